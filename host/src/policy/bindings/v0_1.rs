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

use super::{StoreState, contract_calls, convert_action, convert_context, impl_host, types};

mod generated {
    wasmtime::component::bindgen!({
        path: "wit/policy-0.1",
        world: "policy",
    });
}

use generated::PolicyPre;
use generated::postwarden::policy::host as wit_host;
use generated::postwarden::policy::types as wit;

contract_calls!();

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
