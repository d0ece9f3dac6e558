//! `postwarden:policy@0.2.0` (`policy-sdk/wit`), the current contract, and its `facts`
//! imports.

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, HasSelf, Instance, InstancePre};

use super::{StoreState, contract_calls, convert_action, convert_context, impl_host, types};
use crate::policy::facts;

mod generated {
    wasmtime::component::bindgen!({
        path: "../policy-sdk/wit",
        world: "policy",
    });
}

use generated::PolicyPre;
use generated::postwarden::policy::facts as wit_facts;
use generated::postwarden::policy::host as wit_host;
use generated::postwarden::policy::types as wit;

contract_calls!();

impl_host!(wit_host::Host, wit_host::LogLevel);

impl wit::Host for StoreState {}

/// The facts of the attempt the current call is about (set before the instance is created;
/// the defaults, "not known", during `configure`).
impl wit_facts::Host for StoreState {
    fn mx_dnssec(&mut self) -> wit::DnssecStatus {
        dnssec_to_wit(self.facts.mx_dnssec)
    }

    fn host_dnssec(&mut self) -> wit::DnssecStatus {
        dnssec_to_wit(self.facts.host_dnssec)
    }

    fn sts(&mut self) -> wit::StsStatus {
        use facts::StsStatus as S;
        match &self.facts.sts {
            S::Off => wit::StsStatus::Off,
            S::NoPolicy => wit::StsStatus::NoPolicy,
            S::Policy(p) => wit::StsStatus::Policy(wit::StsPolicy {
                id: p.id.clone(),
                mode: match p.mode {
                    facts::StsMode::Enforce => wit::StsMode::Enforce,
                    facts::StsMode::Testing => wit::StsMode::Testing,
                    facts::StsMode::None => wit::StsMode::None,
                },
                mx: p.mx.clone(),
                max_age: p.max_age,
                fetched_at: p.fetched_at,
                mx_matches: p.mx_matches,
                refresh_error: p.refresh_error.clone(),
            }),
            S::FetchFailed(why) => wit::StsStatus::FetchFailed(why.clone()),
            S::Invalid(why) => wit::StsStatus::Invalid(why.clone()),
        }
    }

    fn dane(&mut self) -> wit::DaneStatus {
        use facts::DaneStatus as D;
        let records = |records: &[facts::TlsaRecord]| {
            records
                .iter()
                .map(|r| wit::TlsaRecord {
                    usage: r.usage,
                    selector: r.selector,
                    matching: r.matching,
                    data: r.data.clone(),
                })
                .collect()
        };
        match &self.facts.dane {
            D::Off => wit::DaneStatus::Off,
            D::NotApplicable(status) => wit::DaneStatus::NotApplicable(dnssec_to_wit(*status)),
            D::NoRecords => wit::DaneStatus::NoRecords,
            D::Usable(r) => wit::DaneStatus::Usable(records(r)),
            D::AllUnusable(r) => wit::DaneStatus::AllUnusable(records(r)),
            D::Bogus(why) => wit::DaneStatus::Bogus(why.clone()),
            D::LookupFailed(why) => wit::DaneStatus::LookupFailed(why.clone()),
        }
    }
}

fn dnssec_to_wit(status: facts::DnssecStatus) -> wit::DnssecStatus {
    match status {
        facts::DnssecStatus::Secure => wit::DnssecStatus::Secure,
        facts::DnssecStatus::Insecure => wit::DnssecStatus::Insecure,
        facts::DnssecStatus::Bogus => wit::DnssecStatus::Bogus,
        facts::DnssecStatus::Indeterminate => wit::DnssecStatus::Indeterminate,
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
        F::DnssecBogus(d) => wit::Failure::DnssecBogus(d),
        F::TlsaLookupFailed(d) => wit::Failure::TlsaLookupFailed(d),
        F::DaneRequired(d) => wit::Failure::DaneRequired(d),
        F::StsPolicyUnavailable(d) => wit::Failure::StsPolicyUnavailable(d),
        F::StsMxMismatch(d) => wit::Failure::StsMxMismatch(d),
        F::TlsaMismatch(d) => wit::Failure::TlsaMismatch(d),
    }
}

fn requirement_from_wit(r: wit::Requirement) -> types::Requirement {
    types::Requirement {
        level: match r.level {
            wit::TlsLevel::None => types::TlsLevel::None,
            wit::TlsLevel::May => types::TlsLevel::May,
            wit::TlsLevel::Encrypt => types::TlsLevel::Encrypt,
            wit::TlsLevel::Dane => types::TlsLevel::Dane,
            wit::TlsLevel::Verify => types::TlsLevel::Verify,
            wit::TlsLevel::Secure => types::TlsLevel::Secure,
        },
        match_names: r.match_names,
        min_version: r.min_version.map(|v| match v {
            wit::TlsVersion::Tls12 => types::TlsVersion::Tls12,
            wit::TlsVersion::Tls13 => types::TlsVersion::Tls13,
        }),
        basis: match r.basis {
            wit::TlsBasis::Local => types::TlsBasis::Local,
            wit::TlsBasis::Sts => types::TlsBasis::Sts,
            wit::TlsBasis::Dane => types::TlsBasis::Dane,
        },
        client_identity: r.client_identity,
    }
}

fn requirement_to_wit(r: &types::Requirement) -> wit::Requirement {
    wit::Requirement {
        level: match r.level {
            types::TlsLevel::None => wit::TlsLevel::None,
            types::TlsLevel::May => wit::TlsLevel::May,
            types::TlsLevel::Encrypt => wit::TlsLevel::Encrypt,
            types::TlsLevel::Dane => wit::TlsLevel::Dane,
            types::TlsLevel::Verify => wit::TlsLevel::Verify,
            types::TlsLevel::Secure => wit::TlsLevel::Secure,
        },
        match_names: r.match_names.clone(),
        min_version: r.min_version.map(version_to_wit),
        basis: match r.basis {
            types::TlsBasis::Local => wit::TlsBasis::Local,
            types::TlsBasis::Sts => wit::TlsBasis::Sts,
            types::TlsBasis::Dane => wit::TlsBasis::Dane,
        },
        client_identity: r.client_identity.clone(),
    }
}

fn version_to_wit(v: types::TlsVersion) -> wit::TlsVersion {
    match v {
        types::TlsVersion::Tls12 => wit::TlsVersion::Tls12,
        types::TlsVersion::Tls13 => wit::TlsVersion::Tls13,
    }
}
