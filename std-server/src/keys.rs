//! The server's key file: one entry per client or device, with its secret
//! and permissions (TOML, owner-only). [`KeyRing`] serves lookups and
//! re-reads the file when it changes, so keys added or revoked take effect
//! for new connections without a restart.

use deltasync_core::access::{Access, Keys};
use deltasync_core::channel::{ClientKey, KEY_ID_LEN, KeyError, SECRET_LEN};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One key as the file stores it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Unique name (logs, dashboard, metrics).
    pub name: String,
    /// 16 hexadecimal digits, sent in clear by the client.
    pub id: String,
    /// 64 hexadecimal digits: the 256-bit secret.
    pub secret: String,
    /// May list, stat and download.
    #[serde(default)]
    pub read: bool,
    /// May upload.
    #[serde(default)]
    pub write: bool,
    /// May delete.
    #[serde(default)]
    pub delete: bool,
    /// May open the dashboard (its secret is then the dashboard's login).
    #[serde(default)]
    pub dashboard: bool,
    /// Name prefixes it may touch (directories); empty: every name.
    #[serde(default)]
    pub prefixes: Vec<String>,
}

/// Everything but the secret.
impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

/// Why the key file could not be used.
#[derive(Debug)]
pub enum KeyFileError {
    /// Reading or writing it failed.
    Io(PathBuf, std::io::Error),
    /// It is not valid TOML of the expected shape.
    Parse(PathBuf, String),
    /// An entry is unusable.
    Entry(PathBuf, String, KeyError),
    /// Two entries share a name or an id.
    Duplicate(PathBuf, String),
    /// No key has that name.
    NoSuchKey(String),
    /// A key with that name exists already.
    Exists(String),
    /// A prefix is not a valid name.
    BadPrefix(String),
    /// Other users may read or write it.
    Exposed(PathBuf, u32),
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Io(p, e) => write!(f, "key file {}: {e}", p.display()),
            KeyFileError::Parse(p, e) => write!(f, "key file {}: {e}", p.display()),
            KeyFileError::Entry(p, name, e) => write!(f, "key file {}: key {name:?}: {e}", p.display()),
            KeyFileError::Duplicate(p, what) => write!(f, "key file {}: {what} appears twice", p.display()),
            KeyFileError::NoSuchKey(n) => write!(f, "no key named {n:?}"),
            KeyFileError::Exists(n) => write!(f, "a key named {n:?} exists already"),
            KeyFileError::BadPrefix(p) => {
                write!(f, "prefix {p:?} is not a name (a directory such as devices/7; no '..', not empty)")
            }
            KeyFileError::Exposed(p, mode) => write!(
                f,
                "key file {} has mode {mode:03o}: other users could read the secrets or add keys; \
                 `chmod 600 {}`",
                p.display(),
                p.display()
            ),
        }
    }
}

impl std::error::Error for KeyFileError {}

impl KeyEntry {
    /// The client key (id and secret) of this entry, checked.
    pub fn client_key(&self) -> Result<ClientKey, KeyError> {
        ClientKey::parse(&format!("{}{}-{}", deltasync_core::channel::KEY_PREFIX, self.id, self.secret))
    }

    /// A device's entry: it may upload (and stat) under `prefix` only.
    pub fn device(name: &str, key: &ClientKey, prefix: &str) -> KeyEntry {
        KeyEntry {
            read: false,
            delete: false,
            prefixes: vec![prefix.to_string()],
            ..KeyEntry::with_key(name, key)
        }
    }

    /// Its permissions, as the protocol checks them.
    pub fn access(&self) -> Access {
        Access {
            key: self.name.clone(),
            read: self.read,
            write: self.write,
            delete: self.delete,
            prefixes: self.prefixes.clone(),
        }
    }

    /// A new full-access entry with a fresh random id and secret.
    pub fn generate(name: &str) -> KeyEntry {
        KeyEntry::with_key(name, &ClientKey { id: rand::random(), secret: rand::random() })
    }

    /// A full-access entry named `name` for `key`.
    pub fn with_key(name: &str, key: &ClientKey) -> KeyEntry {
        KeyEntry {
            name: name.to_string(),
            id: hex_string(&key.id),
            secret: hex_string(&key.secret),
            read: true,
            write: true,
            delete: true,
            dashboard: false,
            prefixes: Vec::new(),
        }
    }

    /// What it may do, in a few words (`key list`).
    pub fn describe(&self) -> String {
        let mut perms: Vec<&str> = Vec::new();
        for (on, word) in [
            (self.read, "read"),
            (self.write, "write"),
            (self.delete, "delete"),
            (self.dashboard, "dashboard"),
        ] {
            if on {
                perms.push(word);
            }
        }
        let perms = if perms.is_empty() { "nothing".to_string() } else { perms.join(",") };
        let scope = if self.prefixes.is_empty() { "every name".to_string() } else { self.prefixes.join(" ") };
        format!("{}\t{}\t{perms}\t{scope}", self.name, self.id)
    }
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads and checks every entry of the key file at `path`, which only its
/// owner may read or write (as ssh wants of its keys).
pub fn load(path: &Path) -> Result<Vec<KeyEntry>, KeyFileError> {
    let io = |e| KeyFileError::Io(path.into(), e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mode = f.metadata().map_err(io)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed(path.into(), mode));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).map_err(io)?;
    // toml's full error text quotes the offending line, which may hold a
    // secret: only the message and the place.
    let file: KeyFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| text[..s.start.min(text.len())].lines().count().max(1));
        KeyFileError::Parse(path.into(), format!("line {line}: {}", e.message()))
    })?;
    let mut names = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for k in &file.key {
        k.client_key().map_err(|e| KeyFileError::Entry(path.into(), k.name.clone(), e))?;
        if !names.insert(k.name.clone()) {
            return Err(KeyFileError::Duplicate(path.into(), format!("name {:?}", k.name)));
        }
        if !ids.insert(k.id.to_ascii_lowercase()) {
            return Err(KeyFileError::Duplicate(path.into(), format!("id {}", k.id)));
        }
        check_prefixes(&k.prefixes)?;
    }
    Ok(file.key)
}

/// Refuses prefixes that are not names (an empty one would be easy to
/// mistake for "everything").
pub fn check_prefixes(prefixes: &[String]) -> Result<(), KeyFileError> {
    match prefixes.iter().find(|p| Access::check_prefix(p).is_err()) {
        Some(p) => Err(KeyFileError::BadPrefix(p.clone())),
        None => Ok(()),
    }
}

/// Writes `keys` to `path` atomically (a temporary file renamed over it),
/// readable by its owner only.
pub fn save(path: &Path, keys: &[KeyEntry]) -> Result<(), KeyFileError> {
    let io = |e| KeyFileError::Io(path.into(), e);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = toml::to_string(&KeyFile { key: keys.to_vec() })
        .map_err(|e| KeyFileError::Parse(path.into(), e.to_string()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("keys");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(b"# deltasync-server keys: edit with `deltasync-server key add|list|revoke`.\n")
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Holds an exclusive lock beside the key file while it is read, changed
/// and written, so that two `key add`/`key revoke` at once lose nothing.
fn locked<T>(path: &Path, f: impl FnOnce() -> Result<T, KeyFileError>) -> Result<T, KeyFileError> {
    let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
    lock_name.push(".lock");
    let lock_path = path.with_file_name(lock_name);
    let io = |e| KeyFileError::Io(lock_path.clone(), e);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    lock.lock().map_err(io)?;
    f()
}

/// Adds `entry` to the file at `path` (created if missing).
pub fn add(path: &Path, entry: KeyEntry) -> Result<(), KeyFileError> {
    check_prefixes(&entry.prefixes)?;
    locked(path, || {
        let mut keys = if path.exists() { load(path)? } else { Vec::new() };
        if keys.iter().any(|k| k.name == entry.name) {
            return Err(KeyFileError::Exists(entry.name));
        }
        keys.push(entry);
        save(path, &keys)
    })
}

/// Removes the key named `name`.
pub fn revoke(path: &Path, name: &str) -> Result<(), KeyFileError> {
    locked(path, || revoke_unlocked(path, name))
}

fn revoke_unlocked(path: &Path, name: &str) -> Result<(), KeyFileError> {
    let mut keys = load(path)?;
    let before = keys.len();
    keys.retain(|k| k.name != name);
    if keys.len() == before {
        return Err(KeyFileError::NoSuchKey(name.to_string()));
    }
    save(path, &keys)
}

/// Creates the directory of a new key file owner-only, if it is missing (an
/// existing directory is left as it is).
pub fn private_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
}

/// What identifies one version of the file: a rewrite renames a new inode
/// over it; an edit in place or a chmod changes its status-change time
/// (nanoseconds here), size or mode.
type Stamp = (u64, u64, i64, i64, u64, u32);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec(), m.size(), m.mode()))
}

struct Loaded {
    stamp: Option<Stamp>,
    keys: Arc<Vec<(ClientKey, KeyEntry)>>,
}

/// The keys of a running server: the key file, re-read whenever it changes.
/// A file that cannot be read or parsed grants nothing until it is fixed
/// (fail closed: a half-edited file must not keep a revoked key alive).
pub struct KeyRing {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl KeyRing {
    /// The keys in `path`, which must load now.
    pub fn open(path: &Path) -> Result<KeyRing, KeyFileError> {
        let stamp = stamp(path);
        let keys = parse_all(load(path)?);
        Ok(KeyRing { path: path.into(), loaded: Mutex::new(Loaded { stamp, keys: Arc::new(keys) }) })
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys as of now (re-read if the file changed).
    pub fn current(&self) -> Arc<Vec<(ClientKey, KeyEntry)>> {
        let now = stamp(&self.path);
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if now != l.stamp {
            l.stamp = now;
            l.keys = Arc::new(match load(&self.path) {
                Ok(keys) => {
                    tracing::info!(path = %self.path.display(), keys = keys.len(), "key file reloaded");
                    parse_all(keys)
                }
                Err(e) => {
                    tracing::error!(error = %e, "key file unusable: refusing every key until it is fixed");
                    Vec::new()
                }
            });
        }
        l.keys.clone()
    }

    /// The entry whose secret is `secret` (a dashboard login) and that has
    /// the dashboard permission. Compared in constant time.
    pub fn dashboard_login(&self, presented: &str) -> Option<String> {
        let given = ClientKey::parse(presented).ok()?;
        self.current()
            .iter()
            .find(|(k, e)| e.dashboard && k.id == given.id && ct_eq(&k.secret, &given.secret))
            .map(|(_, e)| e.name.clone())
    }
}

fn parse_all(entries: Vec<KeyEntry>) -> Vec<(ClientKey, KeyEntry)> {
    entries.into_iter().filter_map(|e| Some((e.client_key().ok()?, e))).collect()
}

/// Equality of two secrets in constant time.
fn ct_eq(a: &[u8; SECRET_LEN], b: &[u8; SECRET_LEN]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

impl Keys for KeyRing {
    fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<([u8; SECRET_LEN], Access)> {
        self.current().iter().find(|(k, _)| &k.id == id).map(|(k, e)| (k.secret, e.access()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_and_revoked_keys_take_effect_on_the_next_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let admin = KeyEntry::generate("admin");
        add(&path, admin.clone()).unwrap();
        let ring = KeyRing::open(&path).unwrap();
        let admin_key = admin.client_key().unwrap();
        assert_eq!(ring.find(&admin_key.id).unwrap().1.key, "admin");
        let dev = KeyEntry { prefixes: vec!["devices/7".into()], read: false, ..KeyEntry::generate("dev7") };
        add(&path, dev.clone()).unwrap();
        let dev_key = dev.client_key().unwrap();
        let (secret, access) = ring.find(&dev_key.id).expect("added without a restart");
        assert_eq!(secret, dev_key.secret);
        assert!(access.allows(deltasync_core::access::Operation::Write, "devices/7/log"));
        assert!(matches!(add(&path, KeyEntry::generate("dev7")), Err(KeyFileError::Exists(_))));
        revoke(&path, "dev7").unwrap();
        assert!(ring.find(&dev_key.id).is_none(), "revoked without a restart");
        assert!(ring.find(&admin_key.id).is_some());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A file others can read grants nothing, nor does a broken one.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ring.find(&admin_key.id).is_none());
        assert!(matches!(load(&path), Err(KeyFileError::Exposed(_, 0o644))));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ring.find(&admin_key.id).is_some());
        let secret = admin.secret.clone();
        std::fs::write(&path, format!("[[key]]\nname = \"x\"\nsecret = \"{secret}\" junk\n")).unwrap();
        assert!(ring.find(&admin_key.id).is_none());
        let err = load(&path).unwrap_err().to_string();
        assert!(!err.contains(&secret), "the error quotes the secret: {err}");
        // Prefixes must be names.
        for bad in ["", "/", "../x"] {
            let e = KeyEntry { prefixes: vec![bad.into()], ..KeyEntry::generate("bad") };
            assert!(matches!(add(&path, e), Err(KeyFileError::BadPrefix(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_weak_secret_is_refused_with_the_way_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let weak = KeyEntry { secret: "0011223344556677".into(), ..KeyEntry::generate("weak") };
        std::fs::write(&path, toml::to_string(&KeyFile { key: vec![weak] }).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("64 bits") && err.contains("deltasync-server key add"), "{err}");
    }

    #[test]
    fn dashboard_logins_need_the_dashboard_permission() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let admin = KeyEntry::generate("admin");
        let dash = KeyEntry {
            read: false,
            write: false,
            delete: false,
            dashboard: true,
            ..KeyEntry::generate("dash")
        };
        add(&path, admin.clone()).unwrap();
        add(&path, dash.clone()).unwrap();
        let ring = KeyRing::open(&path).unwrap();
        let s = |e: &KeyEntry| e.client_key().unwrap().encode().to_string();
        assert_eq!(ring.dashboard_login(&s(&dash)).as_deref(), Some("dash"));
        assert_eq!(ring.dashboard_login(&s(&admin)), None, "a protocol key is no dashboard login");
        assert_eq!(ring.dashboard_login("dsk1-garbage"), None);
    }
}
