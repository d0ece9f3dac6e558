//! The policy engine: WebAssembly components decide the TLS requirement of every delivery.
//!
//! # Layout
//! - [`types`]: the relay's own view of the contract's values.
//! - [`facts`]: what the relay gathers about an attempt (DNSSEC, MTA-STS, TLSA) and the floors
//!   a requirement's basis sets before connecting.
//! - [`engine`]: the wasmtime engine, compilation and its cache, contract checks, deadlines.
//! - [`instance`]: one loaded policy and the calls into it (fresh store per call, limits,
//!   fault classification).
//! - [`chain`]: the ordered chain, fail-closed handling and the host's overriding rules.
//! - [`kv`]: the per-policy persistent store.
//! - [`pool`]: the threads policy calls run on, off the async workers.
//! - `bindings` (private): `bindgen!` output for every contract version the relay loads, and
//!   the conversions (0.1 guests are adapted to the host's 0.2 view there).

mod bindings;
pub mod chain;
pub mod engine;
pub mod facts;
pub mod instance;
pub mod kv;
pub mod pool;
pub mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use chain::{Chain, Decider, Plan, Response, TlsRequiredNo, Verdict};
pub use engine::{
    CompileSource, ComponentInfo, EngineOptions, LoadError, PolicyEngine, PolicySource,
};
pub use instance::{Limits, LoadedPolicy, PolicyFault};
pub use kv::{FileKv, KvStore, MemoryKv};
pub use types::{
    Action, Context, Decision, DeliveryReport, Facts, Failure, Requirement, TlsBasis, TlsLevel,
    TlsVersion,
};

use crate::config::{Config, PolicyConfig};

/// The chain in force, swappable at run time (SIGHUP): in-flight deliveries keep the chain
/// they started with; a reload that fails to load keeps the previous chain.
#[derive(Debug)]
pub struct ChainHandle {
    current: std::sync::RwLock<Arc<Chain>>,
}

impl ChainHandle {
    /// A handle holding `chain`.
    pub fn new(chain: Chain) -> Self {
        ChainHandle { current: std::sync::RwLock::new(Arc::new(chain)) }
    }

    /// The chain in force.
    pub fn current(&self) -> Arc<Chain> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Puts `chain` in force; calls in flight finish with the chain they started with.
    pub fn replace(&self, chain: Chain) {
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(chain);
    }

    /// Loads the chain described by `config` and, only if every policy loads and configures,
    /// puts it in force. On error the previous chain stays and the error is returned.
    pub fn reload(&self, engine: &PolicyEngine, config: &Config) -> Result<(), LoadError> {
        let chain = load_chain(engine, config, StateMode::Persistent)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(chain);
        Ok(())
    }
}

/// How policy state is kept when loading a chain.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum StateMode {
    /// Persistent files under the configured state directory.
    Persistent,
    /// A copy in memory of the persistent state (`policy explain`: looking reads what the
    /// policies remember but must not change it).
    Snapshot,
}

/// Builds the engine described by `config`.
pub fn engine_from_config(config: &Config) -> Result<PolicyEngine, LoadError> {
    PolicyEngine::new(&EngineOptions {
        cache_dir: Some(config.policy_engine.cache_dir.clone()),
        max_concurrent_calls: config.policy_engine.max_concurrent_calls,
    })
}

/// Loads every policy of `config`, in order, into a chain. Fails on the first policy that
/// cannot be read, does not match its pinned hash, violates the contract or rejects its
/// settings; the error names the policy.
pub fn load_chain(
    engine: &PolicyEngine,
    config: &Config,
    state: StateMode,
) -> Result<Chain, LoadError> {
    let mut policies = Vec::with_capacity(config.policies.len());
    for policy in &config.policies {
        let source = read_source(policy)?;
        if let Some(pin) = &policy.sha256 {
            let actual = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&source.bytes));
            if !pin.eq_ignore_ascii_case(&actual) {
                return Err(LoadError::Invalid {
                    name: policy.name.clone(),
                    reason: format!("sha256 is {actual}, but the config pins {pin}"),
                });
            }
        }
        let kv: Arc<dyn KvStore> = match state {
            StateMode::Persistent => Arc::new(open_state(config, policy)?),
            StateMode::Snapshot => {
                let snapshot = MemoryKv::default();
                for (key, value) in open_state(config, policy)?.entries() {
                    // Entries of a valid file are within the limits.
                    let _ = snapshot.set(&key, &value);
                }
                Arc::new(snapshot)
            }
        };
        let (loaded, info) = engine.load(&source, kv)?;
        tracing::info!(
            policy = %policy.name,
            sha256 = %info.sha256,
            source = ?info.source,
            load_ms = info.load_time.as_secs_f64() * 1000.0,
            "policy loaded"
        );
        policies.push(Arc::new(loaded));
    }
    Ok(Chain::new(
        policies,
        config.policy_engine.default_level,
        config.policy_engine.tls_required_no,
    ))
}

/// The state file of policy `name` under `dir`.
pub fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

fn open_state(config: &Config, policy: &PolicyConfig) -> Result<FileKv, LoadError> {
    FileKv::open(state_path(&config.policy_engine.state_dir, &policy.name)).map_err(|e| {
        LoadError::Configure {
            name: policy.name.clone(),
            fault: PolicyFault::Configure(format!("state store: {e}")),
        }
    })
}

fn read_source(policy: &PolicyConfig) -> Result<PolicySource, LoadError> {
    let bytes = std::fs::read(&policy.path).map_err(|source| LoadError::Read {
        name: policy.name.clone(),
        path: policy.path.clone(),
        source,
    })?;
    Ok(PolicySource {
        name: policy.name.clone(),
        bytes,
        settings: policy.settings_json(),
        limits: policy.limits(),
    })
}
