//! What the fake servers saw: one [`Transcript`] per scenario domain, one [`ConnectionLog`] per
//! TCP connection, events in order.
//!
//! Every event is recorded *before* the server acts on it (a reply is logged, then written), so
//! once a client has read a reply the transcript already holds it; only [`Event::Closed`] can
//! lag behind, which [`Transcripts::settled`] waits for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::smtp::Command;

/// One thing that happened on a connection.
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A command line from the client (without CRLF; DATA body lines are not logged).
    Received {
        /// The line, lossily decoded.
        line: String,
        /// Whether it arrived inside TLS.
        tls: bool,
    },
    /// Bytes the server wrote (one write, or one scripted chunk).
    Sent {
        /// The raw text.
        reply: String,
        /// Whether it went out inside TLS.
        tls: bool,
    },
    /// The client sent bytes before the greeting was complete (RFC 5321 §4.3.1).
    EarlyTalk {
        /// What was buffered at that moment.
        bytes: String,
    },
    /// Bytes were already buffered right after the `STARTTLS` line: the client pipelined after
    /// STARTTLS (the client-side mirror of CVE-2011-0411; invariant I2). They are discarded.
    PipelinedAfterStartTls {
        /// The discarded bytes.
        bytes: String,
    },
    /// After the go-ahead to STARTTLS, the first bytes were not a TLS handshake record
    /// (invariant I2: no SMTP before the ClientHello).
    NotClientHello {
        /// The first bytes received, lossily decoded.
        bytes: String,
    },
    /// A TLS ClientHello arrived where an SMTP command was expected.
    ClientHelloInPlaintext,
    /// The TLS handshake completed.
    TlsEstablished {
        /// Negotiated protocol version, e.g. `TLSv1_3`.
        version: String,
        /// Negotiated cipher suite.
        cipher: String,
        /// The SNI the client sent, if any.
        sni: Option<String>,
    },
    /// The handshake failed, or a raw responder made sure it could not succeed.
    TlsFailed(String),
    /// The server answered the final dot positively: the message was accepted.
    MessageAccepted {
        /// The reverse path.
        mail_from: String,
        /// The accepted recipients.
        rcpts: Vec<String>,
        /// Body size in octets.
        size: usize,
        /// Whether the transaction ran inside TLS.
        tls: bool,
        /// The queue id given in the reply (`Q-<nonce>`).
        queue_id: String,
    },
    /// An HTTP request head arrived at the MTA-STS responder.
    HttpRequest {
        /// The method, e.g. `GET`.
        method: String,
        /// The request target, e.g. `/.well-known/mta-sts.txt`.
        target: String,
        /// The `Host` header, if any.
        host: Option<String>,
    },
    /// The MTA-STS responder wrote its response.
    HttpResponse {
        /// The status code.
        status: u16,
        /// Body length in octets (before chunked framing).
        body_len: usize,
    },
    /// The connection ended (either side).
    Closed,
}

/// Which server a connection reached.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Service {
    /// An MX host (SMTP).
    #[default]
    Smtp,
    /// The MTA-STS policy host `mta-sts.<domain>` (HTTPS).
    MtaStsHttps,
}

/// The events of one TCP connection.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ConnectionLog {
    /// The host name the connection was made to: an MX host, or `mta-sts.<domain>`.
    pub mx: String,
    /// Which kind of server that host is.
    pub service: Service,
    /// The client's address.
    pub peer: SocketAddr,
    /// What happened, in order.
    pub events: Vec<Event>,
    /// When each event was recorded (`times[i]` for `events[i]`): a runner orders events of
    /// different connections by it (fairness: was a healthy message accepted before the relay
    /// gave up on a hanging connection?).
    pub times: Vec<std::time::Instant>,
}

impl ConnectionLog {
    /// Whether a TLS handshake completed on this connection.
    pub fn tls_established(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::TlsEstablished { .. }))
    }

    /// Whether the connection has ended.
    pub fn closed(&self) -> bool {
        self.events.last() == Some(&Event::Closed)
    }

    /// When the connection ended, if it has.
    pub fn closed_at(&self) -> Option<std::time::Instant> {
        self.closed().then(|| self.times.last().copied()).flatten()
    }

    /// When the first event matching `which` was recorded.
    pub fn first_at(&self, which: impl Fn(&Event) -> bool) -> Option<std::time::Instant> {
        self.events.iter().position(which).and_then(|i| self.times.get(i).copied())
    }

    /// The commands received, with their TLS flag.
    pub fn commands(&self) -> impl Iterator<Item = (Command, bool)> + '_ {
        self.events.iter().filter_map(|e| match e {
            Event::Received { line, tls } => Some((Command::parse(line.as_bytes()), *tls)),
            _ => None,
        })
    }
}

/// All connections made to one scenario's MX hosts.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Transcript {
    /// Connections in the order they were accepted.
    pub connections: Vec<ConnectionLog>,
}

impl Transcript {
    /// Every accepted message, with the MX host that took it.
    pub fn messages(&self) -> Vec<(&str, &Event)> {
        self.connections
            .iter()
            .flat_map(|c| {
                c.events
                    .iter()
                    .filter(|e| matches!(e, Event::MessageAccepted { .. }))
                    .map(move |e| (c.mx.as_str(), e))
            })
            .collect()
    }

    /// The connections to MX hosts (SMTP), without those to the MTA-STS policy host.
    pub fn smtp(&self) -> impl Iterator<Item = &ConnectionLog> + '_ {
        self.connections.iter().filter(|c| c.service == Service::Smtp)
    }

    /// Every HTTP request the MTA-STS policy host received, in order, as (method, target).
    pub fn http_requests(&self) -> Vec<(&str, &str)> {
        self.connections
            .iter()
            .filter(|c| c.service == Service::MtaStsHttps)
            .flat_map(|c| &c.events)
            .filter_map(|e| match e {
                Event::HttpRequest { method, target, .. } => {
                    Some((method.as_str(), target.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    /// How many times the policy was requested (`GET` of the well-known path, whatever the
    /// answer): what RFC 8461 §3.3's refresh rules are checked against.
    pub fn policy_fetches(&self) -> usize {
        self.http_requests()
            .iter()
            .filter(|(method, target)| *method == "GET" && *target == crate::sts::WELL_KNOWN_PATH)
            .count()
    }
}

type Log = Arc<Mutex<ConnectionLog>>;

/// The shared store of transcripts, keyed by scenario domain. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Transcripts {
    inner: Arc<Mutex<BTreeMap<String, Vec<Log>>>>,
}

impl Transcripts {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of the transcript for `domain` (empty if nothing connected yet).
    pub fn get(&self, domain: &str) -> Transcript {
        let logs: Vec<Log> = lock(&self.inner).get(domain).cloned().unwrap_or_default();
        Transcript { connections: logs.iter().map(|l| lock(l).clone()).collect() }
    }

    /// Forgets the transcript of `domain` (connections still open keep logging elsewhere).
    pub fn clear(&self, domain: &str) {
        lock(&self.inner).remove(domain);
    }

    /// Forgets every transcript.
    pub fn clear_all(&self) {
        lock(&self.inner).clear();
    }

    /// Waits until every connection to `domain` has closed, or `limit` passes, and returns the
    /// transcript either way.
    pub async fn settled(&self, domain: &str, limit: Duration) -> Transcript {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let transcript = self.get(domain);
            let open = transcript.connections.iter().any(|c| !c.closed());
            if !open || tokio::time::Instant::now() >= deadline {
                return transcript;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the log of a new SMTP connection.
    pub(crate) fn open(&self, domain: &str, mx: &str, peer: SocketAddr) -> Recorder {
        self.open_service(domain, mx, Service::Smtp, peer)
    }

    /// Starts the log of a new connection to a `service` host.
    pub(crate) fn open_service(
        &self,
        domain: &str,
        host: &str,
        service: Service,
        peer: SocketAddr,
    ) -> Recorder {
        let log = Arc::new(Mutex::new(ConnectionLog {
            mx: host.to_owned(),
            service,
            peer,
            events: Vec::new(),
            times: Vec::new(),
        }));
        lock(&self.inner).entry(domain.to_owned()).or_default().push(log.clone());
        Recorder { log }
    }
}

/// Appends events to one connection's log.
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    log: Log,
}

impl Recorder {
    pub(crate) fn record(&self, event: Event) {
        let mut log = lock(&self.log);
        log.events.push(event);
        log.times.push(std::time::Instant::now());
    }
}

/// A poisoned lock only means another connection task panicked mid-push; the log is still
/// usable, so take it rather than spread the panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
