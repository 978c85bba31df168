//! What a key may do: the server looks a key up by its id ([`Keys`]) and
//! checks every request against the key's [`Access`].

use crate::channel::{KEY_ID_LEN, SECRET_LEN};
use alloc::string::String;
use alloc::vec::Vec;

/// A request, as permissions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `List`, `Download`, and `Stat` (also allowed to writers, who stat a
    /// name before they upload it).
    Read,
    /// `Upload`.
    Write,
    /// `Delete`.
    Delete,
}

/// A key's permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The key's name (for logs, the dashboard and metrics).
    pub key: String,
    /// May list, stat and download.
    pub read: bool,
    /// May upload.
    pub write: bool,
    /// May delete.
    pub delete: bool,
    /// The name prefixes it may touch, as directories (`devices/7` covers
    /// `devices/7/log`, not `devices/70`); empty means every name.
    pub prefixes: Vec<String>,
}

impl Access {
    /// Everything, for the key `key`.
    pub fn full(key: &str) -> Access {
        Access { key: key.into(), read: true, write: true, delete: true, prefixes: Vec::new() }
    }

    /// Whether `name` lies under one of the key's prefixes. An empty prefix
    /// (or `/`) covers nothing: only an empty list means every name, so a
    /// prefix made from an unset variable cannot widen a key.
    pub fn covers(&self, name: &str) -> bool {
        self.prefixes.is_empty()
            || self.prefixes.iter().any(|p| {
                let p = p.trim_end_matches('/');
                !p.is_empty()
                    && name.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }

    /// Whether directory `dir` lies on the way to one of the key's prefixes
    /// (`devices` leads to `devices/7`): listings show it, though the key
    /// covers only part of what it holds.
    pub fn leads_to(&self, dir: &str) -> bool {
        self.prefixes.iter().any(|p| {
            let p = p.trim_end_matches('/');
            p.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Checks a prefix as a key file may hold it: a valid name (see
    /// [`crate::message::validate_name`]), with at most a trailing `/`.
    pub fn check_prefix(prefix: &str) -> Result<(), crate::error::ErrorCode> {
        crate::message::validate_name(prefix.strip_suffix('/').unwrap_or(prefix))
    }

    /// Whether the key may perform `op` on `name`.
    pub fn allows(&self, op: Operation, name: &str) -> bool {
        let granted = match op {
            Operation::Read => self.read,
            Operation::Write => self.write,
            Operation::Delete => self.delete,
        };
        granted && self.covers(name)
    }
}

/// The server's keys.
pub trait Keys {
    /// The secret and permissions of the key with this id, if it exists and
    /// is not revoked.
    fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<([u8; SECRET_LEN], Access)>;
}

impl<K: Keys + ?Sized> Keys for &K {
    fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<([u8; SECRET_LEN], Access)> {
        (**self).find(id)
    }
}

impl<K: Keys + ?Sized> Keys for alloc::sync::Arc<K> {
    fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<([u8; SECRET_LEN], Access)> {
        (**self).find(id)
    }
}

/// A fixed list of keys (tests, simulations).
impl Keys for Vec<(crate::channel::ClientKey, Access)> {
    fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<([u8; SECRET_LEN], Access)> {
        self.iter().find(|(k, _)| &k.id == id).map(|(k, a)| (k.secret, a.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn prefixes_are_directories() {
        let a = Access { prefixes: vec!["devices/7/".to_string()], ..Access::full("d7") };
        assert!(a.allows(Operation::Write, "devices/7/log"));
        assert!(a.allows(Operation::Write, "devices/7"));
        assert!(!a.allows(Operation::Write, "devices/70/log"));
        assert!(!a.allows(Operation::Write, "devices/8/log"));
        assert!(!a.allows(Operation::Write, "devices"));
        for empty in ["", "/", "//"] {
            let e = Access { prefixes: vec![empty.to_string()], ..Access::full("e") };
            assert!(!e.allows(Operation::Read, "x"), "{empty:?} covers nothing");
            assert!(Access::check_prefix(empty).is_err());
        }
        assert!(Access::check_prefix("devices/7/").is_ok());
        assert!(Access::check_prefix("../x").is_err());
        let ro = Access { write: false, delete: false, ..Access::full("ro") };
        assert!(ro.allows(Operation::Read, "x"));
        assert!(!ro.allows(Operation::Write, "x"));
        assert!(!ro.allows(Operation::Delete, "x"));
    }
}
