//! `partner`: forced `verify` for listed banks, forced `encrypt` for listed partners,
//! opportunistic for everyone else.
//!
//! This is the Rust edition of a policy that also exists in Python, JavaScript and
//! hand-written WAT (see `policies/partner/README.md` for the specification all four follow,
//! and `tests/tests/polyglot.rs` for the tests that hold them to it).

use postwarden_policy_sdk::{
    Action, Context, Decision, Failure, Host, LogLevel, Policy, TlsLevel, names,
};
use serde_json::Value;

/// The policy.
pub struct Partner;

/// The two lists, in the order the settings name them.
const LISTS: [(&str, TlsLevel); 2] = [("verify", TlsLevel::Verify), ("encrypt", TlsLevel::Encrypt)];

impl Policy for Partner {
    fn configure(settings: &str, host: &dyn Host) -> Result<(), String> {
        let settings: serde_json::Map<String, Value> = serde_json::from_str(settings)
            .map_err(|e| format!("settings are not a JSON object: {e}"))?;
        if let Some(key) = settings.keys().find(|k| !LISTS.iter().any(|(name, _)| name == k)) {
            return Err(format!("unknown setting `{key}` (expected verify, encrypt)"));
        }
        // Name → the list it is in, to refuse a name in both (a map: lists can be long).
        let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        let mut counts = [0usize; 2];
        for (index, (list, _)) in LISTS.into_iter().enumerate() {
            let Some(value) = settings.get(list) else { continue };
            let entries = value
                .as_array()
                .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
                .ok_or_else(|| format!("`{list}` must be a list of domain names"))?;
            for entry in entries {
                let name = names::normalize(entry);
                if name.is_empty() || name == "." || name.contains(char::is_whitespace) {
                    return Err(format!("{list}: `{entry}` is not a domain name"));
                }
                if seen.get(&name).is_some_and(|other| *other != list) {
                    return Err(format!("`{name}` is listed in both verify and encrypt"));
                }
                host.table_put(&name, list);
                seen.insert(name, list);
                counts[index] += 1;
            }
        }
        host.log(LogLevel::Info, &format!("partner: {} verify, {} encrypt", counts[0], counts[1]));
        Ok(())
    }

    fn plan(ctx: &Context, host: &dyn Host) -> Decision {
        Decision::require(level(ctx, host))
    }

    fn on_failure(ctx: &Context, failure: &Failure, host: &dyn Host) -> Action {
        if level(ctx, host).is_forced() {
            if ctx.mx_index + 1 < ctx.mx_count {
                Action::NextMx
            } else {
                Action::Defer(format!("partner: TLS required for {}", ctx.domain))
            }
        } else if failure.allows_continue_plaintext() {
            Action::ContinuePlaintext
        } else {
            Action::ReconnectPlaintext
        }
    }
}

/// The level for the context's domain: the first listed key, most specific first.
fn level(ctx: &Context, host: &dyn Host) -> TlsLevel {
    names::lookup_keys(&ctx.domain)
        .find_map(|key| host.table_get(key))
        .and_then(|value| LISTS.iter().find(|(name, _)| *name == value).map(|(_, level)| *level))
        .unwrap_or(TlsLevel::May)
}

postwarden_policy_sdk::export_policy!(Partner);

#[cfg(test)]
mod tests {
    use super::*;
    use postwarden_policy_sdk::testing::{FakeHost, context};

    const SETTINGS: &str =
        r#"{"verify": ["Bank.Example.", ".bank.example"], "encrypt": ["partner.example"]}"#;

    #[test]
    fn lists_choose_the_level() {
        let host = FakeHost::configured::<Partner>(SETTINGS).unwrap();
        let table = [
            ("bank.example", TlsLevel::Verify),
            ("mx.bank.example", TlsLevel::Verify),
            ("partner.example", TlsLevel::Encrypt),
            ("mx.partner.example", TlsLevel::May),
            ("example", TlsLevel::May),
        ];
        for (domain, level) in table {
            assert_eq!(
                Partner::plan(&context(domain), &host),
                Decision::require(level),
                "{domain}"
            );
        }
    }

    #[test]
    fn forced_domains_never_fall_back() {
        let host = FakeHost::configured::<Partner>(SETTINGS).unwrap();
        let mut ctx = context("partner.example");
        ctx.mx_count = 2;
        assert_eq!(Partner::on_failure(&ctx, &Failure::StarttlsNotOffered, &host), Action::NextMx);
        ctx.mx_index = 1;
        assert_eq!(
            Partner::on_failure(&ctx, &Failure::StarttlsNotOffered, &host),
            Action::Defer("partner: TLS required for partner.example".into())
        );
        let other = context("other.example");
        assert_eq!(
            Partner::on_failure(&other, &Failure::StarttlsNotOffered, &host),
            Action::ContinuePlaintext
        );
        assert_eq!(
            Partner::on_failure(&other, &Failure::Timeout("t".into()), &host),
            Action::ReconnectPlaintext
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            (r#"{"verfy": []}"#, "unknown setting `verfy`"),
            (r#"{"verify": "a.example"}"#, "`verify` must be a list of domain names"),
            (r#"{"encrypt": ["a b"]}"#, "encrypt: `a b` is not a domain name"),
            (
                r#"{"verify": ["a.example"], "encrypt": ["A.example"]}"#,
                "`a.example` is listed in both",
            ),
        ];
        for (settings, want) in cases {
            let err = FakeHost::configured::<Partner>(settings).unwrap_err();
            assert!(err.contains(want), "{settings}: {err}");
        }
    }
}
