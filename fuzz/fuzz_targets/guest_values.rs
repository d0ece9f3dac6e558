//! Values a policy guest returns: the requirement from `plan` and the action from `on-failure`,
//! as converted from the component's types, through the chain's checks and on to what the
//! relay builds from them (the TLS client configuration; a deferral's reason in a DSN).
//!
//! Checks: no panic; a requirement that passes is printable on one line and yields a TLS
//! client configuration, except where the relay must fail closed (level `dane` without a DANE
//! verifier, a client identity the relay does not configure); no action that passes allows plaintext under a forced requirement,
//! or on a connection a failed handshake left unusable; a reason that passes cannot break the
//! DSN's framing.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use postwarden::delivery::tls::TlsContext;
use postwarden::policy::chain::{validate_action, validate_requirement};
use postwarden::policy::{Action, Failure, Requirement, TlsBasis, TlsLevel, TlsVersion};
use postwarden::queue::dsn::{DsnRecipient, build};

fn level(u: &mut Unstructured) -> Result<TlsLevel> {
    Ok(*u.choose(&[
        TlsLevel::None,
        TlsLevel::May,
        TlsLevel::Encrypt,
        TlsLevel::Dane,
        TlsLevel::Verify,
        TlsLevel::Secure,
    ])?)
}

fn requirement(u: &mut Unstructured) -> Result<Requirement> {
    let level = level(u)?;
    let count = u.int_in_range(0..=70u8)?;
    let mut match_names = Vec::new();
    for _ in 0..count {
        if u.is_empty() {
            break;
        }
        match_names.push(u.arbitrary::<String>()?);
    }
    let min_version = *u.choose(&[None, Some(TlsVersion::Tls12), Some(TlsVersion::Tls13)])?;
    let basis = *u.choose(&[TlsBasis::Local, TlsBasis::Sts, TlsBasis::Dane])?;
    let client_identity = match u.arbitrary::<bool>()? {
        true => Some(u.arbitrary::<String>()?),
        false => None,
    };
    Ok(Requirement { level, match_names, min_version, basis, client_identity })
}

fn failure(u: &mut Unstructured) -> Result<Failure> {
    let d: String = u.arbitrary()?;
    Ok(match u.int_in_range(0..=15u8)? {
        0 => Failure::StarttlsNotOffered,
        1 => Failure::StarttlsRefused { code: u.arbitrary()?, text: d },
        2 => Failure::HandshakeFailed(d),
        3 => Failure::CertificateUntrusted(d),
        4 => Failure::CertificateExpired(d),
        5 => Failure::CertificateNotYetValid(d),
        6 => Failure::CertificateNameMismatch(d),
        7 => Failure::TlsVersionTooOld(d),
        8 => Failure::ConnectionLost(d),
        9 => Failure::Timeout(d),
        10 => Failure::DnssecBogus(d),
        11 => Failure::TlsaLookupFailed(d),
        12 => Failure::DaneRequired(d),
        13 => Failure::StsPolicyUnavailable(d),
        14 => Failure::StsMxMismatch(d),
        _ => Failure::TlsaMismatch(d),
    })
}

/// As `bindings::action` converts it: codes are the host's, reasons the guest's.
fn action(u: &mut Unstructured, failure: &Failure) -> Result<Action> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => Action::ContinuePlaintext,
        1 => Action::ReconnectPlaintext,
        2 => Action::NextMx,
        3 => Action::defer(failure.defer_code(), u.arbitrary::<String>()?),
        _ => Action::bounce("5.7.5", u.arbitrary::<String>()?),
    })
}

fn tls() -> &'static TlsContext {
    static TLS: OnceLock<TlsContext> = OnceLock::new();
    TLS.get_or_init(|| TlsContext::new(rustls::RootCertStore::empty()))
}

fn run(u: &mut Unstructured) -> Result<()> {
    let requirement = requirement(u)?;
    let failure = failure(u)?;
    let action = action(u, &failure)?;
    let _ = failure.to_string();
    let _ = Failure::from_class(failure.class());

    if validate_requirement(&requirement).is_ok() {
        let shown = requirement.to_string();
        assert!(!shown.contains(|c: char| c.is_control()), "{shown:?}");
        let config = tls().client_config(&requirement, "example.com", "mx.example.com", 25);
        if requirement.level == TlsLevel::Dane || requirement.client_identity.is_some() {
            // No DANE verifier yet, and this context configures no client identity.
            assert!(config.is_err(), "{requirement} must fail closed");
        } else {
            config.expect("a valid requirement gives a TLS configuration");
        }
    }
    if validate_action(&action, &requirement, &failure).is_ok() {
        let plaintext = matches!(action, Action::ContinuePlaintext | Action::ReconnectPlaintext);
        assert!(!(plaintext && requirement.level.is_forced()), "{action} under {requirement}");
        if matches!(action, Action::ContinuePlaintext) {
            assert!(failure.allows_continue_plaintext());
        }
        if let Action::Defer { code, reason } | Action::Bounce { code, reason } = &action {
            assert!(!reason.trim().is_empty());
            let dsn = build(
                "relay.test",
                "sender@example.org",
                "ID1",
                b"Subject: x\r\n\r\nbody\r\n",
                &[DsnRecipient {
                    address: "user@example.com".to_owned(),
                    action: "failed",
                    status: code.clone(),
                    diagnostic: reason.clone(),
                }],
                "Thu, 1 Jan 1970 00:00:00 +0000",
                "<ID1.0.dsn@relay.test>",
            );
            for (i, &b) in dsn.iter().enumerate() {
                match b {
                    b'\r' => assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR in DSN"),
                    b'\n' => assert_eq!(dsn[i - 1], b'\r', "bare LF in DSN"),
                    _ => {}
                }
            }
            let boundaries =
                dsn.split(|&b| b == b'\n').filter(|l| l.starts_with(b"--=_postwarden_ID1")).count();
            assert_eq!(boundaries, 4, "the reason changed the DSN's MIME structure");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
