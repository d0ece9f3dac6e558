//! `postwarden:policy@0.1.0` (`host/wit/policy-0.1`), adapted to the host's 0.2 view.
//!
//! What a 0.1 guest cannot express or see: it never chooses level `dane`, a basis other than
//! local or a client certificate (its requirements read as `local`, no certificate); it has no
//! `facts` import; failures that only 0.2 names reach it as the nearest 0.1 class
//! ([`failure`]). None of those failures can arise under a requirement a 0.1 policy chose, since
//! they belong to `dane` and `sts` requirements, but the mapping is total so that no value
//! the host holds is unrepresentable.

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, HasSelf, Instance, InstancePre};

use super::{StoreState, convert_action, convert_context, impl_host, types};

mod generated {
    wasmtime::component::bindgen!({
        path: "wit/policy-0.1",
        world: "policy",
    });
}

use generated::PolicyPre;
use generated::postwarden::policy::host as wit_host;
use generated::postwarden::policy::types as wit;

pub(super) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<StoreState>,
) -> wasmtime::Result<()> {
    generated::Policy::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |state| state)
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
    let func =
        instance.get_typed_func::<(&wit::Context,), (wit::Decision,)>(&mut *store, export)?;
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
    let func = instance
        .get_typed_func::<(&wit::Context, &wit::Failure), (wit::Action,)>(&mut *store, export)?;
    let (answer,) =
        func.call(&mut *store, (&convert_context!(ctx, wit::Context), &to_wit_failure(failure)))?;
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

impl_host!(wit_host::Host, wit_host::LogLevel);

impl wit::Host for StoreState {}

/// The 0.1 case for a host failure: the same case where 0.1 has it; a TLSA mismatch is an
/// untrusted certificate (the server's key is not the one the destination published); the
/// classes found before connecting read as a failed handshake, their 0.2 class name kept in
/// the text.
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
        F::TlsaMismatch(d) => wit::Failure::CertificateUntrusted(format!("tlsa-mismatch: {d}")),
        other @ (F::DnssecBogus(_)
        | F::TlsaLookupFailed(_)
        | F::DaneRequired(_)
        | F::StsPolicyUnavailable(_)
        | F::StsMxMismatch(_)) => wit::Failure::HandshakeFailed(other.to_string()),
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
        ..types::Requirement::new(types::TlsLevel::None)
    }
}

/// The requirement a 0.1 policy chose, back in its own terms. A requirement it could not have
/// chosen (level `dane`) never reaches its `on-delivered`; it would read as `encrypt`.
fn requirement_to_wit(r: &types::Requirement) -> wit::Requirement {
    wit::Requirement {
        level: match r.level {
            types::TlsLevel::None => wit::TlsLevel::None,
            types::TlsLevel::May => wit::TlsLevel::May,
            types::TlsLevel::Encrypt | types::TlsLevel::Dane => wit::TlsLevel::Encrypt,
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
