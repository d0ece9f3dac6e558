//! The inbound SMTP server: where mail enters the relay.
//!
//! Postwarden is an *outbound* relay. Its inbound side accepts mail only from clients that may
//! relay (a peer address inside [`InboundOptions::relay_networks`], or a client that logged in
//! with AUTH over TLS) and hands every accepted message to a [`Spool`]. There are no local
//! domains: a stranger's `RCPT` gets `554 5.7.1`, whatever the recipient, so the server can
//! never become an open relay by misconfiguring a domain list.
//!
//! A `250` after the final dot is a promise to deliver, so the server sends it only after
//! [`Spool::accept`] has returned, and that method returns only once the message is durable
//! (a message written to a staging file as it arrived is fsync'd and renamed by the spool).
//! A spool failure is a `451 4.3.0` and the client keeps its copy.
//!
//! # Layout
//!
//! - `protocol`: the server side of the wire, without I/O. [`Session`] turns received bytes
//!   into [`Reply`] values and [`Action`]s (bounded command lines, MAIL and RCPT paths and
//!   parameters, the transaction state machine, AUTH exchanges, the DATA body decoder with
//!   dot-unstuffing and the size limit, `TLS-Required: No` detection, the `Received:` line).
//! - `server`: [`serve`] runs it on Tokio: the accept loop with its connection caps, one task
//!   per connection with its time limits (idle, session, DATA rate), one write per batch of
//!   pipelined replies, the STARTTLS switch as a change of stream type, and the call to the
//!   [`Spool`].
//! - `anvil`: [`Anvil`], what is known about each client address across connections
//!   (connections open, connections per minute, AUTH failures), and the limits' counters.
//! - `staging`: the message written to the spool's staging file as it arrives
//!   ([`Spool::stage`]), so memory does not grow with message size.
//! - `net`: [`IpNet`], the CIDR blocks of [`InboundOptions::relay_networks`].
//! - `auth`: the password hash format of [`InboundOptions::credentials`] ([`hash_password`])
//!   and the base64 of AUTH exchanges.
//!
//! Dependencies point down: `server` → (`staging`, `protocol` → (`anvil`, `net`, `auth`,
//! `crate::smtp`)). Nothing here depends on the queue; the queue implements [`Spool`].

mod anvil;
mod auth;
mod hello;
mod net;
mod protocol;
mod server;
mod staging;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use anvil::{Anvil, ClientSlot, InboundStats, RATE_WINDOW, Refusal};
pub use auth::{hash_password, verify_password};
pub use net::{IpNet, IpNetError};
pub use protocol::{
    Action, BodyDecoder, BodyFindings, Command, MailParams, PendingSubmission, Reply, Session,
    parse_command, tls_required_no,
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

/// Default most connections open at once from one client address (Postfix's
/// `smtpd_client_connection_count_limit` is 50, for a server facing the internet; a relay's
/// clients are a few applications, and ten sockets from one address is already many).
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 10;

/// Default most connections one client address may open per minute (Postfix's
/// `smtpd_client_connection_rate_limit`, off there by default).
pub const DEFAULT_MAX_CONNECTION_RATE_PER_CLIENT: u32 = 60;

/// Default longest session, from accept to close.
pub const DEFAULT_MAX_SESSION_TIME: Duration = Duration::from_secs(3600);

/// Default slowest average transfer rate of a message in DATA, in bytes per second, once
/// [`DEFAULT_DATA_RATE_GRACE`] has passed.
pub const DEFAULT_MIN_DATA_RATE: u32 = 1024;

/// Default time a message in DATA may take before [`DEFAULT_MIN_DATA_RATE`] applies.
pub const DEFAULT_DATA_RATE_GRACE: Duration = Duration::from_secs(30);

/// Default AUTH failures from one address, over all its connections, before AUTH is refused.
pub const DEFAULT_AUTH_FAILURE_LIMIT: u32 = 10;

/// Default window over which [`DEFAULT_AUTH_FAILURE_LIMIT`] counts, and for which AUTH is then
/// refused.
pub const DEFAULT_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(600);

/// Default pause before the reply to a failed AUTH.
pub const DEFAULT_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);

/// Default errors a session may make (syntax, sequence, refused AUTH, denied recipients)
/// before it is told `421` and closed (Postfix's `smtpd_hard_error_limit`).
pub const DEFAULT_MAX_ERRORS: u32 = 20;

/// What the server does with a bare CR or LF in a message (Postfix's
/// `smtpd_forbid_bare_newline`).
///
/// Either way only `CRLF . CRLF` ends the message, so a bare line end can never end it early
/// (SMTP smuggling); the question is whether a message holding one is taken at all.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// Accept it; the outbound side sends every line end as CRLF.
    #[default]
    Normalize,
    /// Refuse the message with `550 5.5.2`: for operators whose clients are known to be
    /// correct and who would rather see a broken client fail than have its mail rewritten.
    Reject,
}

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
    /// Most connections open at once from one client address; more are told `421 4.7.0` and
    /// closed (default [`DEFAULT_MAX_CONNECTIONS_PER_CLIENT`]; 0: no limit). IPv6 addresses
    /// count by /64.
    pub max_connections_per_client: u32,
    /// Most connections one client address may open per minute (default
    /// [`DEFAULT_MAX_CONNECTION_RATE_PER_CLIENT`]; 0: no limit).
    pub max_connection_rate_per_client: u32,
    /// Addresses the two limits above do not apply to; `None` (the default) means
    /// `relay_networks`, as Postfix exempts `$mynetworks`: those hosts may already send
    /// anything, and an application that opens a connection per message must not be
    /// throttled. `Some(vec![])` limits everyone.
    pub limit_exempt_networks: Option<Vec<IpNet>>,
    /// Longest session from accept to close, whatever the client does; then `421 4.7.0`
    /// (default [`DEFAULT_MAX_SESSION_TIME`]; zero: no limit).
    pub max_session_time: Duration,
    /// Slowest average rate of a message in DATA, bytes per second, once `data_rate_grace` has
    /// passed; a slower client is told `421 4.7.0` and the message is dropped (default
    /// [`DEFAULT_MIN_DATA_RATE`]; 0: no limit).
    pub min_data_rate: u32,
    /// How long DATA may take before `min_data_rate` applies (default
    /// [`DEFAULT_DATA_RATE_GRACE`]).
    pub data_rate_grace: Duration,
    /// AUTH failures from one client address, over all its connections, after which AUTH is
    /// refused with `454 4.7.0` until `auth_failure_window` has passed since the first of them
    /// (default [`DEFAULT_AUTH_FAILURE_LIMIT`]; 0: no limit). One connection is closed after
    /// 3 failures regardless.
    pub auth_failure_limit: u32,
    /// See `auth_failure_limit` (default [`DEFAULT_AUTH_FAILURE_WINDOW`]).
    pub auth_failure_window: Duration,
    /// Pause before answering a failed AUTH (default [`DEFAULT_AUTH_FAILURE_DELAY`]).
    pub auth_failure_delay: Duration,
    /// Errors a session may make (syntax, sequence, denied recipients) before it is told
    /// `421 4.7.0` and closed (default [`DEFAULT_MAX_ERRORS`]).
    pub max_errors: u32,
    /// Bare CR or LF in a message: accept or refuse (default [`BareNewline::Normalize`]).
    pub bare_newline: BareNewline,
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
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_connection_rate_per_client: DEFAULT_MAX_CONNECTION_RATE_PER_CLIENT,
            limit_exempt_networks: None,
            max_session_time: DEFAULT_MAX_SESSION_TIME,
            min_data_rate: DEFAULT_MIN_DATA_RATE,
            data_rate_grace: DEFAULT_DATA_RATE_GRACE,
            auth_failure_limit: DEFAULT_AUTH_FAILURE_LIMIT,
            auth_failure_window: DEFAULT_AUTH_FAILURE_WINDOW,
            auth_failure_delay: DEFAULT_AUTH_FAILURE_DELAY,
            max_errors: DEFAULT_MAX_ERRORS,
            bare_newline: BareNewline::Normalize,
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
            .field("max_connections_per_client", &self.max_connections_per_client)
            .field("max_connection_rate_per_client", &self.max_connection_rate_per_client)
            .field("limit_exempt_networks", &self.limit_exempt_networks)
            .field("max_session_time", &self.max_session_time)
            .field("min_data_rate", &self.min_data_rate)
            .field("data_rate_grace", &self.data_rate_grace)
            .field("auth_failure_limit", &self.auth_failure_limit)
            .field("auth_failure_window", &self.auth_failure_window)
            .field("auth_failure_delay", &self.auth_failure_delay)
            .field("max_errors", &self.max_errors)
            .field("bare_newline", &self.bare_newline)
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

    /// Whether the per-address connection limits leave `ip` alone (see
    /// [`limit_exempt_networks`](Self::limit_exempt_networks)).
    pub fn limit_exempt(&self, ip: std::net::IpAddr) -> bool {
        match &self.limit_exempt_networks {
            None => self.relay_allowed(ip),
            Some(nets) => {
                let ip = ip.to_canonical();
                nets.iter().any(|net| net.contains(ip))
            }
        }
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
    /// Empty when the message is in `staged`.
    pub body: Vec<u8>,
    /// The message (same form as `body`) in a file from [`Spool::stage`], written as it
    /// arrived; set only when the spool offers staging.
    pub staged: Option<StagedBody>,
    /// `MAIL FROM:<..> REQUIRETLS` was given (only possible over TLS; RFC 8689 §4).
    pub requiretls: bool,
    /// The header block holds `TLS-Required: No` (RFC 8689 §5). When `requiretls` is also
    /// set, RFC 8689 says the header field is to be ignored; that decision is the queue's.
    pub tls_required_no: bool,
    /// `MAIL FROM:<..> SMTPUTF8` was given (RFC 6531): addresses and headers may hold UTF-8.
    pub smtputf8: bool,
    /// The client's address.
    pub client: SocketAddr,
    /// The message arrived over TLS (STARTTLS).
    pub tls: bool,
    /// The user name the client logged in as, if it used AUTH.
    pub authenticated_as: Option<String>,
    /// When the final dot was received.
    pub received_at: SystemTime,
}

/// A message the server wrote to a file from [`Spool::stage`] as it arrived.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct StagedBody {
    /// The file: complete, closed, not fsync'd. [`Spool::accept`] takes it over; when accept
    /// fails the server removes it if it is still there.
    pub path: PathBuf,
    /// Its length in bytes, the `Received:` line included.
    pub len: u64,
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

    /// A new empty file where the server writes a message as it arrives, so that no message
    /// is held in memory whole; it comes back in [`Submission::staged`]. `None` (the
    /// default): the spool takes messages in memory. Blocking; the server calls it off the
    /// async workers.
    fn stage(&self) -> Option<Result<(PathBuf, std::fs::File), String>> {
        None
    }
}
