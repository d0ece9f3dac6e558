//! The relay service in process: SMTP in, queue, policy-driven delivery out, DSNs back.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use postwarden::service::Relay;
use postwarden_tests::{chains, sim};

/// How long a test waits for the queue to reach a state: a guard against a stalled relay, not a
/// timing expectation (a fresh-clone CI run on two busy cores once needed more than 20 s).
const DEADLINE: Duration = Duration::from_secs(90);

/// A relay with `opportunistic` delivering to `fleet` (its DNS, port and CA), its spool in
/// `dir`; `client.example` (the submitters' domain, for DSNs) goes nowhere.
async fn opportunistic_relay(fleet: &postwarden_sim::Fleet, dir: &std::path::Path) -> Relay {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, fleet.ca_pem()).unwrap();
    let toml = format!(
        "[[policy]]\nname = \"opportunistic\"\npath = \"{{wasm:opportunistic}}\"\n\
         [delivery]\nhelo_name = \"relay.postwarden.test\"\nport = {port}\ndns_servers = [\"{dns}\"]\n\
         [delivery.routes]\n\"client.example\" = \"[127.0.0.1]:1\"\n\
         [delivery.timeouts]\nconnect = 2\ngreeting = 2\ncommand = 2\ntls_handshake = 2\n\
         [tls]\nwebpki_roots = false\nca_files = [\"{ca}\"]\n\
         [queue]\ndir = \"spool\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n",
        port = fleet.port(),
        dns = fleet.dns_addr(),
        ca = ca.display()
    );
    let config = chains::config_in(&toml, dir).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Relay::start(&config, listener).await.unwrap()
}

/// Writes each text to the relay's SMTP port over a raw socket (the first, empty, only waits
/// for the greeting) and returns the code of the reply to each.
async fn converse(relay: &Relay, texts: &[&str]) -> Vec<String> {
    let stream = tokio::net::TcpStream::connect(relay.smtp_addr).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let mut codes = Vec::new();
    for text in texts {
        stream.get_mut().write_all(text.as_bytes()).await.unwrap();
        // One reply: its last line has a space after the code.
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert!(!line.is_empty(), "connection closed after {codes:?}");
            if line.as_bytes().get(3) == Some(&b' ') {
                codes.push(line[..3].to_owned());
                break;
            }
        }
    }
    codes
}

async fn submit(relay: &Relay, from: &str, to: &str) {
    let body = format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: invoice\r\n\r\nsecret\r\n");
    let submission =
        postwarden_tests::submit::Submission { from, to: &[to], body: &body, ..Default::default() };
    let replies = postwarden_tests::submit::submit(relay.smtp_addr, &submission).await.unwrap();
    assert!(replies.queued(), "{replies:?}");
}

/// Forced TLS to a domain without STARTTLS: the message is never sent in plaintext; once its
/// lifetime is over it bounces with an RFC 3464 report naming the TLS reason; the report
/// itself (null sender) is never bounced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tls_failure_expires_into_a_dsn_that_never_bounces() {
    let (fleet, _) = sim::fleet(&["CAP-02"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, fleet.ca_pem()).unwrap();
    let toml = format!(
        "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n\".sim.test\" = \"encrypt\"\n\
         [delivery]\nhelo_name = \"relay.postwarden.test\"\nport = {port}\ndns_servers = [\"{dns}\"]\n\
         [delivery.routes]\n\"client.example\" = \"[127.0.0.1]:1\"\n\
         [delivery.timeouts]\nconnect = 2\ngreeting = 2\ncommand = 2\ntls_handshake = 2\n\
         [tls]\nwebpki_roots = false\nca_files = [\"{ca}\"]\n\
         [queue]\ndir = \"spool\"\nmin_backoff = 1\nmax_lifetime = 1\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n",
        port = fleet.port(),
        dns = fleet.dns_addr(),
        ca = ca.display()
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(&config, listener).await.unwrap();
    submit(&relay, "sender@client.example", "user@cap-02.sim.test").await;

    // The DSN appears in the queue (its recipient's domain is unreachable, so it stays a while).
    let deadline = Instant::now() + DEADLINE;
    let mut dsn_seen = None;
    while Instant::now() < deadline && dsn_seen.is_none() {
        for envelope in relay.queue.store().list().unwrap() {
            if envelope.mail_from.is_empty() {
                dsn_seen =
                    Some((envelope.clone(), relay.queue.store().body(&envelope.id).unwrap()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = relay.queue.recent();
    let (dsn, body) =
        dsn_seen.unwrap_or_else(|| panic!("no DSN was queued; attempts: {attempts:?}"));
    let body = String::from_utf8(body).unwrap();
    assert_eq!(dsn.rcpts[0].address, "sender@client.example");
    assert!(body.contains("Content-Type: multipart/report; report-type=delivery-status"), "{body}");
    assert!(
        body.contains(
            "Final-Recipient: rfc822; user@cap-02.sim.test\r\nAction: failed\r\nStatus: 4.7.4"
        ),
        "{body}"
    );
    assert!(body.contains("TLS is required, but was not offered by mx1.cap-02.sim.test"), "{body}");
    assert!(body.contains("Subject: invoice") && !body.contains("secret"), "headers only: {body}");
    // Its own Message-ID, naming the original's queue id (issue 17 item 6).
    let message_id = body.lines().find_map(|l| l.strip_prefix("Message-ID: <")).unwrap_or("");
    assert!(
        message_id.starts_with(&format!("{}.", attempts[0].id)) && message_id.contains(".dsn@"),
        "{body}"
    );

    // Nothing crossed in plaintext to the forced destination.
    let mail_in_plaintext = fleet
        .transcript("cap-02.sim.test")
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .any(|e| matches!(e, postwarden_sim::transcript::Event::Received { line, tls: false } if line.to_ascii_uppercase().starts_with("MAIL")));
    assert!(!mail_in_plaintext);

    // The DSN expires too (lifetime 1 s, unreachable sender) and is dropped, not bounced.
    let deadline = Instant::now() + DEADLINE;
    while !relay.queue.store().list().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "queue never drained: {:?}",
            relay.queue.store().list().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counters = &relay.queue.counters;
    assert_eq!(
        counters.accepted.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the message and one DSN, no DSN of the DSN"
    );
    relay.shutdown(Duration::from_secs(5)).await;
}

/// A forced-TLS failure does not sit silently in the queue: after `delay_warning` the sender
/// gets a "delayed" report, once, while the message keeps being retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_warning_tells_the_sender_once() {
    let (fleet, _) = sim::fleet(&["CAP-02"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n\".sim.test\" = \"encrypt\"\n\
         [delivery]\nport = {port}\ndns_servers = [\"{dns}\"]\n\
         [delivery.routes]\n\"client.example\" = \"[127.0.0.1]:1\"\n\
         [delivery.timeouts]\nconnect = 2\ngreeting = 2\ncommand = 2\ntls_handshake = 2\n\
         [tls]\nwebpki_roots = false\n\
         [queue]\ndir = \"spool\"\nmin_backoff = 1\ndelay_warning = 0\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n",
        port = fleet.port(),
        dns = fleet.dns_addr(),
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(&config, listener).await.unwrap();
    submit(&relay, "sender@client.example", "user@cap-02.sim.test").await;

    let deadline = Instant::now() + DEADLINE;
    let (original, warning) = loop {
        let list = relay.queue.store().list().unwrap();
        let original = list.iter().find(|e| !e.mail_from.is_empty() && e.attempts >= 2).cloned();
        let warning = list.iter().find(|e| e.mail_from.is_empty()).cloned();
        if let (Some(o), Some(w)) = (original, warning) {
            break (o, w);
        }
        assert!(Instant::now() < deadline, "no delay warning: {list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(original.warned && !original.is_done(), "the message stays queued: {original:?}");
    let body = String::from_utf8(relay.queue.store().body(&warning.id).unwrap()).unwrap();
    assert!(body.contains("Subject: Delayed Mail (still being retried)"), "{body}");
    assert!(body.contains("Action: delayed\r\nStatus: 4.7.4"), "{body}");
    let warnings =
        relay.queue.store().list().unwrap().iter().filter(|e| e.mail_from.is_empty()).count();
    assert_eq!(warnings, 1, "warned once, not at every retry");
    relay.shutdown(Duration::from_secs(5)).await;
}

/// Issue 11 item 7: `TLS-Required: No` never turns a forced domain into plaintext by default;
/// with `tls_required_no = "authenticated"` only a submitter that used AUTH can relax it, and
/// the relaxation is logged, counted and credited to the header, not to the forcing policy.
/// CAP-02 has no STARTTLS, so a relaxed message goes in plaintext and a forced one never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_no_relaxes_forced_tls_only_for_whom_the_operator_allows() {
    use postwarden_sim::transcript::Event;
    use postwarden_tests::submit::{Submission, submit};

    let (fleet, _) = sim::fleet(&["CAP-02"]).await.unwrap();
    // Plaintext MAIL FROM lines the forced destination received.
    let plaintext_mail_from = || -> Vec<String> {
        fleet
            .transcript("cap-02.sim.test")
            .connections
            .iter()
            .flat_map(|c| &c.events)
            .filter_map(|e| match e {
                Event::Received { line, tls: false }
                    if line.to_ascii_uppercase().starts_with("MAIL") =>
                {
                    Some(line.clone())
                }
                _ => None,
            })
            .collect()
    };
    for mode in [None, Some("authenticated")] {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(
            &users,
            format!("app:{}\n", postwarden::inbound::hash_password(b"salt-of-app", "s3cret")),
        )
        .unwrap();
        let engine =
            mode.map_or(String::new(), |m| format!("[policy_engine]\ntls_required_no = \"{m}\"\n"));
        let toml = format!(
            "{engine}[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n\".sim.test\" = \"encrypt\"\n\
             [delivery]\nhelo_name = \"relay.postwarden.test\"\nport = {port}\ndns_servers = [\"{dns}\"]\n\
             [delivery.timeouts]\nconnect = 2\ngreeting = 2\ncommand = 2\ntls_handshake = 2\n\
             [tls]\nwebpki_roots = false\n\
             [queue]\ndir = \"spool\"\nmin_backoff = 3600\n\
             [inbound]\nlisten = \"127.0.0.1:0\"\ntls_self_signed = true\ncredentials_file = \"{users}\"\n",
            port = fleet.port(),
            dns = fleet.dns_addr(),
            users = users.display(),
        );
        let config = chains::config_in(&toml, dir.path()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(&config, listener).await.unwrap();
        let tag = mode.unwrap_or("default");
        let body = |who: &str| {
            format!(
                "From: <{who}@client.example>\r\nTo: <user@cap-02.sim.test>\r\nSubject: {tag}\r\nTLS-Required: No\r\n\r\nsecret\r\n"
            )
        };
        let (anonymous, authenticated) = (format!("anon-{tag}"), format!("auth-{tag}"));
        // From a relay network, no AUTH.
        let from = format!("{anonymous}@client.example");
        let replies = submit(
            relay.smtp_addr,
            &Submission {
                from: &from,
                to: &["user@cap-02.sim.test"],
                body: &body(&anonymous),
                ..Submission::default()
            },
        )
        .await
        .unwrap();
        assert!(replies.queued(), "{replies:?}");
        // Over TLS with AUTH.
        let from_auth = format!("{authenticated}@client.example");
        let replies = submit(
            relay.smtp_addr,
            &Submission {
                from: &from_auth,
                to: &["user@cap-02.sim.test"],
                body: &body(&authenticated),
                starttls: true,
                auth: Some(("app", "s3cret")),
            },
        )
        .await
        .unwrap();
        assert!(replies.auth.as_deref().is_some_and(|r| r.starts_with("235")), "{replies:?}");
        assert!(replies.queued(), "{replies:?}");

        // Both messages get their first attempt.
        let deadline = Instant::now() + Duration::from_secs(30);
        let attempts = loop {
            let attempts = relay.queue.recent();
            if attempts.len() >= 2 {
                break attempts;
            }
            assert!(Instant::now() < deadline, "attempts: {attempts:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mail = plaintext_mail_from();
        let chain = relay.chains.current();
        let counters = chain.counters();
        let relaxed = counters.tls_required_no_relaxed.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            !mail.iter().any(|l| l.contains(&anonymous)),
            "{tag}: an unauthenticated TLS-Required: No crossed in plaintext: {mail:?}"
        );
        match mode {
            None => {
                assert!(!mail.iter().any(|l| l.contains(&authenticated)), "{tag}: {mail:?}");
                assert!(
                    attempts
                        .iter()
                        .all(|a| matches!(a.status, postwarden::delivery::Status::Deferred { .. })),
                    "{attempts:?}"
                );
                assert_eq!(relaxed, 0);
            }
            Some(_) => {
                assert!(mail.iter().any(|l| l.contains(&authenticated)), "{tag}: {mail:?}");
                let delivered: Vec<_> = attempts
                    .iter()
                    .filter(|a| matches!(a.status, postwarden::delivery::Status::Delivered { .. }))
                    .collect();
                assert_eq!(delivered.len(), 1, "{attempts:?}");
                assert!(
                    matches!(&delivered[0].status, postwarden::delivery::Status::Delivered { decided_by, tls: None, .. } if decided_by == "tls-required-no(over forced)"),
                    "{delivered:?}"
                );
                assert!(relaxed >= 1, "the relaxation is counted");
            }
        }
        relay.shutdown(Duration::from_secs(5)).await;
    }
}

/// Issue 10 item 5: `RCPT TO:<"a>b"@…>` is a legal quoted local part. The relay accepts it and
/// must then send it on as it came, with its co-recipient in the same transaction, instead of
/// refusing to encode it and deferring every recipient of the domain until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quoted_local_part_with_angle_brackets_is_delivered_with_its_co_recipient() {
    let (fleet, _) = sim::fleet(&["CAP-01"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = opportunistic_relay(&fleet, dir.path()).await;

    // Submitted over a raw socket, so that only the relay's own encoder is under test.
    let codes = converse(
        &relay,
        &[
            "",
            "EHLO app.client.example\r\n",
            "MAIL FROM:<sender@client.example>\r\n",
            "RCPT TO:<\"a>b\"@cap-01.sim.test>\r\n",
            "RCPT TO:<good@cap-01.sim.test>\r\n",
            "DATA\r\n",
            "From: <sender@client.example>\r\nSubject: quoted\r\n\r\nhello\r\n.\r\n",
            "QUIT\r\n",
        ],
    )
    .await;
    assert_eq!(codes, ["220", "250", "250", "250", "250", "354", "250", "221"]);

    let deadline = Instant::now() + DEADLINE;
    while relay.queue.recent().len() < 2 {
        assert!(Instant::now() < deadline, "not delivered: {:?}", relay.queue.recent());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for attempted in relay.queue.recent() {
        assert!(
            matches!(
                attempted.status,
                postwarden::delivery::Status::Delivered { tls: Some(_), .. }
            ),
            "{attempted:?}"
        );
    }
    let received: Vec<String> = fleet
        .transcript("cap-01.sim.test")
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .filter_map(|e| match e {
            postwarden_sim::transcript::Event::Received { line, tls: true }
                if line.starts_with("RCPT") =>
            {
                Some(line.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        received,
        ["RCPT TO:<\"a>b\"@cap-01.sim.test>", "RCPT TO:<good@cap-01.sim.test>"],
        "both recipients in one transaction, the quoted one as it came"
    );
    relay.shutdown(Duration::from_secs(5)).await;
}

/// Issue 17 item 5, end to end: a message submitted with SMTPUTF8 keeps the flag in the spool
/// and goes on with `SMTPUTF8` where the next hop offers it (CAP-12); where it does not
/// (CAP-01) the UTF-8 recipient bounces with 5.6.7 and nothing is sent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_is_carried_from_submission_to_the_next_hop() {
    let (fleet, _) = sim::fleet(&["CAP-01", "CAP-12"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = opportunistic_relay(&fleet, dir.path()).await;

    let codes = converse(
        &relay,
        &[
            "",
            "EHLO app.client.example\r\n",
            "MAIL FROM:<jörg@client.example> SMTPUTF8\r\n",
            "RCPT TO:<müller@cap-12.sim.test>\r\n",
            "RCPT TO:<müller@cap-01.sim.test>\r\n",
            "DATA\r\n",
            "From: <jörg@client.example>\r\nSubject: grüße\r\n\r\nhallo\r\n.\r\n",
            "QUIT\r\n",
        ],
    )
    .await;
    assert_eq!(codes, ["220", "250", "250", "250", "250", "354", "250", "221"]);

    let deadline = Instant::now() + DEADLINE;
    let done = |rcpt: &str| relay.queue.recent().into_iter().find(|a| a.rcpt == rcpt);
    while done("müller@cap-12.sim.test").is_none() || done("müller@cap-01.sim.test").is_none() {
        assert!(Instant::now() < deadline, "not attempted: {:?}", relay.queue.recent());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let offered = done("müller@cap-12.sim.test").unwrap();
    assert!(
        matches!(offered.status, postwarden::delivery::Status::Delivered { tls: Some(_), .. }),
        "{offered:?}"
    );
    let refused = done("müller@cap-01.sim.test").unwrap();
    assert!(
        matches!(&refused.status, postwarden::delivery::Status::Bounced { code, .. } if code == "5.6.7"),
        "{refused:?}"
    );
    let mail = |domain: &str| sim::received(&fleet, domain, "MAIL");
    let sent = mail("cap-12.sim.test");
    assert!(
        sent.len() == 1
            && sent[0].starts_with("MAIL FROM:<jörg@client.example>")
            && sent[0].ends_with(" SMTPUTF8"),
        "{sent:?}"
    );
    assert!(mail("cap-01.sim.test").is_empty());
    relay.shutdown(Duration::from_secs(5)).await;
}
