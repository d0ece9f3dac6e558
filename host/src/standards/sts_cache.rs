//! The MTA-STS cache's rules (RFC 8461 §3.3, §5.1), sans-IO: given what the cache holds, the
//! time, and what DNS and HTTPS answered, what to ask next and which policy is in force.
//!
//! The rules that matter, and where others got them wrong (research §3.2, §3.3):
//! - a cached policy that has not expired stays in force when the TXT lookup or the fetch
//!   fails, and when the TXT record disappears: a domain withdraws a policy by publishing
//!   `mode: none`, not by deleting DNS records. Dropping it on a failed refresh is a downgrade;
//! - the TXT `id` is re-checked at most once per [`TXT_RECHECK`] per domain, and the policy is
//!   fetched again only when the `id` changed or the cached policy expired;
//! - after a failed fetch the next one waits [`FETCH_BACKOFF`], so a broken policy host costs one
//!   HTTPS attempt per five minutes, not one per delivery;
//! - a refresh that fails while a policy is cached is recorded on that policy
//!   (`refresh_error`), for the operator and TLS-RPT (`sts-policy-fetch-error`).

use super::sts::{PolicyFile, RecordError, StsRecord};
use crate::policy::facts::{StsPolicy, StsStatus};

/// How often a domain's TXT record is looked up again while a cached policy is in force.
pub const TXT_RECHECK: u64 = 60;
/// How long after a failed fetch the next is tried.
pub const FETCH_BACKOFF: u64 = 300;

/// What the cache holds for one domain.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Entry {
    /// The policy in force, if any, with the `id` it was fetched for and when.
    pub policy: Option<Cached>,
    /// When the TXT record was last looked up (seconds since the epoch).
    pub txt_checked_at: Option<u64>,
    /// When a fetch last failed, and why; cleared by a successful fetch.
    pub fetch_failed: Option<(u64, String)>,
    /// The last answer when no policy is in force (no record, invalid record or policy).
    pub without_policy: Option<StsStatus>,
}

/// A policy fetched for a TXT `id`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Cached {
    /// The TXT `id` it was fetched for.
    pub id: String,
    /// The policy.
    pub file: PolicyFile,
    /// When it was fetched.
    pub fetched_at: u64,
}

impl Cached {
    /// Whether it may still be applied at `now` (RFC 8461 §3.2 `max_age`).
    pub fn is_live(&self, now: u64) -> bool {
        now < self.fetched_at.saturating_add(u64::from(self.file.max_age))
    }
}

/// The next question for DNS or HTTPS, or none.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Next {
    /// Look up the `_mta-sts` TXT record.
    LookupTxt,
    /// Fetch the policy file (for this TXT `id`).
    Fetch(String),
    /// Nothing to ask: the cache answers.
    Answer,
}

/// What the TXT lookup gave.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum TxtAnswer {
    /// A valid record.
    Record(StsRecord),
    /// No (valid, single) record: the domain has no available policy (§3.1).
    NoRecord(RecordError),
    /// The lookup failed (SERVFAIL, timeout): nothing is known.
    Failed(String),
}

impl Entry {
    /// What to ask before deciding at `now`.
    pub fn next(&self, now: u64) -> Next {
        let recently = |at: Option<u64>, period: u64| at.is_some_and(|t| now < t + period);
        if recently(self.txt_checked_at, TXT_RECHECK) {
            return Next::Answer;
        }
        Next::LookupTxt
    }

    /// Records the TXT answer; returns whether a fetch is due (and for which `id`).
    pub fn txt_answered(&mut self, now: u64, answer: TxtAnswer) -> Next {
        self.txt_checked_at = Some(now);
        match answer {
            TxtAnswer::Record(record) => {
                let current =
                    self.policy.as_ref().is_some_and(|c| c.id == record.id && c.is_live(now));
                let backing_off =
                    self.fetch_failed.as_ref().is_some_and(|(at, _)| now < at + FETCH_BACKOFF);
                if current || backing_off { Next::Answer } else { Next::Fetch(record.id) }
            }
            TxtAnswer::NoRecord(why) => {
                // A live cached policy stays in force (§3.3); otherwise: no policy.
                if !self.policy.as_ref().is_some_and(|c| c.is_live(now)) {
                    self.policy = None;
                    self.without_policy = Some(match why {
                        RecordError::None => StsStatus::NoPolicy,
                        other => StsStatus::Invalid(other.to_string()),
                    });
                }
                Next::Answer
            }
            TxtAnswer::Failed(_) => Next::Answer,
        }
    }

    /// Records the fetch for `id`: the parsed policy, or why there is none.
    pub fn fetched(&mut self, now: u64, id: String, result: Result<PolicyFile, FetchError>) {
        match result {
            Ok(file) => {
                self.policy = Some(Cached { id, file, fetched_at: now });
                self.fetch_failed = None;
                self.without_policy = None;
            }
            Err(error) => {
                let why = error.to_string();
                self.fetch_failed = Some((now, why.clone()));
                if !self.policy.as_ref().is_some_and(|c| c.is_live(now)) {
                    self.policy = None;
                    self.without_policy = Some(match error {
                        FetchError::Invalid(why) => StsStatus::Invalid(why),
                        FetchError::Failed(why) => StsStatus::FetchFailed(why),
                    });
                }
            }
        }
    }

    /// The status in force at `now` for an attempt to `mx_host`.
    pub fn status(&self, now: u64, mx_host: &str) -> StsStatus {
        match &self.policy {
            Some(cached) if cached.is_live(now) => StsStatus::Policy(StsPolicy {
                id: cached.id.clone(),
                mode: cached.file.mode,
                mx: cached.file.mx.clone(),
                max_age: cached.file.max_age,
                fetched_at: cached.fetched_at,
                mx_matches: super::sts::mx_matches(&cached.file.mx, mx_host),
                refresh_error: self.fetch_failed.as_ref().map(|(_, why)| why.clone()),
            }),
            _ => self.without_policy.clone().unwrap_or(StsStatus::NoPolicy),
        }
    }
}

/// Why a fetch gave no policy.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum FetchError {
    /// No answer usable as a policy file: connection, TLS, certificate, HTTP status, size,
    /// timeout (`sts-policy-fetch-error`, `sts-webpki-invalid`).
    Failed(String),
    /// A policy file that does not parse (`sts-policy-invalid`).
    Invalid(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Failed(why) => write!(f, "policy fetch failed: {why}"),
            FetchError::Invalid(why) => write!(f, "invalid policy: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::facts::StsMode;

    fn file(mode: StsMode, max_age: u32) -> PolicyFile {
        PolicyFile { mode, max_age, mx: vec!["*.mx.example".into()] }
    }

    fn record(id: &str) -> TxtAnswer {
        TxtAnswer::Record(StsRecord { id: id.into() })
    }

    fn mode_of(entry: &Entry, now: u64) -> Option<StsMode> {
        match entry.status(now, "a.mx.example") {
            StsStatus::Policy(p) => {
                assert!(p.mx_matches);
                Some(p.mode)
            }
            _ => None,
        }
    }

    #[test]
    fn first_contact_fetches_and_the_policy_is_in_force() {
        let mut e = Entry::default();
        assert_eq!(e.next(0), Next::LookupTxt);
        assert_eq!(e.txt_answered(0, record("1")), Next::Fetch("1".into()));
        e.fetched(0, "1".into(), Ok(file(StsMode::Enforce, 86_400)));
        assert_eq!(mode_of(&e, 1), Some(StsMode::Enforce));
        // Within a minute, no DNS at all; after it, the TXT again but no fetch for the same id.
        assert_eq!(e.next(59), Next::Answer);
        assert_eq!(e.next(60), Next::LookupTxt);
        assert_eq!(e.txt_answered(60, record("1")), Next::Answer);
        // A new id fetches again.
        assert_eq!(e.txt_answered(200, record("2")), Next::Fetch("2".into()));
    }

    /// RFC 8461 §3.3: a live cached policy is applied when DNS or HTTPS fail, and when the
    /// TXT record disappears (research §3.2: Stalwart dropped it: a downgrade).
    #[test]
    fn a_live_cached_policy_survives_failures_and_a_missing_record() {
        let mut e = Entry::default();
        e.txt_answered(0, record("1"));
        e.fetched(0, "1".into(), Ok(file(StsMode::Enforce, 1000)));
        e.txt_answered(100, TxtAnswer::Failed("SERVFAIL".into()));
        assert_eq!(mode_of(&e, 100), Some(StsMode::Enforce));
        e.txt_answered(200, TxtAnswer::NoRecord(RecordError::None));
        assert_eq!(mode_of(&e, 200), Some(StsMode::Enforce));
        assert_eq!(e.txt_answered(300, record("2")), Next::Fetch("2".into()));
        e.fetched(300, "2".into(), Err(FetchError::Failed("HTTP 500".into())));
        match e.status(300, "a.mx.example") {
            StsStatus::Policy(p) => {
                assert_eq!(p.id, "1");
                assert_eq!(p.refresh_error.as_deref(), Some("policy fetch failed: HTTP 500"));
            }
            other => panic!("the cached policy must stay in force, got {other:?}"),
        }
        // Expired: nothing is left to apply, and the failure says why.
        assert_eq!(e.status(1000, "a.mx.example"), StsStatus::NoPolicy);
        e.txt_answered(1000, record("2"));
        e.fetched(1000, "2".into(), Err(FetchError::Failed("HTTP 500".into())));
        assert_eq!(e.status(1000, "a.mx.example"), StsStatus::FetchFailed("HTTP 500".into()));
    }

    #[test]
    fn a_failed_fetch_backs_off_five_minutes() {
        let mut e = Entry::default();
        assert_eq!(e.txt_answered(0, record("1")), Next::Fetch("1".into()));
        e.fetched(0, "1".into(), Err(FetchError::Invalid("missing mode".into())));
        assert_eq!(e.status(0, "a.mx.example"), StsStatus::Invalid("missing mode".into()));
        assert_eq!(e.txt_answered(60, record("1")), Next::Answer);
        assert_eq!(e.txt_answered(299, record("1")), Next::Answer);
        assert_eq!(e.txt_answered(300, record("1")), Next::Fetch("1".into()));
    }

    #[test]
    fn an_expired_policy_is_fetched_again_even_for_the_same_id() {
        let mut e = Entry::default();
        e.txt_answered(0, record("1"));
        e.fetched(0, "1".into(), Ok(file(StsMode::Testing, 100)));
        assert_eq!(e.txt_answered(100, record("1")), Next::Fetch("1".into()));
    }

    #[test]
    fn no_record_without_a_cached_policy_means_no_policy() {
        let mut e = Entry::default();
        e.txt_answered(0, TxtAnswer::NoRecord(RecordError::None));
        assert_eq!(e.status(0, "a.mx.example"), StsStatus::NoPolicy);
        e.txt_answered(60, TxtAnswer::NoRecord(RecordError::Several(2)));
        assert!(matches!(e.status(60, "x"), StsStatus::Invalid(why) if why.contains("2 v=STSv1")));
        // An MX the policy does not list is reported as such.
        e.txt_answered(120, record("1"));
        e.fetched(120, "1".into(), Ok(file(StsMode::Enforce, 1000)));
        assert!(matches!(e.status(121, "b.other.example"), StsStatus::Policy(p) if !p.mx_matches));
    }
}
