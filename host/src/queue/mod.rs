//! The queue: durable storage of accepted messages, the retry schedule, and DSNs.
//!
//! # Layout
//! - [`store`]: the spool directory behind the [`store::QueueStore`] trait (fsync + rename).
//! - [`dsn`]: RFC 3464 bounces and delay warnings.
//! - [`schedule`]: the in-memory index of what is due when.
//! - [`commit`]: group commit of accepted messages.
//! - [`dispatch`]: the active queue: per-destination turns and concurrency windows.
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
pub mod dispatch;
pub mod dsn;
pub mod schedule;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use self::commit::{Committer, NewBody};
use self::dispatch::{Dispatch, Feedback};
use self::schedule::Schedule;
use self::store::{Envelope, QueueStore, Recipient, RecipientState, StoreError, now};
use crate::delivery::{Deliverer, DomainOutcome, Message, Status};
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
    /// `SMTPUTF8` was given with MAIL (RFC 6531).
    pub smtputf8: bool,
}

/// The queue and its scheduler.
pub struct Queue {
    store: Arc<dyn QueueStore>,
    options: QueueOptions,
    wake: Notify,
    recent: std::sync::Mutex<std::collections::VecDeque<Attempted>>,
    /// Counters for `/metrics`.
    pub counters: Counters,
    schedule: std::sync::Mutex<Schedule>,
    /// `None` only if its thread could not be started; accepts then write one by one.
    committer: Option<Committer>,
    /// Messages claimed by a delivery or a queue command (see the module docs).
    claims: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// The exclusive right to change one stored message; released on drop (also when the task
/// holding it panics).
pub struct Claim {
    claims: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.claims).remove(&self.id);
    }
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

/// Messages active at once (envelope in memory, deliveries queued or running), as Postfix's
/// `qmgr_message_active_limit`: a backlog larger than this waits in the spool.
const ACTIVE_LIMIT: usize = 20_000;
/// Envelopes read in one trip to the blocking pool when messages become active.
const LOAD_BATCH: usize = 256;

/// One message in the middle of an attempt, shared by its per-domain jobs.
struct Active {
    /// The envelope as read when the attempt began (attempt number already counted).
    envelope: std::sync::Mutex<Envelope>,
    /// Seconds since acceptance, when the attempt began.
    age: u64,
    /// Read by the first job that starts, kept for the others and for DSNs.
    body: tokio::sync::OnceCell<Option<Arc<Vec<u8>>>>,
    /// Jobs not finished yet, and the outcomes of those that were.
    progress: std::sync::Mutex<(usize, Vec<DomainOutcome>)>,
    /// The stored envelope plus the deliveries recorded so far in this attempt: written after
    /// each domain's transaction (RFC 1047: a crash between a next hop's `250` and our record
    /// is a duplicate), one writer at a time. Bounces are not in it: their DSN is queued first.
    durable: tokio::sync::Mutex<Envelope>,
    /// The body failed its check, or is missing: the message went to quarantine, and the end
    /// of the attempt writes nothing back.
    quarantined: std::sync::atomic::AtomicBool,
    /// Held for the whole attempt: queue commands wait their turn (see the module docs).
    _claim: Claim,
}

impl Active {
    /// Ends one job (with its outcome, if it ran); returns the message's id when it was the last.
    fn finish_one(&self, outcome: Option<DomainOutcome>) -> Option<String> {
        let mut progress = lock(&self.progress);
        progress.0 = progress.0.saturating_sub(1);
        progress.1.extend(outcome);
        (progress.0 == 0).then(|| lock(&self.envelope).id.clone())
    }
}

/// One message to the recipients of one domain.
struct Job {
    message: Arc<Active>,
    domain: String,
    rcpts: Vec<String>,
}

/// What activating a batch of due ids produced.
#[derive(Default)]
struct Loaded {
    jobs: Vec<Job>,
    /// Ids that turned out not to need an attempt now (gone, not due, nothing to do).
    idle: Vec<String>,
}

/// How a job ended.
struct Delivered {
    feedback: Feedback,
    /// The message's id, if this job ended its attempt.
    finished: Option<String>,
}

/// What a scheduler task returns.
enum TaskEnd {
    Loaded(Loaded),
    Delivered(Delivered),
    Finished(String),
}

/// What a scheduler task was started for.
enum TaskKind {
    Load(Vec<String>),
    Deliver(String),
}

/// What a delivery says about its destination's health: a recipient delivered widens the
/// window; a deferral of every recipient for a connection that failed (RFC 3463 X.4.1 "no answer
/// from host", X.4.2 "bad connection": refused, reset, timed out) narrows it; anything else (a
/// policy's deferral, DNS, a reply refusing a recipient) leaves it.
fn feedback(outcome: &DomainOutcome) -> Feedback {
    let mut statuses = outcome.recipients.iter().map(|r| &r.status);
    if statuses.clone().any(|s| matches!(s, Status::Delivered { .. })) {
        return Feedback::Widen;
    }
    let connection_failed = |s: &Status| matches!(s, Status::Deferred { code, .. } if code == "4.4.1" || code == "4.4.2");
    match !outcome.recipients.is_empty() && statuses.all(connection_failed) {
        true => Feedback::Narrow,
        false => Feedback::Keep,
    }
}

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
            schedule: Default::default(),
            committer,
            claims: Default::default(),
        })
    }

    /// Claims message `id` for a change; `None` while a delivery or a command holds it.
    pub fn claim(&self, id: &str) -> Option<Claim> {
        lock(&self.claims)
            .insert(id.to_owned())
            .then(|| Claim { claims: self.claims.clone(), id: id.to_owned() })
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
            smtputf8: message.smtputf8,
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

    /// Runs the scheduler until `shutdown` turns true: due messages become active (their
    /// envelope read, one delivery per recipient domain queued for that destination, see
    /// [`dispatch`]), and deliveries start round-robin across destinations, up to `concurrency`
    /// at a time and each destination's window. In-flight deliveries finish before it returns;
    /// a message whose other domains were not started yet records what was done.
    pub async fn run(
        self: Arc<Self>,
        deliverer: Arc<Deliverer>,
        chains: Arc<ChainHandle>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let slots = self.options.concurrency.max(1);
        let mut dispatch: Dispatch<Job> = Dispatch::new(self.options.per_destination);
        let mut tasks: tokio::task::JoinSet<TaskEnd> = tokio::task::JoinSet::new();
        // What each task was doing, to settle the books even if it panicked.
        let mut kinds: HashMap<tokio::task::Id, TaskKind> = HashMap::new();
        let mut busy: HashSet<String> = HashSet::new();
        let mut running = 0usize;
        let mut next_scan = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if tokio::time::Instant::now() >= next_scan {
                self.scan().await;
                next_scan = tokio::time::Instant::now() + SCAN_INTERVAL;
            }
            // Envelopes are read in batches, so that deliveries start before a large backlog is
            // read in full.
            for batch in self.pop_due(&mut busy).chunks(LOAD_BATCH) {
                let (queue, ids) = (self.clone(), batch.to_vec());
                let handle = tasks.spawn(async move { TaskEnd::Loaded(queue.activate(ids).await) });
                kinds.insert(handle.id(), TaskKind::Load(batch.to_vec()));
            }
            while running < slots {
                let Some((domain, job)) = dispatch.start() else { break };
                running += 1;
                let (queue, deliverer, chains) = (self.clone(), deliverer.clone(), chains.clone());
                let handle = tasks.spawn(async move {
                    let end = queue.deliver(&job, &deliverer, &chains).await;
                    TaskEnd::Delivered(end)
                });
                kinds.insert(handle.id(), TaskKind::Deliver(domain));
            }
            let until_next = lock(&self.schedule)
                .next()
                .map_or(SCAN_INTERVAL, |at| Duration::from_secs(at.saturating_sub(now())));
            let wake_at = (tokio::time::Instant::now() + until_next).min(next_scan);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.settle(joined, &mut kinds, &mut busy, &mut dispatch, &mut running);
                }
                _ = shutdown.changed() => {}
            }
            // Settle whatever else finished meanwhile before dispatching again.
            while let Some(joined) = tasks.try_join_next_with_id() {
                self.settle(joined, &mut kinds, &mut busy, &mut dispatch, &mut running);
            }
        }
        // Deliveries not started stay queued; a message with some domains done records them.
        self.drain_unstarted(&mut dispatch, &mut tasks);
        while let Some(joined) = tasks.join_next_with_id().await {
            self.settle(joined, &mut kinds, &mut busy, &mut dispatch, &mut running);
            self.drain_unstarted(&mut dispatch, &mut tasks);
        }
    }

    /// Due ids not being worked on, at most as many as the active queue has room for; each is
    /// marked busy until its attempt is over.
    fn pop_due(&self, busy: &mut HashSet<String>) -> Vec<String> {
        let t = now();
        let mut schedule = lock(&self.schedule);
        let mut batch = Vec::new();
        while busy.len() < ACTIVE_LIMIT {
            let Some(id) = schedule.pop_due(t) else { break };
            // A message being delivered is rescheduled by its own attempt when it ends.
            if busy.insert(id.clone()) {
                batch.push(id);
            }
        }
        batch
    }

    /// Books the end of a task: frees its slot and tells its destination how it went, unmarks
    /// the message whose attempt it ended, queues the deliveries a load produced.
    fn settle(
        &self,
        joined: Result<(tokio::task::Id, TaskEnd), tokio::task::JoinError>,
        kinds: &mut HashMap<tokio::task::Id, TaskKind>,
        busy: &mut HashSet<String>,
        dispatch: &mut Dispatch<Job>,
        running: &mut usize,
    ) {
        let (id, end) = match joined {
            Ok((id, end)) => (id, Some(end)),
            Err(e) => {
                tracing::error!("scheduler task failed: {e}");
                (e.id(), None)
            }
        };
        match (kinds.remove(&id), end) {
            (Some(TaskKind::Deliver(domain)), end) => {
                *running = running.saturating_sub(1);
                let (feedback, finished) = match end {
                    Some(TaskEnd::Delivered(d)) => (d.feedback, d.finished),
                    _ => (Feedback::Keep, None),
                };
                dispatch.done(&domain, feedback);
                if let Some(message) = finished {
                    busy.remove(&message);
                }
            }
            (Some(TaskKind::Load(_)), Some(TaskEnd::Loaded(loaded))) => {
                for job in loaded.jobs {
                    let domain = job.domain.clone();
                    dispatch.push(&domain, job);
                }
                for id in loaded.idle {
                    busy.remove(&id);
                }
            }
            // A load that failed leaves its messages to the next scan.
            (Some(TaskKind::Load(ids)), _) => {
                for id in ids {
                    busy.remove(&id);
                }
            }
            (_, Some(TaskEnd::Finished(message))) => {
                busy.remove(&message);
            }
            _ => {}
        }
    }

    /// Reads the envelopes of `ids` (one trip to the blocking pool) and turns each due one into
    /// an attempt: one job per recipient domain. The index is a hint: another task may have
    /// finished a message since, or `postwarden queue` changed it; only the stored envelope
    /// counts, or a message could be delivered twice.
    async fn activate(&self, ids: Vec<String>) -> Loaded {
        let mut loaded = Loaded::default();
        // Claimed first: a queue command changing one of these now finishes before its
        // envelope is read, and no command changes it until the attempt is over.
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            match self.claim(&id) {
                Some(claim) => claimed.push(claim),
                None => loaded.idle.push(id),
            }
        }
        let read: Vec<String> = claimed.iter().map(|c| c.id.clone()).collect();
        let envelopes = self
            .blocking(move |store| Ok(read.iter().map(|id| store.envelope(id)).collect::<Vec<_>>()))
            .await;
        let envelopes = match envelopes {
            Ok(envelopes) => envelopes,
            Err(e) => {
                tracing::error!("cannot read envelopes: {e}");
                loaded.idle.extend(claimed.iter().map(|c| c.id.clone()));
                return loaded;
            }
        };
        for (claim, envelope) in claimed.into_iter().zip(envelopes) {
            let id = claim.id.clone();
            let mut envelope = match envelope {
                Ok(envelope) if envelope.next_attempt <= now() => envelope,
                Ok(envelope) => {
                    lock(&self.schedule).set(&id, envelope.next_attempt);
                    loaded.idle.push(id);
                    continue;
                }
                Err(StoreError::NotFound(_)) => {
                    loaded.idle.push(id);
                    continue;
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    self.quarantine(&id, &e.to_string()).await;
                    loaded.idle.push(id);
                    continue;
                }
                Err(e) => {
                    tracing::error!(%id, "cannot read envelope: {e}");
                    loaded.idle.push(id);
                    continue;
                }
            };
            envelope.attempts += 1;
            let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for r in envelope.pending() {
                let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d).to_ascii_lowercase();
                by_domain.entry(domain).or_default().push(r.address.clone());
            }
            let message = Arc::new(Active {
                age: now().saturating_sub(envelope.created),
                durable: tokio::sync::Mutex::new(envelope.clone()),
                envelope: std::sync::Mutex::new(envelope),
                body: tokio::sync::OnceCell::new(),
                progress: std::sync::Mutex::new((by_domain.len(), Vec::new())),
                quarantined: std::sync::atomic::AtomicBool::new(false),
                _claim: claim,
            });
            if by_domain.is_empty() {
                // Nothing pending (stored that way by another process): the attempt is over.
                self.finish(&message).await;
                loaded.idle.push(id);
                continue;
            }
            for (domain, rcpts) in by_domain {
                loaded.jobs.push(Job { message: message.clone(), domain, rcpts });
            }
        }
        loaded
    }

    /// One job: one message to the recipients of one domain. When it is the message's last,
    /// the attempt's outcome is recorded; before that, its deliveries are recorded at once.
    async fn deliver(&self, job: &Job, deliverer: &Deliverer, chains: &ChainHandle) -> Delivered {
        let message = &job.message;
        let outcome = match self.body(message).await {
            Some(body) => {
                let chain = chains.current();
                let envelope = lock(&message.envelope).clone();
                let delivery = Message {
                    mail_from: &envelope.mail_from,
                    body: &body,
                    requiretls: envelope.requiretls,
                    tls_required_no: envelope.tls_required_no,
                    authenticated: envelope.authenticated,
                    smtputf8: envelope.smtputf8,
                    attempt: envelope.attempts,
                    age: message.age,
                };
                let outcome = deliverer.deliver(&chain, &delivery, &job.domain, &job.rcpts).await;
                // The cipher of the session that took the message, as Postfix's `TLS
                // connection established … with cipher …` line gives it.
                let cipher = outcome
                    .recipients
                    .iter()
                    .find_map(|r| match &r.status {
                        Status::Delivered { tls: Some(tls), .. } => Some(tls.cipher.as_str()),
                        _ => None,
                    })
                    .unwrap_or("-");
                tracing::info!(id = %envelope.id, domain = %job.domain, tls = %outcome.tls_log, cipher = %cipher, "delivery attempt");
                Some(outcome)
            }
            None => None,
        };
        let feedback = outcome.as_ref().map_or(Feedback::Keep, feedback);
        if let Some(outcome) = &outcome {
            self.record_deliveries(message, outcome).await;
        }
        let finished = message.finish_one(outcome);
        if finished.is_some() {
            self.finish(message).await;
        }
        Delivered { feedback, finished }
    }

    /// Writes the deliveries of one domain's transaction to disk at once, on top of those
    /// already recorded in this attempt (RFC 1047: the window for a duplicate after a crash is
    /// then one transaction, not the whole attempt). Awaited before the job ends, so every such
    /// write lands before the attempt's final record.
    async fn record_deliveries(&self, message: &Active, outcome: &DomainOutcome) {
        let delivered: Vec<_> = outcome
            .recipients
            .iter()
            .filter_map(|r| match &r.status {
                Status::Delivered { mx, reply, .. } => Some((r.rcpt.clone(), mx, reply)),
                _ => None,
            })
            .collect();
        if delivered.is_empty() {
            return;
        }
        let mut durable = message.durable.lock().await;
        for (rcpt, mx, reply) in delivered {
            if let Some(entry) = durable.rcpts.iter_mut().find(|e| e.address == rcpt) {
                entry.state = RecipientState::Delivered;
                entry.last = Some(("2.0.0".into(), format!("delivered to {mx}: {reply}")));
                entry.tls_log = outcome.tls_log.clone();
            }
        }
        self.save(&durable).await;
    }

    /// The message's body, read once for all its domains and checked against the length and
    /// digest recorded at accept. A body that fails (or is missing) is never delivered: the
    /// message goes to quarantine.
    async fn body(&self, message: &Active) -> Option<Arc<Vec<u8>>> {
        let envelope = lock(&message.envelope).clone();
        message
            .body
            .get_or_init(|| async {
                let read = envelope.id.clone();
                let broken = match self.blocking(move |store| store.body(&read)).await {
                    Ok(body) => match envelope.check_body(&body) {
                        Ok(()) => return Some(Arc::new(body)),
                        Err(reason) => reason,
                    },
                    Err(StoreError::NotFound(_)) => "the message body is missing".to_owned(),
                    Err(e) => {
                        // Transient (I/O): the attempt records nothing, the next scan retries.
                        tracing::error!(id = %envelope.id, "cannot read message: {e}");
                        return None;
                    }
                };
                message.quarantined.store(true, std::sync::atomic::Ordering::SeqCst);
                self.quarantine(&envelope.id, &broken).await;
                None
            })
            .await
            .clone()
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
                        self.quarantine(&claim.id, &reason).await;
                    }
                }
            }
            Err(e) => tracing::error!("queue scan failed: {e}"),
        }
    }

    /// Moves a claimed message to quarantine, logging it once (it leaves the queue, so no
    /// scan meets it again).
    /// The caller holds the message's claim.
    async fn quarantine(&self, id: &str, reason: &str) {
        let (moved, why) = (id.to_owned(), reason.to_owned());
        match self.blocking(move |store| store.quarantine(&moved, &why)).await {
            Ok(()) => {
                self.counters.quarantined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(id, reason, "queue entry quarantined, not delivered");
            }
            Err(e) => tracing::error!(id, reason, "cannot quarantine: {e}"),
        }
    }

    /// Writes `envelope` (an intermediate record of an attempt under way).
    async fn save(&self, envelope: &Envelope) {
        let copy = envelope.clone();
        if let Err(e) = self.blocking(move |store| store.update(&copy)).await {
            tracing::error!(id = %envelope.id, "cannot record deliveries: {e}");
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

    /// Jobs queued but not started at shutdown: each ends without an outcome; a message whose
    /// last job this was records what its other jobs did.
    fn drain_unstarted(
        self: &Arc<Self>,
        dispatch: &mut Dispatch<Job>,
        tasks: &mut tokio::task::JoinSet<TaskEnd>,
    ) {
        for job in dispatch.drain() {
            if let Some(id) = job.message.finish_one(None) {
                let queue = self.clone();
                tasks.spawn(async move {
                    queue.finish(&job.message).await;
                    TaskEnd::Finished(id)
                });
            }
        }
    }

    /// Records the outcome of one attempt of one message: recipient states, counters, DSNs,
    /// expiry, and either removal or the next attempt's time.
    async fn finish(&self, message: &Active) {
        if message.quarantined.load(std::sync::atomic::Ordering::SeqCst) {
            // Moved out of the queue: nothing is written back.
            return;
        }
        let mut envelope = lock(&message.envelope).clone();
        let results = std::mem::take(&mut lock(&message.progress).1);
        if results.is_empty() && !envelope.is_done() {
            // Nothing was attempted (unreadable body, shutdown): the stored envelope stands, and
            // the next scan schedules it again.
            return;
        }
        let age = message.age;
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
        let warn = match (self.options.delay_warning, envelope.warned, envelope.is_done()) {
            (Some(after), false, false) => age >= after.as_secs(),
            _ => false,
        };
        // DSNs quote the headers; the body was read already unless nothing was pending.
        let body = match bounced.is_empty() && !warn {
            true => Arc::default(),
            false => self.body(message).await.unwrap_or_default(),
        };
        if !bounced.is_empty() {
            self.notify(&envelope, &body, &bounced).await;
        }
        if warn {
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
        let now = time::OffsetDateTime::now_utc();
        let date = now.format(&time::format_description::well_known::Rfc2822).unwrap_or_default();
        // Unique per report: a message can have a delay warning and one bounce per attempt
        // that ends recipients, each its own DSN.
        let message_id = format!(
            "<{}.{}.dsn@{}>",
            envelope.id,
            now.unix_timestamp_nanos(),
            self.options.hostname
        );
        let report = dsn::build(
            &self.options.hostname,
            &envelope.mail_from,
            &envelope.id,
            body,
            recipients,
            &date,
            &message_id,
        );
        let message = NewMessage {
            mail_from: String::new(),
            rcpts: vec![envelope.mail_from.clone()],
            body: report,
            staged: None,
            requiretls: false,
            tls_required_no: false,
            authenticated: false,
            smtputf8: false,
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
