//! The wasm boundary: `bindgen!` output for every contract version the relay loads, the host
//! imports, and conversions to the host's types.
//!
//! Everything generated stays in this private module (STYLE.md §5): the rest of the relay sees
//! only [`super::types`]. wasmtime links a component only when its types *equal* the host's, so
//! each contract version keeps its own bindings ([`v0_1`], [`v0_2`]); a component's version is
//! read from its import names ([`Contract::of_version`]) and its calls go through the matching
//! module. The host's own types follow the newest contract; older guests are adapted at this
//! boundary.

mod v0_1;
mod v0_2;

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, Instance, InstancePre};

use super::instance::StoreState;
use super::types;

/// The name of the contract package.
pub(super) const PACKAGE: &str = "postwarden:policy";
/// The newest contract version, the one the SDK builds against.
pub(super) const VERSION: &str = "0.2.0";
/// Every contract version the relay loads, as `major.minor` prefixes of a package version.
pub(super) const LOADABLE: [&str; 2] = ["0.1.", "0.2."];
/// The functions a policy must export (the same in every version).
pub(super) const EXPORTS: [&str; 4] = ["configure", "plan", "on-failure", "on-delivered"];

/// A contract version the relay speaks.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum Contract {
    /// `postwarden:policy@0.1.x`, adapted.
    V0_1,
    /// `postwarden:policy@0.2.x`.
    V0_2,
}

impl Contract {
    /// The contract a package version (`0.2.0`) belongs to.
    pub(super) fn of_version(version: &str) -> Option<Self> {
        if version.starts_with("0.1.") {
            Some(Contract::V0_1)
        } else if version.starts_with("0.2.") {
            Some(Contract::V0_2)
        } else {
            None
        }
    }
}

/// Adds the host interfaces of every contract version to `linker`.
pub(super) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<StoreState>,
) -> wasmtime::Result<()> {
    v0_1::add_to_linker(linker)?;
    v0_2::add_to_linker(linker)
}

/// A pre-instantiated policy and the indices of its exports.
///
/// Each call instantiates afresh and looks up, and type-checks, only the export it calls: the
/// generated `PolicyPre::instantiate` would type-check all four on every decision.
#[derive(Clone)]
pub(super) struct Exports {
    pre: InstancePre<StoreState>,
    contract: Contract,
    configure: ComponentExportIndex,
    plan: ComponentExportIndex,
    on_failure: ComponentExportIndex,
    on_delivered: ComponentExportIndex,
}

impl Exports {
    /// Checks every export's type once (through the generated bindings of `contract`) and
    /// records indices.
    pub(super) fn new(pre: InstancePre<StoreState>, contract: Contract) -> wasmtime::Result<Self> {
        match contract {
            Contract::V0_1 => v0_1::type_check(&pre)?,
            Contract::V0_2 => v0_2::type_check(&pre)?,
        }
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
            contract,
            pre,
        })
    }

    pub(super) fn configure(
        &self,
        store: &mut Store<StoreState>,
        settings: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        let instance = self.pre.instantiate(&mut *store)?;
        // The same type in every version.
        let func = instance
            .get_typed_func::<(&str,), (Result<(), String>,)>(&mut *store, &self.configure)?;
        Ok(func.call(&mut *store, (settings,))?.0)
    }

    pub(super) fn plan(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
    ) -> wasmtime::Result<types::Decision> {
        let instance = self.instantiate_for(store, ctx)?;
        match self.contract {
            Contract::V0_1 => v0_1::plan(store, &instance, &self.plan, ctx),
            Contract::V0_2 => v0_2::plan(store, &instance, &self.plan, ctx),
        }
    }

    pub(super) fn on_failure(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
        failure: &types::Failure,
    ) -> wasmtime::Result<types::Action> {
        let instance = self.instantiate_for(store, ctx)?;
        match self.contract {
            Contract::V0_1 => v0_1::on_failure(store, &instance, &self.on_failure, ctx, failure),
            Contract::V0_2 => v0_2::on_failure(store, &instance, &self.on_failure, ctx, failure),
        }
    }

    pub(super) fn on_delivered(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
        report: &types::DeliveryReport,
    ) -> wasmtime::Result<()> {
        let instance = self.instantiate_for(store, ctx)?;
        match self.contract {
            Contract::V0_1 => v0_1::on_delivered(store, &instance, &self.on_delivered, ctx, report),
            Contract::V0_2 => v0_2::on_delivered(store, &instance, &self.on_delivered, ctx, report),
        }
    }

    /// Instantiates without calling anything (benchmarks).
    pub(super) fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<()> {
        self.pre.instantiate(store).map(drop)
    }

    /// A fresh instance whose `facts` imports answer for `ctx`.
    fn instantiate_for(
        &self,
        store: &mut Store<StoreState>,
        ctx: &types::Context,
    ) -> wasmtime::Result<Instance> {
        store.data_mut().facts = ctx.facts.clone();
        self.pre.instantiate(&mut *store)
    }
}

/// Implements a version's `host` interface on [`StoreState`]: the functions are the same in
/// every version, only the generated trait and its `log-level` type differ.
macro_rules! impl_host {
    ($host:path, $level:path) => {
        impl $host for StoreState {
            fn log(&mut self, level: $level, message: String) {
                use $level as L;
                let level = match level {
                    L::Trace => tracing::Level::TRACE,
                    L::Debug => tracing::Level::DEBUG,
                    L::Info => tracing::Level::INFO,
                    L::Warn => tracing::Level::WARN,
                    L::Error => tracing::Level::ERROR,
                };
                StoreState::log(self, level, message);
            }

            fn now(&mut self) -> u64 {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }

            fn table_put(&mut self, key: String, value: String) {
                StoreState::table_put(self, key, value);
            }

            fn table_get(&mut self, key: String) -> Option<String> {
                self.table.get(&key).cloned()
            }

            fn kv_get(&mut self, key: String) -> Option<String> {
                self.kv.get(&key)
            }

            fn kv_set(&mut self, key: String, value: String) {
                if let Err(e) = self.kv.set(&key, &value) {
                    StoreState::log(
                        self,
                        tracing::Level::WARN,
                        format!("kv-set `{key}` dropped: {e}"),
                    );
                }
            }

            fn kv_delete(&mut self, key: String) {
                if let Err(e) = self.kv.delete(&key) {
                    StoreState::log(
                        self,
                        tracing::Level::WARN,
                        format!("kv-delete `{key}` failed: {e}"),
                    );
                }
            }
        }
    };
}
use impl_host;

/// Converts a version's `action`: the type has the same cases in every version. Codes are the
/// host's business: 4.7.x for deferrals (refined by the chain from the failure class), 5.7.x
/// for bounces.
macro_rules! convert_action {
    ($action:expr, $failure:expr, $wit:path) => {{
        use $wit as A;
        let failure: &types::Failure = $failure;
        match $action {
            A::ContinuePlaintext => types::Action::ContinuePlaintext,
            A::ReconnectPlaintext => types::Action::ReconnectPlaintext,
            A::NextMx => types::Action::NextMx,
            A::Defer(reason) => types::Action::defer(failure.defer_code(), reason),
            A::Bounce(reason) => {
                let code = if failure.allows_continue_plaintext() { "5.7.4" } else { "5.7.5" };
                types::Action::bounce(code, reason)
            }
        }
    }};
}
use convert_action;

/// Converts the host's context into a version's `context` record (the same fields in every
/// version).
macro_rules! convert_context {
    ($ctx:expr, $wit:path) => {{
        let ctx: &types::Context = $ctx;
        $wit {
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
    }};
}
use convert_context;

/// The calls into a component of one contract version: linking, the type check, and `plan`,
/// `on-failure`, `on-delivered` with their conversions. The same code in every version module;
/// only the generated types it names (`generated`, `wit`) and the version's conversion functions
/// (`requirement_from_wit`, `requirement_to_wit`, `to_wit_failure`, `version_to_wit`) differ, and
/// those resolve where the macro is used.
macro_rules! contract_calls {
    () => {
        pub(super) fn add_to_linker(
            linker: &mut wasmtime::component::Linker<StoreState>,
        ) -> wasmtime::Result<()> {
            generated::Policy::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |state| {
                state
            })
        }

        pub(super) fn type_check(pre: &InstancePre<StoreState>) -> wasmtime::Result<()> {
            PolicyPre::new(pre.clone()).map(drop)
        }

        pub(super) fn plan(
            store: &mut Store<StoreState>,
            instance: &Instance,
            export: &ComponentExportIndex,
            ctx: &types::Context,
        ) -> wasmtime::Result<types::Decision> {
            let func = instance
                .get_typed_func::<(&wit::Context,), (wit::Decision,)>(&mut *store, export)?;
            let (decision,) = func.call(&mut *store, (&convert_context!(ctx, wit::Context),))?;
            Ok(match decision {
                wit::Decision::Abstain => types::Decision::Abstain,
                wit::Decision::Require(r) => types::Decision::Require(requirement_from_wit(r)),
            })
        }

        pub(super) fn on_failure(
            store: &mut Store<StoreState>,
            instance: &Instance,
            export: &ComponentExportIndex,
            ctx: &types::Context,
            failure: &types::Failure,
        ) -> wasmtime::Result<types::Action> {
            let func = instance.get_typed_func::<(&wit::Context, &wit::Failure), (wit::Action,)>(
                &mut *store,
                export,
            )?;
            let (answer,) = func.call(
                &mut *store,
                (&convert_context!(ctx, wit::Context), &to_wit_failure(failure)),
            )?;
            Ok(convert_action!(answer, failure, wit::Action))
        }

        pub(super) fn on_delivered(
            store: &mut Store<StoreState>,
            instance: &Instance,
            export: &ComponentExportIndex,
            ctx: &types::Context,
            report: &types::DeliveryReport,
        ) -> wasmtime::Result<()> {
            let func = instance
                .get_typed_func::<(&wit::Context, &wit::DeliveryReport), ()>(&mut *store, export)?;
            let report = wit::DeliveryReport {
                requirement: requirement_to_wit(&report.requirement),
                tls_version: report.tls_version.map(version_to_wit),
                cipher: report.cipher.clone(),
                certificate_verified: report.certificate_verified,
            };
            func.call(&mut *store, (&convert_context!(ctx, wit::Context), &report))
        }
    };
}
use contract_calls;
