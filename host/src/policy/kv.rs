//! The per-policy persistent key-value store behind the `kv-*` imports.
//!
//! Policies that learn (`tofu`) need memory that survives restarts, but must not get a
//! filesystem. The relay keeps one small map per policy and persists it itself. The store is a
//! trait so that a shared backend can later serve several relay nodes.
//!
//! Durability: a change is in memory (and seen by every later call) as soon as `kv-set` returns,
//! and on disk before the relay acts on the answer of the call that made it (the chain's async
//! entry points wait for [`KvStore::pending`]), and before the store is dropped. The disk work
//! is done behind the calls, by one thread per store, so a call is never held by a write or an
//! fsync, and the changes of many calls (a policy writing 200 keys per decision) share one
//! rewrite.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

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
    /// The changes made so far that are not on disk yet, if any.
    fn pending(&self) -> Option<Pending> {
        None
    }
}

/// Changes on their way to disk.
#[derive(Debug)]
pub struct Pending {
    target: u64,
    done: tokio::sync::watch::Receiver<u64>,
}

impl Pending {
    /// Waits until they are written (or their write failed, which is logged).
    pub async fn wait(mut self) {
        let target = self.target;
        // An error means the writer is gone, and with it anything left to wait for.
        let _ = self.done.wait_for(|done| *done >= target).await;
    }
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

/// A store persisted as one JSON file, rewritten atomically (write, fsync, rename) behind the
/// changes by a thread of its own (see the module's durability note). Whole-file rewrites
/// leave no partial state after a crash.
#[derive(Debug)]
pub struct FileKv {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    state: Mutex<State>,
    /// Signalled on every change, and on stop.
    changed: Condvar,
    /// Signalled after every write.
    written: Condvar,
    /// The last version written, for async waiters.
    done: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    map: BTreeMap<String, String>,
    /// Counts changes.
    version: u64,
    /// The last version written (or whose write failed).
    written: u64,
    stop: bool,
}

impl FileKv {
    /// Opens (or creates on first write) the store at `path`, and starts its writer thread.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, KvError> {
        let path = path.into();
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| KvError::Corrupt { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(KvError::Io { path, source }),
        };
        let shared = Arc::new(Shared {
            path: path.clone(),
            state: Mutex::new(State { map, version: 0, written: 0, stop: false }),
            changed: Condvar::new(),
            written: Condvar::new(),
            done: tokio::sync::watch::Sender::new(0),
        });
        let writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("policy-kv".into())
            .spawn(move || writer.write_behind())
            .map_err(|source| KvError::Io { path, source })?;
        Ok(FileKv { shared, writer: Some(writer) })
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Waits (blocking) until every change made so far is written.
    pub fn flush(&self) {
        let mut state = lock(&self.shared.state);
        let target = state.version;
        while state.written < target {
            state = self.shared.written.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn changed(&self, mut state: std::sync::MutexGuard<'_, State>) {
        state.version += 1;
        drop(state);
        self.shared.changed.notify_one();
    }
}

impl Shared {
    /// The writer thread: waits for changes, writes the latest state, until stopped with
    /// nothing left to write.
    fn write_behind(&self) {
        let mut failed = false;
        loop {
            let (json, version) = {
                let mut state = lock(&self.state);
                while state.version == state.written && !state.stop {
                    state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                if state.version == state.written && !(state.stop && failed) {
                    return;
                }
                // Serialising a map of strings cannot fail.
                (serde_json::to_vec_pretty(&state.map).unwrap_or_default(), state.version)
            };
            failed = match self.persist(&json) {
                Ok(()) => false,
                Err(e) => {
                    // The change stays in memory and the next one rewrites the whole file;
                    // a last attempt is made when the store closes.
                    tracing::error!("policy state not saved: {e}");
                    true
                }
            };
            let mut state = lock(&self.state);
            state.written = version;
            if state.stop && failed {
                // The last attempt failed too: give up rather than loop.
                failed = false;
            }
            drop(state);
            self.written.notify_all();
            self.done.send_replace(version);
        }
    }

    fn persist(&self, json: &[u8]) -> Result<(), KvError> {
        let io = |source| KvError::Io { path: self.path.clone(), source };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(json).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

impl Drop for FileKv {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.changed.notify_one();
        if let Some(writer) = self.writer.take() {
            // The writer writes what is left, then returns; a panic there was logged already.
            let _ = writer.join();
        }
    }
}

impl KvStore for FileKv {
    fn get(&self, key: &str) -> Option<String> {
        lock(&self.shared.state).map.get(key).cloned()
    }

    fn set(&self, key: &str, value: &str) -> Result<(), KvError> {
        let mut state = lock(&self.shared.state);
        if state.map.get(key).is_some_and(|v| v == value) {
            return Ok(());
        }
        check(&state.map, key, value)?;
        state.map.insert(key.to_owned(), value.to_owned());
        self.changed(state);
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<bool, KvError> {
        let mut state = lock(&self.shared.state);
        if state.map.remove(key).is_none() {
            return Ok(false);
        }
        self.changed(state);
        Ok(true)
    }

    fn entries(&self) -> Vec<(String, String)> {
        lock(&self.shared.state).map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn pending(&self) -> Option<Pending> {
        let state = lock(&self.shared.state);
        (state.version > state.written)
            .then(|| Pending { target: state.version, done: self.shared.done.subscribe() })
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

    #[tokio::test(flavor = "current_thread")]
    async fn writes_are_on_disk_once_pending_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("learn.json");
        let kv = FileKv::open(&path).unwrap();
        assert!(kv.pending().is_none());
        for n in 0..200 {
            kv.set(&format!("k{n}"), "v").unwrap();
        }
        // Seen at once by readers, on disk once waited for.
        assert_eq!(kv.get("k199").as_deref(), Some("v"));
        kv.pending().expect("200 changes pending").wait().await;
        let on_disk: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk.len(), 200);
        assert!(kv.pending().is_none());
        kv.delete("k0").unwrap();
        kv.flush();
        let on_disk: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk.len(), 199);
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
