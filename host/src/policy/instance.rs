//! One loaded policy: its pre-instantiated component, its table and store, and the calls into
//! it, each in a fresh `Store` under a deadline and a memory cap.
//!
//! A fresh store per call costs a few microseconds with the pooling allocator and buys what a
//! reused instance cannot: no state leaks between messages, and a trap poisons nothing (a
//! component instance cannot be entered again after a trap).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::Exports;
use super::kv::KvStore;
use super::pool::CallPool;
use super::types::{Action, Context, Decision, DeliveryReport, Failure};

/// Lines a single call may log; more are dropped (a policy must not flood the log).
const MAX_LOG_LINES: usize = 32;
/// Longest log line kept, in bytes.
const MAX_LOG_LINE: usize = 1024;
/// Bytes of WASI stdout/stderr captured per call.
const MAX_STDIO: usize = 16 * 1024;
/// Table entries a policy may create in `configure`.
const MAX_TABLE_ENTRIES: usize = 2_000_000;
/// What one table entry costs the host beyond its key and value bytes (two `String` headers
/// and the hash map's slot, rounded up), counted against [`Limits::table_bytes`].
pub const TABLE_ENTRY_OVERHEAD: usize = 64;

/// Resource limits applied to every call into a policy.
///
/// `configure` gets its own, larger budget: it runs once, at load, and may parse a large table
/// (100,000 domains) that the decisions then read from the host. Decisions must be fast.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    /// CPU-time budget per decision call (the CPU time of the thread running it, see
    /// `CpuClock`; calls run one per CPU on the policy pool), checked by epoch interruption
    /// (1 ms resolution), with a wall-clock ceiling for a starved machine.
    pub deadline: Duration,
    /// Largest linear memory during a decision call, in bytes.
    pub memory: usize,
    /// CPU-time budget of `configure`, counted the same way.
    pub configure_deadline: Duration,
    /// Largest linear memory during `configure`, in bytes.
    pub configure_memory: usize,
    /// Most host memory the policy's table may hold, in bytes: keys, values and
    /// [`TABLE_ENTRY_OVERHEAD`] per entry. The table lives in the relay, outside the guest's
    /// memory cap, for as long as the policy is loaded; a `configure` that tries to keep more
    /// fails the load.
    pub table_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(10),
            memory: 16 << 20,
            configure_deadline: Duration::from_secs(1),
            configure_memory: 256 << 20,
            table_bytes: 64 << 20,
        }
    }
}

/// Why a call into a policy did not produce a usable answer. Every fault makes the relay defer.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFault {
    /// The guest trapped (including an abort after a failed allocation it did not attribute to
    /// the memory cap).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call used its whole CPU budget and was interrupted.
    #[error("exceeded its deadline of {0:?}")]
    Deadline(Duration),
    /// The call got so little CPU that it reached the wall-clock ceiling (the machine, not the
    /// policy, is the likely culprit) and was interrupted.
    #[error("was interrupted after {0:?} of wall-clock time without finishing (starved of CPU)")]
    Starved(Duration),
    /// The guest tried to grow its memory beyond the cap.
    #[error("exceeded its memory limit of {0} bytes")]
    MemoryLimit(usize),
    /// The guest answered something the contract does not allow here.
    #[error("returned an invalid answer: {0}")]
    Invalid(String),
    /// `configure` rejected the settings.
    #[error("rejected its settings: {0}")]
    Configure(String),
    /// `configure` tried to keep more in the host table than the policy's limit.
    #[error(
        "tried to keep {wanted} bytes in its host table (`table-put`), more than its limit of \
         {limit} bytes (table_limit_mib)"
    )]
    TableLimit {
        /// The bytes the table would have held with every write kept.
        wanted: usize,
        /// The limit.
        limit: usize,
    },
}

impl PolicyFault {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyFault::Trap(_) => "trap",
            PolicyFault::Deadline(_) | PolicyFault::Starved(_) => "deadline",
            PolicyFault::MemoryLimit(_) => "memory",
            PolicyFault::Invalid(_) => "invalid",
            PolicyFault::Configure(_) => "configure",
            PolicyFault::TableLimit { .. } => "table",
        }
    }
}

/// Counters for one policy, read by metrics and tests.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Calls made (configure, plan, on-failure, on-delivered).
    pub calls: AtomicU64,
    /// Faults, as counted by the chain (including answers it found invalid).
    pub faults: AtomicU64,
}

/// A policy ready to be called: compiled, linked, pre-instantiated and configured.
pub struct LoadedPolicy {
    name: Arc<str>,
    exports: Exports,
    engine: wasmtime::Engine,
    needs_wasi: bool,
    limits: Limits,
    table: Arc<HashMap<String, String>>,
    kv: Arc<dyn KvStore>,
    stats: Arc<PolicyStats>,
    sha256: String,
    pool: Arc<CallPool>,
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// What `LoadedPolicy::new` needs; built by the engine.
pub(super) struct Parts {
    pub name: Arc<str>,
    pub exports: Exports,
    pub needs_wasi: bool,
    pub engine: wasmtime::Engine,
    pub limits: Limits,
    pub kv: Arc<dyn KvStore>,
    pub sha256: String,
    pub pool: Arc<CallPool>,
}

impl LoadedPolicy {
    /// Runs `configure` with `settings` (JSON) and returns the configured policy.
    pub(super) fn configure(parts: Parts, settings: &str) -> Result<Self, PolicyFault> {
        let mut policy = Self::unconfigured(parts);
        let settings = settings.to_owned();
        let (result, state) =
            policy.call(true, |exports, store| exports.configure(store, &settings));
        let result = result?;
        result.map_err(PolicyFault::Configure)?;
        if state.table_refused > 0 {
            let wanted = state.table_bytes.saturating_add(state.table_refused);
            return Err(PolicyFault::TableLimit { wanted, limit: policy.limits.table_bytes });
        }
        policy.table = Arc::new(state.table_writes.unwrap_or_default());
        Ok(policy)
    }

    /// The policy before `configure`, with an empty table: for checks that need no settings,
    /// such as whether a decision's instance fits the decision limits at all.
    pub(super) fn unconfigured(parts: Parts) -> Self {
        LoadedPolicy {
            name: parts.name,
            exports: parts.exports,
            needs_wasi: parts.needs_wasi,
            engine: parts.engine,
            limits: parts.limits,
            table: Arc::new(HashMap::new()),
            kv: parts.kv,
            stats: Arc::default(),
            sha256: parts.sha256,
            pool: parts.pool,
        }
    }

    /// The policy's name from the relay config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hex SHA-256 of the component's bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The policy's persistent store.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// Call and fault counters.
    pub fn stats(&self) -> &PolicyStats {
        &self.stats
    }

    /// The threads the relay runs this policy's calls on (see [`super::pool`]). The methods
    /// below run on the calling thread: tools and tests call them directly, the relay through
    /// the chain's `*_async` methods, which use this pool.
    pub fn pool(&self) -> &Arc<CallPool> {
        &self.pool
    }

    /// Calls `plan`. Returns the decision and the lines the policy logged.
    pub fn plan(&self, ctx: &Context) -> (Result<Decision, PolicyFault>, Vec<String>) {
        let (result, state) = self.call(false, |exports, store| exports.plan(store, ctx));
        (result, state.logs)
    }

    /// Calls `on-failure`. Returns the action and the lines the policy logged.
    pub fn on_failure(
        &self,
        ctx: &Context,
        failure: &Failure,
    ) -> (Result<Action, PolicyFault>, Vec<String>) {
        let (result, state) =
            self.call(false, |exports, store| exports.on_failure(store, ctx, failure));
        (result, state.logs)
    }

    /// Instantiates in a fresh store and drops it, without calling anything (benchmarks, and
    /// `policy check`: does a decision instance fit the decision limits at all).
    #[doc(hidden)]
    pub fn instantiate_only(&self) -> Result<(), PolicyFault> {
        self.call(false, |exports, store| exports.instantiate(store)).0
    }

    /// Calls `on-delivered`.
    pub fn on_delivered(&self, ctx: &Context, report: &DeliveryReport) -> Result<(), PolicyFault> {
        self.call(false, |exports, store| exports.on_delivered(store, ctx, report)).0
    }

    /// Instantiates the component in a fresh store and runs `f` under the limits. Returns the
    /// store's state too, so callers can collect logs and table writes.
    fn call<R: Send>(
        &self,
        configuring: bool,
        f: impl FnOnce(&Exports, &mut Store<StoreState>) -> wasmtime::Result<R> + Send,
    ) -> (Result<R, PolicyFault>, StoreState) {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let limits = match configuring {
            true => (self.limits.configure_deadline, self.limits.configure_memory),
            false => (self.limits.deadline, self.limits.memory),
        };
        let mut store = Store::new(&self.engine, self.state(configuring, limits));
        store.limiter(|s| &mut s.limiter);
        // The first tick takes the CPU clock's reference (see `CpuClock`).
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| Ok(ctx.data_mut().clock.on_deadline()));

        let outcome = if self.needs_wasi && tokio::runtime::Handle::try_current().is_ok() {
            let exports = &self.exports;
            std::thread::scope(|scope| {
                let worker = scope.spawn(move || {
                    let result = f(exports, &mut store);
                    (result, store)
                });
                worker.join().map_err(|_| ())
            })
        } else {
            let result = f(&self.exports, &mut store);
            Ok((result, store))
        };
        let (result, store) = match outcome {
            Ok(done) => done,
            // A panic on the host side of a WASI call took the store with its thread. Fail
            // closed like any other fault; the relay goes on.
            Err(()) => {
                let fault = PolicyFault::Trap("the policy's worker thread panicked".to_owned());
                return (Err(fault), self.state(configuring, limits));
            }
        };
        let mut state = store.into_data();
        state.flush_stdio();
        (result.map_err(|e| classify(&state, limits, e)), state)
    }
}

impl LoadedPolicy {
    /// A fresh store's data.
    fn state(&self, configuring: bool, (deadline, max_memory): (Duration, usize)) -> StoreState {
        StoreState {
            name: self.name.clone(),
            table: self.table.clone(),
            table_writes: configuring.then(HashMap::new),
            table_bytes: 0,
            table_limit: self.limits.table_bytes,
            table_refused: 0,
            kv: self.kv.clone(),
            logs: Vec::new(),
            limiter: Limiter { max_memory, exceeded: false },
            clock: CpuClock::new(deadline),
            last_stderr: None,
            facts: Arc::default(),
            // Created on the guest's first WASI call: most calls make none, and building a
            // WASI context would double the cost of a decision.
            wasi: None,
        }
    }
}

/// A call's deadline, charged in CPU time of the thread that runs it.
///
/// A call that was preempted (a loaded machine, a build next to the relay, a hundred
/// deliveries on two cores) has used less CPU than the wall-clock time that passed, and gets
/// the rest of its budget; a guest that loops uses CPU and is stopped once it has had its whole
/// budget. Waiting is never charged, working always is. A wall-clock ceiling (see
/// [`CpuClock::wall_ceiling`]) bounds the latency of a call on a starved machine.
///
/// Reading a thread's CPU clock is a system call (~0.6 µs here, more than a tenth of a Rust
/// decision), so nothing is read when a call starts: the first epoch tick of the call (at most
/// one tick, 1 ms, in) takes the reference, and the budget counts from there. Calls that end
/// before a tick, nearly all of them, never read the clock.
struct CpuClock {
    budget: Duration,
    reference: Option<(Duration, Instant)>,
    /// The call was interrupted at the wall-clock ceiling, not for using its budget.
    starved: bool,
}

/// How many deadlines of wall-clock time a call may take at most, however little CPU it got
/// (but never less than [`MIN_WALL_CEILING`]).
const WALL_CEILING: u32 = 20;
/// A decision waiting this long for a CPU means an overloaded machine; deferring is then
/// better than holding the delivery.
const MIN_WALL_CEILING: Duration = Duration::from_secs(1);

impl CpuClock {
    fn new(budget: Duration) -> Self {
        CpuClock { budget, reference: None, starved: false }
    }

    /// The most wall-clock time a call may take, counted from its first tick.
    fn wall_ceiling(&self) -> Duration {
        (self.budget * WALL_CEILING).max(MIN_WALL_CEILING)
    }

    /// Called on the guest's thread when the epoch deadline passes; the first deadline is set
    /// one tick after the store is created.
    fn on_deadline(&mut self) -> UpdateDeadline {
        self.on_deadline_at(thread_cpu_time(), Instant::now())
    }

    /// [`Self::on_deadline`] with the clocks read by the caller (tests pass made-up times).
    fn on_deadline_at(&mut self, cpu: Duration, now: Instant) -> UpdateDeadline {
        let Some((cpu_at_reference, wall_at_reference)) = self.reference else {
            self.reference = Some((cpu, now));
            return UpdateDeadline::Continue(super::engine::deadline_ticks(self.budget));
        };
        let used = cpu.saturating_sub(cpu_at_reference);
        if used >= self.budget {
            return UpdateDeadline::Interrupt;
        }
        if now.saturating_duration_since(wall_at_reference) >= self.wall_ceiling() {
            self.starved = true;
            return UpdateDeadline::Interrupt;
        }
        UpdateDeadline::Continue(super::engine::deadline_ticks(self.budget - used))
    }
}

/// CPU time used so far by the calling thread (one `clock_gettime`, well under a microsecond).
fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0))
}

/// Names the fault behind a failed call, given the limits it ran under.
fn classify(
    state: &StoreState,
    (deadline, memory): (Duration, usize),
    error: wasmtime::Error,
) -> PolicyFault {
    if state.limiter.exceeded {
        return PolicyFault::MemoryLimit(memory);
    }
    if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return match state.clock.starved {
            true => PolicyFault::Starved(state.clock.wall_ceiling()),
            false => PolicyFault::Deadline(deadline),
        };
    }
    // The outermost message is "error while executing at wasm backtrace:"; the trap itself
    // is the root cause.
    let cause = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    let mut text = cause.lines().next().unwrap_or_default().to_owned();
    // Interpreted guests report why they gave up on stderr (a Python traceback's last line, a
    // JS exception that could not be returned); without it the fault says only "unreachable".
    if let Some(line) = &state.last_stderr {
        text.push_str(&format!(" (guest stderr: {line})"));
    }
    PolicyFault::Trap(text)
}

/// The data of one store: everything the host imports need during one call.
pub(crate) struct StoreState {
    name: Arc<str>,
    pub(super) table: Arc<HashMap<String, String>>,
    table_writes: Option<HashMap<String, String>>,
    /// Bytes `table_writes` holds, counted as [`Limits::table_bytes`] says.
    table_bytes: usize,
    table_limit: usize,
    /// Bytes of the writes refused because the table would have exceeded `table_limit`.
    table_refused: usize,
    pub(super) kv: Arc<dyn KvStore>,
    logs: Vec<String>,
    limiter: Limiter,
    clock: CpuClock,
    wasi: Option<WasiState>,
    /// The last line the guest wrote to stderr in this call, for fault messages.
    last_stderr: Option<String>,
    /// The facts of the attempt this call is about, for the `facts` imports.
    pub(super) facts: Arc<super::facts::Facts>,
}

impl StoreState {
    /// Records a line the policy logged and forwards it to the relay's log.
    pub(super) fn log(&mut self, level: tracing::Level, mut message: String) {
        if self.logs.len() >= MAX_LOG_LINES {
            return;
        }
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let policy = &*self.name;
        match level {
            tracing::Level::ERROR => tracing::error!(policy, "{message}"),
            tracing::Level::WARN => tracing::warn!(policy, "{message}"),
            tracing::Level::INFO => tracing::info!(policy, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(policy, "{message}"),
            tracing::Level::TRACE => tracing::trace!(policy, "{message}"),
        }
        self.logs.push(message);
    }

    pub(super) fn table_put(&mut self, key: String, value: String) {
        let cost = |k: &str, v: &str| k.len() + v.len() + TABLE_ENTRY_OVERHEAD;
        match &mut self.table_writes {
            Some(table) if table.len() < MAX_TABLE_ENTRIES || table.contains_key(&key) => {
                let new = cost(&key, &value);
                let old = table.get(&key).map_or(0, |v| cost(&key, v));
                let total = (self.table_bytes - old).saturating_add(new);
                if total > self.table_limit {
                    // Refused, not stored: the host never holds more than the limit. The load
                    // then fails with the figure (see `configure`).
                    self.table_refused = self.table_refused.saturating_add(new);
                    return;
                }
                self.table_bytes = total;
                table.insert(key, value);
            }
            Some(_) => self.log(tracing::Level::WARN, "table-put dropped: table full".into()),
            None => self.log(
                tracing::Level::WARN,
                format!("table-put `{key}` ignored: only allowed during configure"),
            ),
        }
    }

    /// Moves whatever the guest wrote to WASI stdout/stderr into the log.
    fn flush_stdio(&mut self) {
        let Some(wasi) = &self.wasi else { return };
        let (stdout, stderr) = (wasi.stdout.contents(), wasi.stderr.contents());
        for line in String::from_utf8_lossy(&stdout).lines().filter(|l| !l.is_empty()) {
            self.log(tracing::Level::INFO, format!("stdio: {line}"));
        }
        for line in String::from_utf8_lossy(&stderr).lines().filter(|l| !l.trim().is_empty()) {
            if !is_runtime_boilerplate(line) {
                self.last_stderr = Some(line.trim().chars().take(300).collect());
            }
            self.log(tracing::Level::INFO, format!("stdio: {line}"));
        }
    }
}

/// Lines a guest's language runtime prints around the real error: stack frames (indented),
/// componentize-py's Rust runtime panicking after the Python traceback (whose last line names
/// the exception), SpiderMonkey's stack header and abort notice after the JS message.
fn is_runtime_boilerplate(line: &str) -> bool {
    const PREFIXES: [&str; 6] = [
        "thread '",
        "note: run with `RUST_BACKTRACE",
        "stack backtrace:",
        "Python function threw an unexpected exception",
        "Stack:",
        "Redirecting call to abort()",
    ];
    line.starts_with(char::is_whitespace) || PREFIXES.iter().any(|prefix| line.starts_with(prefix))
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self.wasi.get_or_insert_with(WasiState::deny_all);
        WasiCtxView { ctx: &mut wasi.ctx, table: &mut wasi.table }
    }
}

/// A deny-by-default WASI: no preopened directories, no sockets, no name lookups, empty
/// environment and arguments, closed stdin, stdout/stderr captured (bounded) into the log.
struct WasiState {
    ctx: WasiCtx,
    table: ResourceTable,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl WasiState {
    fn deny_all() -> Self {
        let stdout = MemoryOutputPipe::new(MAX_STDIO);
        let stderr = MemoryOutputPipe::new(MAX_STDIO);
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        WasiState { ctx, table: ResourceTable::new(), stdout, stderr }
    }
}

/// Caps linear memory per store and remembers whether the cap was hit, so that the trap that
/// follows (an allocator abort, usually) is reported as what it is.
struct Limiter {
    max_memory: usize,
    exceeded: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

#[cfg(test)]
mod stderr_tests {
    use super::is_runtime_boilerplate;

    #[test]
    fn the_guests_own_message_is_kept_and_runtime_noise_skipped() {
        // What SpiderMonkey printed for `throw new Error(...)` from `configure`.
        let js = "expected a string, received [object]\nStack:\n  _utf8AllocateAndEncode@x.js:18:11\n\
                  Redirecting call to abort() to mozalloc_abort";
        let kept: Vec<_> = js.lines().filter(|l| !is_runtime_boilerplate(l)).collect();
        assert_eq!(kept, ["expected a string, received [object]"]);
        // What componentize-py printed for an uncaught exception.
        let py = "Traceback (most recent call last):\n  File \"/0/app.py\", line 85, in configure\n\
                  RuntimeError: odd\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\n\
                  Python function threw an unexpected exception\n\
                  note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace";
        let kept: Vec<_> = py.lines().filter(|l| !is_runtime_boilerplate(l)).collect();
        assert_eq!(kept.last(), Some(&"RuntimeError: odd"));
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    fn spin_cpu(duration: Duration) {
        let started = thread_cpu_time();
        while thread_cpu_time().saturating_sub(started) < duration {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn waiting_is_not_charged_and_working_is() {
        let mut clock = CpuClock::new(Duration::from_millis(20));
        // The first deadline only takes the reference.
        assert!(matches!(clock.on_deadline(), UpdateDeadline::Continue(_)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(clock.on_deadline(), UpdateDeadline::Continue(_)), "waiting was charged");
        spin_cpu(Duration::from_millis(25));
        assert!(matches!(clock.on_deadline(), UpdateDeadline::Interrupt), "work was not charged");
    }

    /// The clocks are injected: a real sleep near the ceiling would fail whenever the
    /// machine is slow to wake the test thread.
    #[test]
    fn a_starved_call_still_ends_at_the_wall_clock_ceiling() {
        let mut clock = CpuClock::new(Duration::from_millis(1));
        assert_eq!(clock.wall_ceiling(), MIN_WALL_CEILING);
        let (cpu, start) = (Duration::from_secs(7), Instant::now());
        assert!(matches!(clock.on_deadline_at(cpu, start), UpdateDeadline::Continue(_)));
        let just_before = start + MIN_WALL_CEILING - Duration::from_nanos(1);
        assert!(matches!(clock.on_deadline_at(cpu, just_before), UpdateDeadline::Continue(_)));
        assert!(!clock.starved);
        let at_ceiling = start + MIN_WALL_CEILING;
        assert!(matches!(clock.on_deadline_at(cpu, at_ceiling), UpdateDeadline::Interrupt));
        assert!(clock.starved, "the fault must say the machine starved the call");
    }

    #[test]
    fn the_budget_counts_cpu_from_the_first_tick() {
        let mut clock = CpuClock::new(Duration::from_millis(20));
        let (cpu, start) = (Duration::from_secs(3), Instant::now());
        assert!(matches!(clock.on_deadline_at(cpu, start), UpdateDeadline::Continue(_)));
        let later = start + Duration::from_millis(100);
        let almost = cpu + Duration::from_millis(19);
        assert!(matches!(clock.on_deadline_at(almost, later), UpdateDeadline::Continue(_)));
        let spent = cpu + Duration::from_millis(20);
        assert!(matches!(clock.on_deadline_at(spent, later), UpdateDeadline::Interrupt));
        assert!(!clock.starved, "used its budget: not starved");
    }
}
