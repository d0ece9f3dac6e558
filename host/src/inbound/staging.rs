//! Writing a message to the spool's staging file as it arrives, so that memory per connection
//! stays at a few hundred KiB whatever the message size (10 concurrent 20 MB messages held
//! whole took the relay from 13 MB to 475 MB of RSS).
//!
//! The file comes from [`Spool::stage`] and goes back in [`Submission::staged`]; the spool
//! fsyncs and renames it at accept, so the `250` still means "on disk". Bytes are gathered up
//! to [`WRITE_AT`] and written on the blocking pool, never on an async worker. Every byte goes
//! through [`Staging::write`], the one place to add a running checksum.
//!
//! [`Submission::staged`]: super::Submission::staged

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Spool, StagedBody};

/// Bytes gathered before a write to the file.
const WRITE_AT: usize = 256 * 1024;

/// A message stays in memory until this much of it has arrived: most mail is smaller, and
/// then costs no extra trips to the blocking pool (the committer writes it as before).
pub(super) const STAGE_AFTER: u64 = 64 * 1024;

/// Where the current message's bytes go.
pub(super) enum Sink {
    /// Not decided yet for this message.
    Undecided,
    /// The spool takes messages in memory (decided once per connection).
    Memory,
    /// A staging file.
    File(Staging),
    /// Staging failed for the message of this number: its bytes are dropped and it is
    /// answered `451`.
    Failed(u64),
}

/// An open staging file.
pub(super) struct Staging {
    /// The session's number of the message being written.
    pub(super) message: u64,
    path: PathBuf,
    /// `None` only if a write task was lost (then every later write fails).
    file: Option<std::fs::File>,
    len: u64,
    pending: Vec<u8>,
}

impl Sink {
    /// Asks the spool for a staging file for message number `message`, off the async workers.
    pub(super) async fn open(spool: &Arc<dyn Spool>, message: u64) -> Sink {
        let spool = spool.clone();
        match tokio::task::spawn_blocking(move || spool.stage()).await {
            Ok(None) => Sink::Memory,
            Ok(Some(Ok((path, file)))) => {
                Sink::File(Staging { message, path, file: Some(file), len: 0, pending: Vec::new() })
            }
            Ok(Some(Err(reason))) => {
                tracing::warn!(%reason, "cannot stage a message body");
                Sink::Failed(message)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot stage a message body");
                Sink::Failed(message)
            }
        }
    }
}

impl Staging {
    /// Appends `bytes`, writing to the file once enough has gathered.
    pub(super) async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.len += bytes.len() as u64;
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= WRITE_AT {
            self.write_pending().await?;
        }
        Ok(())
    }

    /// Writes the gathered bytes on the blocking pool; the buffer comes back for reuse.
    async fn write_pending(&mut self) -> std::io::Result<()> {
        let lost = || std::io::Error::other("the staging write task was lost");
        let mut file = self.file.take().ok_or_else(lost)?;
        let mut pending = std::mem::take(&mut self.pending);
        let (file, pending, written) = tokio::task::spawn_blocking(move || {
            let written = file.write_all(&pending);
            pending.clear();
            (file, pending, written)
        })
        .await
        .map_err(|_| lost())?;
        self.file = Some(file);
        self.pending = pending;
        written
    }

    /// Writes what is left and closes the file.
    pub(super) async fn finish(mut self) -> Result<StagedBody, (std::io::Error, PathBuf)> {
        match self.write_pending().await {
            Ok(()) => Ok(StagedBody { path: self.path, len: self.len }),
            Err(error) => Err((error, self.path)),
        }
    }

    /// Closes and removes the file (a message that was refused or cut off).
    pub(super) async fn discard(self) {
        drop(self.file);
        remove(self.path).await;
    }
}

/// Removes a staging file off the async workers; one already gone is fine.
pub(super) async fn remove(path: PathBuf) {
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((e, path)),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err((error, path))) = removed {
        tracing::warn!(%error, path = %path.display(), "cannot remove a staged message body");
    }
}
