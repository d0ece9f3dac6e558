//! Isolation in the relay: policy work never holds the inbound listener (issue 10, item 4).
//!
//! The test drives the real relay in process over real sockets and judges by counters (calls in
//! flight, calls ended), never by elapsed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use postwarden::service::Relay;
use postwarden_tests::chains;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Issue 10, item 4: policy calls ran on the async workers (and waited for a CPU on a blocking
/// gate there), so a policy that burns its whole deadline on every decision of a backlog left
/// nothing to answer inbound clients. Now calls run on the policy pool: with every pool thread
/// provably inside a call that cannot end before its 10 s deadline, an inbound client still
/// gets its greeting and its NOOP answered, and no call ended meanwhile.
#[test]
fn policy_work_does_not_hold_inbound_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "[[policy]]\nname = \"burner\"\npath = \"{wasm:broken-policy}\"\ndeadline_ms = 10000\n\
         settings = { mode = \"loop\" }\n\
         [delivery]\nhelo_name = \"relay.postwarden.test\"\n\
         [delivery.routes]\n\"backlog.example\" = \"[127.0.0.1]:1\"\n\
         [queue]\ndir = \"spool\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n";
    let config = chains::config_in(toml, dir.path()).unwrap();
    // The backlog is in the spool before the relay starts: every message is due at once.
    let spool =
        std::sync::Arc::new(postwarden::queue::store::SpoolDir::open(&config.queue.dir).unwrap());
    let queue = postwarden::queue::Queue::new(spool, Default::default());
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    client_rt.block_on(async {
        // Twice the calls the pool (or, before, the gate) runs at once on this machine: enough to
        // keep every thread busy, few enough that the old code ends this test in tens of seconds.
        for n in 0..4 {
            let message = postwarden::queue::NewMessage {
                mail_from: "app@client.example".into(),
                rcpts: vec![format!("user{n}@backlog.example")],
                body: b"Subject: backlog\r\n\r\nhi\r\n".to_vec(),
                staged: None,
                requiretls: false,
                tls_required_no: false,
                authenticated: false,
                smtputf8: false,
            };
            queue.accept_durably(message).await.unwrap();
        }
    });
    drop(queue);

    // The relay runs on a runtime of its own, as in production: two workers.
    let relay_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = relay_rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let relay = relay_rt.block_on(Relay::start(&config, listener)).unwrap();
    let chain = relay.chains.current();
    let policy = chain.policies()[0].clone();
    let in_flight = || {
        let calls = policy.stats().calls.load(std::sync::atomic::Ordering::SeqCst);
        let ended = chain.counters().faults.load(std::sync::atomic::Ordering::SeqCst);
        (calls.saturating_sub(1 + ended), ended) // `configure` was a call too
    };
    let threads = policy.pool().threads() as u64;
    // Waiting on the counters (nothing to be notified by inside the guest) until every pool
    // thread is inside a call. No call can end before its 10 s deadline, so one ending first
    // means the calls could not run side by side. When calls ran on the async workers they
    // also starved what ends them (the relay stalled outright): the guard turns that hang into
    // a failure; it is far beyond the milliseconds the pool needs.
    let guard = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (busy, ended) = in_flight();
        if busy >= threads {
            break;
        }
        assert_eq!(ended, 0, "a call ended before {threads} ran side by side ({busy} running)");
        assert!(
            std::time::Instant::now() < guard,
            "the relay stalled: {busy} of {threads} policy calls started in 120 s, none ended"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (busy, ended_before) = in_flight();

    let reply = client_rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut stream = tokio::net::TcpStream::connect(relay.smtp_addr).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while !seen.ends_with(b"\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the greeting");
            seen.extend_from_slice(&buf[..n]);
        }
        stream.write_all(b"NOOP\r\n").await.unwrap();
        let greeting = seen.len();
        while !seen[greeting..].ends_with(b"\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the NOOP reply");
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let (_, ended_after) = in_flight();
    assert!(reply.starts_with("220 ") && reply.contains("\r\n250 "), "{reply:?}");
    assert_eq!(
        ended_before, ended_after,
        "the inbound session had to wait for policy calls to end ({busy} were running)"
    );

    relay_rt.block_on(relay.shutdown(Duration::from_millis(100)));
    relay_rt.shutdown_background();
}
