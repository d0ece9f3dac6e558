//! Spool integrity over the real spool and scheduler (issue 11 item 2): what fails its check
//! (truncated or altered body, missing body, unparseable envelope) is quarantined, listed and
//! counted, and never delivered; envelopes from before the check are delivered unchecked;
//! hostile envelope fields are listed escaped.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use postwarden::control::{Request, execute};
use postwarden::queue::store::{Envelope, QueueStore, Recipient, RecipientState, SpoolDir};
use postwarden::service::Relay;
use postwarden_tests::chains;
use postwarden_tests::sink::Sink;

fn envelope(id: &str, from: &str, rcpt: &str) -> Envelope {
    Envelope {
        id: id.to_owned(),
        mail_from: from.to_owned(),
        rcpts: vec![Recipient {
            address: rcpt.to_owned(),
            state: RecipientState::Pending,
            last: None,
            tls_log: String::new(),
        }],
        created: postwarden::queue::store::now(),
        attempts: 0,
        next_attempt: 0,
        requiretls: false,
        tls_required_no: false,
        authenticated: false,
        smtputf8: false,
        warned: false,
        body_len: None,
        body_sha256: None,
    }
}

fn body(subject: &str) -> Vec<u8> {
    format!("Subject: {subject}\r\n\r\nthe whole of {subject}\r\nlast line\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_failing_their_checks_are_quarantined_and_never_delivered() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");

    // The spool as a stopped relay left it, then damaged on disk.
    let spool = SpoolDir::open_offline(&spool_dir).unwrap();
    let put = |id: &str, from: &str, rcpt: &str, subject: &str, sealed: bool| {
        let mut e = envelope(id, from, rcpt);
        let b = body(subject);
        if sealed {
            e.seal(&b);
        }
        spool.insert(&e, &b).unwrap();
    };
    put("good", "a@client.test", "u@example.com", "good", true);
    put("legacy", "a@client.test", "u@example.com", "legacy", false);
    put("truncated", "a@client.test", "u@example.com", "truncated", true);
    put("altered", "a@client.test", "u@example.com", "altered", true);
    put("bodiless", "a@client.test", "u@example.com", "bodiless", true);
    put("garbled", "a@client.test", "u@example.com", "garbled", true);
    // CR/LF and an escape sequence in fields. No command can carry such an address, so an
    // attempt would bounce it at once (issue 10 item 5): it is due tomorrow, and stays queued.
    let mut hostile = envelope("hostile", "x@y\r\nforged  age 0s\x1b[2J", "u\r\n@example.net");
    let hostile_body = body("hostile");
    hostile.seal(&hostile_body);
    hostile.next_attempt = postwarden::queue::store::now() + 86_400;
    spool.insert(&hostile, &hostile_body).unwrap();
    let msg = |id: &str| spool_dir.join("msg").join(format!("{id}.eml"));
    let full = body("truncated");
    std::fs::write(msg("truncated"), &full[..full.len() - 11]).unwrap();
    let mut altered = body("altered");
    altered[10] ^= 0x20;
    std::fs::write(msg("altered"), altered).unwrap();
    std::fs::remove_file(msg("bodiless")).unwrap();
    std::fs::write(spool_dir.join("env/garbled.json"), b"{\"id\": \"garbled\", \"rcpts\": [")
        .unwrap();
    drop(spool);

    let toml = format!(
        "[delivery]\n[delivery.routes]\n\"example.com\" = \"[127.0.0.1]:{}\"\n\"example.net\" = \"[127.0.0.1]:1\"\n\
         [queue]\ndir = \"spool\"\nmin_backoff = 3600\n[inbound]\nlisten = \"127.0.0.1:0\"\n",
        sink.addr.port()
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(&config, listener).await.unwrap();

    let s = sink.clone();
    let delivered =
        tokio::task::spawn_blocking(move || s.wait_for(2, Duration::from_secs(30))).await.unwrap();
    assert_eq!(delivered, 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.queue.store().quarantined().unwrap().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "not quarantined: {:?}",
            relay.queue.store().quarantined().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The others are done: the queue holds the hostile entry alone, never attempted.
    while relay.queue.store().list().unwrap().len() > 1 {
        assert!(Instant::now() < deadline, "{:?}", relay.queue.store().list().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.queue.store().envelope("hostile").unwrap().attempts, 0);

    // Only the intact bodies went out, each whole.
    let subjects: BTreeSet<String> = sink.received().iter().filter_map(|m| m.subject()).collect();
    assert_eq!(subjects, BTreeSet::from(["good".to_owned(), "legacy".to_owned()]));
    for m in sink.received() {
        assert_eq!(m.body, body(&m.subject().unwrap()));
    }

    // Quarantined with their reasons, out of the queue (no scan meets them again), counted.
    let quarantined = relay.queue.store().quarantined().unwrap();
    let reason = |id: &str| quarantined.iter().find(|q| q.id == id).unwrap().reason.clone();
    assert!(reason("truncated").contains("bytes"), "{}", reason("truncated"));
    assert!(reason("altered").contains("checksum"), "{}", reason("altered"));
    assert!(reason("bodiless").contains("missing"), "{}", reason("bodiless"));
    assert!(reason("garbled").contains("corrupt envelope"), "{}", reason("garbled"));
    for id in ["truncated", "altered", "bodiless", "garbled"] {
        assert!(!spool_dir.join("env").join(format!("{id}.json")).exists(), "{id}");
        assert!(!msg(id).exists(), "{id}");
    }
    assert!(spool_dir.join("quarantine/truncated.eml").exists());
    assert!(spool_dir.join("quarantine/garbled.json").exists());
    assert_eq!(relay.queue.counters.quarantined.load(std::sync::atomic::Ordering::Relaxed), 4);

    // `queue list`: the hostile entry on one line, escaped; the quarantined ones shown.
    let queue = relay.queue.clone();
    let list = tokio::task::spawn_blocking(move || execute(&queue, &Request::List)).await.unwrap();
    assert!(list.ok);
    let out = list.output;
    assert!(!out.contains('\r') && !out.contains('\x1b'), "{out:?}");
    assert_eq!(out.lines().count(), 6, "{out}");
    assert!(out.contains("from <x@y\\r\\nforged  age 0s\\u{1b}[2J>"), "{out}");
    assert!(out.contains("(first u\\r\\n@example.net)"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("QUARANTINED")).count(), 4, "{out}");
    assert!(out.ends_with("1 messages, 4 quarantined\n"), "{out}");
    relay.shutdown(Duration::from_secs(5)).await;
}
