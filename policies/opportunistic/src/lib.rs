//! `opportunistic`: encrypt when possible, deliver anyway.
//!
//! What operators call opportunistic TLS (RFC 7435's spirit, Postfix `may`): every domain gets
//! `may`, and TLS is tried everywhere before plaintext is accepted anywhere.
//!
//! - More than one MX host: a TLS failure at one host (STARTTLS missing or refused, handshake,
//!   certificate, timeout, lost connection) answers `next-mx`, so the next host is tried with
//!   TLS. When every host failed TLS, the relay falls back to plaintext in the same attempt, at
//!   the most preferred of those hosts that accepts a plaintext connection: `next-mx` under a
//!   requirement that allows plaintext means "TLS elsewhere first", never a deferral. A broken
//!   or stripped primary thus costs no encryption when a backup has working TLS.
//! - One MX host: there is nowhere else to try. STARTTLS missing or refused continues in
//!   plaintext on the same connection; after a failure once STARTTLS was accepted the
//!   connection's state is unknown, so the relay reconnects at once and delivers without
//!   STARTTLS. Reconnecting immediately, rather than on a later queue run, keeps outcomes
//!   deterministic.
//!
//! Settings: none.

use postwarden_policy_sdk::{Action, Context, Decision, Failure, Host, Policy, TlsLevel};

/// The policy.
pub struct Opportunistic;

impl Policy for Opportunistic {
    fn plan(_ctx: &Context, _host: &dyn Host) -> Decision {
        Decision::require(TlsLevel::May)
    }

    fn on_failure(ctx: &Context, failure: &Failure, _host: &dyn Host) -> Action {
        if ctx.mx_count > 1 {
            Action::NextMx
        } else if failure.allows_continue_plaintext() {
            Action::ContinuePlaintext
        } else {
            Action::ReconnectPlaintext
        }
    }
}

postwarden_policy_sdk::export_policy!(Opportunistic);

#[cfg(test)]
mod tests {
    use super::*;
    use postwarden_policy_sdk::SmtpReply;
    use postwarden_policy_sdk::testing::{FakeHost, context};

    #[test]
    fn every_domain_gets_may() {
        let host = FakeHost::configured::<Opportunistic>("{}").unwrap();
        for domain in ["example.com", "bank.example", "a.b.c"] {
            assert_eq!(
                Opportunistic::plan(&context(domain), &host),
                Decision::require(TlsLevel::May)
            );
        }
    }

    #[test]
    fn with_several_mx_hosts_every_failure_tries_tls_at_the_next() {
        let host = FakeHost::default();
        let refused = Failure::StarttlsRefused(SmtpReply { code: 454, text: "no".into() });
        let failures = [
            Failure::StarttlsNotOffered,
            refused,
            Failure::HandshakeFailed("alert".into()),
            Failure::CertificateExpired("x".into()),
            Failure::Timeout("x".into()),
            Failure::ConnectionLost("x".into()),
        ];
        // The last host too: the relay then falls back to plaintext from the top.
        for index in 0..3 {
            let mut ctx = context("example.com");
            (ctx.mx_index, ctx.mx_count) = (index, 3);
            for failure in &failures {
                assert_eq!(
                    Opportunistic::on_failure(&ctx, failure, &host),
                    Action::NextMx,
                    "{failure:?} at {index}"
                );
            }
        }
    }

    #[test]
    fn failures_fall_back_to_plaintext() {
        let host = FakeHost::default();
        let ctx = context("example.com");
        assert_eq!(ctx.mx_count, 1);
        let refused = Failure::StarttlsRefused(SmtpReply { code: 454, text: "no".into() });
        let table = [
            (Failure::StarttlsNotOffered, Action::ContinuePlaintext),
            (refused, Action::ContinuePlaintext),
            (Failure::HandshakeFailed("alert".into()), Action::ReconnectPlaintext),
            (Failure::CertificateExpired("x".into()), Action::ReconnectPlaintext),
            (Failure::Timeout("x".into()), Action::ReconnectPlaintext),
            (Failure::ConnectionLost("x".into()), Action::ReconnectPlaintext),
        ];
        for (failure, action) in table {
            assert_eq!(Opportunistic::on_failure(&ctx, &failure, &host), action, "{failure:?}");
        }
    }

    #[test]
    fn settings_are_rejected() {
        let err = FakeHost::configured::<Opportunistic>(r#"{"domains": []}"#).unwrap_err();
        assert!(err.contains("takes no settings") && err.contains("domains"), "{err}");
    }
}
