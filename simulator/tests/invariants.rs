//! The invariant checker over real transcripts: each check fires on the violation it names,
//! and only under the policy it applies to.
#![allow(clippy::unwrap_used)]

mod support;

use postwarden_sim::{Event, Invariant, Transcript, check};
use support::{REPLY_TIMEOUT, connect, fleet, mx_addr, upgrade, verifying_config};

async fn settled(fleet: &postwarden_sim::Fleet, id: &str) -> Transcript {
    let domain = fleet.scenarios().iter().find(|s| s.id == id).unwrap().domain();
    fleet.transcripts().settled(&domain, REPLY_TIMEOUT).await
}

fn flagged(transcript: &Transcript, forced: bool) -> Vec<(Invariant, String)> {
    check("test", transcript, forced).into_iter().map(|v| (v.invariant, v.line)).collect()
}

/// I1: "Under F or FV, no MAIL, RCPT, DATA, BDAT or AUTH is sent unless TLS is up."
#[tokio::test]
async fn plaintext_mail_is_flagged_under_forced_but_not_opportunistic() {
    let fleet = fleet(&["CAP-02"]).await;
    let (addr, _) = mx_addr(&fleet, "CAP-02", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    let done = client.transaction("a@relay.test", &["user@cap-02.sim.test"]).await.unwrap();
    assert_eq!(done.code, 250);
    client.command("QUIT").await.unwrap();
    drop(client);

    let transcript = settled(&fleet, "CAP-02").await;
    assert!(matches!(transcript.messages()[0].1, Event::MessageAccepted { tls: false, .. }));
    assert!(check("CAP-02", &transcript, false).is_empty());
    let violations = check("CAP-02", &transcript, true);
    assert!(!violations.is_empty());
    assert_eq!(violations[0].invariant, Invariant::PlaintextTransaction);
    assert_eq!(violations[0].scenario, "CAP-02");
    assert_eq!(violations[0].line, "MAIL FROM:<a@relay.test>");
    assert!(violations.iter().all(|v| v.invariant == Invariant::PlaintextTransaction));
    assert_eq!(violations.len(), 3, "MAIL, RCPT and DATA: {violations:?}");
}

/// I2: "After STARTTLS\r\n the relay sends nothing until the 220 arrives."
#[tokio::test]
async fn bytes_pipelined_after_starttls_are_flagged_and_discarded() {
    let fleet = fleet(&["CAP-01"]).await;
    let (addr, host) = mx_addr(&fleet, "CAP-01", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    client.send(b"STARTTLS\r\nMAIL FROM:<evil@relay.test>\r\n").await.unwrap();
    assert_eq!(client.reply().await.unwrap().code, 220);
    let mut tls = upgrade(client, verifying_config(), &host).await.unwrap();
    // The pipelined MAIL was not carried into TLS: MAIL now still needs EHLO first.
    assert_eq!(tls.command("MAIL FROM:<a@relay.test>").await.unwrap().code, 503);
    drop(tls);
    let found = flagged(&settled(&fleet, "CAP-01").await, false);
    assert!(
        found.contains(&(
            Invariant::PipelinedAfterStartTls,
            "MAIL FROM:<evil@relay.test>\r\n".into()
        )),
        "{found:?}"
    );
    // I4 as well: MAIL before EHLO inside TLS.
    assert!(found.iter().any(|(i, _)| *i == Invariant::EhloAfterTls), "{found:?}");
}

/// I2, second half: "sends no SMTP bytes before its ClientHello".
#[tokio::test]
async fn smtp_instead_of_client_hello_is_flagged() {
    let fleet = fleet(&["CAP-01"]).await;
    let (addr, _) = mx_addr(&fleet, "CAP-01", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    assert_eq!(client.command("STARTTLS").await.unwrap().code, 220);
    client.send(b"MAIL FROM:<a@relay.test>\r\n").await.unwrap();
    let _ = client.read_once().await;
    drop(client);
    let found = flagged(&settled(&fleet, "CAP-01").await, false);
    assert!(
        found.iter().any(|(i, l)| *i == Invariant::PipelinedAfterStartTls && l.starts_with("MAIL")),
        "{found:?}"
    );
}

/// I5: "After a failed handshake, SMTP never continues on that TCP connection."
#[tokio::test]
async fn smtp_after_a_failed_handshake_is_flagged() {
    let fleet = fleet(&["HS-01"]).await;
    let (addr, host) = mx_addr(&fleet, "HS-01", "mx1");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Keep a second handle on the socket so we can misbehave after the failure.
    let std = tcp.into_std().unwrap();
    let twin = tokio::net::TcpStream::from_std(std.try_clone().unwrap()).unwrap();
    let mut client = support::Client::new(tokio::net::TcpStream::from_std(std).unwrap());
    client.reply().await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    client.command("STARTTLS").await.unwrap();
    assert!(upgrade(client, verifying_config(), &host).await.is_err());
    let mut twin = support::Client::new(twin);
    let _ = twin.send(b"MAIL FROM:<a@relay.test>\r\n").await;
    drop(twin);
    let found = flagged(&settled(&fleet, "HS-01").await, false);
    assert!(
        found
            .contains(&(Invariant::CommandAfterFailedHandshake, "MAIL FROM:<a@relay.test>".into())),
        "{found:?}"
    );
}

/// RFC 5321 §4.3.1: a client that talks during a split greeting is caught (GRT-05).
#[tokio::test]
async fn talking_before_the_greeting_ends_is_flagged() {
    let fleet = fleet(&["GRT-05"]).await;
    let (addr, _) = mx_addr(&fleet, "GRT-05", "mx1");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut client = support::Client::new(tcp);
    client.read_once().await.unwrap(); // "220-" only
    client.send(b"EHLO eager.test\r\n").await.unwrap();
    let greeting = client.reply().await.unwrap();
    assert_eq!(greeting.code, 220);
    assert_eq!(client.reply().await.unwrap().code, 250);
    drop(client);
    let found = flagged(&settled(&fleet, "GRT-05").await, false);
    assert_eq!(found, vec![(Invariant::TalkBeforeGreeting, "EHLO eager.test\r\n".into())]);
}

/// Research §3.6 item 10: AUTH is never sent in plaintext, even under O (AUTH-01).
#[tokio::test]
async fn auth_in_plaintext_is_flagged_under_every_policy() {
    let fleet = fleet(&["AUTH-01"]).await;
    let (addr, _) = mx_addr(&fleet, "AUTH-01", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    assert!(client.command("EHLO relay.test").await.unwrap().has_capability("AUTH"));
    assert_eq!(client.command("STARTTLS").await.unwrap().code, 454);
    client.command("AUTH PLAIN AHVzZXIAcGFzcw==").await.unwrap();
    drop(client);
    let transcript = settled(&fleet, "AUTH-01").await;
    let found = flagged(&transcript, false);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, Invariant::AuthWithoutTls);
    assert_eq!(check("AUTH-01", &transcript, true).len(), 2, "I1 and AUTH under forced");
}

/// I9: "A recipient counts as delivered only on the reply to the final dot of a transaction
/// whose DATA got 354 and whose whole body was sent, on the same connection and the same side
/// of the TLS boundary." A client that takes DATA-04's `250` to DATA for acceptance reports a
/// delivery the transcript cannot back; the real acceptance elsewhere is backed, but only on
/// its own side of the TLS boundary and with its own reply.
#[tokio::test]
async fn a_delivery_without_a_body_is_flagged() {
    use postwarden_sim::{Delivery, check_deliveries};
    let fleet = fleet(&["DATA-04", "CAP-02"]).await;
    let (addr, host) = mx_addr(&fleet, "DATA-04", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    let pretend = client.transaction("a@relay.test", &["user@data-04.sim.test"]).await.unwrap();
    assert_eq!(pretend.code, 250, "DATA-04 answers DATA with 250");
    client.command("QUIT").await.unwrap();
    drop(client);
    let claim = |mx: &str, tls: bool, reply: &str| Delivery {
        rcpt: "user@data-04.sim.test".into(),
        mx: mx.into(),
        tls,
        reply: reply.into(),
    };
    let transcript = settled(&fleet, "DATA-04").await;
    let violations =
        check_deliveries("DATA-04", &transcript, &[claim(&host, false, "250 2.0.0 pretend")]);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].invariant, Invariant::DeliveredWithoutTransaction);
    assert!(violations[0].to_string().starts_with("I9 violated in DATA-04"), "{}", violations[0]);

    let (addr, host) = mx_addr(&fleet, "CAP-02", "mx1");
    let (mut client, _) = connect(addr).await.unwrap();
    client.command("EHLO relay.test").await.unwrap();
    let done = client.transaction("a@relay.test", &["user@data-04.sim.test"]).await.unwrap();
    assert_eq!(done.code, 250);
    client.command("QUIT").await.unwrap();
    drop(client);
    let transcript = settled(&fleet, "CAP-02").await;
    let reply = format!("{} {}", done.code, done.lines[0]);
    assert!(check_deliveries("CAP-02", &transcript, &[claim(&host, false, &reply)]).is_empty());
    // The same acceptance claimed inside TLS, or on another reply, is not backed.
    assert_eq!(check_deliveries("CAP-02", &transcript, &[claim(&host, true, &reply)]).len(), 1);
    let other = "250 2.1.5 Ok";
    assert_eq!(check_deliveries("CAP-02", &transcript, &[claim(&host, false, other)]).len(), 1);
}
