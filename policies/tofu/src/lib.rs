//! `tofu`: anti-downgrade memory (trust on first use), after chasquid.
//!
//! Once a domain has received mail over TLS with a verified certificate, an attacker who strips
//! STARTTLS or presents a forged certificate should not be able to make us fall back. This
//! policy remembers, in the relay's persistent store, the strongest TLS each domain has shown,
//! and from then on requires at least that: `verify` after a verified delivery (and, with
//! `remember_encrypt = true`, `encrypt` after an unverified TLS delivery). Domains it has not
//! seen abstain, so put `tofu` before the policy that handles them. The relay reports every
//! delivery to every policy in the chain, so `tofu` learns from deliveries others decided.
//!
//! A remembered level expires after `max_age_days` (default 180) without a confirming delivery,
//! so a domain that legitimately dropped TLS is not blocked forever; an operator clears it at
//! once with `postwarden policy state reset DOMAIN`.
//!
//! Settings: `remember_encrypt` (bool, default false), `max_age_days` (integer, default 180).
//! Store: key = domain, value = `level;unix-time-of-last-confirmation`.

use postwarden_policy_sdk::{
    Action, Context, Decision, DeliveryReport, Failure, Host, LogLevel, Policy, TlsLevel,
    parse_settings,
};
use serde::Deserialize;

/// The policy.
pub struct Tofu;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    remember_encrypt: bool,
    #[serde(default = "default_max_age_days")]
    max_age_days: u64,
}

fn default_max_age_days() -> u64 {
    180
}

const SECONDS_PER_DAY: u64 = 86_400;

impl Policy for Tofu {
    fn configure(settings: &str, host: &dyn Host) -> Result<(), String> {
        let settings: Settings = parse_settings(settings)?;
        if settings.max_age_days == 0 {
            return Err("max_age_days must be at least 1".to_owned());
        }
        host.table_put("remember_encrypt", if settings.remember_encrypt { "1" } else { "0" });
        host.table_put("max_age", &(settings.max_age_days * SECONDS_PER_DAY).to_string());
        Ok(())
    }

    fn plan(ctx: &Context, host: &dyn Host) -> Decision {
        match remembered(ctx, host) {
            Some((level, _)) => Decision::require(level),
            None => Decision::Abstain,
        }
    }

    fn on_failure(ctx: &Context, failure: &Failure, host: &dyn Host) -> Action {
        if ctx.mx_index + 1 < ctx.mx_count {
            return Action::NextMx;
        }
        let since = remembered(ctx, host).map_or(0, |(_, at)| at);
        Action::Defer(format!(
            "TLS downgrade refused: {} had TLS at {} (last confirmed at unix time {since}), now {}",
            ctx.domain,
            ctx.mx_host,
            failure.class()
        ))
    }

    fn on_delivered(ctx: &Context, report: &DeliveryReport, host: &dyn Host) {
        let learned = if report.tls_version.is_some() && report.certificate_verified {
            TlsLevel::Verify
        } else if report.tls_version.is_some()
            && host.table_get("remember_encrypt").as_deref() == Some("1")
        {
            TlsLevel::Encrypt
        } else {
            return;
        };
        let known = remembered(ctx, host);
        // Never weaken what is remembered: an unverified delivery does not overwrite `verify`.
        let level = match known {
            Some((TlsLevel::Verify, _)) => TlsLevel::Verify,
            _ => learned,
        };
        let now = host.now();
        match known {
            // Refresh at most daily: every write is an fsync'd file rewrite in the relay.
            Some((old, at)) if old == level && now.saturating_sub(at) < SECONDS_PER_DAY => return,
            None => host.log(
                LogLevel::Info,
                &format!("tofu: remembering {} for {}", level.as_str(), ctx.domain),
            ),
            Some(_) => {}
        }
        host.kv_set(&ctx.domain, &format!("{};{now}", level.as_str()));
    }
}

postwarden_policy_sdk::export_policy!(Tofu);

/// The remembered level and when it was last confirmed, if it has not expired.
fn remembered(ctx: &Context, host: &dyn Host) -> Option<(TlsLevel, u64)> {
    let value = host.kv_get(&ctx.domain)?;
    let (level, at) = value.split_once(';')?;
    let (level, at) = (TlsLevel::parse(level)?, at.parse::<u64>().ok()?);
    let max_age = host
        .table_get("max_age")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(180 * SECONDS_PER_DAY);
    (host.now().saturating_sub(at) <= max_age).then_some((level, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postwarden_policy_sdk::testing::{FakeHost, context};
    use postwarden_policy_sdk::{Requirement, TlsVersion};

    fn report(tls: bool, verified: bool) -> DeliveryReport {
        DeliveryReport {
            requirement: Requirement::new(TlsLevel::May),
            tls_version: tls.then_some(TlsVersion::Tls13),
            cipher: String::new(),
            certificate_verified: verified,
        }
    }

    #[test]
    fn learns_verified_tls_and_refuses_downgrade() {
        let host = FakeHost::configured::<Tofu>("{}").unwrap();
        host.now.set(1_000);
        let ctx = context("example.com");
        assert_eq!(Tofu::plan(&ctx, &host), Decision::Abstain);

        Tofu::on_delivered(&ctx, &report(true, false), &host);
        assert_eq!(
            Tofu::plan(&ctx, &host),
            Decision::Abstain,
            "unverified TLS is not remembered by default"
        );

        Tofu::on_delivered(&ctx, &report(true, true), &host);
        assert_eq!(Tofu::plan(&ctx, &host), Decision::require(TlsLevel::Verify));
        Tofu::on_delivered(&ctx, &report(false, false), &host);
        assert_eq!(
            Tofu::plan(&ctx, &host),
            Decision::require(TlsLevel::Verify),
            "plaintext does not erase"
        );
        assert!(matches!(
            Tofu::on_failure(&ctx, &Failure::StarttlsNotOffered, &host),
            Action::Defer(_)
        ));

        host.now.set(1_000 + 181 * SECONDS_PER_DAY);
        assert_eq!(Tofu::plan(&ctx, &host), Decision::Abstain, "expired");
    }

    #[test]
    fn remember_encrypt_and_never_weaken() {
        let host = FakeHost::configured::<Tofu>(r#"{"remember_encrypt": true, "max_age_days": 1}"#)
            .unwrap();
        let ctx = context("example.com");
        Tofu::on_delivered(&ctx, &report(true, false), &host);
        assert_eq!(Tofu::plan(&ctx, &host), Decision::require(TlsLevel::Encrypt));
        Tofu::on_delivered(&ctx, &report(true, true), &host);
        Tofu::on_delivered(&ctx, &report(true, false), &host);
        assert_eq!(Tofu::plan(&ctx, &host), Decision::require(TlsLevel::Verify));
        assert_eq!(Tofu::plan(&context("other.example"), &host), Decision::Abstain);
    }

    #[test]
    fn confirmations_refresh_the_store_at_most_daily() {
        let host = FakeHost::configured::<Tofu>("{}").unwrap();
        let ctx = context("example.com");
        host.now.set(1_000);
        Tofu::on_delivered(&ctx, &report(true, true), &host);
        host.now.set(2_000);
        Tofu::on_delivered(&ctx, &report(true, true), &host);
        assert_eq!(host.kv_get("example.com").as_deref(), Some("verify;1000"));
        let later = 1_000 + SECONDS_PER_DAY;
        host.now.set(later);
        Tofu::on_delivered(&ctx, &report(true, true), &host);
        assert_eq!(host.kv_get("example.com"), Some(format!("verify;{later}")));
    }

    #[test]
    fn bad_settings() {
        assert!(
            FakeHost::configured::<Tofu>(r#"{"max_age_days": 0}"#)
                .unwrap_err()
                .contains("max_age_days")
        );
        assert!(
            FakeHost::configured::<Tofu>(r#"{"remember": true}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }
}
