//! The queue: durable storage of accepted messages, the retry schedule, and DSNs.
//!
//! # Layout
//! - [`store`]: the spool directory behind the [`store::QueueStore`] trait (fsync + rename).
//! - [`dsn`]: RFC 3464 bounces and delay warnings.
//! - [`schedule`]: the in-memory index of what is due when.
//! - [`commit`]: group commit of accepted messages.
//! - this module: [`Queue`]: accepting (durably), the scheduler loop, per-recipient outcomes,
//!   exponential backoff, the maximal lifetime.

pub mod commit;
pub mod dsn;
pub mod schedule;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use self::commit::{Committer, NewBody};
use self::schedule::Schedule;
use self::store::{Envelope, QueueStore, Recipient, RecipientState, StoreError, now};
use crate::delivery::{Deliverer, Message, Status};
use crate::policy::ChainHandle;

/// Retry and lifetime settings (Postfix-like defaults).
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// First retry delay (Postfix `minimal_backoff_time`, 300 s).
    pub min_backoff: Duration,
    /// Longest retry delay (Postfix `maximal_backoff_time`, 4000 s).
    pub max_backoff: Duration,
    /// After this, pending recipients bounce (Postfix `maximal_queue_lifetime`, 5 days).
    pub max_lifetime: Duration,
    /// Send a delay warning once a message has waited this long (`None`: never).
    pub delay_warning: Option<Duration>,
    /// Messages delivered at the same time.
    pub concurrency: usize,
    /// Deliveries to one destination domain at the same time (Postfix's
    /// `default_destination_concurrency_limit`, 20).
    pub per_destination: usize,
    /// The name in DSNs' `Reporting-MTA`.
    pub hostname: String,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            min_backoff: Duration::from_secs(300),
            max_backoff: Duration::from_secs(4000),
            max_lifetime: Duration::from_secs(5 * 86_400),
            delay_warning: None,
            concurrency: 20,
            per_destination: 20,
            hostname: "localhost".to_owned(),
        }
    }
}

/// A message to accept.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// Reverse-path (empty: null sender).
    pub mail_from: String,
    /// Recipients.
    pub rcpts: Vec<String>,
    /// Headers and body, CRLF (empty when `staged` is set).
    pub body: Vec<u8>,
    /// The headers and body are in this file from [`QueueStore::stage_body`] instead (the
    /// inbound server wrote it as the message arrived); the queue takes it over.
    pub staged: Option<std::path::PathBuf>,
    /// REQUIRETLS.
    pub requiretls: bool,
    /// `TLS-Required: No`.
    pub tls_required_no: bool,
    /// The submitter logged in with SMTP AUTH.
    pub authenticated: bool,
}

/// The queue and its scheduler.
pub struct Queue {
    store: Arc<dyn QueueStore>,
    options: QueueOptions,
    wake: Notify,
    recent: std::sync::Mutex<std::collections::VecDeque<Attempted>>,
    /// Counters for `/metrics`.
    pub counters: Counters,
    destinations: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
    schedule: std::sync::Mutex<Schedule>,
    /// `None` only if its thread could not be started; accepts then write one by one.
    committer: Option<Committer>,
}

/// How often the scheduler re-reads the whole spool (changes made by `postwarden queue` from
/// another process are seen within this).
const SCAN_INTERVAL: Duration = Duration::from_secs(60);

/// Queue counters, exported as Prometheus metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages accepted (fsync'd).
    pub accepted: std::sync::atomic::AtomicU64,
    /// Recipients delivered over verified TLS.
    pub delivered_tls_verified: std::sync::atomic::AtomicU64,
    /// Recipients delivered over unverified TLS.
    pub delivered_tls_unverified: std::sync::atomic::AtomicU64,
    /// Recipients delivered in plaintext.
    pub delivered_plaintext: std::sync::atomic::AtomicU64,
    /// Recipient attempts deferred.
    pub deferred: std::sync::atomic::AtomicU64,
    /// Recipients bounced.
    pub bounced: std::sync::atomic::AtomicU64,
}

/// The outcome of one recipient's delivery attempt, kept in memory for status reports (the
/// demo's table, the admin listener).
#[derive(Clone, Debug)]
pub struct Attempted {
    /// Queue id.
    pub id: String,
    /// Recipient.
    pub rcpt: String,
    /// Attempt number.
    pub attempt: u32,
    /// What happened.
    pub status: Status,
    /// The TLS log field of the attempt.
    pub tls_log: String,
}

/// How many [`Attempted`] records are kept.
const RECENT: usize = 10_000;

impl Queue {
    /// A queue over `store`.
    pub fn new(store: Arc<dyn QueueStore>, options: QueueOptions) -> Arc<Self> {
        let committer = Committer::start(store.clone())
            .map_err(|e| tracing::error!("no group commit (cannot start its thread): {e}"))
            .ok();
        Arc::new(Queue {
            store,
            options,
            wake: Notify::new(),
            recent: Default::default(),
            counters: Counters::default(),
            destinations: Default::default(),
            schedule: Default::default(),
            committer,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn QueueStore> {
        &self.store
    }

    /// The most recent attempt outcomes, oldest first.
    pub fn recent(&self) -> Vec<Attempted> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Stores a message durably and wakes the scheduler. Returns the queue id only once the
    /// message is on disk (fsync'd): the caller may then say 250. The disk work goes through
    /// the group committer, shared with the other messages being accepted at the same time.
    pub async fn accept_durably(&self, message: NewMessage) -> Result<String, StoreError> {
        let (envelope, body) = Self::envelope(message);
        let id = envelope.id.clone();
        match &self.committer {
            Some(committer) => committer.insert(envelope, body).await?,
            None => {
                self.blocking(move |store| {
                    store.insert_batch(&[(&envelope, body.source())]).pop().unwrap_or(Ok(()))
                })
                .await?
            }
        }
        Ok(self.accepted(id))
    }

    /// Counts, schedules and announces a message now on disk.
    fn accepted(&self, id: String) -> String {
        self.counters.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.schedule).set(&id, 0);
        self.wake.notify_one();
        id
    }

    /// A new message's envelope: every recipient pending, due now.
    fn envelope(message: NewMessage) -> (Envelope, NewBody) {
        let id = store::SpoolDir::new_id();
        let envelope = Envelope {
            id: id.clone(),
            mail_from: message.mail_from,
            rcpts: message
                .rcpts
                .into_iter()
                .map(|address| Recipient {
                    address,
                    state: RecipientState::Pending,
                    last: None,
                    tls_log: String::new(),
                })
                .collect(),
            created: now(),
            attempts: 0,
            next_attempt: 0,
            requiretls: message.requiretls,
            tls_required_no: message.tls_required_no,
            authenticated: message.authenticated,
            warned: false,
        };
        let body = match message.staged {
            Some(path) => NewBody::Staged(path),
            None => NewBody::Bytes(message.body),
        };
        (envelope, body)
    }

    /// A new file in the spool for a body still arriving (see [`QueueStore::stage_body`]);
    /// blocking: call it off the async workers.
    pub fn stage_body(&self) -> Option<Result<(std::path::PathBuf, std::fs::File), StoreError>> {
        self.store.stage_body()
    }

    /// Makes every message due now (`postwarden queue retry` and tests).
    pub fn retry_all(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for mut envelope in self.store.list()? {
            envelope.next_attempt = 0;
            self.store.update(&envelope)?;
            lock(&self.schedule).set(&envelope.id, 0);
            n += 1;
        }
        self.wake.notify_one();
        Ok(n)
    }

    /// Runs the scheduler until `shutdown` turns true: due messages are delivered, up to
    /// `concurrency` at a time; in-flight deliveries finish before it returns.
    pub async fn run(
        self: Arc<Self>,
        deliverer: Arc<Deliverer>,
        chains: Arc<ChainHandle>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        let mut in_flight = tokio::task::JoinSet::new();
        let busy: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
        let mut next_scan = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if tokio::time::Instant::now() >= next_scan {
                self.scan().await;
                next_scan = tokio::time::Instant::now() + SCAN_INTERVAL;
            }
            let t = now();
            loop {
                let Some(id) = lock(&self.schedule).pop_due(t) else { break };
                // A message being delivered is rescheduled by its own task when it finishes.
                if !lock(&busy).insert(id.clone()) {
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let (queue, deliverer, chains, busy) =
                    (self.clone(), deliverer.clone(), chains.clone(), busy.clone());
                in_flight.spawn(async move {
                    // The index is a hint: another task may have finished this message (removed
                    // it, or rescheduled it) since, or `postwarden queue` changed it. Only the
                    // stored envelope counts, or a message could be delivered twice.
                    // One trip to the blocking pool reads both envelope and body.
                    let read = id.clone();
                    let due = queue
                        .blocking(move |store| {
                            let fresh = store.envelope(&read)?;
                            let body = (fresh.next_attempt <= now()).then(|| store.body(&read));
                            Ok((fresh, body))
                        })
                        .await;
                    match due {
                        Ok((fresh, Some(Ok(body)))) => {
                            queue.attempt(fresh, body, &deliverer, &chains).await;
                        }
                        Ok((_, Some(Err(e)))) => tracing::error!(%id, "cannot read message: {e}"),
                        Ok((fresh, None)) => lock(&queue.schedule).set(&id, fresh.next_attempt),
                        Err(StoreError::NotFound(_)) => {}
                        Err(e) => tracing::error!(%id, "cannot read envelope: {e}"),
                    }
                    lock(&busy).remove(&id);
                    drop(permit);
                });
            }
            while in_flight.try_join_next().is_some() {}
            let until_next = lock(&self.schedule)
                .next()
                .map_or(SCAN_INTERVAL, |at| Duration::from_secs(at.saturating_sub(now())));
            let wake_at = (tokio::time::Instant::now() + until_next).min(next_scan);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = shutdown.changed() => {}
            }
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// Reads the whole spool into the schedule. Entries are merged, never dropped, so that a
    /// message accepted while the spool was being read keeps its place.
    async fn scan(&self) {
        match self.blocking(|store| store.list()).await {
            Ok(list) => {
                let mut schedule = lock(&self.schedule);
                for envelope in list {
                    schedule.set(&envelope.id, envelope.next_attempt);
                }
            }
            Err(e) => tracing::error!("queue scan failed: {e}"),
        }
    }

    /// Runs a store operation off the async workers: it may wait for fsync.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn QueueStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(store.as_ref()))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())))
    }

    /// One delivery attempt of one message, recipients grouped by domain.
    async fn attempt(
        &self,
        mut envelope: Envelope,
        body: Vec<u8>,
        deliverer: &Deliverer,
        chains: &ChainHandle,
    ) {
        envelope.attempts += 1;
        let age = now().saturating_sub(envelope.created);
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in envelope.pending() {
            let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d).to_ascii_lowercase();
            by_domain.entry(domain).or_default().push(r.address.clone());
        }
        let chain = chains.current();
        let message = Message {
            mail_from: &envelope.mail_from,
            body: &body,
            requiretls: envelope.requiretls,
            tls_required_no: envelope.tls_required_no,
            authenticated: envelope.authenticated,
            attempt: envelope.attempts,
            age,
        };
        let mut results = Vec::new();
        for (domain, rcpts) in &by_domain {
            let slot = self.destination(domain);
            let Ok(_permit) = slot.acquire().await else { continue };
            let outcome = deliverer.deliver(&chain, &message, domain, rcpts).await;
            tracing::info!(id = %envelope.id, domain, tls = %outcome.tls_log, "delivery attempt");
            results.push(outcome);
        }
        let mut bounced = Vec::new();
        for outcome in results {
            for r in outcome.recipients {
                self.remember(Attempted {
                    id: envelope.id.clone(),
                    rcpt: r.rcpt.clone(),
                    attempt: envelope.attempts,
                    status: r.status.clone(),
                    tls_log: outcome.tls_log.clone(),
                });
                let Some(entry) = envelope.rcpts.iter_mut().find(|e| e.address == r.rcpt) else {
                    continue;
                };
                entry.tls_log = outcome.tls_log.clone();
                let counter = match &r.status {
                    Status::Delivered { tls: Some(t), .. } if t.verified => {
                        &self.counters.delivered_tls_verified
                    }
                    Status::Delivered { tls: Some(_), .. } => {
                        &self.counters.delivered_tls_unverified
                    }
                    Status::Delivered { tls: None, .. } => &self.counters.delivered_plaintext,
                    Status::Deferred { .. } => &self.counters.deferred,
                    Status::Bounced { .. } => &self.counters.bounced,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match r.status {
                    Status::Delivered { mx, reply, .. } => {
                        entry.state = RecipientState::Delivered;
                        entry.last = Some(("2.0.0".into(), format!("delivered to {mx}: {reply}")));
                    }
                    Status::Bounced { code, reason } => {
                        entry.state = RecipientState::Bounced;
                        entry.last = Some((code.clone(), reason.clone()));
                        bounced.push(dsn::DsnRecipient {
                            address: r.rcpt,
                            action: "failed",
                            status: code,
                            diagnostic: reason,
                        });
                    }
                    Status::Deferred { code, reason } => entry.last = Some((code, reason)),
                }
            }
        }
        if !envelope.is_done() && age >= self.options.max_lifetime.as_secs() {
            for entry in envelope.rcpts.iter_mut().filter(|e| e.state == RecipientState::Pending) {
                entry.state = RecipientState::Bounced;
                let (code, reason) =
                    entry.last.clone().unwrap_or(("4.4.7".into(), "no attempt succeeded".into()));
                bounced.push(dsn::DsnRecipient {
                    address: entry.address.clone(),
                    action: "failed",
                    status: code,
                    diagnostic: format!("delivery time expired; last error: {reason}"),
                });
            }
        }
        if !bounced.is_empty() {
            self.notify(&envelope, &body, &bounced).await;
        }
        if let (Some(after), false, false) =
            (self.options.delay_warning, envelope.warned, envelope.is_done())
            && age >= after.as_secs()
        {
            let delayed: Vec<_> = envelope
                .pending()
                .map(|e| {
                    let (status, diagnostic) =
                        e.last.clone().unwrap_or(("4.0.0".into(), "not yet delivered".into()));
                    dsn::DsnRecipient {
                        address: e.address.clone(),
                        action: "delayed",
                        status,
                        diagnostic,
                    }
                })
                .collect();
            self.notify(&envelope, &body, &delayed).await;
            envelope.warned = true;
        }
        let id = envelope.id.clone();
        let result = if envelope.is_done() {
            self.blocking(move |store| store.remove(&id)).await
        } else {
            envelope.next_attempt = now() + self.backoff(envelope.attempts).as_secs();
            lock(&self.schedule).set(&envelope.id, envelope.next_attempt);
            let envelope = envelope.clone();
            self.blocking(move |store| store.update(&envelope)).await
        };
        if let Err(e) = result {
            tracing::error!(id = %envelope.id, "cannot update the queue: {e}");
        }
    }

    /// The concurrency limiter of one destination domain.
    fn destination(&self, domain: &str) -> Arc<Semaphore> {
        lock(&self.destinations)
            .entry(domain.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.options.per_destination.max(1))))
            .clone()
    }

    fn remember(&self, attempted: Attempted) {
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(attempted);
    }

    /// Exponential backoff: `min * 2^(attempts-1)`, capped at `max`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32.checked_shl(attempts.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.options.min_backoff.saturating_mul(factor).min(self.options.max_backoff)
    }

    /// Queues a DSN to the sender, unless the message is itself a DSN (null sender).
    async fn notify(&self, envelope: &Envelope, body: &[u8], recipients: &[dsn::DsnRecipient]) {
        if envelope.mail_from.is_empty() {
            tracing::info!(id = %envelope.id, "not bouncing a bounce");
            return;
        }
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        let report = dsn::build(
            &self.options.hostname,
            &envelope.mail_from,
            &envelope.id,
            body,
            recipients,
            &date,
        );
        let message = NewMessage {
            mail_from: String::new(),
            rcpts: vec![envelope.mail_from.clone()],
            body: report,
            staged: None,
            requiretls: false,
            tls_required_no: false,
            authenticated: false,
        };
        if let Err(e) = self.accept_durably(message).await {
            tracing::error!(id = %envelope.id, "cannot queue the DSN: {e}");
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store::SpoolDir::open(dir.path()).unwrap());
        let queue = Queue::new(store, QueueOptions::default());
        let secs: Vec<u64> = (1..=6).map(|n| queue.backoff(n).as_secs()).collect();
        assert_eq!(secs, [300, 600, 1200, 2400, 4000, 4000]);
    }
}
