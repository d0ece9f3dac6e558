//! RFC 3207 from the server side, with a minimal client written in this test: the STARTTLS
//! switch, certificate verification outcomes, stripping, and response injection.
#![allow(clippy::unwrap_used)]

mod support;

use postwarden_sim::Event;
use rustls::{AlertDescription, CertificateError, Error as TlsError};
use support::{
    Client, connect, danger_unverified_config, fleet, mx_addr, rustls_error, upgrade,
    verifying_config,
};

/// RFC 3207 §4: "After receiving a 220 response to a STARTTLS command, the client MUST start
/// the TLS negotiation before giving any other SMTP commands." §4.2: the client "SHOULD send an
/// EHLO command as the first command after a successful TLS negotiation."
#[tokio::test]
async fn good_scenario_completes_starttls_and_verifies_for_the_mx_name() {
    let fleet = fleet(&["CAP-01"]).await;
    let (addr, host) = mx_addr(&fleet, "CAP-01", "mx1");
    let (mut client, greeting) = connect(addr).await.unwrap();
    assert_eq!(greeting.code, 220);
    let ehlo = client.command("EHLO relay.test").await.unwrap();
    assert!(ehlo.has_capability("STARTTLS"));
    assert_eq!(client.command("STARTTLS").await.unwrap().code, 220);
    let mut tls = upgrade(client, verifying_config(), &host).await.unwrap();
    let ehlo = tls.command("EHLO relay.test").await.unwrap();
    assert!(!ehlo.has_capability("STARTTLS"), "STARTTLS listed after TLS: {ehlo:?}");
    assert!(ehlo.lines.iter().any(|l| l.starts_with("X-REAL-")));
    let done = tls.transaction("a@relay.test", &["user@cap-01.sim.test"]).await.unwrap();
    assert_eq!(done.code, 250);
    assert!(done.lines[0].contains("Q-"));
    assert_eq!(tls.command("QUIT").await.unwrap().code, 221);
    drop(tls);

    let transcript = fleet.transcripts().settled("cap-01.sim.test", support::REPLY_TIMEOUT).await;
    let log = &transcript.connections[0];
    assert!(log.events.iter().any(|e| matches!(e,
        Event::TlsEstablished { sni: Some(sni), .. } if *sni == host)));
    let messages = transcript.messages();
    assert!(matches!(messages[0].1, Event::MessageAccepted { tls: true, size: 34, .. }));
    assert!(postwarden_sim::check("CAP-01", &transcript, true).is_empty());
}

/// Handshake against `id` with the verifying client; returns the rustls error.
async fn verification_error(fleet: &postwarden_sim::Fleet, id: &str) -> Option<TlsError> {
    let (addr, host) = mx_addr(fleet, id, "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    assert_eq!(client.command("STARTTLS").await.unwrap().code, 220, "{id}");
    match upgrade(client, verifying_config(), &host).await {
        Ok(mut tls) => {
            // TLS 1.3 servers may report problems only at the first read.
            tls.command("QUIT").await.err().and_then(|e| rustls_error(&e).cloned())
        }
        Err(error) => {
            Some(rustls_error(&error).cloned().unwrap_or_else(|| panic!("{id}: {error}")))
        }
    }
}

fn cert_error(error: Option<TlsError>) -> CertificateError {
    match error {
        Some(TlsError::InvalidCertificate(e)) => e,
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

/// RFC 8461 §5 / Postfix `verify`: FV refuses these; the error says why.
#[tokio::test]
async fn bad_certificates_fail_verification_for_the_right_reason() {
    let ids = [
        "CERT-02", "CERT-03", "CERT-04", "CERT-05", "CERT-06", "CERT-07", "CERT-08", "CERT-10B",
        "CERT-11", "CERT-12", "CERT-13", "CERT-13B", "CERT-17",
    ];
    let fleet = fleet(&ids).await;
    // Self-signed, untrusted root, missing intermediate.
    for id in ["CERT-02", "CERT-03", "CERT-07"] {
        let e = cert_error(verification_error(&fleet, id).await);
        assert_eq!(e, CertificateError::UnknownIssuer, "{id}");
    }
    for id in ["CERT-04", "CERT-08", "CERT-10B", "CERT-11", "CERT-12"] {
        let e = cert_error(verification_error(&fleet, id).await);
        assert!(
            matches!(
                e,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ),
            "{id}: {e:?}"
        );
    }
    let e = cert_error(verification_error(&fleet, "CERT-05").await);
    assert!(
        matches!(e, CertificateError::Expired | CertificateError::ExpiredContext { .. }),
        "{e:?}"
    );
    let e = cert_error(verification_error(&fleet, "CERT-06").await);
    assert!(
        matches!(e, CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }),
        "{e:?}"
    );
    let e = cert_error(verification_error(&fleet, "CERT-13B").await);
    assert!(
        matches!(
            e,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        ),
        "{e:?}"
    );
    for id in ["CERT-13", "CERT-17"] {
        cert_error(verification_error(&fleet, id).await);
    }

    // Without verification (O and F) every one of them completes the handshake.
    for id in ids {
        let (addr, host) = mx_addr(&fleet, id, "mx1");
        let (mut client, _) = connect(addr).await.unwrap();
        client.command("EHLO relay.test").await.unwrap();
        client.command("STARTTLS").await.unwrap();
        let mut tls = upgrade(client, danger_unverified_config(), &host).await.unwrap();
        assert_eq!(tls.command("EHLO relay.test").await.unwrap().code, 250, "{id}");
    }
}

#[tokio::test]
async fn good_certificate_variants_verify() {
    let ids = [
        "CERT-01", "CERT-09", "CERT-10", "CERT-18", "CERT-19", "CERT-20", "CERT-20B", "CERT-21",
        "HS-16",
    ];
    let fleet = fleet(&ids).await;
    for id in ids {
        assert_eq!(verification_error(&fleet, id).await, None, "{id}");
    }
}

/// Research §1.3: the raw responders produce the rustls errors observed against real servers.
#[tokio::test]
async fn raw_responders_break_the_handshake() {
    let fleet = fleet(&["HS-01", "HS-02", "STL-07", "HS-06"]).await;
    for (id, expect) in [
        ("HS-01", TlsError::AlertReceived(AlertDescription::HandshakeFailure)),
        ("HS-02", TlsError::AlertReceived(AlertDescription::ProtocolVersion)),
    ] {
        assert_eq!(verification_error(&fleet, id).await, Some(expect), "{id}");
    }
    for id in ["STL-07", "HS-06"] {
        assert!(verification_error(&fleet, id).await.is_some(), "{id}");
    }
    let transcript = fleet.transcripts().settled("hs-01.sim.test", support::REPLY_TIMEOUT).await;
    assert!(transcript.connections[0].events.iter().any(|e| matches!(e, Event::TlsFailed(_))));
}

/// Research §3.1: the stripping server hides STARTTLS and fixes the last-line marker.
#[tokio::test]
async fn stripping_scenario_does_not_advertise_starttls() {
    let fleet = fleet(&["CAP-03", "CAP-04"]).await;
    for id in ["CAP-03", "CAP-04"] {
        let (addr, _) = mx_addr(&fleet, id, "mx1");
        let (mut client, _) = connect(addr).await.unwrap();
        client.send(b"EHLO relay.test\r\n").await.unwrap();
        let ehlo = client.reply().await.unwrap();
        assert_eq!(ehlo.code, 250);
        assert!(!ehlo.has_capability("STARTTLS"), "{id}: {ehlo:?}");
        let refused = client.command("STARTTLS").await.unwrap();
        assert!(!refused.is_positive(), "{id}");
    }
}

async fn starttls_first_read(
    fleet: &postwarden_sim::Fleet,
    id: &str,
) -> Client<tokio::net::TcpStream> {
    let (addr, _) = mx_addr(fleet, id, "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    client.send(b"STARTTLS\r\n").await.unwrap();
    client.read_once().await.unwrap();
    client
}

/// Research §3.2: the forged replies travel in the same write (one segment) as the 220.
#[tokio::test]
async fn injection_bytes_arrive_with_the_220() {
    let fleet = fleet(&["INJ-01", "INJ-02", "INJ-03", "INJ-04", "INJ-05"]).await;
    for (id, injected) in [
        ("INJ-01", "220 2.0.0 Ready to start TLS\r\n250-X-INJECTED\r\n250 AUTH PLAIN\r\n"),
        ("INJ-02", "220 2.0.0 Ready to start TLS\r\n250-AUTH PLA"),
        ("INJ-04", "354 go ahead\r\n250 2.0.0 Ok: queued as FORGED\r\n"),
        ("INJ-05", "220 2.0.0 go ahead\r\n250-X-INJECTED\r\n250 AUTH PLAIN\r\n"),
    ] {
        let client = starttls_first_read(&fleet, id).await;
        let first = String::from_utf8_lossy(client.buffered()).into_owned();
        assert!(first.starts_with("220"), "{id}: {first:?}");
        assert!(first.ends_with(injected), "{id}: {first:?}");
    }
    // INJ-03 sends them in a second write, only once the ClientHello has started to arrive.
    let mut client = starttls_first_read(&fleet, "INJ-03").await;
    assert_eq!(client.buffered(), b"220 2.0.0 Ready to start TLS\r\n");
    client.send(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x01]).await.unwrap();
    client.read_once().await.unwrap();
    assert!(client.buffered().ends_with(b"250-X-INJECTED\r\n250 AUTH PLAIN\r\n"));
}

/// A client that discards the injected bytes (Postfix) gets a clean TLS session whose EHLO
/// reply is the real server's.
#[tokio::test]
async fn discarding_injected_bytes_yields_the_real_capabilities() {
    let fleet = fleet(&["INJ-01"]).await;
    let (_, host) = mx_addr(&fleet, "INJ-01", "mx1");
    let mut client = starttls_first_read(&fleet, "INJ-01").await;
    let reply = client.reply().await.unwrap();
    assert_eq!(reply.code, 220);
    assert!(!client.buffered().is_empty());
    let mut tls = upgrade(client, verifying_config(), &host).await.unwrap();
    let ehlo = tls.command("EHLO relay.test").await.unwrap();
    assert!(ehlo.lines.iter().any(|l| l.starts_with("X-REAL-")), "{ehlo:?}");
    assert!(!ehlo.lines.iter().any(|l| l.contains("INJECTED")));
}

/// Research §3.4 / RFC 3207 §4.2: capabilities before and after TLS differ (CAP-09).
#[tokio::test]
async fn capabilities_change_after_tls() {
    let fleet = fleet(&["CAP-09"]).await;
    let (addr, host) = mx_addr(&fleet, "CAP-09", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    let before = client.command("EHLO relay.test").await.unwrap();
    assert!(before.lines.contains(&"SIZE 100".to_owned()) && before.has_capability("AUTH"));
    client.command("STARTTLS").await.unwrap();
    let mut tls = upgrade(client, verifying_config(), &host).await.unwrap();
    let after = tls.command("EHLO relay.test").await.unwrap();
    assert!(after.lines.contains(&"SIZE 10000000".to_owned()) && after.has_capability("8BITMIME"));
    assert!(!after.has_capability("AUTH"));
}
