//! `opportunistic`: encrypt when possible, deliver anyway.
//!
//! What operators call opportunistic TLS (RFC 7435's spirit, Postfix `may`): every domain gets
//! `may`. If the server does not offer STARTTLS or refuses it, the message continues in
//! plaintext on the same connection; if TLS fails after STARTTLS was accepted (handshake,
//! certificate, timeout, lost connection), the connection's state is unknown, so the relay
//! reconnects to the same MX at once and delivers without STARTTLS. Reconnecting immediately,
//! rather than on a later queue run, keeps outcomes deterministic.
//!
//! Settings: none.

use postwarden_policy_sdk::{Action, Context, Decision, Failure, Host, Policy, TlsLevel};

/// The policy.
pub struct Opportunistic;

impl Policy for Opportunistic {
    fn plan(_ctx: &Context, _host: &dyn Host) -> Decision {
        Decision::require(TlsLevel::May)
    }

    fn on_failure(_ctx: &Context, failure: &Failure, _host: &dyn Host) -> Action {
        if failure.allows_continue_plaintext() {
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
    fn failures_fall_back_to_plaintext() {
        let host = FakeHost::default();
        let ctx = context("example.com");
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
