//! Which stored files an upload's data may already be in: each file's
//! sketch (`deltasync_core::tree::sketch`, the smallest of its chunk ids),
//! indexed by id, in memory. Both stores keep one; the connection picks,
//! among the files found, one the client's key may read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Files indexed at most (more are not indexed: an upload then finds
/// fewer files to reuse, never a wrong one).
const MAX_FILES: usize = 1 << 20;
/// Files kept for one id at most (the latest): a chunk that very many
/// files hold (zeros, say) finds a few of them, not all.
const MAX_PER_ID: usize = 32;

/// The sketches of stored files, by id.
#[derive(Default)]
pub struct Sketches(Mutex<Index>);

#[derive(Default)]
struct Index {
    by_id: HashMap<u64, Vec<Arc<str>>>,
    of: HashMap<Arc<str>, Vec<u64>>,
}

impl Index {
    fn remove(&mut self, name: &str) {
        let Some((name, ids)) = self.of.remove_entry(name) else { return };
        for id in ids {
            if let Some(names) = self.by_id.get_mut(&id) {
                names.retain(|n| *n != name);
                if names.is_empty() {
                    self.by_id.remove(&id);
                }
            }
        }
    }
}

impl std::fmt::Debug for Sketches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketches").field("files", &self.lock().of.len()).finish()
    }
}

impl Sketches {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `name`'s sketch is now `sketch` (empty: it has none).
    pub fn set(&self, name: &str, sketch: &[u64]) {
        let mut ix = self.lock();
        if ix.of.get(name).is_some_and(|s| s == sketch) {
            return;
        }
        ix.remove(name);
        if sketch.is_empty() || ix.of.len() >= MAX_FILES {
            return;
        }
        let name: Arc<str> = name.into();
        for &id in sketch {
            let names = ix.by_id.entry(id).or_default();
            if names.len() >= MAX_PER_ID {
                names.remove(0);
            }
            names.push(name.clone());
        }
        ix.of.insert(name, sketch.to_vec());
    }

    /// `name` is gone.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Forgets every file but those `keep` says are still stored.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut ix = self.lock();
        let gone: Vec<Arc<str>> = ix.of.keys().filter(|n| !keep(n)).cloned().collect();
        for name in gone {
            ix.remove(&name);
        }
    }

    /// The files whose sketches share ids with `sketch`, and how many.
    pub fn find(&self, sketch: &[u64]) -> Vec<(String, u32)> {
        let ix = self.lock();
        let mut hits: HashMap<&Arc<str>, u32> = HashMap::new();
        for id in sketch {
            for name in ix.by_id.get(id).into_iter().flatten() {
                *hits.entry(name).or_default() += 1;
            }
        }
        hits.into_iter().map(|(n, h)| (n.to_string(), h)).collect()
    }

    /// Whether no file is indexed.
    pub fn is_empty(&self) -> bool {
        self.lock().of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_found_by_shared_ids_and_forgotten() {
        let s = Sketches::default();
        s.set("a", &[1, 2, 3, 4]);
        s.set("b", &[3, 4, 5, 6]);
        let mut found = s.find(&[4, 5, 9]);
        found.sort();
        assert_eq!(found, [("a".to_string(), 1), ("b".to_string(), 2)]);
        s.set("b", &[7]);
        assert_eq!(s.find(&[5]), []);
        s.remove("a");
        assert_eq!(s.find(&[1, 2, 3]), []);
        assert!(!s.is_empty());
        s.remove("b");
        assert!(s.is_empty());
    }
}
