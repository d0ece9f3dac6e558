//! The wasmtime engine that runs policies: configuration, compilation with an on-disk cache,
//! contract checking, and the epoch ticker that enforces deadlines.
//!
//! One engine serves every policy of the process. Compilation happens once per policy at
//! startup or reload (and not even then when the cache has the artifact); every call gets a
//! fresh store from the pooling allocator.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{self, Contract, Exports};
use super::instance::{Limits, LoadedPolicy, Parts, PolicyFault, StoreState};
use super::kv::KvStore;
use super::pool::CallPool;

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(1);
/// Largest memory cap a policy may ask for; the pooling allocator reserves slots this big.
pub const MAX_MEMORY_LIMIT: usize = 512 << 20;
/// Largest component accepted, checked before compiling.
const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Where compiled policies are cached (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Instance slots of the pooling allocator (pool size). Calls still run at most one per
    /// CPU: the policy pool runs them before their store is created.
    pub max_concurrent_calls: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { cache_dir: None, max_concurrent_calls: 128 }
    }
}

/// Everything needed to load one policy.
#[derive(Clone, Debug)]
pub struct PolicySource {
    /// The policy's name, used in logs, metrics and error messages.
    pub name: String,
    /// The component: binary, or component text (WAT).
    pub bytes: Vec<u8>,
    /// The `settings` table, as JSON.
    pub settings: String,
    /// Per-call limits.
    pub limits: Limits,
}

/// Why a policy could not be loaded. Each error names the policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Reading the file failed.
    #[error("policy `{name}`: cannot read {path}: {source}")]
    Read {
        /// Policy name.
        name: String,
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The bytes are not a valid component (or are a core module).
    #[error("policy `{name}`: not a valid WebAssembly component: {reason}")]
    Invalid {
        /// Policy name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The component does not implement the contract.
    #[error("policy `{name}`: does not implement the postwarden:policy contract: {reason}")]
    Contract {
        /// Policy name.
        name: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// `configure` failed or faulted.
    #[error("policy `{name}`: {fault}")]
    Configure {
        /// Policy name.
        name: String,
        /// The fault.
        fault: PolicyFault,
    },
    /// A decision cannot run under the decision limits (`policy check`).
    #[error("policy `{name}`: a decision {fault}")]
    Decision {
        /// Policy name.
        name: String,
        /// The fault.
        fault: PolicyFault,
    },
    /// The engine could not be built.
    #[error("policy engine: {0}")]
    Engine(String),
}

/// Where a compiled artifact came from (reported by `policy check` and tested: a second start
/// must not recompile).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum CompileSource {
    /// Compiled now with Cranelift.
    Compiled,
    /// Loaded from the on-disk cache.
    Cache,
}

/// What `check` reports about a component.
#[derive(Clone, Debug)]
pub struct ComponentInfo {
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    /// The contract version the component was built against.
    pub contract_version: String,
    /// Every import, by name.
    pub imports: Vec<String>,
    /// Whether the component imports WASI (it then gets the deny-by-default WASI).
    pub imports_wasi: bool,
    /// Where the compiled code came from.
    pub source: CompileSource,
    /// Time spent compiling or loading from cache.
    pub load_time: Duration,
}

/// Components larger than this run on the copy-on-write engine (see [`PolicyEngine`]).
const LARGE_COMPONENT: usize = 1 << 20;

/// The process-wide policy engine.
///
/// It holds up to two wasmtime engines that differ in one setting, how linear memory is
/// initialised on every fresh instance. Small policies (Rust, WAT: kilobytes of data) copy
/// their data segments, which measured faster than mapping a copy-on-write image (4.8 vs 5.2
/// µs per decision). Large ones (Python, JavaScript: megabytes of data) map the image, since
/// copying it on every decision would cost far more. The second engine is built only when a
/// large policy is loaded.
#[derive(Clone)]
pub struct PolicyEngine {
    small: Arc<Runtime>,
    large: Arc<OnceLock<Result<Runtime, String>>>,
    slots: u32,
    cache_dir: Option<PathBuf>,
    pool: Arc<CallPool>,
}

/// One wasmtime engine with its linker and epoch ticker.
struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    _ticker: Ticker,
}

impl Runtime {
    fn new(slots: u32, copy_on_write: bool) -> Result<Self, String> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .max_memory_size(MAX_MEMORY_LIMIT)
            // Reset reused memory in place, guided by the kernel's dirty-page tracking
            // (pagemap_scan), instead of madvise: no page faults and no cross-CPU TLB
            // shootdowns on the next instance (research §4.4; measured 17.7 → 8.3 µs).
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(Enabled::Auto);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .memory_init_cow(copy_on_write)
            .max_wasm_stack(512 << 10)
            .wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| format!("{e:#}"))?;
        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker).map_err(|e| format!("{e:#}"))?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| format!("{e:#}"))?;
        never_block(&mut linker).map_err(|e| format!("{e:#}"))?;
        let ticker = Ticker::start(engine.clone());
        Ok(Runtime { engine, linker, _ticker: ticker })
    }
}

/// Replaces WASI's blocking `poll` and `pollable.block` with versions that report every
/// pollable ready at once.
///
/// A guest waits in the host, where no deadline can reach it: epoch interruption fires only in
/// guest code, and the deadline counts CPU time, which waiting does not use. A Python policy
/// calling `time.sleep(3)` therefore held its decision (and a thread of the call pool) for three
/// seconds. Nothing a policy may do needs to wait: it has no sockets or files, and its stdout
/// and stderr are memory pipes that are always ready. So in a policy, time does not pass by
/// waiting: sleeps return at once, and a guest that polls in a loop burns its CPU budget and is
/// stopped like any other loop.
fn never_block(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    linker.allow_shadowing(true);
    let mut poll = linker.instance("wasi:io/poll@0.2.12")?;
    poll.func_wrap("poll", |_, (pollables,): (Vec<Resource<DynPollable>>,)| {
        let ready = 0..u32::try_from(pollables.len()).unwrap_or(u32::MAX);
        Ok((ready.collect::<Vec<u32>>(),))
    })?;
    poll.func_wrap("[method]pollable.block", |_, (_,): (Resource<DynPollable>,)| Ok(()))?;
    linker.allow_shadowing(false);
    Ok(())
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine").field("cache_dir", &self.cache_dir).finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Builds the engine: pooling allocator, epoch interruption, no component-model-async.
    pub fn new(options: &EngineOptions) -> Result<Self, LoadError> {
        let slots = options.max_concurrent_calls.max(1);
        Ok(PolicyEngine {
            small: Arc::new(Runtime::new(slots, false).map_err(LoadError::Engine)?),
            large: Arc::default(),
            slots,
            cache_dir: options.cache_dir.clone(),
            pool: Arc::new(
                CallPool::per_cpu().map_err(|e| {
                    LoadError::Engine(format!("cannot start the policy threads: {e}"))
                })?,
            ),
        })
    }

    /// The runtime for a component of `len` bytes.
    fn runtime(&self, len: usize) -> Result<&Runtime, LoadError> {
        if len <= LARGE_COMPONENT {
            return Ok(&self.small);
        }
        self.large
            .get_or_init(|| Runtime::new(self.slots, true))
            .as_ref()
            .map_err(|e| LoadError::Engine(e.clone()))
    }

    /// Compiles (or loads from cache) and checks a component without configuring it.
    pub fn check(&self, name: &str, bytes: &[u8]) -> Result<ComponentInfo, LoadError> {
        self.prepare(name, bytes).map(|(_, info)| info)
    }

    /// Instantiates the component once as a decision would, under the decision limits of
    /// `limits`, without configuring it: a component whose initial memory (its data segments)
    /// exceeds the decision memory cap loads and configures, yet every decision faults.
    /// `policy check` calls this so that such a policy fails the check, not every delivery.
    pub fn check_decision_instance(
        &self,
        name: &str,
        bytes: &[u8],
        limits: Limits,
    ) -> Result<(), LoadError> {
        let (pre, info) = self.prepare(name, bytes)?;
        let parts = Parts {
            name: Arc::from(name),
            exports: pre,
            needs_wasi: info.imports_wasi,
            engine: self.runtime(bytes.len())?.engine.clone(),
            limits,
            kv: Arc::new(super::kv::MemoryKv::default()),
            sha256: info.sha256,
            pool: self.pool.clone(),
        };
        LoadedPolicy::unconfigured(parts)
            .instantiate_only()
            .map_err(|fault| LoadError::Decision { name: name.to_owned(), fault })
    }

    /// Loads a policy: compile or load from cache, check the contract, pre-instantiate, and run
    /// `configure` with its settings.
    pub fn load(
        &self,
        source: &PolicySource,
        kv: Arc<dyn KvStore>,
    ) -> Result<(LoadedPolicy, ComponentInfo), LoadError> {
        let name = &source.name;
        let largest = source.limits.memory.max(source.limits.configure_memory);
        if largest > MAX_MEMORY_LIMIT {
            return Err(LoadError::Engine(format!(
                "policy `{name}`: memory limit {largest} exceeds the maximum of {MAX_MEMORY_LIMIT} bytes"
            )));
        }
        let (pre, info) = self.prepare(name, &source.bytes)?;
        let parts = Parts {
            name: Arc::from(name.as_str()),
            exports: pre,
            needs_wasi: info.imports_wasi,
            engine: self.runtime(source.bytes.len())?.engine.clone(),
            limits: source.limits,
            kv,
            sha256: info.sha256.clone(),
            pool: self.pool.clone(),
        };
        let policy = LoadedPolicy::configure(parts, &source.settings)
            .map_err(|fault| LoadError::Configure { name: name.clone(), fault })?;
        Ok((policy, info))
    }

    fn prepare(&self, name: &str, bytes: &[u8]) -> Result<(Exports, ComponentInfo), LoadError> {
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(LoadError::Invalid {
                name: name.to_owned(),
                reason: format!("{} bytes exceeds the limit of {MAX_COMPONENT_BYTES}", bytes.len()),
            });
        }
        let started = std::time::Instant::now();
        let sha256 = hex::encode(Sha256::digest(bytes));
        let rt = self.runtime(bytes.len())?;
        let (component, source) = self.compile(rt, name, bytes, &sha256)?;
        let load_time = started.elapsed();
        let contract = |reason: String| LoadError::Contract { name: name.to_owned(), reason };
        let (contract_version, imports, imports_wasi) =
            check_contract(&rt.engine, &component).map_err(contract)?;
        let instance_pre =
            rt.linker.instantiate_pre(&component).map_err(|e| contract(format!("{e:#}")))?;
        // `check_contract` accepted only versions `Contract::of_version` knows.
        let version = Contract::of_version(&contract_version)
            .ok_or_else(|| contract(format!("unknown version {contract_version}")))?;
        let pre = Exports::new(instance_pre, version)
            .map_err(|e| contract(format!("as postwarden:policy@{contract_version}: {e:#}")))?;
        let info =
            ComponentInfo { sha256, contract_version, imports, imports_wasi, source, load_time };
        Ok((pre, info))
    }

    /// Compiles `bytes`, going through the cache when one is configured. The cache key is the
    /// content hash plus the engine's compatibility hash, so a wasmtime upgrade or a changed
    /// setting never loads stale code.
    fn compile(
        &self,
        rt: &Runtime,
        name: &str,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, CompileSource), LoadError> {
        let invalid = |e: wasmtime::Error| LoadError::Invalid {
            name: name.to_owned(),
            reason: format!("{e:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            let wrapped = wrap_core_module(bytes)
                .map_err(|reason| LoadError::Invalid { name: name.to_owned(), reason })?;
            return Ok((
                Component::new(&rt.engine, &wrapped).map_err(invalid)?,
                CompileSource::Compiled,
            ));
        };
        let path = cache_path(&rt.engine, dir, sha256);
        // Read whole rather than mapped (`deserialize_file`): a mapped artifact faults its
        // pages in during the first decisions, and those faults are charged to the decisions'
        // CPU deadline. For a 35 MB Python artifact that pushed first decisions past 10 ms;
        // reading costs ~20 ms once, at load.
        if let Ok(cached) = std::fs::read(&path) {
            // SAFETY: `deserialize` trusts its input to be wasmtime output. The cache
            // directory is the relay's own, written only below with `precompile_component`
            // output (atomically, via rename), and the file name binds it to the content hash
            // and this engine's compatibility hash.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize(&rt.engine, &cached) } {
                Ok(component) => return Ok((component, CompileSource::Cache)),
                Err(e) => {
                    tracing::warn!(policy = name, path = %path.display(), "ignoring unusable cache entry: {e:#}")
                }
            }
        }
        let wrapped = wrap_core_module(bytes)
            .map_err(|reason| LoadError::Invalid { name: name.to_owned(), reason })?;
        let compiled = rt.engine.precompile_component(&wrapped).map_err(invalid)?;
        if let Err(e) = write_atomically(&path, &compiled) {
            tracing::warn!(policy = name, path = %path.display(), "cannot cache compiled policy: {e}");
        }
        // SAFETY: `compiled` was produced by `precompile_component` on this very engine.
        #[allow(unsafe_code)]
        let component =
            unsafe { Component::deserialize(&rt.engine, &compiled) }.map_err(invalid)?;
        Ok((component, CompileSource::Compiled))
    }
}

/// The cache file for content `sha256` compiled by `engine`.
fn cache_path(engine: &Engine, dir: &Path, sha256: &str) -> PathBuf {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()))
}

/// Converts a deadline to epoch ticks, rounding up and adding one tick: the first tick may
/// come at any moment after the store starts.
pub(super) fn deadline_ticks(deadline: Duration) -> u64 {
    let ticks = deadline.as_nanos().div_ceil(TICK.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(1)
}

/// Checks exports and imports against the contract, naming what is wrong. Returns the contract
/// version found, the import names and whether WASI is imported.
fn check_contract(
    engine: &Engine,
    component: &Component,
) -> Result<(String, Vec<String>, bool), String> {
    let ty = component.component_type();
    let exports: Vec<(String, bool)> = ty
        .exports(engine)
        .map(|(name, item)| (name.to_owned(), matches!(item.ty, ComponentItem::ComponentFunc(_))))
        .collect();
    for wanted in bindings::EXPORTS {
        match exports.iter().find(|(name, _)| name == wanted) {
            Some((_, true)) => {}
            Some((_, false)) => return Err(format!("export `{wanted}` is not a function")),
            None => {
                let found: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
                return Err(format!(
                    "missing export `{wanted}` (the component exports: {})",
                    if found.is_empty() { "nothing".to_owned() } else { found.join(", ") }
                ));
            }
        }
    }
    let mut version = None;
    let mut imports = Vec::new();
    let mut wasi = false;
    for (name, _) in ty.imports(engine) {
        imports.push(name.to_owned());
        if name.starts_with("wasi:") {
            wasi = true;
            continue;
        }
        let Some(rest) = name.strip_prefix(bindings::PACKAGE).and_then(|r| r.strip_prefix('/'))
        else {
            return Err(format!(
                "imports `{name}`, which a policy may not use (only {}/* and wasi:*)",
                bindings::PACKAGE
            ));
        };
        let (_, found) = rest.split_once('@').unwrap_or((rest, ""));
        if Contract::of_version(found).is_none() {
            return Err(format!(
                "built against {}@{found}, but this relay loads {} (newest {})",
                bindings::PACKAGE,
                bindings::LOADABLE.map(|v| format!("{v}x")).join(" and "),
                bindings::VERSION
            ));
        }
        if version.as_ref().is_some_and(|v: &String| v != found) {
            return Err(format!(
                "imports two versions of {} ({} and {found})",
                bindings::PACKAGE,
                version.unwrap_or_default()
            ));
        }
        version = Some(found.to_owned());
    }
    Ok((version.unwrap_or_else(|| bindings::VERSION.to_owned()), imports, wasi))
}

/// Turns a core module into a component, so that toolchains without component support (or
/// Rust built for `wasm32-unknown-unknown`, which imports no WASI and instantiates faster)
/// can implement the contract: the module must carry the `component-type` custom section that
/// `wit-bindgen` embeds (`wasm-tools component embed` does the same for hand-built modules).
/// Components and component text pass through untouched.
fn wrap_core_module(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    if !bytes.starts_with(b"\0asm\x01\0\0\0") {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    wit_component::ComponentEncoder::default()
        .module(bytes)
        .map_err(|e| describe_core_module_error(&e))?
        .validate(true)
        .encode()
        .map(std::borrow::Cow::Owned)
        .map_err(|e| describe_core_module_error(&e))
}

fn describe_core_module_error(e: &impl std::fmt::Display) -> String {
    format!(
        "core module cannot be made a component: {e:#} (build it with wit-bindgen against \
         policy-sdk/wit, or embed the world with `wasm-tools component embed`)"
    )
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Advances the engine's epoch every [`TICK`] on a background thread, until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new().name("policy-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                engine.increment_epoch();
            }
        });
        if let Err(e) = spawned {
            // Without the ticker no deadline fires, and a looping policy would hang its caller.
            // Refusing to run is the only fail-closed answer.
            panic!("cannot start the policy epoch thread: {e}");
        }
        Ticker { stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
