//! The wasm boundary: `bindgen!` output, the host imports, and conversions to the host's types.
//!
//! Everything generated stays in this private module (STYLE.md §5): the rest of the relay sees
//! only [`super::types`].

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, HasSelf, InstancePre};

use super::instance::StoreState;
use super::types;

mod generated {
    wasmtime::component::bindgen!({
        path: "../policy-sdk/wit",
        world: "policy",
    });
}

use generated::PolicyPre;
use generated::postwarden::policy::host::{self as wit_host, LogLevel};
use generated::postwarden::policy::types as wit;

/// The name of the contract package and the version this relay speaks.
pub(super) const PACKAGE: &str = "postwarden:policy";
/// The contract version; components built against any 0.1.x are accepted.
pub(super) const VERSION: &str = "0.1.0";
/// The functions a policy must export.
pub(super) const EXPORTS: [&str; 4] = ["configure", "plan", "on-failure", "on-delivered"];

/// Adds the `host` interface (and the types-only interface) to `linker`.
pub(super) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<StoreState>,
) -> wasmtime::Result<()> {
    generated::Policy::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |state| state)
}

/// A pre-instantiated policy and the indices of its exports.
///
/// Each call instantiates afresh and looks up, and type-checks, only the export it calls: the
/// generated `PolicyPre::instantiate` would type-check all four on every decision.
#[derive(Clone)]
pub(super) struct Exports {
    pre: InstancePre<StoreState>,
    configure: ComponentExportIndex,
    plan: ComponentExportIndex,
    on_failure: ComponentExportIndex,
    on_delivered: ComponentExportIndex,
}

impl Exports {
    /// Checks every export's type once (through the generated bindings) and records indices.
    pub(super) fn new(pre: InstancePre<StoreState>) -> wasmtime::Result<Self> {
        PolicyPre::new(pre.clone())?;
        let component = pre.component();
        let index = |name: &str| {
            component
                .get_export_index(None, name)
                .ok_or_else(|| wasmtime::format_err!("missing export `{name}`"))
        };
        Ok(Exports {
            configure: index("configure")?,
            plan: index("plan")?,
            on_failure: index("on-failure")?,
            on_delivered: index("on-delivered")?,
            pre,
        })
    }

    pub(super) fn configure(
        &self,
        store: &mut Store<StoreState>,
        settings: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        let instance = self.pre.instantiate(&mut *store)?;
        let func = instance
            .get_typed_func::<(&str,), (Result<(), String>,)>(&mut *store, &self.configure)?;
        Ok(func.call(&mut *store, (settings,))?.0)
    }

    pub(super) fn plan(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
    ) -> wasmtime::Result<types::Decision> {
        let instance = self.pre.instantiate(&mut *store)?;
        let func = instance
            .get_typed_func::<(&wit::Context,), (wit::Decision,)>(&mut *store, &self.plan)?;
        Ok(decision(func.call(&mut *store, (&context(ctx),))?.0))
    }

    pub(super) fn on_failure(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
        failure: &types::Failure,
    ) -> wasmtime::Result<types::Action> {
        let instance = self.pre.instantiate(&mut *store)?;
        let func = instance.get_typed_func::<(&wit::Context, &wit::Failure), (wit::Action,)>(
            &mut *store,
            &self.on_failure,
        )?;
        let (answer,) = func.call(&mut *store, (&context(ctx), &to_wit_failure(failure)))?;
        Ok(action(answer, failure))
    }

    pub(super) fn on_delivered(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
        delivered: &types::DeliveryReport,
    ) -> wasmtime::Result<()> {
        let instance = self.pre.instantiate(&mut *store)?;
        let func = instance.get_typed_func::<(&wit::Context, &wit::DeliveryReport), ()>(
            &mut *store,
            &self.on_delivered,
        )?;
        func.call(&mut *store, (&context(ctx), &report(delivered)))
    }

    /// Instantiates without calling anything (benchmarks).
    pub(super) fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<()> {
        self.pre.instantiate(store).map(drop)
    }
}

impl wit_host::Host for StoreState {
    fn log(&mut self, level: LogLevel, message: String) {
        let level = match level {
            LogLevel::Trace => tracing::Level::TRACE,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Error => tracing::Level::ERROR,
        };
        self.log(level, message);
    }

    fn now(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn table_put(&mut self, key: String, value: String) {
        self.table_put(key, value);
    }

    fn table_get(&mut self, key: String) -> Option<String> {
        self.table.get(&key).cloned()
    }

    fn kv_get(&mut self, key: String) -> Option<String> {
        self.kv.get(&key)
    }

    fn kv_set(&mut self, key: String, value: String) {
        if let Err(e) = self.kv.set(&key, &value) {
            self.log(tracing::Level::WARN, format!("kv-set `{key}` dropped: {e}"));
        }
    }

    fn kv_delete(&mut self, key: String) {
        if let Err(e) = self.kv.delete(&key) {
            self.log(tracing::Level::WARN, format!("kv-delete `{key}` failed: {e}"));
        }
    }
}

impl wit::Host for StoreState {}

/// Converts the host's context into the generated type.
fn context(ctx: &types::Context) -> wit::Context {
    wit::Context {
        domain: ctx.domain.clone(),
        mx_host: ctx.mx_host.clone(),
        ip: ctx.ip.clone(),
        mx_preference: ctx.mx_preference,
        mx_index: ctx.mx_index,
        mx_count: ctx.mx_count,
        attempt: ctx.attempt,
        message_age: ctx.message_age,
        requiretls: ctx.requiretls,
        tls_required_no: ctx.tls_required_no,
    }
}

fn to_wit_failure(failure: &types::Failure) -> wit::Failure {
    use types::Failure as F;
    match failure.clone() {
        F::StarttlsNotOffered => wit::Failure::StarttlsNotOffered,
        F::StarttlsRefused { code, text } => {
            wit::Failure::StarttlsRefused(wit::SmtpReply { code, text })
        }
        F::HandshakeFailed(d) => wit::Failure::HandshakeFailed(d),
        F::CertificateUntrusted(d) => wit::Failure::CertificateUntrusted(d),
        F::CertificateExpired(d) => wit::Failure::CertificateExpired(d),
        F::CertificateNotYetValid(d) => wit::Failure::CertificateNotYetValid(d),
        F::CertificateNameMismatch(d) => wit::Failure::CertificateNameMismatch(d),
        F::TlsVersionTooOld(d) => wit::Failure::TlsVersionTooOld(d),
        F::ConnectionLost(d) => wit::Failure::ConnectionLost(d),
        F::Timeout(d) => wit::Failure::Timeout(d),
    }
}

fn report(report: &types::DeliveryReport) -> wit::DeliveryReport {
    wit::DeliveryReport {
        requirement: requirement_to_wit(&report.requirement),
        tls_version: report.tls_version.map(version_to_wit),
        cipher: report.cipher.clone(),
        certificate_verified: report.certificate_verified,
    }
}

fn decision(decision: wit::Decision) -> types::Decision {
    match decision {
        wit::Decision::Abstain => types::Decision::Abstain,
        wit::Decision::Require(r) => types::Decision::Require(requirement_from_wit(r)),
    }
}

/// Converts a policy's action. Codes are the host's business: 4.7.x for deferrals (refined by
/// the chain from the failure class), 5.7.x for bounces.
fn action(action: wit::Action, failure: &types::Failure) -> types::Action {
    match action {
        wit::Action::ContinuePlaintext => types::Action::ContinuePlaintext,
        wit::Action::ReconnectPlaintext => types::Action::ReconnectPlaintext,
        wit::Action::NextMx => types::Action::NextMx,
        wit::Action::Defer(reason) => types::Action::defer(failure.defer_code(), reason),
        wit::Action::Bounce(reason) => {
            let code = if failure.allows_continue_plaintext() { "5.7.4" } else { "5.7.5" };
            types::Action::bounce(code, reason)
        }
    }
}

fn requirement_from_wit(r: wit::Requirement) -> types::Requirement {
    types::Requirement {
        level: match r.level {
            wit::TlsLevel::None => types::TlsLevel::None,
            wit::TlsLevel::May => types::TlsLevel::May,
            wit::TlsLevel::Encrypt => types::TlsLevel::Encrypt,
            wit::TlsLevel::Verify => types::TlsLevel::Verify,
            wit::TlsLevel::Secure => types::TlsLevel::Secure,
        },
        match_names: r.match_names,
        min_version: r.min_version.map(|v| match v {
            wit::TlsVersion::Tls12 => types::TlsVersion::Tls12,
            wit::TlsVersion::Tls13 => types::TlsVersion::Tls13,
        }),
    }
}

fn requirement_to_wit(r: &types::Requirement) -> wit::Requirement {
    wit::Requirement {
        level: match r.level {
            types::TlsLevel::None => wit::TlsLevel::None,
            types::TlsLevel::May => wit::TlsLevel::May,
            types::TlsLevel::Encrypt => wit::TlsLevel::Encrypt,
            types::TlsLevel::Verify => wit::TlsLevel::Verify,
            types::TlsLevel::Secure => wit::TlsLevel::Secure,
        },
        match_names: r.match_names.clone(),
        min_version: r.min_version.map(version_to_wit),
    }
}

fn version_to_wit(v: types::TlsVersion) -> wit::TlsVersion {
    match v {
        types::TlsVersion::Tls12 => wit::TlsVersion::Tls12,
        types::TlsVersion::Tls13 => wit::TlsVersion::Tls13,
    }
}
