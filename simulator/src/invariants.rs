//! Invariants of research §0.3 that can be judged from the server side of a transcript.
//!
//! I3 (injected bytes never read as replies), I6 (connection reuse), I7 (bounded waits) and I8
//! (bounded memory) need the relay's own report and are left to the conformance runner; what a
//! server can see is checked here, per connection, in event order. I9 (a delivery is backed by
//! a transaction the server saw through) compares the relay's report with the transcript:
//! [`check_deliveries`].

use std::fmt;

use crate::smtp::Command;
use crate::transcript::{Event, Service, Transcript};

/// An invariant a relay must keep.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum Invariant {
    /// I1: under a forced decision, no MAIL, RCPT, DATA, BDAT or AUTH outside TLS.
    PlaintextTransaction,
    /// I2: after `STARTTLS\r\n`, nothing until the reply, and no SMTP bytes before the
    /// ClientHello (client side of CVE-2011-0411).
    PipelinedAfterStartTls,
    /// I4: after the handshake, EHLO (or HELO) again before any transaction; never a second
    /// STARTTLS (RFC 3207 §4.2).
    EhloAfterTls,
    /// I5: no SMTP on a connection whose handshake failed.
    CommandAfterFailedHandshake,
    /// RFC 5321 §4.3.1: the client waits for the whole greeting before talking.
    TalkBeforeGreeting,
    /// Research §3.6 item 10: AUTH is never sent without TLS, whatever the policy.
    AuthWithoutTls,
    /// Research §3.6 item 3: a ClientHello only after a 2xx reply to STARTTLS.
    HandshakeWithoutGoAhead,
    /// I9: a recipient counts as delivered only on the reply to the final dot of a transaction
    /// whose DATA got 354 and whose whole body was sent, on the same connection and the same
    /// side of the TLS boundary.
    DeliveredWithoutTransaction,
}

impl Invariant {
    /// The short code used in the research and in reports (`I1`, `I2`, ...).
    pub fn code(self) -> &'static str {
        match self {
            Self::PlaintextTransaction => "I1",
            Self::PipelinedAfterStartTls => "I2",
            Self::EhloAfterTls => "I4",
            Self::CommandAfterFailedHandshake => "I5",
            Self::TalkBeforeGreeting => "GREET",
            Self::AuthWithoutTls => "AUTH",
            Self::HandshakeWithoutGoAhead => "GO-AHEAD",
            Self::DeliveredWithoutTransaction => "I9",
        }
    }
}

/// One broken invariant.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// The scenario id (or whatever name the caller passed).
    pub scenario: String,
    /// Index of the connection in the transcript.
    pub connection: usize,
    /// The MX host of that connection.
    pub mx: String,
    /// The offending line or bytes.
    pub line: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violated in {} (connection {} to {}): {:?}",
            self.invariant.code(),
            self.scenario,
            self.connection,
            self.mx,
            self.line
        )
    }
}

/// Checks every connection of `transcript`; `forced` says whether the relay's decision for
/// this destination required TLS (F or FV).
pub fn check(scenario: &str, transcript: &Transcript, forced: bool) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (index, connection) in transcript.connections.iter().enumerate() {
        if connection.service != Service::Smtp {
            continue;
        }
        let mut flag = |invariant: Invariant, line: &str| {
            violations.push(Violation {
                invariant,
                scenario: scenario.to_owned(),
                connection: index,
                mx: connection.mx.clone(),
                line: line.to_owned(),
            });
        };
        let mut handshake_failed = false;
        let mut in_tls = false;
        let mut greeted_in_tls = false;
        // The reply to the latest STARTTLS: `None` before any, `Some(None)` while awaited.
        let mut starttls_reply: Option<Option<bool>> = None;
        for event in &connection.events {
            match event {
                Event::Received { line, tls } => {
                    let command = Command::parse(line.as_bytes());
                    if command == Command::StartTls {
                        starttls_reply = Some(None);
                    }
                    if handshake_failed {
                        flag(Invariant::CommandAfterFailedHandshake, line);
                    }
                    if !tls && forced && command.is_transaction() {
                        flag(Invariant::PlaintextTransaction, line);
                    }
                    if !tls && matches!(command, Command::Auth(_)) {
                        flag(Invariant::AuthWithoutTls, line);
                    }
                    if *tls && in_tls {
                        match command {
                            Command::Ehlo(_) | Command::Helo(_) => greeted_in_tls = true,
                            Command::StartTls => flag(Invariant::EhloAfterTls, line),
                            Command::Quit | Command::Noop | Command::Rset => {}
                            _ if !greeted_in_tls => flag(Invariant::EhloAfterTls, line),
                            _ => {}
                        }
                    }
                }
                Event::Sent { reply, .. } => {
                    if starttls_reply == Some(None) {
                        starttls_reply = Some(Some(reply.starts_with('2')));
                    }
                }
                Event::EarlyTalk { bytes } => flag(Invariant::TalkBeforeGreeting, bytes),
                Event::PipelinedAfterStartTls { bytes } | Event::NotClientHello { bytes } => {
                    flag(Invariant::PipelinedAfterStartTls, bytes);
                }
                Event::ClientHelloInPlaintext if starttls_reply != Some(Some(true)) => {
                    flag(Invariant::HandshakeWithoutGoAhead, "<ClientHello>");
                }
                Event::TlsEstablished { .. } => in_tls = true,
                Event::TlsFailed(_) => handshake_failed = true,
                Event::ClientHelloInPlaintext
                | Event::MessageAccepted { .. }
                | Event::HttpRequest { .. }
                | Event::HttpResponse { .. }
                | Event::Closed => {}
            }
        }
    }
    violations
}

/// A delivery as the relay reports it, for [`check_deliveries`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Delivery {
    /// The recipient.
    pub rcpt: String,
    /// The MX host the relay says took it.
    pub mx: String,
    /// Whether the relay says the transaction ran inside TLS.
    pub tls: bool,
    /// The reply the relay counted as the server's acceptance.
    pub reply: String,
}

/// One transaction a server saw through: DATA and its reply, the whole body, the reply to the
/// final dot.
struct Completed {
    rcpts: Vec<String>,
    tls: bool,
    go_ahead_354: bool,
    dot_reply: String,
}

/// I9: every delivery the relay reports is backed, on one connection to that MX, by a
/// transaction on the same side of the TLS boundary whose DATA the server answered with 354,
/// whose whole body it received (so it recorded the message) and whose final dot it answered
/// with the very reply the relay counted. A relay that reads an unsolicited line as an answer,
/// or takes a 250 to DATA for acceptance, reports a delivery no server made.
pub fn check_deliveries(
    scenario: &str,
    transcript: &Transcript,
    deliveries: &[Delivery],
) -> Vec<Violation> {
    let completed: Vec<(usize, &str, Vec<Completed>)> = transcript
        .connections
        .iter()
        .enumerate()
        .map(|(index, c)| (index, c.mx.as_str(), completed(&c.events)))
        .collect();
    let same_host =
        |a: &str, b: &str| a.trim_end_matches('.').eq_ignore_ascii_case(b.trim_end_matches('.'));
    let mut violations = Vec::new();
    for delivery in deliveries {
        let last = delivery.reply.lines().last().unwrap_or_default().trim_end();
        let backed = completed.iter().filter(|(_, mx, _)| same_host(mx, &delivery.mx)).any(
            |(_, _, transactions)| {
                transactions.iter().any(|t| {
                    t.go_ahead_354
                        && t.tls == delivery.tls
                        && t.rcpts.iter().any(|r| r.eq_ignore_ascii_case(&delivery.rcpt))
                        && t.dot_reply.lines().any(|line| line.trim_end() == last)
                })
            },
        );
        if !backed {
            let connection = completed
                .iter()
                .find(|(_, mx, _)| same_host(mx, &delivery.mx))
                .map_or(0, |(index, _, _)| *index);
            violations.push(Violation {
                invariant: Invariant::DeliveredWithoutTransaction,
                scenario: scenario.to_owned(),
                connection,
                mx: delivery.mx.clone(),
                line: format!(
                    "{} reported delivered {} on `{}`, but no connection to that MX shows DATA \
                     answered 354, the whole body and that reply to the final dot",
                    delivery.rcpt,
                    if delivery.tls { "inside TLS" } else { "in plaintext" },
                    delivery.reply.trim_end()
                ),
            });
        }
    }
    violations
}

/// The transactions of one connection that reached the reply to the final dot.
fn completed(events: &[Event]) -> Vec<Completed> {
    let mut done = Vec::new();
    // The reply to the latest DATA: `None` before any, `Some(None)` while awaited.
    let mut data_reply: Option<Option<(bool, bool)>> = None;
    let mut accepted: Option<(Vec<String>, bool)> = None;
    for event in events {
        match event {
            Event::Received { line, .. } if Command::parse(line.as_bytes()) == Command::Data => {
                data_reply = Some(None);
            }
            Event::Sent { reply, tls } => {
                if let Some((rcpts, accepted_tls)) = accepted.take() {
                    let go_ahead = data_reply.flatten();
                    done.push(Completed {
                        rcpts,
                        tls: accepted_tls && *tls,
                        go_ahead_354: go_ahead
                            .is_some_and(|(is_354, data_tls)| is_354 && data_tls == accepted_tls),
                        dot_reply: reply.clone(),
                    });
                    data_reply = None;
                } else if data_reply == Some(None) {
                    data_reply = Some(Some((reply.starts_with("354"), *tls)));
                }
            }
            Event::MessageAccepted { rcpts, tls, .. } => accepted = Some((rcpts.clone(), *tls)),
            _ => {}
        }
    }
    done
}
