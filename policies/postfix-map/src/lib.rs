//! `postfix-map`: a Postfix `smtp_tls_policy_maps` table, pasted as is.
//!
//! Postfix users migrate by copying their table into the settings:
//!
//! ```toml
//! [[policy]]
//! name = "postfix"
//! path = "postfix_map.wasm"
//! [policy.settings]
//! map = """
//! example.com        encrypt
//! .example.net       verify match=hostname:nexthop
//! bank.example       secure match=.bank.example protocols=>=TLSv1.3
//! [mx.example.org]   none
//! """
//! ```
//!
//! Semantics follow Postfix's documentation of `smtp_tls_policy_maps`:
//! - keys: `domain` (that domain only), `.domain` (its subdomains), `[host]` or `[host]:25`
//!   (the MX host being connected to). The recipient domain is looked up first, most specific
//!   key first, then the MX host.
//! - levels: `none`, `may`, `encrypt`, `verify`, `secure`. `dane`, `dane-only` and
//!   `fingerprint` are not supported yet and are rejected.
//! - `match=` (colon-separated) for `verify` and `secure`: `hostname` (the MX host), `nexthop`
//!   (the recipient domain), `dot-nexthop` (its subdomains), or literal names (`.name` for
//!   subdomains). Defaults: `hostname` for verify, `nexthop:dot-nexthop` for secure.
//! - `protocols=`: `>=TLSv1.2`, `>=TLSv1.3`, or exclusions such as `!SSLv2:!SSLv3:!TLSv1:!TLSv1.1`
//!   (TLS 1.2 is always our floor).
//! - Any other attribute (`ciphers`, `exclude`, `tafile`, `servername`, ...) is an error at
//!   configure time, never silently ignored: a pasted table must mean what it meant in Postfix.
//!
//! Failures: under `may` the relay falls back to plaintext (on the same connection when
//! STARTTLS was missing or refused, on a new one after a failed handshake); under `encrypt` and
//! stronger it tries the next MX, then defers, as Postfix does.

use postwarden_policy_sdk::{
    Action, Context, Decision, Failure, Host, Policy, Requirement, TlsLevel, TlsVersion, names,
    parse_settings,
};
use serde::Deserialize;

/// The policy.
pub struct PostfixMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The table text.
    map: String,
}

impl Policy for PostfixMap {
    fn configure(settings: &str, host: &dyn Host) -> Result<(), String> {
        let settings: Settings = parse_settings(settings)?;
        for entry in parse_table(&settings.map)? {
            host.table_put(&entry.key, &entry.requirement.encode());
        }
        Ok(())
    }

    fn plan(ctx: &Context, host: &dyn Host) -> Decision {
        let host_keys = [format!("[{}]", ctx.mx_host)];
        let keys = names::lookup_keys(&ctx.domain).chain(host_keys.iter().map(String::as_str));
        for key in keys {
            if let Some(value) = host.table_get(key) {
                let Some(mut requirement) = Requirement::decode(&value) else {
                    return Decision::require(TlsLevel::Secure);
                };
                requirement.match_names = resolve_match(&requirement, ctx);
                return Decision::Require(requirement);
            }
        }
        Decision::Abstain
    }

    fn on_failure(ctx: &Context, failure: &Failure, host: &dyn Host) -> Action {
        let forced = match PostfixMap::plan(ctx, host) {
            Decision::Require(r) => r.is_forced(),
            Decision::Abstain => false,
        };
        if !forced {
            return if failure.allows_continue_plaintext() {
                Action::ContinuePlaintext
            } else {
                Action::ReconnectPlaintext
            };
        }
        if ctx.mx_index + 1 < ctx.mx_count {
            Action::NextMx
        } else {
            Action::Defer(format!(
                "TLS is required for {}: {} at {}",
                ctx.domain,
                failure.class(),
                ctx.mx_host
            ))
        }
    }
}

postwarden_policy_sdk::export_policy!(PostfixMap);

/// One parsed table line.
#[derive(Debug, PartialEq)]
struct Entry {
    key: String,
    requirement: Requirement,
}

/// Parses the table text. Errors name the line number and the offending word.
fn parse_table(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (number, line) in logical_lines(text) {
        let fail = |msg: String| format!("map line {number}: {msg}");
        let mut words = line.split_whitespace();
        let (Some(key), Some(level)) = (words.next(), words.next()) else {
            return Err(fail(format!("expected `key level [attr=value...]`, found `{line}`")));
        };
        let key = parse_key(key).map_err(fail)?;
        // Checked before parsing: Postfix's `dane` is opportunistic (DANE when TLSA records
        // are usable, else `may`), not the contract's mandatory `dane`, which is Postfix's
        // `dane-only`; both wait for the relay to gather TLSA records.
        if matches!(level, "dane" | "dane-only" | "fingerprint") {
            return Err(fail(format!("level `{level}` is not supported yet")));
        }
        let level = match TlsLevel::parse(level) {
            Some(level) => level,
            None => return Err(fail(format!("unknown level `{level}`"))),
        };
        let mut requirement = Requirement::new(level);
        let mut match_given = false;
        for attr in words {
            let Some((name, value)) = attr.split_once('=') else {
                return Err(fail(format!("`{attr}` is not an attribute=value pair")));
            };
            match name {
                "match" if level.is_verified() => {
                    requirement.match_names =
                        value.split(':').filter(|s| !s.is_empty()).map(str::to_owned).collect();
                    if requirement.match_names.is_empty() {
                        return Err(fail("`match=` is empty".to_owned()));
                    }
                    match_given = true;
                }
                "match" => {
                    return Err(fail(format!("`match=` needs verify or secure, not {level:?}")));
                }
                "protocols" => requirement.min_version = parse_protocols(value).map_err(fail)?,
                _ => return Err(fail(format!("attribute `{name}` is not supported"))),
            }
        }
        if !match_given {
            requirement.match_names = match level {
                TlsLevel::Verify => vec!["hostname".to_owned()],
                TlsLevel::Secure => vec!["nexthop".to_owned(), "dot-nexthop".to_owned()],
                _ => Vec::new(),
            };
        }
        entries.push(Entry { key, requirement });
    }
    Ok(entries)
}

/// Joins Postfix continuation lines (leading whitespace) and drops comments and blank lines.
/// Yields the 1-based number of each logical line's first physical line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match out.last_mut() {
            Some((_, last)) if line.starts_with([' ', '\t']) => {
                last.push(' ');
                last.push_str(trimmed);
            }
            _ => out.push((i + 1, trimmed.to_owned())),
        }
    }
    out
}

fn parse_key(key: &str) -> Result<String, String> {
    if let Some(rest) = key.strip_prefix('[') {
        let (host, port) = match rest.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => (host, Some(port.strip_prefix(':').unwrap_or(port))),
            None => return Err(format!("key `{key}` has no closing `]`")),
        };
        if let Some(port) = port.filter(|p| *p != "25") {
            return Err(format!(
                "key `{key}`: port `{port}` is not supported (MX hosts are matched on port 25)"
            ));
        }
        if host.is_empty() {
            return Err(format!("key `{key}` has an empty host"));
        }
        return Ok(format!("[{}]", names::normalize(host)));
    }
    if key.contains(':') || key.contains('@') {
        return Err(format!("key `{key}` is not a domain, .domain or [host] key"));
    }
    Ok(names::normalize(key))
}

fn parse_protocols(value: &str) -> Result<Option<TlsVersion>, String> {
    match value {
        ">=TLSv1.2" | ">=TLSv1" | ">=TLSv1.1" => return Ok(Some(TlsVersion::Tls12)),
        ">=TLSv1.3" => return Ok(Some(TlsVersion::Tls13)),
        _ => {}
    }
    let mut min = TlsVersion::Tls12;
    for item in value.split([':', ',', ' ']).filter(|s| !s.is_empty()) {
        match item {
            "!SSLv2" | "!SSLv3" | "!TLSv1" | "!TLSv1.1" => {}
            "!TLSv1.2" => min = TlsVersion::Tls13,
            _ => return Err(format!("protocols `{item}` is not supported")),
        }
    }
    Ok(Some(min))
}

/// Resolves Postfix's symbolic match names against the context.
fn resolve_match(requirement: &Requirement, ctx: &Context) -> Vec<String> {
    requirement
        .match_names
        .iter()
        .map(|name| match name.as_str() {
            "hostname" => ctx.mx_host.clone(),
            "nexthop" => ctx.domain.clone(),
            "dot-nexthop" => format!(".{}", ctx.domain),
            literal => literal.to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postwarden_policy_sdk::testing::{FakeHost, context};

    const MAP: &str = "
# comment
example.com        encrypt
.example.net       verify match=hostname:nexthop
bank.example       secure
  protocols=>=TLSv1.3
[mx.legacy.example]:25 none
plain.example      may
";

    fn host() -> FakeHost {
        let settings = serde_json::json!({ "map": MAP }).to_string();
        FakeHost::configured::<PostfixMap>(&settings).unwrap()
    }

    #[test]
    fn decisions_follow_postfix_semantics() {
        let host = host();
        let req = |level, names: &[&str], min| {
            Decision::Require(Requirement {
                match_names: names.iter().map(|s| s.to_string()).collect(),
                min_version: min,
                ..Requirement::new(level)
            })
        };
        let mut legacy = context("legacy.example");
        legacy.mx_host = "mx.legacy.example".into();
        let table = [
            (context("example.com"), req(TlsLevel::Encrypt, &[], None)),
            (context("sub.example.com"), Decision::Abstain),
            (
                context("a.example.net"),
                req(TlsLevel::Verify, &["mx.a.example.net", "a.example.net"], None),
            ),
            (
                context("bank.example"),
                req(TlsLevel::Secure, &["bank.example", ".bank.example"], Some(TlsVersion::Tls13)),
            ),
            (legacy, req(TlsLevel::None, &[], None)),
            (context("plain.example"), req(TlsLevel::May, &[], None)),
            (context("other.example"), Decision::Abstain),
        ];
        for (ctx, decision) in table {
            assert_eq!(PostfixMap::plan(&ctx, &host), decision, "{}", ctx.domain);
        }
    }

    #[test]
    fn failures_depend_on_level() {
        let host = host();
        let failure = Failure::HandshakeFailed("alert".into());
        assert_eq!(
            PostfixMap::on_failure(&context("plain.example"), &failure, &host),
            Action::ReconnectPlaintext
        );
        assert_eq!(
            PostfixMap::on_failure(&context("plain.example"), &Failure::StarttlsNotOffered, &host),
            Action::ContinuePlaintext
        );
        assert!(matches!(
            PostfixMap::on_failure(&context("example.com"), &failure, &host),
            Action::Defer(_)
        ));
        let mut ctx = context("example.com");
        ctx.mx_count = 2;
        assert_eq!(PostfixMap::on_failure(&ctx, &failure, &host), Action::NextMx);
    }

    #[test]
    fn unsupported_input_is_an_error_with_its_line() {
        let cases = [
            ("example.com dane", "map line 1: level `dane` is not supported yet"),
            (
                "example.com encrypt ciphers=high",
                "map line 1: attribute `ciphers` is not supported",
            ),
            ("\n\nexample.com", "map line 3: expected `key level"),
            ("example.com bogus", "unknown level `bogus`"),
            ("[mx.example.com]:587 encrypt", "port `587` is not supported"),
            ("example.com encrypt match=x", "`match=` needs verify or secure"),
            ("example.com verify protocols=SSLv3", "protocols `SSLv3` is not supported"),
        ];
        for (map, expected) in cases {
            let settings = serde_json::json!({ "map": map }).to_string();
            let err = FakeHost::configured::<PostfixMap>(&settings).unwrap_err();
            assert!(err.contains(expected), "{map}: {err}");
        }
    }
}
