//! The SMTP client connection, with the STARTTLS upgrade as a change of type.
//!
//! `Client<TcpStream>` is a plaintext connection; [`Client::starttls`] consumes it and returns
//! a `Client<TlsStream<TcpStream>>` (or the refused plaintext client, or nothing at all when
//! the handshake failed: a connection whose handshake failed is never used again, invariant
//! I5). A mail transaction on a TLS client needs nothing more; on a plaintext client it needs a
//! [`PlaintextPermit`], which only a non-forced requirement can produce. So "MAIL in plaintext
//! under a TLS-required decision" cannot be written (invariant I1).
//!
//! After the `220` to STARTTLS, any byte already buffered is a response-injection attempt
//! (CVE-2011-0411 class, invariant I3): the connection is dropped, nothing buffered is ever
//! read as a reply. After the handshake the client forgets the pre-TLS capabilities and sends
//! EHLO again (invariant I4).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls::{CertJudge, CertVerdict, classify_handshake_error};
use crate::policy::{Failure, TlsLevel, TlsVersion};
use crate::smtp::{Capabilities, Command, DotStuffer, Reply, ReplyBuffer, ReplyError, Severity};

/// Per-stage timeouts (RFC 5321 §4.5.3.2 defaults; tests scale them down).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Waiting for the greeting.
    pub greeting: Duration,
    /// Any other command's reply (EHLO, STARTTLS, MAIL, RCPT, RSET, QUIT).
    pub command: Duration,
    /// The TLS handshake.
    pub tls_handshake: Duration,
    /// The reply to DATA.
    pub data_init: Duration,
    /// Sending one block of the message.
    pub data_block: Duration,
    /// The reply after the final dot.
    pub final_dot: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: min(5),
            command: min(5),
            tls_handshake: min(1),
            data_init: min(2),
            data_block: min(3),
            final_dot: min(10),
        }
    }
}

impl Timeouts {
    /// Every timeout set to `d` (tests).
    pub fn all(d: Duration) -> Self {
        Timeouts {
            connect: d,
            greeting: d,
            command: d,
            tls_handshake: d,
            data_init: d,
            data_block: d,
            final_dot: d,
        }
    }
}

/// Why a session step failed below the SMTP reply level.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The server did not answer in time.
    #[error("timed out waiting for {stage}")]
    Timeout {
        /// What we were waiting for.
        stage: &'static str,
    },
    /// The connection closed.
    #[error("connection closed during {stage}")]
    Closed {
        /// What we were doing.
        stage: &'static str,
    },
    /// A socket error.
    #[error("{stage}: {source}")]
    Io {
        /// What we were doing.
        stage: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The server's reply was malformed or too large.
    #[error("malformed reply during {stage}: {source}")]
    Protocol {
        /// What we were doing.
        stage: &'static str,
        /// The parse error.
        source: ReplyError,
    },
    /// A command could not be encoded (an address with control characters, say).
    #[error("cannot send {stage}: {reason}")]
    Command {
        /// Which command.
        stage: &'static str,
        /// Why.
        reason: String,
    },
}

impl SessionError {
    /// The contract failure class when this happens during the TLS step.
    pub fn as_tls_failure(&self) -> Failure {
        match self {
            SessionError::Timeout { stage } => Failure::Timeout(format!("waiting for {stage}")),
            SessionError::Closed { stage } => {
                Failure::ConnectionLost(format!("closed during {stage}"))
            }
            other => Failure::ConnectionLost(other.to_string()),
        }
    }
}

/// A connection to an SMTP server over `S` (a TCP stream, or TLS over it).
pub struct Client<S> {
    stream: S,
    replies: ReplyBuffer,
    peer: SocketAddr,
    timeouts: Timeouts,
    /// Capabilities from the last EHLO on this stream (empty after HELO).
    pub capabilities: Capabilities,
}

/// What [`Client::starttls`] turned into.
pub enum StartTls {
    /// TLS is up and EHLO was sent again.
    Upgraded(Box<Client<TlsStream<TcpStream>>>, TlsInfo),
    /// The server answered STARTTLS with something other than 220. The plaintext connection is
    /// intact (no handshake started).
    Refused {
        /// The server's answer.
        reply: Reply,
        /// The connection, still in plaintext.
        client: Box<Client<TcpStream>>,
    },
    /// The upgrade failed after the 220 or while waiting for it; the connection is gone.
    Failed(Failure),
}

/// What the TLS session looks like.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TlsInfo {
    /// Negotiated version.
    pub version: TlsVersion,
    /// Cipher suite name.
    pub cipher: String,
    /// Whether the certificate verified against the roots and the names of the requirement.
    pub verified: bool,
    /// Why it did not verify, when it did not (the failure class it maps to).
    pub verify_failure: Option<Failure>,
    /// The DNS names in the server's certificate.
    pub names: Vec<String>,
    /// How many certificates the server sent.
    pub chain_len: usize,
    /// The session was resumed (no certificate sent this time: the chain and verdict are
    /// those of the session, judged again now by the same requirement's rules).
    pub resumed: bool,
}

/// Proof that plaintext delivery is allowed: only the policy chain's verdict of `none` or
/// `may`, for a message without REQUIRETLS, yields one, and only inside this crate. Code
/// outside cannot make one, so it cannot send a plaintext transaction with this client:
///
/// ```compile_fail,E0624
/// use postwarden::delivery::client::PlaintextPermit;
/// // Minting a permit outside the crate does not compile, even from a real plan: the
/// // constructor is crate-private.
/// fn mint(plan: &postwarden::policy::Plan) -> Option<PlaintextPermit> {
///     PlaintextPermit::from_plan(plan, false)
/// }
/// ```
///
/// ```compile_fail,E0423
/// use postwarden::delivery::client::PlaintextPermit;
/// // Nor does building one by hand: its field is private.
/// let permit = PlaintextPermit(());
/// ```
#[derive(Debug)]
pub struct PlaintextPermit(());

impl PlaintextPermit {
    /// A permit, unless the plan's verdict forbids plaintext (a forced requirement, or a
    /// deferral) or the message carries REQUIRETLS.
    pub(crate) fn from_plan(plan: &crate::policy::Plan, requiretls: bool) -> Option<Self> {
        let requirement = plan.requirement()?;
        (requirement.level <= TlsLevel::May && !requiretls).then_some(PlaintextPermit(()))
    }
}

/// The envelope of one transaction.
#[derive(Clone, Debug)]
pub struct Envelope<'a> {
    /// Reverse-path, empty for the null sender.
    pub mail_from: &'a str,
    /// Recipients for this transaction.
    pub rcpts: &'a [String],
    /// Message size in bytes (for SIZE).
    pub size: u64,
    /// The body contains 8-bit data.
    pub eight_bit: bool,
    /// The message carries REQUIRETLS.
    pub requiretls: bool,
}

/// The server's verdict on each recipient of a transaction.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum RcptResult {
    /// Accepted and the message was taken (the final reply).
    Delivered(Reply),
    /// Temporarily refused (at RCPT, DATA or the final dot).
    Deferred(Reply),
    /// Permanently refused.
    Bounced(Reply),
}

impl Client<TcpStream> {
    /// Connects to `addr` (TCP_NODELAY: one write per command batch, no Nagle delays) and reads
    /// the greeting.
    pub async fn connect(
        addr: SocketAddr,
        timeouts: Timeouts,
    ) -> Result<(Self, Reply), SessionError> {
        let stream = tokio::time::timeout(timeouts.connect, TcpStream::connect(addr))
            .await
            .map_err(|_| SessionError::Timeout { stage: "connect" })?
            .map_err(|source| SessionError::Io { stage: "connect", source })?;
        stream.set_nodelay(true).map_err(|source| SessionError::Io { stage: "connect", source })?;
        let mut client = Client {
            stream,
            replies: ReplyBuffer::new(),
            peer: addr,
            timeouts,
            capabilities: Capabilities::default(),
        };
        let greeting = client.read_reply("greeting", timeouts.greeting).await?;
        Ok((client, greeting))
    }

    /// Sends STARTTLS and, on 220, performs the handshake with `config` for `server_name`,
    /// then EHLO again as `helo_name`.
    pub async fn starttls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls_pki_types::ServerName<'static>,
        judge: &CertJudge,
        helo_name: &str,
    ) -> StartTls {
        let reply = match self.command(&Command::StartTls, "STARTTLS", self.timeouts.command).await
        {
            Ok(reply) => reply,
            Err(e) => return StartTls::Failed(e.as_tls_failure()),
        };
        if reply.code() != 220 {
            return StartTls::Refused { reply, client: Box::new(self) };
        }
        if self.replies.pending() > 0 {
            // Bytes that arrived with the 220 were sent before the handshake, so anyone on the
            // path could have written them. Never read them as replies (CVE-2011-0411 class).
            return StartTls::Failed(Failure::HandshakeFailed(format!(
                "{} bytes arrived after the 220 to STARTTLS (response injection)",
                self.replies.pending()
            )));
        }
        let connector = tokio_rustls::TlsConnector::from(config);
        let handshake = connector.connect(server_name, self.stream);
        let tls = match tokio::time::timeout(self.timeouts.tls_handshake, handshake).await {
            Err(_) => return StartTls::Failed(Failure::Timeout("TLS handshake".to_owned())),
            Ok(Err(e)) => return StartTls::Failed(classify_handshake_error(&e)),
            Ok(Ok(tls)) => tls,
        };
        let (_, conn) = tls.get_ref();
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
            _ => TlsVersion::Tls12,
        };
        let cipher =
            conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let certs = conn.peer_certificates().unwrap_or_default();
        let (verified, verify_failure) = match judge.judge(certs) {
            CertVerdict::Verified => (true, None),
            CertVerdict::NotVerified(failure) => (false, Some(failure)),
        };
        let names = certs
            .first()
            .and_then(|leaf| webpki::EndEntityCert::try_from(leaf).ok())
            .map(|leaf| leaf.valid_dns_names().map(str::to_owned).collect())
            .unwrap_or_default();
        let chain_len = certs.len();
        let mut client = Client {
            stream: tls,
            replies: ReplyBuffer::new(),
            peer: self.peer,
            timeouts: self.timeouts,
            capabilities: Capabilities::default(),
        };
        match client.ehlo(helo_name).await {
            Ok(()) => StartTls::Upgraded(
                Box::new(client),
                TlsInfo { version, cipher, verified, verify_failure, names, chain_len, resumed },
            ),
            Err(e) => StartTls::Failed(e.as_tls_failure()),
        }
    }

    /// Runs a mail transaction in plaintext; requires a permit.
    pub async fn transaction_plaintext(
        &mut self,
        _permit: &PlaintextPermit,
        envelope: &Envelope<'_>,
        message: &[u8],
    ) -> Result<Vec<RcptResult>, SessionError> {
        self.transaction(envelope, message).await
    }
}

impl Client<TlsStream<TcpStream>> {
    /// Runs a mail transaction over TLS.
    pub async fn transaction_tls(
        &mut self,
        envelope: &Envelope<'_>,
        message: &[u8],
    ) -> Result<Vec<RcptResult>, SessionError> {
        self.transaction(envelope, message).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// EHLO (HELO when EHLO is refused permanently); sets [`Client::capabilities`].
    ///
    /// Only `250` is an answer to EHLO or HELO (RFC 5321 §4.3.2). Anything else that is not a
    /// refusal, such as an unsolicited `220` after the TLS handshake (HS-13) or a `354`, means
    /// the two sides no longer agree on the dialogue: continuing would read every later reply
    /// as the answer to the wrong command.
    pub async fn ehlo(&mut self, helo_name: &str) -> Result<(), SessionError> {
        let ehlo = Command::Ehlo(helo_name.to_owned());
        let reply = self.command(&ehlo, "EHLO", self.timeouts.command).await?;
        if reply.code() == 250 {
            self.capabilities = Capabilities::from_reply(&reply);
            return Ok(());
        }
        if reply.severity() == Severity::PermanentNegative {
            let helo = Command::Helo(helo_name.to_owned());
            let reply = self.command(&helo, "HELO", self.timeouts.command).await?;
            if reply.code() == 250 {
                self.capabilities = Capabilities::default();
                return Ok(());
            }
            return Err(SessionError::Command {
                stage: "HELO",
                reason: format!("refused: {}", reply.to_string().trim_end()),
            });
        }
        Err(SessionError::Command {
            stage: "EHLO",
            reason: format!("unexpected reply: {}", reply.to_string().trim_end()),
        })
    }

    /// RSET: a parked connection's check before it carries another transaction.
    pub async fn rset(&mut self) -> Result<(), SessionError> {
        let reply = self.command(&Command::Rset, "RSET", self.timeouts.command).await?;
        if reply.code() == 250 {
            return Ok(());
        }
        Err(SessionError::Command {
            stage: "RSET",
            reason: format!("refused: {}", reply.to_string().trim_end()),
        })
    }

    /// QUIT, ignoring the answer: the transaction's outcome is already known.
    pub async fn quit(mut self) {
        let _ = self
            .command(&Command::Quit, "QUIT", Duration::from_secs(5).min(self.timeouts.command))
            .await;
    }

    /// Sends one command and reads its reply.
    async fn command(
        &mut self,
        command: &Command,
        stage: &'static str,
        timeout: Duration,
    ) -> Result<Reply, SessionError> {
        let mut out = Vec::with_capacity(64);
        command
            .encode(&mut out)
            .map_err(|e| SessionError::Command { stage, reason: e.to_string() })?;
        self.write(&out, stage, timeout).await?;
        self.read_reply(stage, timeout).await
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let io = |source| SessionError::Io { stage, source };
        tokio::time::timeout(timeout, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| SessionError::Timeout { stage })?
        .map_err(io)
    }

    async fn read_reply(
        &mut self,
        stage: &'static str,
        timeout: Duration,
    ) -> Result<Reply, SessionError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(reply) = self
                .replies
                .next_reply()
                .map_err(|source| SessionError::Protocol { stage, source })?
            {
                return Ok(reply);
            }
            let room = self.replies.room().clamp(1, chunk.len());
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk[..room]))
                .await
                .map_err(|_| SessionError::Timeout { stage })?
                .map_err(|source| SessionError::Io { stage, source })?;
            if n == 0 {
                return Err(SessionError::Closed { stage });
            }
            self.replies
                .extend(&chunk[..n])
                .map_err(|source| SessionError::Protocol { stage, source })?;
        }
    }

    /// MAIL, RCPT..., DATA, message, final dot. With PIPELINING the envelope goes in one
    /// write (RFC 2920) and the replies are read in order.
    async fn transaction(
        &mut self,
        envelope: &Envelope<'_>,
        message: &[u8],
    ) -> Result<Vec<RcptResult>, SessionError> {
        let caps = &self.capabilities;
        if let Some(limit) = caps.size_limit()
            && envelope.size > limit
        {
            // RFC 1870: don't send what the server announced it will refuse; it is permanent.
            let text = format!(
                "552 5.3.4 message of {} bytes exceeds the server's SIZE {limit}\r\n",
                envelope.size
            );
            if let Some(reply) = synthetic(&text) {
                return Ok(envelope
                    .rcpts
                    .iter()
                    .map(|_| RcptResult::Bounced(reply.clone()))
                    .collect());
            }
        }
        let mail = Command::Mail {
            from: envelope.mail_from.to_owned(),
            size: caps.size.is_some().then_some(envelope.size),
            body_8bit: envelope.eight_bit && caps.eight_bit_mime,
            requiretls: envelope.requiretls && caps.requiretls,
        };
        let encode = |cmd: &Command, out: &mut Vec<u8>, stage| {
            cmd.encode(out).map_err(|e| SessionError::Command { stage, reason: e.to_string() })
        };
        let timeout = self.timeouts.command;
        let mut results: Vec<Option<RcptResult>> = vec![None; envelope.rcpts.len()];
        let mut accepted = Vec::new();
        let data_reply = if self.capabilities.pipelining {
            let mut out = Vec::with_capacity(64 * (envelope.rcpts.len() + 2));
            encode(&mail, &mut out, "MAIL")?;
            for rcpt in envelope.rcpts {
                encode(&Command::Rcpt { to: rcpt.clone() }, &mut out, "RCPT")?;
            }
            encode(&Command::Data, &mut out, "DATA")?;
            self.write(&out, "MAIL", timeout).await?;
            let mail_reply = self.read_reply("MAIL", timeout).await?;
            for (i, _) in envelope.rcpts.iter().enumerate() {
                let reply = self.read_reply("RCPT", timeout).await?;
                record_rcpt(&mut results, &mut accepted, i, reply, &mail_reply);
            }
            let data = self.read_reply("DATA", self.timeouts.data_init).await?;
            if mail_reply.severity() != Severity::PositiveCompletion {
                return Ok(fill(results, &mail_reply));
            }
            data
        } else {
            let mail_reply = self.command(&mail, "MAIL", timeout).await?;
            if mail_reply.severity() != Severity::PositiveCompletion {
                return Ok(fill(results, &mail_reply));
            }
            for (i, rcpt) in envelope.rcpts.iter().enumerate() {
                let reply =
                    self.command(&Command::Rcpt { to: rcpt.clone() }, "RCPT", timeout).await?;
                record_rcpt(&mut results, &mut accepted, i, reply, &mail_reply);
            }
            if accepted.is_empty() {
                let _ = self.command(&Command::Rset, "RSET", timeout).await;
                return Ok(results.into_iter().flatten().collect());
            }
            self.command(&Command::Data, "DATA", self.timeouts.data_init).await?
        };
        if accepted.is_empty() {
            if data_reply.code() == 354 {
                // A server that took pipelined DATA without recipients gets an empty message
                // it cannot deliver to anyone (RFC 2920 §3.1).
                self.write(b".\r\n", "final dot", timeout).await?;
                let _ = self.read_reply("final dot", self.timeouts.final_dot).await?;
            }
            let _ = self.command(&Command::Rset, "RSET", timeout).await;
            return Ok(results.into_iter().flatten().collect());
        }
        if data_reply.code() != 354 {
            return Ok(fill_accepted(results, &accepted, &data_reply));
        }
        let mut body = Vec::with_capacity(message.len() + message.len() / 64 + 8);
        let mut stuffer = DotStuffer::new();
        stuffer.encode(message, &mut body);
        stuffer.finish(&mut body);
        self.write(&body, "message", self.timeouts.data_block.max(self.timeouts.command)).await?;
        let final_reply = self.read_reply("final dot", self.timeouts.final_dot).await?;
        Ok(fill_accepted(results, &accepted, &final_reply))
    }
}

/// A reply of our own making (for outcomes decided without asking the server).
fn synthetic(text: &str) -> Option<Reply> {
    let mut buffer = ReplyBuffer::new();
    buffer.extend(text.as_bytes()).ok()?;
    buffer.next_reply().ok().flatten()
}

fn record_rcpt(
    results: &mut [Option<RcptResult>],
    accepted: &mut Vec<usize>,
    i: usize,
    reply: Reply,
    mail: &Reply,
) {
    if mail.severity() != Severity::PositiveCompletion {
        return;
    }
    results[i] = Some(match reply.severity() {
        Severity::PositiveCompletion => {
            accepted.push(i);
            return;
        }
        // A 3xx to RCPT makes no sense; treat it as a temporary failure of that recipient.
        Severity::TransientNegative | Severity::PositiveIntermediate => RcptResult::Deferred(reply),
        Severity::PermanentNegative => RcptResult::Bounced(reply),
    });
}

/// Every recipient gets the outcome of `reply` (a refused MAIL).
fn fill(results: Vec<Option<RcptResult>>, reply: &Reply) -> Vec<RcptResult> {
    results.into_iter().map(|_| verdict(reply)).collect()
}

/// Accepted recipients get the outcome of `reply`; the others keep theirs.
fn fill_accepted(
    mut results: Vec<Option<RcptResult>>,
    accepted: &[usize],
    reply: &Reply,
) -> Vec<RcptResult> {
    for &i in accepted {
        results[i] = Some(verdict(reply));
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| verdict(reply))).collect()
}

fn verdict(reply: &Reply) -> RcptResult {
    match reply.severity() {
        Severity::PositiveCompletion => RcptResult::Delivered(reply.clone()),
        Severity::TransientNegative | Severity::PositiveIntermediate => {
            RcptResult::Deferred(reply.clone())
        }
        Severity::PermanentNegative => RcptResult::Bounced(reply.clone()),
    }
}
