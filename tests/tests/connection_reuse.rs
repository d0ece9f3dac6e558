//! Connection reuse and TLS session resumption end to end: a TLS connection carries the next
//! message to the same MX under the same requirement, never one decided differently, and a
//! connection the server has dropped or that waited too long is replaced, not trusted; a new
//! connection resumes the TLS session of an earlier one only under the same requirement.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use postwarden::delivery::client::Timeouts;
use postwarden::delivery::reuse::ReuseLimits;
use postwarden::delivery::route::{HickoryResolver, Router};
use postwarden::delivery::tls::TlsContext;
use postwarden::delivery::{Deliverer, DomainOutcome, Status};
use postwarden_sim::server::Timing;
use postwarden_sim::transcript::{ConnectionLog, Event};
use postwarden_sim::{Fleet, FleetOptions};
use postwarden_tests::{chains, sim};

const OPPORTUNISTIC: &str =
    "[[policy]]\nname = \"opportunistic\"\npath = \"{wasm:opportunistic}\"\n";
const FORCED: &str = "[[policy]]\nname = \"forced\"\npath = \"{wasm:forced-tls}\"\n[policy.settings.domains]\n\".sim.test\" = \"encrypt\"\n";
const VERIFY: &str = "[[policy]]\nname = \"forced\"\npath = \"{wasm:forced-tls}\"\n[policy.settings.domains]\n\".sim.test\" = \"verify\"\n";
const DOMAIN: &str = "cap-01.sim.test";

async fn fleet(timing: Timing) -> Fleet {
    Fleet::start(FleetOptions {
        scenarios: Some(vec!["CAP-01".to_owned()]),
        timing,
        ca: Some(sim::ca().unwrap()),
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

fn deliverer(fleet: &Fleet, limits: ReuseLimits) -> Deliverer {
    let resolver = HickoryResolver::new(&[fleet.dns_addr()]).unwrap();
    let router = Router::new(Box::new(resolver), fleet.port(), HashMap::new(), Some(1));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fleet.ca().root_der().clone()).unwrap();
    Deliverer::new(
        router,
        TlsContext::new(roots),
        Timeouts::all(Duration::from_secs(2)),
        "relay.test",
    )
    .with_reuse(limits)
}

fn delivered_over_tls(outcome: &DomainOutcome) -> bool {
    matches!(&outcome.recipients[0].status, Status::Delivered { tls: Some(_), .. })
}

/// The commands a connection received, upper-cased verbs, with whether each came inside TLS.
fn commands(connection: &ConnectionLog) -> Vec<(String, bool)> {
    connection
        .events
        .iter()
        .filter_map(|e| match e {
            &Event::Received { ref line, tls } => {
                let verb = line.split([' ', ':']).next().unwrap_or("").to_ascii_uppercase();
                Some((verb, tls))
            }
            _ => None,
        })
        .collect()
}

fn accepted(connection: &ConnectionLog) -> usize {
    connection
        .events
        .iter()
        .filter(|e| matches!(e, Event::MessageAccepted { tls: true, .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_message_under_the_same_requirement_rides_the_same_tls_connection() {
    let fleet = fleet(Timing::fast()).await;
    let deliverer = deliverer(&fleet, ReuseLimits::default());
    let (opportunistic, _e1, _d1) = chains::load(OPPORTUNISTIC).unwrap();
    let (forced, _e2, _d2) = chains::load(FORCED).unwrap();

    for _ in 0..3 {
        let out = sim::send(&deliverer, &opportunistic, DOMAIN, false, false).await;
        assert!(delivered_over_tls(&out), "{out:?}");
    }
    // `encrypt` is another requirement: its own connection, even to the same host.
    let out = sim::send(&deliverer, &forced, DOMAIN, false, false).await;
    assert!(delivered_over_tls(&out), "{out:?}");
    assert_eq!(deliverer.parked_connections(), 2);
    let stats = &deliverer.stats;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((count(&stats.opened), count(&stats.reused)), (2, 2));
    assert_eq!(count(&stats.tls_full) + count(&stats.tls_resumed), 2);

    let transcript = fleet.transcript(DOMAIN);
    assert_eq!(transcript.connections.len(), 2, "one connection per requirement");
    let first = &transcript.connections[0];
    assert_eq!(accepted(first), 3, "three messages on the first connection");
    let cmds = commands(first);
    let verbs: Vec<&str> = cmds.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(
        verbs,
        [
            "EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA",
            "RSET", "MAIL", "RCPT", "DATA"
        ]
    );
    assert!(
        cmds.iter().filter(|(v, _)| v != "EHLO" && v != "STARTTLS").all(|(_, tls)| *tls),
        "every transaction and RSET inside TLS: {cmds:?}"
    );
    assert_eq!(accepted(&transcript.connections[1]), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_dropped_is_replaced() {
    // The server closes connections idle for 300 ms; the relay would keep them for 5 s.
    let fleet = fleet(Timing { idle: Duration::from_millis(300), ..Timing::fast() }).await;
    let limits = ReuseLimits { idle: Duration::from_secs(5), ..ReuseLimits::default() };
    let deliverer = deliverer(&fleet, limits);
    let (chain, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();

    assert!(delivered_over_tls(&sim::send(&deliverer, &chain, DOMAIN, false, false).await));
    // Wait for the event, not for time: the server has closed the parked connection.
    let closed = fleet.transcripts().settled(DOMAIN, Duration::from_secs(10)).await;
    assert!(closed.connections.iter().all(|c| c.closed()), "the server never closed it");
    assert_eq!(deliverer.parked_connections(), 1, "the relay still holds it, dead");
    let out = sim::send(&deliverer, &chain, DOMAIN, false, false).await;
    assert!(
        delivered_over_tls(&out),
        "a dead parked connection must not cost the delivery: {out:?}"
    );

    let transcript = fleet.transcript(DOMAIN);
    assert_eq!(transcript.connections.len(), 2);
    assert_eq!(accepted(&transcript.connections[0]), 1);
    assert_eq!(accepted(&transcript.connections[1]), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_with_quit_and_reuse_can_be_turned_off() {
    let fleet = fleet(Timing::fast()).await;
    let limits = ReuseLimits { idle: Duration::from_millis(200), ..ReuseLimits::default() };
    let deliverer = deliverer(&fleet, limits);
    let (chain, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();

    assert!(delivered_over_tls(&sim::send(&deliverer, &chain, DOMAIN, false, false).await));
    assert_eq!(deliverer.parked_connections(), 1);
    // The sweeper takes it out of the cache, then says QUIT; the server then closes.
    let closed = fleet.transcripts().settled(DOMAIN, Duration::from_secs(10)).await;
    assert!(closed.connections.iter().all(|c| c.closed()), "never closed");
    assert_eq!(deliverer.parked_connections(), 0, "the sweeper closed it");
    let transcript = fleet.transcript(DOMAIN);
    let cmds = commands(&transcript.connections[0]);
    assert_eq!(cmds.last().map(|(v, tls)| (v.as_str(), *tls)), Some(("QUIT", true)), "{cmds:?}");

    let off = deliverer_without_reuse(&fleet);
    for _ in 0..2 {
        assert!(delivered_over_tls(&sim::send(&off, &chain, DOMAIN, false, false).await));
    }
    assert_eq!(off.parked_connections(), 0);
    assert_eq!(fleet.transcript(DOMAIN).connections.len(), 3, "one connection per message");
}

fn deliverer_without_reuse(fleet: &Fleet) -> Deliverer {
    deliverer(fleet, ReuseLimits { idle: Duration::ZERO, ..ReuseLimits::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_under_the_same_requirement_only() {
    let fleet = Fleet::start(FleetOptions {
        scenarios: Some(vec!["CAP-01".to_owned(), "CERT-02".to_owned()]),
        timing: Timing::fast(),
        ca: Some(sim::ca().unwrap()),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let deliverer = deliverer_without_reuse(&fleet);
    let (opportunistic, _e1, _d1) = chains::load(OPPORTUNISTIC).unwrap();
    let (verify, _e2, _d2) = chains::load(VERIFY).unwrap();
    let tls = |out: &DomainOutcome| match &out.recipients[0].status {
        Status::Delivered { tls: Some(info), .. } => Some((info.resumed, info.verified)),
        _ => None,
    };

    // A valid certificate: the second connection resumes, and still reports "verified".
    let first = sim::send(&deliverer, &opportunistic, DOMAIN, false, false).await;
    let second = sim::send(&deliverer, &opportunistic, DOMAIN, false, false).await;
    assert_eq!(tls(&first), Some((false, true)), "{first:?}");
    assert_eq!(tls(&second), Some((true, true)), "{second:?}");
    // `verify` is another requirement: a full handshake, checked by its own rules.
    let checked = sim::send(&deliverer, &verify, DOMAIN, false, false).await;
    assert_eq!(tls(&checked), Some((false, true)), "{checked:?}");

    // A self-signed certificate accepted under `may` must not let a `verify` delivery skip the
    // check by resuming that session.
    let self_signed = "cert-02.sim.test";
    let may = sim::send(&deliverer, &opportunistic, self_signed, false, false).await;
    assert_eq!(tls(&may), Some((false, false)), "{may:?}");
    let forced = sim::send(&deliverer, &verify, self_signed, false, false).await;
    assert!(
        matches!(&forced.recipients[0].status, Status::Deferred { code, .. } if code == "4.7.5"),
        "{forced:?}"
    );
    let again = sim::send(&deliverer, &opportunistic, self_signed, false, false).await;
    assert_eq!(tls(&again), Some((true, false)), "resumed, and still not verified: {again:?}");
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((count(&deliverer.stats.tls_full), count(&deliverer.stats.tls_resumed)), (3, 2));
}

/// Issue 17 item 3: one session cache for every requirement spent each ticket on a handshake
/// that could not use it (rustls resumes only under the verifier that checked the session), so
/// deliveries alternating `may` and `verify` to one server never resumed. Now each
/// configuration keeps its own sessions: after one full handshake per requirement, every
/// connection resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_requirements_to_one_server_both_resume() {
    let fleet = fleet(Timing::fast()).await;
    let deliverer = deliverer_without_reuse(&fleet);
    let (opportunistic, _e1, _d1) = chains::load(OPPORTUNISTIC).unwrap();
    let (verify, _e2, _d2) = chains::load(VERIFY).unwrap();
    for _ in 0..6 {
        for chain in [&opportunistic, &verify] {
            assert!(delivered_over_tls(&sim::send(&deliverer, chain, DOMAIN, false, false).await));
        }
    }
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (count(&deliverer.stats.tls_full), count(&deliverer.stats.tls_resumed)),
        (2, 10),
        "(full, resumed) handshakes for 12 deliveries"
    );
}

/// Issue 17 item 3, the other half: rustls keys sessions by server name only, so two servers
/// under one name on different ports (here two fleets, each with its own session keys) took
/// each other's tickets, and deliveries alternating between them never resumed. The port is
/// part of the cache's key now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_under_one_name_on_two_ports_both_resume() {
    let (first, second) = (fleet(Timing::fast()).await, fleet(Timing::fast()).await);
    assert_ne!(first.port(), second.port());
    let resolver = HickoryResolver::new(&[first.dns_addr()]).unwrap();
    // `other.example` goes to the same MX name, on the second fleet's port.
    let routes = HashMap::from([(
        "other.example".to_owned(),
        ("mx1.cap-01.sim.test".to_owned(), second.port()),
    )]);
    let router = Router::new(Box::new(resolver), first.port(), routes, Some(1));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(first.ca().root_der().clone()).unwrap();
    let deliverer = Deliverer::new(
        router,
        TlsContext::new(roots),
        Timeouts::all(Duration::from_secs(2)),
        "relay.test",
    )
    .with_reuse(ReuseLimits { idle: Duration::ZERO, ..ReuseLimits::default() });
    let (opportunistic, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();
    for _ in 0..6 {
        for domain in [DOMAIN, "other.example"] {
            let out = sim::send(&deliverer, &opportunistic, domain, false, false).await;
            assert!(delivered_over_tls(&out), "{domain}: {out:?}");
        }
    }
    assert_eq!(first.transcript(DOMAIN).connections.len(), 6);
    assert_eq!(second.transcript(DOMAIN).connections.len(), 6);
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (count(&deliverer.stats.tls_full), count(&deliverer.stats.tls_resumed)),
        (2, 10),
        "(full, resumed) handshakes for 12 deliveries"
    );
}
