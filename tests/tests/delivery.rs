//! The delivery engine end to end: real wasm policies, real sockets, real TLS, the simulator's
//! servers. Every policy action, the host's overriding rules, and the outcome records.

#![allow(clippy::unwrap_used)]

use postwarden::delivery::{Fallback, Status};
use postwarden::policy::TlsVersion;
use postwarden_sim::transcript::Event;
use postwarden_tests::{chains, sim};

const OPPORTUNISTIC: &str =
    "[[policy]]\nname = \"opportunistic\"\npath = \"{wasm:opportunistic}\"\n";
const FORCED: &str = "[[policy]]\nname = \"forced\"\npath = \"{wasm:forced-tls}\"\n[policy.settings.domains]\n\".sim.test\" = \"encrypt\"\n";

fn broken(mode: &str) -> String {
    format!(
        "[[policy]]\nname = \"broken\"\npath = \"{{wasm:broken-policy}}\"\nsettings = {{ mode = \"{mode}\" }}\n"
    )
}

fn status(outcome: &postwarden::delivery::DomainOutcome) -> &Status {
    &outcome.recipients[0].status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_over_tls_with_a_complete_record() {
    let (fleet, deliverer) = sim::fleet(&["CAP-01"]).await.unwrap();
    let (chain, _engine, _dir) = chains::load(OPPORTUNISTIC).unwrap();
    let outcome = sim::send(&deliverer, &chain, "cap-01.sim.test", false, false).await;
    match status(&outcome) {
        Status::Delivered {
            mx, tls: Some(tls), fallback, decided_by, requirement, reply, ..
        } => {
            assert_eq!(mx, "mx1.cap-01.sim.test");
            assert_eq!(tls.version, TlsVersion::Tls13);
            assert!(tls.cipher.starts_with("TLS13_"), "{}", tls.cipher);
            assert!(tls.verified, "the test CA is trusted and the name matches");
            assert_eq!(
                (*fallback, decided_by.as_str(), requirement.as_str()),
                (Fallback::No, "opportunistic", "may")
            );
            assert!(reply.starts_with("250"), "{reply}");
        }
        other => panic!("expected TLS delivery, got {other:?}"),
    }
    assert_eq!(outcome.tls_log, "tls=may:tls1.3,verified");
    let transcript = fleet.transcript("cap-01.sim.test");
    let accepted = transcript
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .any(|e| matches!(e, Event::MessageAccepted { tls: true, .. }));
    assert!(accepted, "the server saw the message inside TLS");
}

/// continue-plaintext (O, STARTTLS not offered), reconnect-plaintext (O, handshake alert),
/// next-mx (F, first MX without STARTTLS), defer (F, not offered), bounce (a policy that
/// bounces): each action carried out over the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_action_end_to_end() {
    let (fleet, deliverer) = sim::fleet(&["CAP-02", "HS-01", "MX-01"]).await.unwrap();
    let (o, _e1, _d1) = chains::load(OPPORTUNISTIC).unwrap();
    let (f, _e2, _d2) = chains::load(FORCED).unwrap();
    let (b, _e3, _d3) = chains::load(&broken("bounce")).unwrap();

    let out = sim::send(&deliverer, &o, "cap-02.sim.test", false, false).await;
    assert!(
        matches!(
            status(&out),
            Status::Delivered { tls: None, fallback: Fallback::SameConnection, .. }
        ),
        "{out:?}"
    );
    assert_eq!(fleet.transcript("cap-02.sim.test").connections.len(), 1, "same connection");

    let out = sim::send(&deliverer, &o, "hs-01.sim.test", false, false).await;
    assert!(
        matches!(status(&out), Status::Delivered { tls: None, fallback: Fallback::Reconnect, .. }),
        "{out:?}"
    );
    let transcript = fleet.transcript("hs-01.sim.test");
    assert_eq!(transcript.connections.len(), 2, "a new connection after the failed handshake");
    let second_sent_starttls = transcript.connections[1].events.iter().any(
        |e| matches!(e, Event::Received { line, .. } if line.eq_ignore_ascii_case("STARTTLS")),
    );
    assert!(!second_sent_starttls, "the reconnection must not try STARTTLS again");

    let out = sim::send(&deliverer, &f, "mx-01.sim.test", false, false).await;
    match status(&out) {
        Status::Delivered { mx, tls: Some(_), .. } => assert_eq!(mx, "mx2.mx-01.sim.test"),
        other => panic!("expected TLS via mx2, got {other:?}"),
    }
    assert_eq!(out.tls_log, "tls=encrypt:next(4.7.4) tls=encrypt:tls1.3,verified");

    let out = sim::send(&deliverer, &f, "cap-02.sim.test", false, false).await;
    assert_eq!(
        status(&out),
        &Status::Deferred {
            code: "4.7.4".into(),
            reason: "TLS is required, but was not offered by mx1.cap-02.sim.test".into()
        }
    );

    let out = sim::send(&deliverer, &b, "cap-02.sim.test", false, false).await;
    assert_eq!(
        status(&out),
        &Status::Bounced {
            code: "5.7.4".into(),
            reason: "bounced by policy: TLS is mandatory here".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiretls_is_never_sent_in_plaintext_and_needs_the_next_hop_to_advertise_it() {
    let (fleet, deliverer) = sim::fleet(&["CAP-01", "CAP-02"]).await.unwrap();
    let (o, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();
    let out = sim::send(&deliverer, &o, "cap-02.sim.test", true, false).await;
    assert!(matches!(status(&out), Status::Bounced { code, .. } if code == "5.7.30"), "{out:?}");
    let mail_sent = fleet
        .transcript("cap-02.sim.test")
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .any(|e| matches!(e, Event::Received { line, .. } if line.to_ascii_uppercase().starts_with("MAIL")));
    assert!(!mail_sent, "MAIL crossed a plaintext connection for a REQUIRETLS message");
    // Verified TLS, but the server does not advertise REQUIRETLS (RFC 8689 §4.2.1).
    let out = sim::send(&deliverer, &o, "cap-01.sim.test", true, false).await;
    assert!(
        matches!(status(&out), Status::Bounced { code, reason } if code == "5.7.30" && reason.contains("does not advertise REQUIRETLS")),
        "{out:?}"
    );
}

/// `TLS-Required: No` keeps forced TLS forced by default; with `tls_required_no = "any"` it
/// relaxes to plaintext, and the delivery is credited to the header, not to `forced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_no_header_relaxes_forced_tls_only_when_opted_in() {
    let (fleet, deliverer) = sim::fleet(&["CAP-02"]).await.unwrap();
    let (f, _e, _d) = chains::load(FORCED).unwrap();
    let out = sim::send(&deliverer, &f, "cap-02.sim.test", false, true).await;
    assert!(matches!(status(&out), Status::Deferred { .. }), "{out:?}");
    let mail_sent = fleet
        .transcript("cap-02.sim.test")
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .any(|e| matches!(e, Event::Received { line, .. } if line.to_ascii_uppercase().starts_with("MAIL")));
    assert!(!mail_sent, "MAIL crossed a plaintext connection to a forced domain");

    let (f, _e, _d) =
        chains::load(&format!("[policy_engine]\ntls_required_no = \"any\"\n{FORCED}")).unwrap();
    let out = sim::send(&deliverer, &f, "cap-02.sim.test", false, true).await;
    assert!(
        matches!(status(&out), Status::Delivered { tls: None, decided_by, requirement, .. }
            if decided_by == "tls-required-no(over forced)" && requirement == "may"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_policy_defers_before_any_connection() {
    let (fleet, deliverer) = sim::fleet(&["CAP-01"]).await.unwrap();
    let (chain, _e, _d) = chains::load(&broken("trap")).unwrap();
    let out = sim::send(&deliverer, &chain, "cap-01.sim.test", false, false).await;
    assert!(
        matches!(status(&out), Status::Deferred { code, reason } if code == "4.7.0" && reason.starts_with("policy `broken` trapped")),
        "{out:?}"
    );
    assert_eq!(out.tls_log, "tls=fault:defer");
    assert!(
        fleet.transcript("cap-01.sim.test").connections.is_empty(),
        "no connection may be made"
    );
}

/// Issue 10 item 8: the opportunistic policy tries TLS at every MX host before plaintext at any,
/// in one attempt and without a deferral. MX-02: mx1 fails the handshake, mx2 delivers over
/// TLS. MX-01: mx1 has no STARTTLS, mx2 delivers over TLS. MX-04: both fail the handshake, so
/// the message goes in plaintext to the most preferred (mx1), not the last one tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_tries_tls_at_every_mx_before_plaintext() {
    let (fleet, deliverer) = sim::fleet(&["MX-01", "MX-02", "MX-04"]).await.unwrap();
    let (o, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();

    let out = sim::send(&deliverer, &o, "mx-02.sim.test", false, false).await;
    match status(&out) {
        Status::Delivered { mx, tls: Some(_), .. } => assert_eq!(mx, "mx2.mx-02.sim.test"),
        other => panic!("MX-02: expected TLS via mx2, got {other:?}"),
    }
    assert_eq!(out.tls_log, "tls=may:next(4.7.5) tls=may:tls1.3,verified");

    let out = sim::send(&deliverer, &o, "mx-01.sim.test", false, false).await;
    match status(&out) {
        Status::Delivered { mx, tls: Some(_), .. } => assert_eq!(mx, "mx2.mx-01.sim.test"),
        other => panic!("MX-01: expected TLS via mx2, got {other:?}"),
    }
    assert_eq!(out.tls_log, "tls=may:next(4.7.4) tls=may:tls1.3,verified");

    let out = sim::send(&deliverer, &o, "mx-04.sim.test", false, false).await;
    match status(&out) {
        Status::Delivered { mx, tls: None, fallback: Fallback::Reconnect, .. } => {
            assert_eq!(mx, "mx1.mx-04.sim.test")
        }
        other => panic!("MX-04: expected plaintext via mx1, got {other:?}"),
    }
    assert_eq!(out.tls_log, "tls=may:next(4.7.5) tls=may:next(4.7.5) tls=may:plaintext(reconnect)");
    let transcript = fleet.transcript("mx-04.sim.test");
    let hosts: Vec<&str> = transcript.connections.iter().map(|c| c.mx.as_str()).collect();
    assert_eq!(
        hosts,
        ["mx1.mx-04.sim.test", "mx2.mx-04.sim.test", "mx1.mx-04.sim.test"],
        "TLS at each host, then plaintext from the top"
    );
    let last = &transcript.connections[2].events;
    assert!(
        !last.iter().any(
            |e| matches!(e, Event::Received { line, .. } if line.eq_ignore_ascii_case("STARTTLS"))
        ),
        "the plaintext pass does not try STARTTLS again"
    );
}

/// Issue 10 item 5: an address no SMTP command can carry (here `<` outside a quoted local part,
/// as an older relay could have queued it) is a permanent problem of that recipient alone: it
/// bounces with 5.1.3 and its co-recipient is delivered, instead of the transaction aborting
/// as a 4.4.2 for both until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsendable_recipient_bounces_alone() {
    use postwarden::delivery::Message;

    let (fleet, deliverer) = sim::fleet(&["CAP-01"]).await.unwrap();
    let (o, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();
    let body = "From: <sender@postwarden.test>\r\nSubject: two\r\n\r\nhello\r\n";
    let message = Message {
        mail_from: "sender@postwarden.test",
        body: body.as_bytes(),
        requiretls: false,
        tls_required_no: false,
        authenticated: false,
        smtputf8: false,
        attempt: 1,
        age: 0,
    };
    let rcpts = ["a>b@cap-01.sim.test".to_owned(), "good@cap-01.sim.test".to_owned()];
    let out = deliverer.deliver(&o, &message, "cap-01.sim.test", &rcpts).await;
    assert_eq!(out.recipients.len(), 2);
    assert_eq!(out.recipients[0].rcpt, rcpts[0]);
    assert!(
        matches!(&out.recipients[0].status, Status::Bounced { code, reason } if code == "5.1.3" && reason.contains("forbidden character '>'")),
        "{out:?}"
    );
    assert_eq!(out.recipients[1].rcpt, rcpts[1]);
    assert!(matches!(out.recipients[1].status, Status::Delivered { tls: Some(_), .. }), "{out:?}");
    assert_eq!(out.tls_log, "tls=may:tls1.3,verified");
    let accepted = fleet
        .transcript("cap-01.sim.test")
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .filter(|e| matches!(e, Event::MessageAccepted { .. }))
        .count();
    assert_eq!(accepted, 1);

    // A sender no command can carry: every recipient bounces, nothing is sent.
    let message = Message { mail_from: "x\r\nRSET@postwarden.test", ..message };
    let out = deliverer.deliver(&o, &message, "cap-01.sim.test", &rcpts[1..]).await;
    assert!(
        matches!(&out.recipients[0].status, Status::Bounced { code, .. } if code == "5.1.7"),
        "{out:?}"
    );
}

/// I6: a connection is only used for a domain whose policy it satisfies. Two domains share one
/// MX (no STARTTLS there): the opportunistic one is delivered in plaintext, the forced one must
/// get a connection of its own that tries STARTTLS, and no MAIL, rather than riding along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_connection_is_never_shared_with_a_forced_domain() {
    use std::collections::HashMap;
    use std::time::Duration;

    use postwarden::delivery::Deliverer;
    use postwarden::delivery::client::Timeouts;
    use postwarden::delivery::route::{HickoryResolver, Router};
    use postwarden::delivery::tls::TlsContext;

    let (fleet, _) = sim::fleet(&["CAP-02"]).await.unwrap();
    let mx = fleet.route("cap-02.sim.test").unwrap().mx[0].addr();
    let mut routes = HashMap::new();
    routes.insert("forced.example".to_owned(), (mx.ip().to_string(), mx.port()));
    let router = Router::new(
        Box::new(HickoryResolver::new(&[fleet.dns_addr()]).unwrap()),
        fleet.port(),
        routes,
        Some(1),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fleet.ca().root_der().clone()).unwrap();
    let deliverer = Deliverer::new(
        router,
        TlsContext::new(roots),
        Timeouts::all(Duration::from_secs(2)),
        "relay.test",
    );
    let toml = "[[policy]]\nname = \"forced\"\npath = \"{wasm:forced-tls}\"\n[policy.settings.domains]\n\"forced.example\" = \"encrypt\"\n\
                [[policy]]\nname = \"opportunistic\"\npath = \"{wasm:opportunistic}\"\n";
    let (chain, _e, _d) = chains::load(toml).unwrap();

    let plain = sim::send(&deliverer, &chain, "cap-02.sim.test", false, false).await;
    assert!(matches!(status(&plain), Status::Delivered { tls: None, .. }), "{plain:?}");
    let forced = sim::send(&deliverer, &chain, "forced.example", false, false).await;
    assert!(
        matches!(status(&forced), Status::Deferred { code, .. } if code == "4.7.4"),
        "{forced:?}"
    );

    let transcript = fleet.transcript("cap-02.sim.test");
    assert_eq!(transcript.connections.len(), 2, "one connection per decision");
    let second = &transcript.connections[1].events;
    let sent = |verb: &str| {
        second.iter().any(|e| matches!(e, Event::Received { line, .. } if line.to_ascii_uppercase().starts_with(verb)))
    };
    assert!(sent("STARTTLS") && !sent("MAIL"), "{second:?}");
}

/// STARTTLS response injection (research §3.2, invariant I3) under forced TLS: bytes that
/// arrive with the `220` to STARTTLS abort the attempt before any handshake (INJ-01, 02, 04,
/// 05: the exact failure names the injection); bytes written after the ClientHello reach the
/// TLS layer and fail the handshake (INJ-03). Never a delivery, never a MAIL. Without the
/// defence in `Client::starttls` the first four were delivered over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_response_injection_fails_exactly_under_forced_tls() {
    let (f, _e, _d) = chains::load(FORCED).unwrap();
    for id in ["INJ-01", "INJ-02", "INJ-03", "INJ-04", "INJ-05"] {
        let (fleet, deliverer) = sim::fleet(&[id]).await.unwrap();
        let domain = format!("{}.sim.test", id.to_ascii_lowercase());
        let out = sim::send(&deliverer, &f, &domain, false, false).await;
        let Status::Deferred { code, reason } = status(&out) else {
            panic!("{id}: {out:?}");
        };
        assert_eq!(code, "4.7.5", "{id}: {reason}");
        if id == "INJ-03" {
            assert!(!reason.contains("response injection"), "{id}: {reason}");
        } else {
            assert!(
                reason.contains("bytes arrived after the 220 to STARTTLS (response injection)"),
                "{id}: {reason}"
            );
        }
        let mail_sent = fleet
            .transcript(&domain)
            .connections
            .iter()
            .flat_map(|c| &c.events)
            .any(|e| matches!(e, Event::Received { line, .. } if line.to_ascii_uppercase().starts_with("MAIL")));
        assert!(!mail_sent, "{id}: MAIL was sent");
    }
}

/// Issue 17 item 1: a server that completes the handshake and then answers the EHLO with
/// `421 4.7.1 … No client certificate presented` (Postfix with `smtpd_tls_req_ccert`) refused
/// the session; TLS did not fail. Under `may` the relay used to reconnect in plaintext, and
/// under a forced level it reported `4.7.5 Lost connection … during TLS`. Now both defer with
/// the server's own code and reply, and no transaction is ever started in plaintext there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_tls_is_the_servers_answer_not_a_tls_failure() {
    let (fleet, deliverer) = sim::fleet(&["EHLO-10"]).await.unwrap();
    for config in [OPPORTUNISTIC, FORCED] {
        let (chain, _e, _d) = chains::load(config).unwrap();
        let out = sim::send(&deliverer, &chain, "ehlo-10.sim.test", false, false).await;
        assert!(
            matches!(status(&out), Status::Deferred { code, reason } if code == "4.7.1"
                && reason == "mx1.ehlo-10.sim.test [127.0.0.2] refused the session after \
                    STARTTLS: 421 4.7.1 mx1.ehlo-10.sim.test: No client certificate presented"),
            "{out:?}"
        );
    }
    let connections = &fleet.transcript("ehlo-10.sim.test").connections;
    assert_eq!(connections.len(), 2, "one connection per attempt, no plaintext reconnection");
    let mail_sent = connections.iter().flat_map(|c| &c.events).any(
        |e| matches!(e, Event::Received { line, .. } if line.to_ascii_uppercase().starts_with("MAIL")),
    );
    assert!(!mail_sent, "a transaction was started at a host that refused the session");
}

/// Issue 17 item 5 (RFC 6531): a message sent with SMTPUTF8 to a UTF-8 address goes with
/// `SMTPUTF8` to a next hop that offers it (CAP-12), and bounces with 5.6.7 before MAIL at one
/// that does not (CAP-01), as Postfix does; an ASCII message flagged SMTPUTF8 still goes to
/// CAP-01, without the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_goes_where_offered_and_bounces_where_not() {
    use postwarden::delivery::Message;

    let (fleet, deliverer) = sim::fleet(&["CAP-01", "CAP-12"]).await.unwrap();
    let (o, _e, _d) = chains::load(OPPORTUNISTIC).unwrap();
    let body = "From: <jörg@postwarden.test>\r\nSubject: grüße\r\n\r\nhallo\r\n";
    let message = Message {
        mail_from: "jörg@postwarden.test",
        body: body.as_bytes(),
        requiretls: false,
        tls_required_no: false,
        authenticated: false,
        smtputf8: true,
        attempt: 1,
        age: 0,
    };
    let mail_lines = |domain: &str| sim::received(&fleet, domain, "MAIL");

    let rcpts = ["müller@cap-12.sim.test".to_owned()];
    let out = deliverer.deliver(&o, &message, "cap-12.sim.test", &rcpts).await;
    assert!(matches!(status(&out), Status::Delivered { tls: Some(_), .. }), "{out:?}");
    assert_eq!(
        mail_lines("cap-12.sim.test"),
        [format!("MAIL FROM:<jörg@postwarden.test> SIZE={} BODY=8BITMIME SMTPUTF8", body.len())]
    );

    let rcpts = ["müller@cap-01.sim.test".to_owned()];
    let out = deliverer.deliver(&o, &message, "cap-01.sim.test", &rcpts).await;
    assert!(
        matches!(status(&out), Status::Bounced { code, reason } if code == "5.6.7"
            && reason.contains("SMTPUTF8 is required, but was not offered")),
        "{out:?}"
    );
    assert!(mail_lines("cap-01.sim.test").is_empty(), "MAIL was sent to a server without SMTPUTF8");

    let ascii = Message {
        mail_from: "sender@postwarden.test",
        body: b"Subject: plain\r\n\r\nhi\r\n",
        ..message
    };
    let rcpts = ["user@cap-01.sim.test".to_owned()];
    let out = deliverer.deliver(&o, &ascii, "cap-01.sim.test", &rcpts).await;
    assert!(matches!(status(&out), Status::Delivered { tls: Some(_), .. }), "{out:?}");
    assert_eq!(
        mail_lines("cap-01.sim.test"),
        [format!("MAIL FROM:<sender@postwarden.test> SIZE={}", ascii.body.len())]
    );
}

/// Mutual TLS (issue 17 item 4): a requirement naming a configured client identity presents
/// that certificate, and a server that requires one (HS-09) accepts the message over TLS; the
/// same forced requirement without an identity never delivers (TLS 1.3 reports the missing
/// certificate only after the handshake, at the first read), and a name the relay does not
/// configure defers before STARTTLS, never falling back to "no certificate".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_client_identity_is_presented_to_a_server_that_requires_one() {
    use std::collections::HashMap;
    use std::time::Duration;

    use postwarden::delivery::Deliverer;
    use postwarden::delivery::client::Timeouts;
    use postwarden::delivery::route::{HickoryResolver, Router};
    use postwarden::delivery::tls::{ClientIdentity, TlsContext};

    let (fleet, _) = sim::fleet(&["HS-09"]).await.unwrap();
    let deliverer = |identities: HashMap<String, ClientIdentity>| {
        let router = Router::new(
            Box::new(HickoryResolver::new(&[fleet.dns_addr()]).unwrap()),
            fleet.port(),
            HashMap::new(),
            Some(1),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(fleet.ca().root_der().clone()).unwrap();
        Deliverer::new(
            router,
            TlsContext::new(roots).with_client_identities(identities),
            Timeouts::all(Duration::from_secs(2)),
            "relay.postwarden.test",
        )
    };
    let client = fleet.ca().client_identity("relay.postwarden.test").unwrap();
    let identity = ClientIdentity::new(client.chain.clone(), client.key.clone_key()).unwrap();
    let with_identity = deliverer(HashMap::from([("partner".to_owned(), identity)]));
    let chain_naming = |name: &str| {
        chains::load(&format!(
            "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n\
             \"hs-09.sim.test\" = {{ level = \"verify\", client_identity = \"{name}\" }}\n"
        ))
        .unwrap()
    };

    let (partner, _e1, _d1) = chain_naming("partner");
    let outcome = sim::send(&with_identity, &partner, "hs-09.sim.test", false, false).await;
    match status(&outcome) {
        Status::Delivered { tls: Some(tls), requirement, .. } => {
            assert!(tls.verified);
            assert_eq!(requirement, "verify cert=partner");
        }
        other => panic!("expected a TLS delivery with the client certificate, got {other:?}"),
    }
    assert_eq!(sim::received(&fleet, "hs-09.sim.test", "MAIL").len(), 1);

    // The same forced level with no identity: no MAIL ever reaches the server.
    let (anonymous, _e2, _d2) = chains::load(FORCED).unwrap();
    let outcome = sim::send(&with_identity, &anonymous, "hs-09.sim.test", false, false).await;
    assert!(matches!(status(&outcome), Status::Deferred { .. }), "{outcome:?}");
    assert_eq!(sim::received(&fleet, "hs-09.sim.test", "MAIL").len(), 1, "no second MAIL");

    // A name the relay does not configure: deferred, naming it, before STARTTLS.
    let connections = fleet.transcript("hs-09.sim.test").connections.len();
    let (unknown, _e3, _d3) = chain_naming("nobody");
    let outcome = sim::send(&with_identity, &unknown, "hs-09.sim.test", false, false).await;
    match status(&outcome) {
        Status::Deferred { code, reason } => {
            assert_eq!(code, "4.7.5");
            assert!(reason.contains("client identity `nobody`"), "{reason}");
        }
        other => panic!("expected a deferral, got {other:?}"),
    }
    assert_eq!(fleet.transcript("hs-09.sim.test").connections.len(), connections + 1);
    assert!(sim::received(&fleet, "hs-09.sim.test", "STARTTLS").len() == 2, "not a third");
}

/// MTA-STS facts are gathered for a delivery when enabled, and never for a domain with a static
/// route (its hop is not the domain's MX). The `facts` fixture makes the difference visible:
/// with the policy host unreachable the gathered status is `fetch-failed` (it answers `may`);
/// not gathered, every fact reads "not looked up" (it answers `encrypt`). The sink offers no
/// STARTTLS, so both end in the fixture's deferral; the log shows which level was decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_facts_are_gathered_except_through_a_static_route() {
    use std::collections::HashMap;
    use std::time::Duration;

    use postwarden::delivery::Deliverer;
    use postwarden::delivery::client::Timeouts;
    use postwarden::delivery::route::{Router, StaticResolver};
    use postwarden::delivery::tls::TlsContext;
    use postwarden::standards::fetch::Fetcher;

    let sink = postwarden_tests::sink::Sink::start();
    let mut resolver = StaticResolver::default();
    let localhost = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    for domain in ["sts.example", "routed.example"] {
        resolver.mx.insert(domain.into(), vec![(10, format!("mx.{domain}"))]);
        resolver.hosts.insert(format!("mx.{domain}"), localhost.clone());
        // The policy host answers on no port: a fetch fails at once.
        resolver.hosts.insert(format!("mta-sts.{domain}"), localhost.clone());
        resolver.txt.insert(format!("_mta-sts.{domain}"), vec!["v=STSv1; id=1;".into()]);
    }
    let routes =
        HashMap::from([("routed.example".to_owned(), ("127.0.0.1".to_owned(), sink.addr.port()))]);
    let router = Router::new(Box::new(resolver), sink.addr.port(), routes, Some(1));
    let tls = TlsContext::new(rustls::RootCertStore::empty());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fetcher = Fetcher {
        tls: TlsContext::new({
            let mut roots = rustls::RootCertStore::empty();
            roots.add(sim::ca().unwrap().root_der().clone()).unwrap();
            roots
        })
        .https_config()
        .unwrap(),
        port: closed,
        timeout: Duration::from_secs(5),
    };
    let deliverer =
        Deliverer::new(router, tls, Timeouts::all(Duration::from_secs(5)), "relay.test")
            .with_mta_sts(fetcher);
    let (chain, _e, _d) = chains::load(&broken("facts")).unwrap();

    let gathered = sim::send(&deliverer, &chain, "sts.example", false, false).await;
    assert!(matches!(status(&gathered), Status::Deferred { .. }), "{gathered:?}");
    assert!(gathered.tls_log.starts_with("tls=may"), "{}", gathered.tls_log);
    let routed = sim::send(&deliverer, &chain, "routed.example", false, false).await;
    assert!(matches!(status(&routed), Status::Deferred { .. }), "{routed:?}");
    assert!(routed.tls_log.starts_with("tls=encrypt"), "{}", routed.tls_log);
    assert_eq!(sink.count(), 0);
}

/// MTA-STS end to end against the simulator: the policy is looked up in its DNS and fetched
/// from its HTTPS responder over verified TLS, reaches the policy as a fact (the `facts`
/// fixture answers `verify` with basis `sts` under `enforce`), and the host's floor keeps an MX
/// the policy does not list from being used at all: `sts-mx-mismatch` before any connection,
/// which the policy defers. Within a minute the cache answers: one fetch per domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_policies_are_fetched_cached_and_enforced_before_connecting() {
    use std::collections::{BTreeMap, HashMap};
    use std::time::Duration;

    use postwarden::delivery::Deliverer;
    use postwarden::delivery::client::Timeouts;
    use postwarden::delivery::route::{HickoryResolver, Router};
    use postwarden::delivery::tls::TlsContext;
    use postwarden::standards::fetch::Fetcher;
    use postwarden_sim::server::Timing;
    use postwarden_sim::sts::StsKnobs;
    use postwarden_sim::{Fleet, FleetOptions};

    let policy =
        |mx: &str| format!("version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: 86400\r\n");
    let fleet = Fleet::start(FleetOptions {
        scenarios: Some(vec!["CAP-01".into(), "CERT-01".into()]),
        timing: Timing::default(),
        ca: Some(sim::ca().unwrap()),
        sts: BTreeMap::from([
            ("cap-01.sim.test".to_owned(), StsKnobs::serving("a1", &policy("*.cap-01.sim.test"))),
            ("cert-01.sim.test".to_owned(), StsKnobs::serving("b1", &policy("mx.elsewhere.test"))),
        ]),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fleet.ca().root_der().clone()).unwrap();
    let tls = TlsContext::new(roots);
    let fetcher = Fetcher {
        tls: tls.https_config().unwrap(),
        port: fleet.sts_https_port(),
        timeout: Duration::from_secs(10),
    };
    let router = Router::new(
        Box::new(HickoryResolver::new(&[fleet.dns_addr()]).unwrap()),
        fleet.port(),
        HashMap::new(),
        Some(1),
    );
    let deliverer =
        Deliverer::new(router, tls, Timeouts::all(Duration::from_secs(5)), "relay.test")
            .with_mta_sts(fetcher);
    let (chain, _e, _d) = chains::load(&broken("facts")).unwrap();

    for _ in 0..2 {
        let outcome = sim::send(&deliverer, &chain, "cap-01.sim.test", false, false).await;
        match status(&outcome) {
            Status::Delivered { tls: Some(tls), requirement, .. } => {
                assert!(tls.verified);
                assert_eq!(requirement, "verify basis=sts");
            }
            other => panic!("expected a verified delivery under the STS policy, got {other:?}"),
        }
    }
    assert_eq!(fleet.transcript("cap-01.sim.test").policy_fetches(), 1, "the cache answers");

    let outcome = sim::send(&deliverer, &chain, "cert-01.sim.test", false, false).await;
    match status(&outcome) {
        Status::Deferred { reason, .. } => assert_eq!(reason, "facts policy saw sts-mx-mismatch"),
        other => panic!("expected the policy's deferral, got {other:?}"),
    }
    let transcript = fleet.transcript("cert-01.sim.test");
    assert_eq!(transcript.policy_fetches(), 1);
    assert_eq!(transcript.smtp().count(), 0, "no SMTP connection to an unlisted MX");
}
