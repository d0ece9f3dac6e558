//! `forced-tls`: TLS is mandatory for listed domains.
//!
//! For every listed domain the relay must establish TLS at the configured level (`encrypt`,
//! `dane`, `verify` or `secure`) or not deliver at all. A TLS failure on one MX moves on to the next
//! MX; when none is left the message is deferred with a reason in Postfix's words, never
//! bounced: the queue lifetime decides when to give up, because TLS outages are usually
//! transient. Unlisted domains abstain, so the next policy in the chain (or the relay's
//! opportunistic default) decides.
//!
//! Settings:
//!
//! ```toml
//! [policy.settings.domains]
//! "bank.example" = "verify"                 # exactly this domain
//! ".bank.example" = "verify"                # every subdomain of it
//! "partner.example" = { level = "secure", match = ["partner.example", ".partner-mail.example"] }
//! "legacy.example" = { level = "encrypt", min_version = "tls13" }
//! "connector.example" = { level = "verify", client_identity = "bank-connector" }
//! ```
//!
//! `client_identity` names a client certificate configured in the relay
//! (`[tls.client_identities.NAME]`), presented to partners whose servers require one.
//!
//! Settings are parsed once in `configure` and stored in the host's table, one entry per
//! domain, so a decision costs a few table lookups whatever the size of the list.

use std::collections::BTreeMap;

use postwarden_policy_sdk::{
    Action, Context, Decision, Failure, Host, Policy, Requirement, TlsLevel, TlsVersion, names,
    parse_settings,
};
use serde::Deserialize;

/// The policy.
pub struct ForcedTls;

/// The settings, as written in the relay config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Domain (or `.parent` for subdomains) → requirement.
    domains: BTreeMap<String, Entry>,
}

/// One domain's requirement: a level name, or a table with parameters.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Entry {
    Level(String),
    Detailed(Detailed),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Detailed {
    level: String,
    #[serde(default, rename = "match")]
    match_names: Vec<String>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    client_identity: Option<String>,
}

impl Policy for ForcedTls {
    fn configure(settings: &str, host: &dyn Host) -> Result<(), String> {
        let settings: Settings = parse_settings(settings)?;
        for (domain, entry) in settings.domains {
            let requirement =
                entry.requirement().map_err(|e| format!("domains.\"{domain}\": {e}"))?;
            let key = names::normalize(&domain);
            if key.is_empty() || key == "." || key.contains(char::is_whitespace) {
                return Err(format!("domains.\"{domain}\": not a domain name"));
            }
            host.table_put(&key, &requirement.encode());
        }
        Ok(())
    }

    fn plan(ctx: &Context, host: &dyn Host) -> Decision {
        for key in names::lookup_keys(&ctx.domain) {
            if let Some(value) = host.table_get(key) {
                return match Requirement::decode(&value) {
                    Some(requirement) => Decision::Require(requirement),
                    // The table is written only by `configure`: an undecodable entry is a bug,
                    // and the strictest reading is the safe one.
                    None => Decision::require(TlsLevel::Secure),
                };
            }
        }
        Decision::Abstain
    }

    fn on_failure(ctx: &Context, failure: &Failure, _host: &dyn Host) -> Action {
        if ctx.mx_index + 1 < ctx.mx_count {
            return Action::NextMx;
        }
        Action::Defer(reason(ctx, failure))
    }
}

postwarden_policy_sdk::export_policy!(ForcedTls);

impl Entry {
    fn requirement(&self) -> Result<Requirement, String> {
        let (level, match_names, min_version, identity) = match self {
            Entry::Level(level) => (level.as_str(), &[][..], None, None),
            Entry::Detailed(d) => (
                d.level.as_str(),
                &d.match_names[..],
                d.min_version.as_deref(),
                d.client_identity.as_deref(),
            ),
        };
        let level = match TlsLevel::parse(level) {
            Some(level) if level.is_forced() => level,
            _ => {
                return Err(format!("level `{level}` is not one of encrypt, dane, verify, secure"));
            }
        };
        if let Some(name) = identity
            && (name.is_empty() || name.contains([';', ',']) || name.contains(char::is_whitespace))
        {
            return Err(format!("`client_identity` `{name}` is not an identity name"));
        }
        if !match_names.is_empty() && !level.is_verified() {
            return Err(format!("`match` needs level verify or secure, not {}", level.as_str()));
        }
        for name in match_names {
            if name.is_empty() || name.contains([';', ',']) || name.contains(char::is_whitespace) {
                return Err(format!("`match` entry `{name}` is not a host name"));
            }
        }
        let min_version = match min_version {
            None => None,
            Some("tls12") => Some(TlsVersion::Tls12),
            Some("tls13") => Some(TlsVersion::Tls13),
            Some(other) => return Err(format!("min_version `{other}` is not tls12 or tls13")),
        };
        let mut requirement = Requirement::new(level);
        requirement.match_names = match_names.to_vec();
        requirement.min_version = min_version;
        requirement.client_identity = identity.map(str::to_owned);
        Ok(requirement)
    }
}

/// The reason text for a deferral, in the words Postfix operators grep for.
fn reason(ctx: &Context, failure: &Failure) -> String {
    let mx = &ctx.mx_host;
    match failure {
        Failure::StarttlsNotOffered => format!("TLS is required, but was not offered by {mx}"),
        Failure::StarttlsRefused(reply) => {
            format!("TLS is required, but {mx} refused STARTTLS: {} {}", reply.code, reply.text)
        }
        Failure::HandshakeFailed(why) => {
            format!("Cannot start TLS with {mx}: handshake failure: {why}")
        }
        Failure::CertificateUntrusted(why)
        | Failure::CertificateExpired(why)
        | Failure::CertificateNotYetValid(why)
        | Failure::CertificateNameMismatch(why) => {
            format!("Server certificate of {mx} not verified ({}): {why}", failure.class())
        }
        Failure::TlsVersionTooOld(why) => format!("TLS version offered by {mx} is too old: {why}"),
        Failure::ConnectionLost(why) => format!("Lost connection with {mx} during TLS: {why}"),
        Failure::Timeout(why) => format!("Timed out starting TLS with {mx}: {why}"),
        Failure::DaneRequired(why) => format!("DANE is required for {mx}, but: {why}"),
        Failure::DnssecBogus(why) | Failure::TlsaLookupFailed(why) => {
            format!("Cannot look up the TLSA records of {mx} ({}): {why}", failure.class())
        }
        Failure::TlsaMismatch(why) => {
            format!("Server certificate of {mx} does not match its TLSA records: {why}")
        }
        Failure::StsPolicyUnavailable(why) | Failure::StsMxMismatch(why) => {
            format!("MTA-STS does not allow delivery to {mx} ({}): {why}", failure.class())
        }
        Failure::Other(other) => {
            format!("TLS with {mx} failed ({}): {}", other.class, other.detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postwarden_policy_sdk::testing::{FakeHost, context};

    const SETTINGS: &str = r#"{"domains": {
        "bank.example": "verify",
        ".bank.example": "encrypt",
        "Partner.Example.": {"level": "secure", "match": [".partner-mail.example"], "min_version": "tls13"}
    }}"#;

    #[test]
    fn plans_by_most_specific_entry() {
        let host = FakeHost::configured::<ForcedTls>(SETTINGS).unwrap();
        let partner = Requirement {
            match_names: vec![".partner-mail.example".into()],
            min_version: Some(TlsVersion::Tls13),
            ..Requirement::new(TlsLevel::Secure)
        };
        let table = [
            ("bank.example", Decision::require(TlsLevel::Verify)),
            ("mx.bank.example", Decision::require(TlsLevel::Encrypt)),
            ("a.b.bank.example", Decision::require(TlsLevel::Encrypt)),
            ("partner.example", Decision::Require(partner)),
            ("sub.partner.example", Decision::Abstain),
            ("other.example", Decision::Abstain),
            ("example", Decision::Abstain),
        ];
        for (domain, decision) in table {
            assert_eq!(ForcedTls::plan(&context(domain), &host), decision, "{domain}");
        }
    }

    #[test]
    fn a_client_identity_and_dane_are_carried_into_the_requirement() {
        let settings = r#"{"domains": {
            "bank.example": {"level": "verify", "client_identity": "bank-connector"},
            "dane.example": "dane"
        }}"#;
        let host = FakeHost::configured::<ForcedTls>(settings).unwrap();
        let expected = Requirement::new(TlsLevel::Verify).with_client_identity("bank-connector");
        assert_eq!(ForcedTls::plan(&context("bank.example"), &host), Decision::Require(expected));
        assert_eq!(
            ForcedTls::plan(&context("dane.example"), &host),
            Decision::require(TlsLevel::Dane)
        );
    }

    #[test]
    fn failures_try_next_mx_then_defer() {
        let host = FakeHost::default();
        let mut ctx = context("bank.example");
        ctx.mx_count = 2;
        assert_eq!(
            ForcedTls::on_failure(&ctx, &Failure::StarttlsNotOffered, &host),
            Action::NextMx
        );
        ctx.mx_index = 1;
        match ForcedTls::on_failure(&ctx, &Failure::StarttlsNotOffered, &host) {
            Action::Defer(reason) => {
                assert_eq!(reason, "TLS is required, but was not offered by mx.bank.example")
            }
            other => panic!("expected defer, got {other:?}"),
        }
        let failure = Failure::CertificateExpired("expired 2001-01-01".into());
        assert!(matches!(ForcedTls::on_failure(&ctx, &failure, &host), Action::Defer(_)));
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases = [
            (r#"{"domains": {"a.example": "may"}}"#, "domains.\"a.example\": level `may`"),
            (
                r#"{"domains": {"a.example": {"level": "encrypt", "match": ["x"]}}}"#,
                "`match` needs",
            ),
            (r#"{"domains": {"a.example": {"level": "verify", "min_version": "ssl3"}}}"#, "ssl3"),
            (r#"{"domain": {}}"#, "unknown field `domain`"),
            (r#"{"domains": {"a example": "verify"}}"#, "not a domain name"),
            (
                r#"{"domains": {"a.example": {"level": "verify", "client_identity": "a b"}}}"#,
                "`client_identity` `a b` is not an identity name",
            ),
        ];
        for (settings, expected) in cases {
            let err = FakeHost::configured::<ForcedTls>(settings).unwrap_err();
            assert!(err.contains(expected), "{settings}: {err}");
        }
    }
}
