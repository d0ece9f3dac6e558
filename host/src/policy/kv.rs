//! The per-policy persistent key-value store behind the `kv-*` imports.
//!
//! Policies that learn (`tofu`) need memory that survives restarts, but must not get a
//! filesystem. The relay keeps one small map per policy and persists it itself. The store is a
//! trait so that a shared backend can later serve several relay nodes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest key accepted, in bytes.
pub const MAX_KEY: usize = 256;
/// Largest value accepted, in bytes.
pub const MAX_VALUE: usize = 4096;
/// Most keys one policy may hold.
pub const MAX_KEYS: usize = 100_000;

/// A policy's persistent store.
pub trait KvStore: Send + Sync {
    /// Reads a key.
    fn get(&self, key: &str) -> Option<String>;
    /// Writes a key; a no-op when the value is unchanged.
    fn set(&self, key: &str, value: &str) -> Result<(), KvError>;
    /// Removes a key; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool, KvError>;
    /// Every entry, sorted by key.
    fn entries(&self) -> Vec<(String, String)>;
}

/// Why a store operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Key longer than [`MAX_KEY`].
    #[error("key is {0} bytes, the limit is {MAX_KEY}")]
    KeyTooLong(usize),
    /// Value longer than [`MAX_VALUE`].
    #[error("value is {0} bytes, the limit is {MAX_VALUE}")]
    ValueTooLong(usize),
    /// The store holds [`MAX_KEYS`] keys already.
    #[error("the store is full ({MAX_KEYS} keys)")]
    Full,
    /// Reading or writing the backing file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The backing file is not a JSON object of strings.
    #[error("{path}: not a policy state file: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// A store that lives only in memory (tests, `policy explain`).
#[derive(Debug, Default)]
pub struct MemoryKv {
    map: Mutex<BTreeMap<String, String>>,
}

impl KvStore for MemoryKv {
    fn get(&self, key: &str) -> Option<String> {
        lock(&self.map).get(key).cloned()
    }

    fn set(&self, key: &str, value: &str) -> Result<(), KvError> {
        let mut map = lock(&self.map);
        check(&map, key, value)?;
        map.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<bool, KvError> {
        Ok(lock(&self.map).remove(key).is_some())
    }

    fn entries(&self) -> Vec<(String, String)> {
        lock(&self.map).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// A store persisted as one JSON file, rewritten atomically (write, fsync, rename) on every
/// change. Policies write rarely (a new fact about a domain), so whole-file rewrites are cheap
/// and leave no partial state after a crash.
#[derive(Debug)]
pub struct FileKv {
    path: PathBuf,
    map: Mutex<BTreeMap<String, String>>,
}

impl FileKv {
    /// Opens (or creates on first write) the store at `path`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, KvError> {
        let path = path.into();
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| KvError::Corrupt { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(KvError::Io { path, source }),
        };
        Ok(FileKv { path, map: Mutex::new(map) })
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn persist(&self, map: &BTreeMap<String, String>) -> Result<(), KvError> {
        let io = |source| KvError::Io { path: self.path.clone(), source };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        // Serialising a map of strings cannot fail.
        let json = serde_json::to_vec_pretty(map).unwrap_or_default();
        tmp.write_all(&json).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

impl KvStore for FileKv {
    fn get(&self, key: &str) -> Option<String> {
        lock(&self.map).get(key).cloned()
    }

    fn set(&self, key: &str, value: &str) -> Result<(), KvError> {
        let mut map = lock(&self.map);
        if map.get(key).is_some_and(|v| v == value) {
            return Ok(());
        }
        check(&map, key, value)?;
        let previous = map.insert(key.to_owned(), value.to_owned());
        if let Err(e) = self.persist(&map) {
            match previous {
                Some(previous) => map.insert(key.to_owned(), previous),
                None => map.remove(key),
            };
            return Err(e);
        }
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<bool, KvError> {
        let mut map = lock(&self.map);
        if map.remove(key).is_none() {
            return Ok(false);
        }
        self.persist(&map)?;
        Ok(true)
    }

    fn entries(&self) -> Vec<(String, String)> {
        lock(&self.map).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Removes `domain` and every `domain/...` key; returns the removed keys. This is the contract's
/// convention for per-destination state (`postwarden policy state reset DOMAIN`).
pub fn reset_domain(store: &dyn KvStore, domain: &str) -> Result<Vec<String>, KvError> {
    let prefix = format!("{domain}/");
    let mut removed = Vec::new();
    for (key, _) in store.entries() {
        if (key == domain || key.starts_with(&prefix)) && store.delete(&key)? {
            removed.push(key);
        }
    }
    Ok(removed)
}

fn check(map: &BTreeMap<String, String>, key: &str, value: &str) -> Result<(), KvError> {
    if key.len() > MAX_KEY {
        return Err(KvError::KeyTooLong(key.len()));
    }
    if value.len() > MAX_VALUE {
        return Err(KvError::ValueTooLong(value.len()));
    }
    if map.len() >= MAX_KEYS && !map.contains_key(key) {
        return Err(KvError::Full);
    }
    Ok(())
}

/// Locks a map, recovering from poisoning: the maps hold plain data that a panicking writer
/// cannot leave half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_survives_reopen_and_resets_by_domain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tofu.json");
        let kv = FileKv::open(&path).unwrap();
        kv.set("example.com", "verify;1").unwrap();
        kv.set("example.com/mx", "x").unwrap();
        kv.set("example.community", "verify;2").unwrap();
        drop(kv);

        let kv = FileKv::open(&path).unwrap();
        assert_eq!(kv.get("example.com").as_deref(), Some("verify;1"));
        let removed = reset_domain(&kv, "example.com").unwrap();
        assert_eq!(removed, ["example.com", "example.com/mx"]);
        drop(kv);
        let kv = FileKv::open(&path).unwrap();
        assert_eq!(kv.entries(), [("example.community".to_owned(), "verify;2".to_owned())]);
    }

    #[test]
    fn limits_are_enforced() {
        let kv = MemoryKv::default();
        assert!(matches!(kv.set(&"k".repeat(MAX_KEY + 1), "v"), Err(KvError::KeyTooLong(_))));
        assert!(matches!(kv.set("k", &"v".repeat(MAX_VALUE + 1)), Err(KvError::ValueTooLong(_))));
    }

    #[test]
    fn corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "not json").unwrap();
        let err = FileKv::open(&path).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("not a policy state file"), "{err}");
    }
}
