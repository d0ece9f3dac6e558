//! The inbound SMTP server: where mail enters the relay.
//!
//! Postwarden is an *outbound* relay. Its inbound side accepts mail only from clients that may
//! relay (a peer address inside [`InboundOptions::relay_networks`], or a client that logged in
//! with AUTH over TLS) and hands every accepted message to a [`Spool`]. There are no local
//! domains: a stranger's `RCPT` gets `554 5.7.1`, whatever the recipient, so the server can
//! never become an open relay by misconfiguring a domain list.
//!
//! A `250` after the final dot is a promise to deliver, so the server sends it only after
//! [`Spool::accept`] has returned, and that method returns only once the message is durable.
//! A spool failure is a `451 4.3.0` and the client keeps its copy.
//!
//! # Layout
//!
//! - `protocol`: the server side of the wire, without I/O. [`Session`] turns received bytes
//!   into [`Reply`] values and [`Action`]s (bounded command lines, MAIL and RCPT paths and
//!   parameters, the transaction state machine, AUTH exchanges, the DATA body decoder with
//!   dot-unstuffing and the size limit, `TLS-Required: No` detection, the `Received:` line).
//! - `server`: [`serve`] runs it on Tokio: the accept loop with its connection cap, one task
//!   per connection with an idle timeout, one write per batch of pipelined replies, the
//!   STARTTLS switch as a change of stream type, and the call to the [`Spool`].
//! - `net`: [`IpNet`], the CIDR blocks of [`InboundOptions::relay_networks`].
//! - `auth`: the password hash format of [`InboundOptions::credentials`] ([`hash_password`])
//!   and the base64 of AUTH exchanges.
//!
//! Dependencies point down: `server` → `protocol` → (`net`, `auth`, `crate::smtp`). Nothing
//! here depends on the queue; the queue implements [`Spool`].

mod auth;
mod net;
mod protocol;
mod server;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use auth::{hash_password, verify_password};
pub use net::{IpNet, IpNetError};
pub use protocol::{
    Action, BodyDecoder, Command, MailParams, PendingSubmission, Reply, Session, parse_command,
    tls_required_no,
};
pub use server::{serve, serve_reloadable};

/// Default largest message, in bytes (25 MiB), advertised as `SIZE`.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 25 * 1024 * 1024;

/// Default most recipients per message (RFC 5321 §4.5.3.1.8 asks for at least 100).
pub const DEFAULT_MAX_RECIPIENTS: usize = 100;

/// Default longest command line, CRLF included (RFC 5321 §4.5.3.1.4 and §4.5.3.1.6).
pub const DEFAULT_MAX_LINE_LENGTH: usize = 1000;

/// Default most simultaneous connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;

/// Default idle timeout: RFC 5321 §4.5.3.2.7 asks a server to wait at least 5 minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything the inbound server needs to know, already parsed into valid types.
///
/// The configuration file is read elsewhere (`config.rs`) and converted into this; the server
/// never reads files.
#[derive(Clone)]
pub struct InboundOptions {
    /// The name in the greeting, the EHLO reply and the `Received:` lines (default
    /// `localhost`; set it to the relay's public name).
    pub hostname: String,
    /// Peers that may relay without logging in (default `127.0.0.0/8` and `::1/128`).
    /// IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`) are matched as IPv4.
    pub relay_networks: Vec<IpNet>,
    /// Largest message in bytes after dot-unstuffing, without the `Received:` line the server
    /// adds (default [`DEFAULT_MAX_MESSAGE_SIZE`]).
    pub max_message_size: usize,
    /// Most recipients per message (default [`DEFAULT_MAX_RECIPIENTS`]).
    pub max_recipients: usize,
    /// Longest command line, CRLF included (default [`DEFAULT_MAX_LINE_LENGTH`]; raised to
    /// 512 if set lower, the RFC 5321 minimum for replies and a sane floor for commands).
    pub max_line_length: usize,
    /// Most simultaneous connections; more are told `421 4.7.0` and closed (default
    /// [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// How long a client may stay silent (or not read our replies) before it is told
    /// `421 4.4.2` and disconnected (default [`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// The certificate for STARTTLS; `None` means STARTTLS (and therefore AUTH) is not
    /// offered.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Users who may relay from anywhere after AUTH over TLS: user name → password hash in the
    /// format of [`hash_password`] (`sha256:<salt-hex>:<hex(sha256(salt || password))>`).
    /// Empty means AUTH is not offered.
    pub credentials: HashMap<String, String>,
}

impl Default for InboundOptions {
    fn default() -> Self {
        InboundOptions {
            hostname: "localhost".to_owned(),
            relay_networks: IpNet::loopback().to_vec(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: DEFAULT_MAX_RECIPIENTS,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            tls: None,
            credentials: HashMap::new(),
        }
    }
}

/// Password hashes are not printed.
impl std::fmt::Debug for InboundOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundOptions")
            .field("hostname", &self.hostname)
            .field("relay_networks", &self.relay_networks)
            .field("max_message_size", &self.max_message_size)
            .field("max_recipients", &self.max_recipients)
            .field("max_line_length", &self.max_line_length)
            .field("max_connections", &self.max_connections)
            .field("idle_timeout", &self.idle_timeout)
            .field("tls", &self.tls.is_some())
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl InboundOptions {
    /// Whether a client at `ip` may relay without logging in.
    pub fn relay_allowed(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.relay_networks.iter().any(|net| net.contains(ip))
    }

    /// Whether AUTH can ever be offered: it needs TLS and at least one user.
    pub fn auth_configured(&self) -> bool {
        self.tls.is_some() && !self.credentials.is_empty()
    }
}

/// One accepted message, handed to the [`Spool`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Submission {
    /// The reverse-path without angle brackets; empty for the null sender (`MAIL FROM:<>`).
    pub mail_from: String,
    /// The forward-paths without angle brackets, in the order they were accepted (duplicates
    /// are kept once).
    pub rcpts: Vec<String>,
    /// The message, dot-unstuffed, with the server's `Received:` line prepended. Line ends
    /// are as the client sent them (normally CRLF); the outbound dot-stuffer normalises them.
    pub body: Vec<u8>,
    /// `MAIL FROM:<..> REQUIRETLS` was given (only possible over TLS; RFC 8689 §4).
    pub requiretls: bool,
    /// The header block holds `TLS-Required: No` (RFC 8689 §5). When `requiretls` is also
    /// set, RFC 8689 says the header field is to be ignored; that decision is the queue's.
    pub tls_required_no: bool,
    /// The client's address.
    pub client: SocketAddr,
    /// The message arrived over TLS (STARTTLS).
    pub tls: bool,
    /// The user name the client logged in as, if it used AUTH.
    pub authenticated_as: Option<String>,
    /// When the final dot was received.
    pub received_at: SystemTime,
}

/// Where accepted messages go: the queue implements this.
///
/// The server calls [`accept`](Spool::accept) once per message and replies to the client
/// only after it returns: `250 2.0.0 queued as <id>` on `Ok(id)`, `451 4.3.0` on `Err` (the
/// reason is logged, not sent to the client). Calls from different connections run
/// concurrently.
pub trait Spool: Send + Sync + 'static {
    /// Stores the message and returns its queue id, or the reason it could not be stored.
    ///
    /// Must return only once the message is durable (fsync'd); the server replies 250 only
    /// after that.
    fn accept(
        &self,
        submission: Submission,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}
