//! Facts about a delivery attempt that the relay gathers and policies read: DNSSEC status,
//! MTA-STS policy, TLSA records (the contract's `facts` interface).
//!
//! The host gathers, policies decide, and the host keeps the floors no policy can lift: this
//! module holds the values and the floors that need nothing but them ([`Facts::precondition`]:
//! a requirement whose basis the facts do not support fails *before* connecting, with a class
//! the deciding policy's `on-failure` can react to). Facts not gathered read as `off` /
//! `indeterminate`, so a requirement that depends on them fails closed.

use super::types::{Failure, Requirement, TlsBasis, TlsLevel};

/// The DNSSEC status of an answer (RFC 4033 §5).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum DnssecStatus {
    /// Validated from a trust anchor.
    Secure,
    /// Provably unsigned.
    Insecure,
    /// Signed, validation failed.
    Bogus,
    /// Not known.
    #[default]
    Indeterminate,
}

/// The mode of an MTA-STS policy.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum StsMode {
    /// Enforce.
    Enforce,
    /// Report only.
    Testing,
    /// Withdrawn.
    None,
}

/// An MTA-STS policy as the relay holds it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct StsPolicy {
    /// The TXT record's `id`.
    pub id: String,
    /// The mode.
    pub mode: StsMode,
    /// The `mx` patterns.
    pub mx: Vec<String>,
    /// `max_age` in seconds.
    pub max_age: u32,
    /// Fetch time, seconds since the epoch.
    pub fetched_at: u64,
    /// Whether the MX host of the attempt matches `mx`.
    pub mx_matches: bool,
    /// Why the last refresh failed, when this is a cached policy kept in force.
    pub refresh_error: Option<String>,
}

/// What the relay knows of the recipient domain's MTA-STS policy.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum StsStatus {
    /// Not looked up.
    #[default]
    Off,
    /// No `_mta-sts` record.
    NoPolicy,
    /// A valid policy.
    Policy(StsPolicy),
    /// Announced but not fetched, nothing cached.
    FetchFailed(String),
    /// Fetched but invalid.
    Invalid(String),
}

/// One TLSA record.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TlsaRecord {
    /// Certificate usage.
    pub usage: u8,
    /// Selector.
    pub selector: u8,
    /// Matching type.
    pub matching: u8,
    /// Association data.
    pub data: Vec<u8>,
}

/// What the relay knows of the MX host's TLSA records.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum DaneStatus {
    /// Not looked up.
    #[default]
    Off,
    /// The MX or address records are not secure (their status).
    NotApplicable(DnssecStatus),
    /// Secure, no TLSA records.
    NoRecords,
    /// Secure TLSA records, at least one usable.
    Usable(Vec<TlsaRecord>),
    /// Secure TLSA records, none usable.
    AllUnusable(Vec<TlsaRecord>),
    /// The TLSA answer is bogus.
    Bogus(String),
    /// The TLSA lookup failed.
    LookupFailed(String),
}

/// Everything gathered for one attempt to one MX host.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Facts {
    /// DNSSEC status of the domain's MX records.
    pub mx_dnssec: DnssecStatus,
    /// DNSSEC status of the host's address records.
    pub host_dnssec: DnssecStatus,
    /// The domain's MTA-STS policy.
    pub sts: StsStatus,
    /// The host's TLSA records.
    pub dane: DaneStatus,
}

impl Facts {
    /// The failure a requirement meets before any connection, when the facts cannot support
    /// it: level `dane` without a usable TLSA set (RFC 7672 §2.2), basis `sts` without a usable
    /// policy or, in enforce mode, with an MX host the policy does not list (RFC 8461 §4.1).
    /// `None`: connect.
    pub fn precondition(&self, requirement: &Requirement) -> Option<Failure> {
        if requirement.level == TlsLevel::Dane {
            match &self.dane {
                DaneStatus::Usable(_) => {}
                DaneStatus::Bogus(why) => return Some(Failure::DnssecBogus(why.clone())),
                DaneStatus::LookupFailed(why) => {
                    return Some(Failure::TlsaLookupFailed(why.clone()));
                }
                other => return Some(Failure::DaneRequired(describe_dane(other))),
            }
        }
        if requirement.basis == TlsBasis::Sts {
            match &self.sts {
                StsStatus::Policy(policy) => {
                    if policy.mode == StsMode::Enforce && !policy.mx_matches {
                        return Some(Failure::StsMxMismatch(format!(
                            "the MX host matches none of the policy's mx patterns ({})",
                            policy.mx.join(", ")
                        )));
                    }
                }
                StsStatus::Off => {
                    return Some(Failure::StsPolicyUnavailable(
                        "this relay does not look up MTA-STS".to_owned(),
                    ));
                }
                StsStatus::NoPolicy => {
                    return Some(Failure::StsPolicyUnavailable(
                        "the domain publishes no MTA-STS policy".to_owned(),
                    ));
                }
                StsStatus::FetchFailed(why) | StsStatus::Invalid(why) => {
                    return Some(Failure::StsPolicyUnavailable(why.clone()));
                }
            }
        }
        None
    }
}

fn describe_dane(status: &DaneStatus) -> String {
    match status {
        DaneStatus::Off => "this relay does not look up TLSA records".to_owned(),
        DaneStatus::NotApplicable(dnssec) => {
            format!("the MX or address records are not DNSSEC-secure ({dnssec:?})")
        }
        DaneStatus::NoRecords => "no TLSA records".to_owned(),
        DaneStatus::AllUnusable(_) => "no usable TLSA record".to_owned(),
        DaneStatus::Usable(_) => "usable TLSA records".to_owned(),
        DaneStatus::Bogus(why) | DaneStatus::LookupFailed(why) => why.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(mode: StsMode, mx_matches: bool) -> StsStatus {
        StsStatus::Policy(StsPolicy {
            id: "1".into(),
            mode,
            mx: vec!["mx.example".into()],
            max_age: 86_400,
            fetched_at: 0,
            mx_matches,
            refresh_error: None,
        })
    }

    fn with_basis(level: TlsLevel, basis: TlsBasis) -> Requirement {
        Requirement { basis, ..Requirement::new(level) }
    }

    #[test]
    fn local_requirements_need_no_facts() {
        for level in [TlsLevel::None, TlsLevel::May, TlsLevel::Encrypt, TlsLevel::Verify] {
            assert_eq!(Facts::default().precondition(&Requirement::new(level)), None);
        }
    }

    #[test]
    fn dane_needs_a_usable_tlsa_set_and_says_why_not() {
        let dane = with_basis(TlsLevel::Dane, TlsBasis::Dane);
        let mut facts = Facts::default();
        assert!(matches!(facts.precondition(&dane), Some(Failure::DaneRequired(_))));
        facts.dane = DaneStatus::AllUnusable(Vec::new());
        assert!(matches!(facts.precondition(&dane), Some(Failure::DaneRequired(_))));
        facts.dane = DaneStatus::Bogus("RRSIG expired".into());
        assert_eq!(facts.precondition(&dane), Some(Failure::DnssecBogus("RRSIG expired".into())));
        facts.dane = DaneStatus::LookupFailed("SERVFAIL".into());
        assert_eq!(facts.precondition(&dane), Some(Failure::TlsaLookupFailed("SERVFAIL".into())));
        let record = TlsaRecord { usage: 3, selector: 1, matching: 1, data: vec![0; 32] };
        facts.dane = DaneStatus::Usable(vec![record]);
        assert_eq!(facts.precondition(&dane), None);
    }

    #[test]
    fn sts_basis_needs_a_policy_and_a_listed_mx_in_enforce_mode() {
        let verify = with_basis(TlsLevel::Verify, TlsBasis::Sts);
        let mut facts = Facts::default();
        assert!(matches!(facts.precondition(&verify), Some(Failure::StsPolicyUnavailable(_))));
        facts.sts = StsStatus::FetchFailed("HTTP 404".into());
        assert_eq!(
            facts.precondition(&verify),
            Some(Failure::StsPolicyUnavailable("HTTP 404".into()))
        );
        facts.sts = sts(StsMode::Enforce, false);
        assert!(matches!(facts.precondition(&verify), Some(Failure::StsMxMismatch(_))));
        facts.sts = sts(StsMode::Enforce, true);
        assert_eq!(facts.precondition(&verify), None);
        // Testing mode reports; it never keeps a host from being used.
        facts.sts = sts(StsMode::Testing, false);
        assert_eq!(facts.precondition(&verify), None);
    }
}
