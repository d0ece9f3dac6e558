//! Invariants of research §0.3 that can be judged from the server side of a transcript.
//!
//! I3 (injected bytes never read as replies), I6 (connection reuse), I7 (bounded waits) and I8
//! (bounded memory) need the relay's own report and are left to the conformance runner; what a
//! server can see is checked here, per connection, in event order.

use std::fmt;

use crate::smtp::Command;
use crate::transcript::{Event, Transcript};

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
                Event::ClientHelloInPlaintext | Event::MessageAccepted { .. } | Event::Closed => {}
            }
        }
    }
    violations
}
