//! Black-box mode: judge any relay (ours over SMTP, Postfix, anything) from the outside.
//!
//! The runner submits one message per scenario recipient to the relay over SMTP and watches the
//! fleet: a message accepted inside TLS is TLS; accepted in plaintext it is PLAIN, or PLAIN*
//! when an earlier connection to that MX tried STARTTLS; a DSN arriving back at the sender's
//! mailbox (hosted by the fleet's healthy `cap-01.sim.test`) is BOUNCE; nothing within the
//! window is DEFER, but only with evidence: the relay must have connected to the scenario's
//! MX hosts (a relay that never connects would otherwise pass every deferral row), unless none
//! of them listens. A delivery must reach the MX host the catalogue names for the column (MX-03:
//! under verify, the valid mx2, not the self-signed mx1). Codes are not observable from
//! outside, so any deferral or bounce matches. Each recipient gets its own message and its own
//! sender address, so a DSN names exactly one.
//!
//! Invariant I9 (a delivery is backed by a transaction the server saw through) is judged two
//! ways from outside. The out-of-step scenarios expect delivery through a healthy backup MX, so
//! a relay that believes the broken primary took the message shows as DEFER or the wrong MX.
//! And given the relay's Prometheus endpoint, the runner compares its count of delivered
//! recipients, on each side of the TLS boundary, with what the fleet's servers accepted: a
//! relay can never have delivered more than the servers took (row `I9`).
//!
//! Fairness is judged from the fleet's clocks. A scenario with a backlog (EOD-07: the final dot
//! is never answered) gets its messages first; once one of them hangs at the dot, the healthy
//! CAP-01 gets its message, which must be accepted before the relay gives up on any hanging
//! connection. A relay whose stuck deliveries hold every slot (issue 10 item 3) delivers it
//! only after the first of them times out, and the row fails saying so.
//!
//! Scenarios whose message carries REQUIRETLS are listed but not judged here: RFC 8689 only
//! lets a relay accept REQUIRETLS over TLS, and this runner submits in plaintext.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use postwarden_sim::transcript::{Event, Transcript};
use postwarden_sim::{Fleet, Outcome, Scenario};

use crate::expect::{Expect, Expectations, Expected, Observed};
use crate::{Report, ScenarioResult};

/// The domain whose mailbox receives DSNs (a healthy scenario accepting everything).
const SINK: &str = "cap-01.sim.test";

/// Runs the fleet's scenarios through the relay at `relay`, waiting up to `window` for outcomes.
pub async fn run_external(
    fleet: &Fleet,
    relay: SocketAddr,
    expectations: &Expectations,
    window: Duration,
    name: &str,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let (scenarios, unjudged): (Vec<Scenario>, Vec<Scenario>) =
        fleet.scenarios().iter().cloned().partition(|s| !s.requiretls);
    anyhow::ensure!(
        fleet.route(SINK).is_some(),
        "black-box mode needs CAP-01 ({SINK}) to receive DSNs"
    );
    let mut submitted = Vec::new();
    // Backlogs first: their messages hang at the final dot before anything else is submitted.
    let (backlogs, scenarios): (Vec<Scenario>, Vec<Scenario>) =
        scenarios.into_iter().partition(|s| s.backlog > 0);
    for scenario in &backlogs {
        let expected = expectations.expected(scenario);
        for n in 1..=scenario.backlog {
            let local = format!("user{n}");
            let (rcpt, sender) = addresses(scenario, &local);
            submit_one(relay, &sender, &rcpt, scenario.id).await?;
            submitted.push((scenario.clone(), expected.clone(), rcpt, sender));
        }
    }
    let deadline = Instant::now() + window;
    while !backlogs.iter().all(|s| hanging_at_dot(&fleet.transcript(&s.domain())))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The healthy SINK goes first among the others: it is the domain judged for fairness.
    let (sink, others): (Vec<Scenario>, Vec<Scenario>) =
        scenarios.into_iter().partition(|s| s.domain() == SINK);
    let scenarios: Vec<Scenario> = sink.into_iter().chain(others).collect();
    for scenario in &scenarios {
        let expected = expectations.expected(scenario);
        let locals: Vec<&str> = match &expected {
            Expected::Catalogue(Outcome::Split(parts)) => parts.iter().map(|(l, _)| *l).collect(),
            _ => vec!["user"],
        };
        for local in locals {
            let (rcpt, sender) = addresses(scenario, local);
            submit_one(relay, &sender, &rcpt, scenario.id).await?;
            submitted.push((scenario.clone(), expected.clone(), rcpt, sender));
        }
    }

    // Watch until every recipient has an outcome or the window closes.
    let deadline = Instant::now() + window;
    loop {
        let settled =
            submitted.iter().all(|(s, _, rcpt, sender)| observe(fleet, s, rcpt, sender).is_some());
        if settled || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut results: Vec<ScenarioResult> = Vec::new();
    for (scenario, expected, rcpt, sender) in &submitted {
        let local = rcpt.split('@').next().unwrap_or_default().to_owned();
        let mut problems = Vec::new();
        let observed = match observe(fleet, scenario, rcpt, sender) {
            Some(observed) => observed,
            None => {
                if let Some(missing) = deferral_without_evidence(fleet, scenario) {
                    problems.push(format!("{local}: {missing}"));
                }
                Observed::Defer(String::new())
            }
        };
        let want = match expected {
            Expected::Catalogue(Outcome::Split(parts)) => {
                parts.iter().find(|(l, _)| *l == local).map(|(_, o)| Expected::Catalogue(*o))
            }
            other => Some(other.clone()),
        };
        if let Some(want) = &want
            && !accepts_blackbox(want, &observed)
        {
            problems.push(format!("{local}: expected {want}, got {observed}"));
        }
        if let (Some(via), Some(mx)) =
            (scenario.expected.via(expectations.column_of(scenario)), observed.mx())
            && !mx.starts_with(&format!("{via}."))
            && matches!(want, Some(Expected::Catalogue(_)))
        {
            problems.push(format!("{local}: expected delivery via {via}, got {mx}"));
        }
        let transcript = fleet.transcript(&scenario.domain());
        let forced = expectations.default.is_forced()
            && !matches!(want, Some(Expected::File(Expect::Plain | Expect::PlainReconnect)));
        for violation in postwarden_sim::check(scenario.id, &transcript, forced) {
            problems.push(format!("invariant {violation}"));
        }
        match results.iter_mut().find(|r| r.id == scenario.id) {
            Some(result) => {
                result.observed.push((local, observed));
                result.problems.extend(problems);
            }
            None => results.push(ScenarioResult {
                id: scenario.id.to_owned(),
                domain: scenario.domain(),
                description: scenario.description.to_owned(),
                expected: expected.to_string(),
                observed: vec![(local, observed)],
                decision: "external".to_owned(),
                tls_log: String::new(),
                problems,
                elapsed: started.elapsed(),
            }),
        }
    }
    for scenario in &backlogs {
        if let Some(result) = results.iter_mut().find(|r| r.id == scenario.id) {
            result.problems.extend(unfair(fleet, scenario));
        }
    }
    for result in &mut results {
        result.problems.dedup();
    }
    for scenario in unjudged {
        results.push(ScenarioResult {
            id: scenario.id.to_owned(),
            domain: scenario.domain(),
            description: scenario.description.to_owned(),
            expected: expectations.expected(&scenario).to_string(),
            observed: Vec::new(),
            decision: "not judged: REQUIRETLS".to_owned(),
            tls_log: String::new(),
            problems: Vec::new(),
            elapsed: Duration::ZERO,
        });
    }
    if let Some(metrics) = metrics {
        let counts = tokio::task::spawn_blocking(move || delivered_counts(metrics)).await?;
        let (relay_tls, relay_plain) =
            counts.map_err(|e| anyhow::anyhow!("reading the relay's metrics at {metrics}: {e}"))?;
        let (fleet_tls, fleet_plain) = accepted_counts(fleet);
        let mut problems = Vec::new();
        for (side, relay, fleet) in
            [("inside TLS", relay_tls, fleet_tls), ("in plaintext", relay_plain, fleet_plain)]
        {
            if relay > fleet {
                problems.push(format!(
                    "invariant I9 violated: the relay counts {relay} recipients delivered {side}, \
                     the fleet's servers accepted {fleet}"
                ));
            }
        }
        results.push(ScenarioResult {
            id: "I9".to_owned(),
            domain: "(all)".to_owned(),
            description: "deliveries the relay counts vs recipients the fleet accepted".to_owned(),
            expected: "<= accepted".to_owned(),
            observed: Vec::new(),
            decision: format!("relay {relay_tls}+{relay_plain}, fleet {fleet_tls}+{fleet_plain}"),
            tls_log: String::new(),
            problems,
            elapsed: started.elapsed(),
        });
    }
    Ok(Report { name: name.to_owned(), results, elapsed: started.elapsed() })
}

/// The recipient and sender of one submitted message: each message has its own sender, so a
/// DSN names exactly one.
fn addresses(scenario: &Scenario, local: &str) -> (String, String) {
    (
        format!("{local}@{}", scenario.domain()),
        format!("conformance+{}.{local}@{SINK}", scenario.label),
    )
}

async fn submit_one(
    relay: SocketAddr,
    sender: &str,
    rcpt: &str,
    id: &'static str,
) -> anyhow::Result<()> {
    let (owned_rcpt, owned_sender) = (rcpt.to_owned(), sender.to_owned());
    tokio::task::spawn_blocking(move || submit(relay, &owned_sender, &owned_rcpt, id))
        .await?
        .map_err(|e| anyhow::anyhow!("submitting {rcpt} to {relay}: {e}"))
}

/// Whether some connection got `354`, sent its body and now waits, open, for the reply to the
/// final dot (EOD-07 never sends one).
fn hanging_at_dot(transcript: &Transcript) -> bool {
    transcript.connections.iter().any(|c| !c.closed() && reached_dot(c))
}

fn reached_dot(connection: &postwarden_sim::transcript::ConnectionLog) -> bool {
    connection
        .events
        .iter()
        .any(|e| matches!(e, Event::Sent { reply, .. } if reply.starts_with("354")))
}

/// Fairness (issue 10 item 3), judged from the fleet's clocks: the healthy SINK's message must
/// have been accepted before the relay gave up on any connection of `backlog` that hung at the
/// final dot. A relay that lets one destination's stuck deliveries hold every slot delivers it
/// only once the first of them times out.
fn unfair(fleet: &Fleet, backlog: &Scenario) -> Vec<String> {
    let hung = fleet.transcript(&backlog.domain());
    let first_given_up = hung
        .connections
        .iter()
        .filter(|c| reached_dot(c))
        .filter_map(postwarden_sim::transcript::ConnectionLog::closed_at)
        .min();
    if !hung.connections.iter().any(reached_dot) {
        return vec![format!(
            "fairness not judged: none of the {} messages queued here reached the final dot",
            backlog.backlog
        )];
    }
    let healthy_rcpt = format!("user@{SINK}");
    let healthy = fleet.transcript(SINK).connections.iter().find_map(|c| {
        c.first_at(|e| {
            matches!(e, Event::MessageAccepted { rcpts, .. }
            if rcpts.iter().any(|r| r.eq_ignore_ascii_case(&healthy_rcpt)))
        })
    });
    match (healthy, first_given_up) {
        (None, _) => vec![format!(
            "fairness: the healthy {SINK} never got its message while {} messages hung here",
            backlog.backlog
        )],
        (Some(healthy), Some(given_up)) if given_up < healthy => vec![format!(
            "fairness: the healthy {SINK} got its message {:.1} s after the relay gave up on a \
             connection hanging here at the final dot: it waited behind this destination's \
             backlog",
            healthy.duration_since(given_up).as_secs_f64()
        )],
        _ => Vec::new(),
    }
}

/// Recipients the fleet's servers accepted (a positive reply to a final dot after the whole
/// body), inside TLS and in plaintext.
fn accepted_counts(fleet: &Fleet) -> (u64, u64) {
    let (mut tls, mut plain) = (0, 0);
    for scenario in fleet.scenarios() {
        for connection in fleet.transcript(&scenario.domain()).connections {
            for event in connection.events {
                if let Event::MessageAccepted { rcpts, tls: inside, .. } = event {
                    let n = rcpts.len() as u64;
                    if inside { tls += n } else { plain += n }
                }
            }
        }
    }
    (tls, plain)
}

/// `postwarden_recipients_delivered_total` from the relay's Prometheus text, summed inside TLS
/// (`verified`, `unverified`) and in plaintext.
fn delivered_counts(metrics: SocketAddr) -> std::io::Result<(u64, u64)> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect(metrics)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (mut tls, mut plain) = (0, 0);
    for line in text.lines().filter(|l| l.starts_with("postwarden_recipients_delivered_total{")) {
        let value: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if line.contains("tls=\"plaintext\"") {
            plain += value;
        } else {
            tls += value;
        }
    }
    Ok((tls, plain))
}

/// Codes cannot be seen from outside: any deferral matches a deferral, any bounce a bounce.
fn accepts_blackbox(expected: &Expected, observed: &Observed) -> bool {
    let outcome_matches = |o: &Outcome| match (o, observed) {
        (Outcome::Defer { .. }, Observed::Defer(_)) => true,
        (o, observed) => crate::expect::outcome_accepts(o, observed),
    };
    match expected {
        Expected::Catalogue(Outcome::AnyOf(options)) => options.iter().any(outcome_matches),
        Expected::Catalogue(outcome) => outcome_matches(outcome),
        Expected::File(Expect::Defer(_)) => matches!(observed, Observed::Defer(_)),
        Expected::File(expect) => crate::expect::expect_accepts(expect, observed),
    }
}

/// Why "nothing arrived" is not evidence of a deferral for `scenario`, if it is not: the
/// relay never connected to any of its MX hosts although one listens.
fn deferral_without_evidence(fleet: &Fleet, scenario: &Scenario) -> Option<String> {
    let route = fleet.route(&scenario.domain())?;
    if !route.mx.iter().any(|mx| mx.listening) {
        // Nothing to connect to (GRT-01): a refused connection leaves no trace to check.
        return None;
    }
    let transcript = fleet.transcript(&scenario.domain());
    transcript.connections.is_empty().then(|| {
        "no delivery, and the relay never connected to any MX host: no evidence of a deferral"
            .to_owned()
    })
}

/// What the fleet saw for one recipient, if anything yet.
fn observe(fleet: &Fleet, scenario: &Scenario, rcpt: &str, sender: &str) -> Option<Observed> {
    let transcript = fleet.transcript(&scenario.domain());
    if let Some(observed) = accepted(&transcript, rcpt) {
        return Some(observed);
    }
    let sink = fleet.transcript(SINK);
    let bounced = sink.connections.iter().flat_map(|c| &c.events).any(|e| {
        matches!(e, Event::MessageAccepted { mail_from, rcpts, .. }
            if mail_from.is_empty() && rcpts.iter().any(|r| r.eq_ignore_ascii_case(sender)))
    });
    bounced.then(|| Observed::Bounce(String::new()))
}

fn accepted(transcript: &Transcript, rcpt: &str) -> Option<Observed> {
    let mut tried_starttls = std::collections::HashSet::new();
    for connection in &transcript.connections {
        let starttls = connection.events.iter().any(|e| {
            matches!(e, Event::Received { line, tls: false } if line.trim().eq_ignore_ascii_case("STARTTLS"))
        });
        for event in &connection.events {
            if let Event::MessageAccepted { rcpts, tls, .. } = event
                && rcpts.iter().any(|r| r.eq_ignore_ascii_case(rcpt))
            {
                let mx = connection.mx.clone();
                return Some(if *tls {
                    Observed::Tls(mx)
                } else if !starttls && tried_starttls.contains(&connection.mx) {
                    Observed::PlainReconnect(mx)
                } else {
                    Observed::Plain(mx)
                });
            }
        }
        if starttls {
            tried_starttls.insert(connection.mx.clone());
        }
    }
    None
}

/// A minimal SMTP submission (blocking; the runner's own code, not the relay's client).
fn submit(relay: SocketAddr, sender: &str, rcpt: &str, id: &str) -> std::io::Result<()> {
    let stream = TcpStream::connect(relay)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut expect = |code: char| -> std::io::Result<()> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "relay closed"));
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return match line.starts_with(code) {
                    true => Ok(()),
                    false => {
                        Err(std::io::Error::other(format!("relay answered {}", line.trim_end())))
                    }
                };
            }
        }
    };
    expect('2')?;
    for (command, code) in [
        ("EHLO conformance.postwarden.test".to_owned(), '2'),
        (format!("MAIL FROM:<{sender}>"), '2'),
        (format!("RCPT TO:<{rcpt}>"), '2'),
        ("DATA".to_owned(), '3'),
    ] {
        writer.write_all(format!("{command}\r\n").as_bytes())?;
        expect(code)?;
    }
    let body = format!(
        "From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: conformance {id}\r\n\r\nscenario {id}\r\n.\r\n"
    );
    writer.write_all(body.as_bytes())?;
    expect('2')?;
    writer.write_all(b"QUIT\r\n")?;
    Ok(())
}
