//! Group commit: accepted messages are written by one thread, in batches, so that concurrent
//! accepts share directory fsyncs and no async worker ever waits for the disk.
//!
//! Why: a durable accept is two files, each fsync'd, renamed and followed by an fsync of its
//! directory: four fsyncs a message, each a device flush. Under load many SMTP sessions finish
//! DATA at once; the committer takes every message waiting, writes and fsyncs all their files,
//! renames them in and fsyncs each directory once ([`QueueStore::insert_batch`]). Nobody waits
//! for a timer: while one batch is on its way to the disk, the next one gathers. Each sender
//! gets its answer only when its own message is durable, so the 250 after DATA still means
//! "on disk".

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::store::{BodySource, Envelope, QueueStore, StoreError};

/// Most messages written in one batch.
const MAX_BATCH: usize = 256;

struct Request {
    envelope: Envelope,
    body: NewBody,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A new message's body, as handed to the committer.
#[derive(Debug)]
pub enum NewBody {
    /// In memory.
    Bytes(Vec<u8>),
    /// Written to a file from [`QueueStore::stage_body`] as it arrived.
    Staged(std::path::PathBuf),
}

impl NewBody {
    /// The body as the store takes it.
    pub fn source(&self) -> BodySource<'_> {
        match self {
            NewBody::Bytes(bytes) => BodySource::Bytes(bytes),
            NewBody::Staged(path) => BodySource::Staged(path),
        }
    }
}

/// The handle accepts go through; the thread ends when the last handle is dropped.
pub struct Committer {
    requests: mpsc::Sender<Request>,
}

impl Committer {
    /// Starts the committer thread over `store`.
    pub fn start(store: Arc<dyn QueueStore>) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("queue-commit".to_owned())
            .spawn(move || run(store.as_ref(), &incoming))?;
        Ok(Committer { requests })
    }

    /// Stores `envelope` and `body` durably; returns once they are on disk.
    pub async fn insert(&self, envelope: Envelope, body: NewBody) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(Request { envelope, body, done })
            .map_err(|_| StoreError::Task("the queue committer has stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError::Task("the queue committer dropped a message".to_owned()))?
    }
}

fn run(store: &dyn QueueStore, incoming: &mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = incoming.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match incoming.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let items: Vec<(&Envelope, BodySource<'_>)> =
            batch.iter().map(|r| (&r.envelope, r.body.source())).collect();
        let results = store.insert_batch(&items);
        drop(items);
        for (request, result) in batch.drain(..).zip(results) {
            // The session may have gone away meanwhile; the message is stored either way.
            let _ = request.done.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::{Recipient, RecipientState, SpoolDir};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_accepts_are_all_durable_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn QueueStore> = Arc::new(SpoolDir::open(dir.path()).unwrap());
        let committer = Arc::new(Committer::start(store).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..100u64 {
            let committer = committer.clone();
            tasks.spawn(async move {
                let envelope = Envelope {
                    id: SpoolDir::new_id(),
                    mail_from: "a@example.org".into(),
                    rcpts: vec![Recipient {
                        address: format!("r{n}@example.com"),
                        state: RecipientState::Pending,
                        last: None,
                        tls_log: String::new(),
                    }],
                    created: n,
                    attempts: 0,
                    next_attempt: 0,
                    requiretls: false,
                    tls_required_no: false,
                    authenticated: false,
                    smtputf8: false,
                    warned: false,
                    body_len: None,
                    body_sha256: None,
                };
                let body = NewBody::Bytes(format!("body {n}").into_bytes());
                committer.insert(envelope.clone(), body).await?;
                Ok::<_, StoreError>(envelope)
            });
        }
        let mut answered = Vec::new();
        while let Some(done) = tasks.join_next().await {
            answered.push(done.unwrap().unwrap());
        }
        drop(committer);
        // Read back through a fresh handle (the committer thread may still hold the lock).
        let spool = SpoolDir::inspect(dir.path());
        assert_eq!(spool.list().unwrap().len(), 100);
        for e in &answered {
            assert_eq!(&spool.envelope(&e.id).unwrap(), e);
            assert_eq!(spool.body(&e.id).unwrap(), format!("body {}", e.created).into_bytes());
        }
    }
}
