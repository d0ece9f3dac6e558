//! The queue: durable storage of accepted messages, the retry schedule, and DSNs.
//!
//! # Layout
//! - [`store`]: the spool directory behind the [`store::QueueStore`] trait (fsync + rename).
//! - [`dsn`]: RFC 3464 bounces and delay warnings.
//! - [`schedule`]: the in-memory index of what is due when.
//! - [`commit`]: group commit of accepted messages.
//! - this module: [`Queue`]: accepting (durably), the scheduler loop, per-recipient outcomes,
//!   exponential backoff, the maximal lifetime, quarantine of entries that fail their checks.
//!
//! # Who writes an envelope
//! Every change to a stored message happens under its *claim* ([`Queue::claim`]): the delivery
//! task holds it from reading the envelope to writing the outcome, a queue command (through
//! [`crate::control`]) for its read-modify-write. So a command can never write back a stale
//! copy (putting delivered recipients back, recreating a removed envelope), and a delivery
//! never starts on a message a command is changing.

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
    /// Messages claimed by a delivery or a queue command (see the module docs).
    claims: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The exclusive right to change one stored message; released on drop.
pub struct Claim<'a> {
    queue: &'a Queue,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.queue.claims).remove(&self.id);
    }
}

/// What reading a due message found.
enum Due {
    /// Deliver this.
    Now(Envelope, Vec<u8>),
    /// Not due before this time.
    Later(u64),
    /// Fails its checks: quarantine it, for this reason.
    Broken(String),
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
    /// Entries moved to quarantine (corrupt envelope, missing or altered body).
    pub quarantined: std::sync::atomic::AtomicU64,
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
            claims: Default::default(),
        })
    }

    /// Claims message `id` for a change; `None` while a delivery or a command holds it.
    pub fn claim(&self, id: &str) -> Option<Claim<'_>> {
        lock(&self.claims).insert(id.to_owned()).then(|| Claim { queue: self, id: id.to_owned() })
    }

    /// Makes message `id` due at `at` in the scheduler's index and wakes the scheduler.
    pub fn reschedule(&self, id: &str, at: u64) {
        lock(&self.schedule).set(id, at);
        self.wake.notify_one();
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
            body_len: None,
            body_sha256: None,
        };
        let mut envelope = envelope;
        let body = match message.staged {
            // Sealed by the store, which reads the staged file back.
            Some(path) => NewBody::Staged(path),
            None => {
                envelope.seal(&message.body);
                NewBody::Bytes(message.body)
            }
        };
        (envelope, body)
    }

    /// A new file in the spool for a body still arriving (see [`QueueStore::stage_body`]);
    /// blocking: call it off the async workers.
    pub fn stage_body(&self) -> Option<Result<(std::path::PathBuf, std::fs::File), StoreError>> {
        self.store.stage_body()
    }

    /// Makes message `id` due now, under its claim, from the envelope as stored: delivered
    /// recipients stay delivered and a removed message stays removed. `Ok(false)`: a delivery
    /// of it is under way (it is rescheduled when that ends). Blocking: call it off the async
    /// workers.
    pub fn retry(&self, id: &str) -> Result<bool, StoreError> {
        let Some(claim) = self.claim(id) else { return Ok(false) };
        let mut envelope = self.store.envelope(id)?;
        if envelope.next_attempt != 0 {
            envelope.next_attempt = 0;
            self.store.update(&envelope)?;
        }
        // Released first: the scheduler skips a claimed message it takes from the schedule.
        drop(claim);
        self.reschedule(id, 0);
        Ok(true)
    }

    /// Removes message `id` under its claim. `Ok(false)`: a delivery of it is under way.
    /// Blocking: call it off the async workers.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let Some(_claim) = self.claim(id) else { return Ok(false) };
        self.store.remove(id)?;
        Ok(true)
    }

    /// Makes every message due now (see [`Queue::retry`]): (made due, under delivery).
    pub fn retry_all(&self) -> Result<(usize, usize), StoreError> {
        let (mut due, mut busy) = (0, 0);
        for envelope in self.store.list()? {
            match self.retry(&envelope.id) {
                Ok(true) => due += 1,
                Ok(false) => busy += 1,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((due, busy))
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
                // A message being delivered (claimed) is rescheduled by its own task when it
                // finishes; `deliver_due` skips it.
                if lock(&self.claims).contains(&id) {
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let (queue, deliverer, chains) = (self.clone(), deliverer.clone(), chains.clone());
                in_flight.spawn(async move {
                    queue.deliver_due(&id, &deliverer, &chains).await;
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

    /// Delivers message `id` if it is still due, under its claim. The schedule is a hint:
    /// another task may have finished this message (removed it, or rescheduled it) since, or a
    /// queue command changed it; only the stored envelope counts, or a message could be
    /// delivered twice. The body is checked against the envelope's record first; what fails
    /// (or has no body, or no parseable envelope) goes to quarantine, never to the next hop.
    pub async fn deliver_due(&self, id: &str, deliverer: &Deliverer, chains: &ChainHandle) {
        // Whoever holds the claim reschedules the message when done with it.
        let Some(claim) = self.claim(id) else { return };
        // One trip to the blocking pool reads both envelope and body.
        let read = id.to_owned();
        let due = self
            .blocking(move |store| {
                let fresh = store.envelope(&read)?;
                if fresh.next_attempt > now() {
                    return Ok(Due::Later(fresh.next_attempt));
                }
                match store.body(&read) {
                    Ok(body) => Ok(match fresh.check_body(&body) {
                        Ok(()) => Due::Now(fresh, body),
                        Err(reason) => Due::Broken(reason),
                    }),
                    Err(StoreError::NotFound(_)) => {
                        Ok(Due::Broken("the message body is missing".to_owned()))
                    }
                    Err(e) => Err(e),
                }
            })
            .await;
        match due {
            Ok(Due::Now(fresh, body)) => self.attempt(fresh, body, deliverer, chains).await,
            Ok(Due::Later(at)) => lock(&self.schedule).set(id, at),
            Ok(Due::Broken(reason)) => self.quarantine(&claim, &reason).await,
            Err(StoreError::NotFound(_)) => {}
            Err(e @ StoreError::Corrupt { .. }) => self.quarantine(&claim, &e.to_string()).await,
            // Transient (I/O): the next scan schedules it again.
            Err(e) => tracing::error!(%id, "cannot read the message: {e}"),
        }
    }

    /// Moves a claimed message to quarantine, logging it once (it leaves the queue, so no
    /// scan meets it again).
    async fn quarantine(&self, claim: &Claim<'_>, reason: &str) {
        let (id, why) = (claim.id.clone(), reason.to_owned());
        match self.blocking(move |store| store.quarantine(&id, &why)).await {
            Ok(()) => {
                self.counters.quarantined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(id = %claim.id, reason, "queue entry quarantined, not delivered");
            }
            Err(e) => tracing::error!(id = %claim.id, reason, "cannot quarantine: {e}"),
        }
    }

    /// Reads the whole spool into the schedule, and quarantines envelopes that do not parse.
    /// Entries are merged, never dropped, so that a message accepted while the spool was being
    /// read keeps its place.
    async fn scan(&self) {
        match self.blocking(|store| store.scan()).await {
            Ok(listing) => {
                {
                    let mut schedule = lock(&self.schedule);
                    for envelope in listing.envelopes {
                        schedule.set(&envelope.id, envelope.next_attempt);
                    }
                }
                for (id, reason) in listing.corrupt {
                    // Claimed elsewhere: that task meets the same corrupt envelope.
                    if let Some(claim) = self.claim(&id) {
                        self.quarantine(&claim, &reason).await;
                    }
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
        // The message borrows from copies: the envelope itself takes outcomes meanwhile.
        let mail_from = envelope.mail_from.clone();
        let message = Message {
            mail_from: &mail_from,
            body: &body,
            requiretls: envelope.requiretls,
            tls_required_no: envelope.tls_required_no,
            authenticated: envelope.authenticated,
            attempt: envelope.attempts,
            age,
        };
        let mut bounced = Vec::new();
        // What is on disk should say "delivered" as soon as a next hop said so (RFC 1047: a
        // crash between its 250 and our record duplicates the message). `durable` is the
        // envelope as stored plus the deliveries: it is written after each transaction but the
        // last (that one's record follows at once, below). Bounces are not in it: their DSN is
        // queued first, and a crash before that must leave them to be tried (and bounced) again.
        let mut durable = envelope.clone();
        let mut unsaved = false;
        let domains = by_domain.len();
        for (n, (domain, rcpts)) in by_domain.iter().enumerate() {
            let slot = self.destination(domain);
            let Ok(_permit) = slot.acquire().await else { continue };
            let outcome = deliverer.deliver(&chain, &message, domain, rcpts).await;
            tracing::info!(id = %envelope.id, domain, tls = %outcome.tls_log, "delivery attempt");
            let delivered = self.apply(&mut envelope, &mut durable, outcome, &mut bounced);
            unsaved |= delivered;
            if unsaved && n + 1 < domains {
                self.save(&durable).await;
                unsaved = false;
            }
        }
        let needs_dsn = !bounced.is_empty()
            || (!envelope.is_done() && age >= self.options.max_lifetime.as_secs())
            || (self.options.delay_warning.is_some_and(|after| age >= after.as_secs())
                && !envelope.warned
                && !envelope.is_done());
        if unsaved && needs_dsn {
            // Queuing a DSN takes a sync: record the deliveries before.
            self.save(&durable).await;
        }
        self.finish_attempt(envelope, body, bounced, age).await;
    }

    /// Writes `envelope` (an intermediate record of an attempt under way).
    async fn save(&self, envelope: &Envelope) {
        let copy = envelope.clone();
        if let Err(e) = self.blocking(move |store| store.update(&copy)).await {
            tracing::error!(id = %envelope.id, "cannot record deliveries: {e}");
        }
    }

    /// Applies one domain's outcome to the envelope (and its deliveries to `durable`); counts
    /// and remembers each. Returns whether anyone was delivered.
    fn apply(
        &self,
        envelope: &mut Envelope,
        durable: &mut Envelope,
        outcome: crate::delivery::DomainOutcome,
        bounced: &mut Vec<dsn::DsnRecipient>,
    ) -> bool {
        let mut any = false;
        {
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
                        if let Some(kept) = durable.rcpts.iter_mut().find(|e| e.address == r.rcpt) {
                            *kept = entry.clone();
                        }
                        any = true;
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
        any
    }

    /// The end of an attempt: expiry, DSNs, then the envelope's final record (removed when
    /// done, else rescheduled with backoff).
    async fn finish_attempt(
        &self,
        mut envelope: Envelope,
        body: Vec<u8>,
        mut bounced: Vec<dsn::DsnRecipient>,
        age: u64,
    ) {
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
