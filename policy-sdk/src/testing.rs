//! Test a policy's logic natively, with plain `cargo test`.
//!
//! [`FakeHost`] implements [`Host`] in memory, so the same `Policy` methods that run inside the
//! relay can be table-tested without wasm:
//!
//! ```ignore
//! let host = FakeHost::configured::<MyPolicy>(r#"{"domains": {"bank.example": "verify"}}"#)?;
//! assert_eq!(MyPolicy::plan(&context("bank.example"), &host), Decision::require(TlsLevel::Verify));
//! ```
//!
//! Testing through the real engine (deadline, memory cap, fresh instances) is done with
//! `postwarden policy explain` or the simulator's conformance runner.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use crate::{Context, DaneStatus, DnssecStatus, Host, LogLevel, Policy, StsStatus};

/// An in-memory [`Host`]: table, persistent store, log lines, a settable clock and settable
/// facts.
#[derive(Debug, Default)]
pub struct FakeHost {
    /// The policy's table, as filled by `configure`.
    pub table: RefCell<BTreeMap<String, String>>,
    /// The persistent store.
    pub kv: RefCell<BTreeMap<String, String>>,
    /// Every line logged, in order.
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    /// What [`Host::now`] returns.
    pub now: Cell<u64>,
    /// What the facts functions return (`None`: the relay's "not known").
    pub facts: RefCell<Facts>,
}

/// The facts a [`FakeHost`] answers with.
#[derive(Debug, Default)]
pub struct Facts {
    /// [`Host::mx_dnssec`].
    pub mx_dnssec: Option<DnssecStatus>,
    /// [`Host::host_dnssec`].
    pub host_dnssec: Option<DnssecStatus>,
    /// [`Host::sts`].
    pub sts: Option<StsStatus>,
    /// [`Host::dane`].
    pub dane: Option<DaneStatus>,
}

impl FakeHost {
    /// Runs `P::configure` with `settings` (JSON) on a new fake host and returns the host.
    pub fn configured<P: Policy>(settings: &str) -> Result<Self, String> {
        let host = FakeHost::default();
        P::configure(settings, &host)?;
        Ok(host)
    }
}

impl Host for FakeHost {
    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn now(&self) -> u64 {
        self.now.get()
    }

    fn table_put(&self, key: &str, value: &str) {
        self.table.borrow_mut().insert(key.to_owned(), value.to_owned());
    }

    fn table_get(&self, key: &str) -> Option<String> {
        self.table.borrow().get(key).cloned()
    }

    fn kv_get(&self, key: &str) -> Option<String> {
        self.kv.borrow().get(key).cloned()
    }

    fn kv_set(&self, key: &str, value: &str) {
        self.kv.borrow_mut().insert(key.to_owned(), value.to_owned());
    }

    fn kv_delete(&self, key: &str) {
        self.kv.borrow_mut().remove(key);
    }

    fn mx_dnssec(&self) -> DnssecStatus {
        self.facts.borrow().mx_dnssec.unwrap_or(DnssecStatus::Indeterminate)
    }

    fn host_dnssec(&self) -> DnssecStatus {
        self.facts.borrow().host_dnssec.unwrap_or(DnssecStatus::Indeterminate)
    }

    fn sts(&self) -> StsStatus {
        self.facts.borrow().sts.clone().unwrap_or(StsStatus::Off)
    }

    fn dane(&self) -> DaneStatus {
        self.facts.borrow().dane.clone().unwrap_or(DaneStatus::Off)
    }
}

/// A context for the first attempt to the single MX `mx.<domain>` of `domain`.
pub fn context(domain: &str) -> Context {
    Context {
        domain: domain.to_owned(),
        mx_host: format!("mx.{domain}"),
        ip: "192.0.2.1".to_owned(),
        mx_preference: 10,
        mx_index: 0,
        mx_count: 1,
        attempt: 1,
        message_age: 0,
        requiretls: false,
        tls_required_no: false,
    }
}
