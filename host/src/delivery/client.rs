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
//!
//! Replies are counted exactly (invariant I9). One reply per command, and nothing else: before
//! every command or pipelined group, and before the message body, the client takes whatever the
//! server already sent; any byte there is a reply nobody asked for, and reading it as the
//! answer to the next command would shift every later reply by one (a `250` to RCPT taken for
//! the answer to DATA, so "delivered" with no body sent). Such a connection is out of step: the
//! transaction fails with [`SessionError::Desync`] (the caller defers or tries the next host) and
//! the connection is never reused. Only `354` to DATA leads to the body, and only the reply to
//! the final dot can deliver.

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
    /// The server sent bytes beyond the replies asked for: the dialogue is out of step, and the
    /// next reply read would answer the wrong command.
    #[error("{bytes} unexpected bytes from the server before {stage} (replies out of step)")]
    Desync {
        /// What we were about to send.
        stage: &'static str,
        /// How many unasked-for bytes were waiting.
        bytes: usize,
    },
    /// A well-formed reply that answers nothing we sent (a `250` or `334` to DATA, a `3xx` to the
    /// final dot): the two sides no longer agree on the dialogue.
    #[error("unexpected reply to {stage}: {reply}")]
    Unexpected {
        /// The command.
        stage: &'static str,
        /// The reply, as received.
        reply: String,
    },
    /// The server refused the session: EHLO answered 4xx, or EHLO and then HELO answered 5xx.
    /// Said inside TLS, this is the server's answer about this client (Postfix's `421 4.7.1 …
    /// No client certificate presented`, aiosmtpd's `421 4.3.2`), not a failure of TLS.
    #[error("{stage} refused: {}", .reply.to_string().trim_end())]
    Refused {
        /// The command refused.
        stage: &'static str,
        /// The server's reply.
        reply: Reply,
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

/// A 4xx or 5xx to a greeting command is a refusal; any other reply answers nothing we sent.
fn refusal_or_unexpected(stage: &'static str, reply: Reply) -> SessionError {
    match reply.severity() {
        Severity::TransientNegative | Severity::PermanentNegative => {
            SessionError::Refused { stage, reply }
        }
        _ => SessionError::Unexpected { stage, reply: reply.to_string().trim_end().to_owned() },
    }
}

/// A connection to an SMTP server over `S` (a TCP stream, or TLS over it).
pub struct Client<S> {
    stream: S,
    replies: ReplyBuffer,
    peer: SocketAddr,
    timeouts: Timeouts,
    /// Something went wrong on this connection (replies out of step, an unexpected reply, a
    /// refused RSET): it may finish what it was doing, but never carries another transaction.
    spoiled: bool,
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
    /// TLS is up, and the server refused the session inside it (EHLO answered 4xx, or EHLO
    /// and HELO 5xx). The host spoke TLS and then said no: its answer to be followed (another
    /// MX host, or defer or bounce by its reply), never a TLS failure that plaintext could
    /// route around. The connection is gone.
    RefusedInTls {
        /// The server's refusal.
        reply: Reply,
        /// The TLS session the refusal came in.
        info: TlsInfo,
    },
    /// TLS is up, but the server's replies inside it are out of step (an unsolicited line
    /// before or after the EHLO reply): an SMTP fault of that host, not a TLS failure for the
    /// policy to judge. The connection is gone.
    OutOfStep(SessionError),
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
    /// The sender asked for SMTPUTF8 (RFC 6531): `SMTPUTF8` goes with MAIL where offered.
    pub smtputf8: bool,
    /// The message cannot go without SMTPUTF8: it was asked for and an envelope address or a
    /// header field holds UTF-8. A server that does not offer it gets nothing: 5.6.7.
    pub needs_smtputf8: bool,
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
            spoiled: false,
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
            spoiled: false,
            capabilities: Capabilities::default(),
        };
        match client.ehlo(helo_name).await {
            Ok(()) => StartTls::Upgraded(
                Box::new(client),
                TlsInfo { version, cipher, verified, verify_failure, names, chain_len, resumed },
            ),
            Err(SessionError::Refused { reply, .. }) => StartTls::RefusedInTls {
                reply,
                info: TlsInfo {
                    version,
                    cipher,
                    verified,
                    verify_failure,
                    names,
                    chain_len,
                    resumed,
                },
            },
            Err(e @ (SessionError::Desync { .. } | SessionError::Unexpected { .. })) => {
                StartTls::OutOfStep(e)
            }
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
            // A line after the EHLO reply would be read as the answer to STARTTLS or MAIL.
            return self.expect_quiet("the command after EHLO").await;
        }
        if reply.severity() == Severity::PermanentNegative {
            let helo = Command::Helo(helo_name.to_owned());
            let reply = self.command(&helo, "HELO", self.timeouts.command).await?;
            if reply.code() == 250 {
                self.capabilities = Capabilities::default();
                return Ok(());
            }
            return Err(refusal_or_unexpected("HELO", reply));
        }
        Err(refusal_or_unexpected("EHLO", reply))
    }

    /// RSET: a parked connection's check before it carries another transaction.
    pub async fn rset(&mut self) -> Result<(), SessionError> {
        let reply = self.command(&Command::Rset, "RSET", self.timeouts.command).await?;
        if reply.code() == 250 {
            // A parked connection that answers RSET with more than one reply is out of step:
            // better a new connection than a transaction on it.
            return self.expect_quiet("the command after RSET").await;
        }
        self.spoiled = true;
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

    /// Whether the connection may carry another transaction: nothing went wrong on it and the
    /// server has sent nothing since its last reply (checked now, without waiting).
    pub async fn reusable(&mut self) -> bool {
        !self.spoiled && self.expect_quiet("reuse").await.is_ok()
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
        self.expect_quiet(stage).await?;
        self.write(&out, stage, timeout).await?;
        self.read_reply(stage, timeout).await
    }

    /// Fails unless the server has sent nothing beyond the replies already read: neither bytes
    /// left in the buffer after the last reply, nor bytes that have arrived since (taken without
    /// waiting). Called before anything is sent, so an extra line cannot be read as the answer
    /// to the next command. A connection that fails this is spoiled.
    async fn expect_quiet(&mut self, stage: &'static str) -> Result<(), SessionError> {
        if self.replies.pending() == 0 {
            let mut chunk = [0u8; 512];
            let stream = &mut self.stream;
            // Poll the stream once: `Pending` means nothing has arrived, and the read is dropped.
            let arrived = std::future::poll_fn(|cx| {
                let mut buf = tokio::io::ReadBuf::new(&mut chunk);
                match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                    std::task::Poll::Ready(result) => {
                        std::task::Poll::Ready(Some(result.map(|()| buf.filled().len())))
                    }
                    std::task::Poll::Pending => std::task::Poll::Ready(None),
                }
            })
            .await;
            match arrived {
                None => {}
                Some(Ok(0)) => {
                    self.spoiled = true;
                    return Err(SessionError::Closed { stage });
                }
                Some(Ok(n)) => {
                    // A full buffer is as much a desync as the bytes themselves.
                    let _ = self.replies.extend(&chunk[..n]);
                    self.spoiled = true;
                    return Err(SessionError::Desync { stage, bytes: n.max(1) });
                }
                Some(Err(source)) => {
                    self.spoiled = true;
                    return Err(SessionError::Io { stage, source });
                }
            }
        }
        match self.replies.pending() {
            0 => Ok(()),
            bytes => {
                self.spoiled = true;
                Err(SessionError::Desync { stage, bytes })
            }
        }
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
        // RFC 6152 §3: 8-bit data never goes to a server that does not offer 8BITMIME, and
        // the relay does not convert (ARCHITECTURE.md, "Message content"): permanent.
        if envelope.eight_bit
            && !caps.eight_bit_mime
            && let Some(reply) = synthetic(EIGHT_BIT_REFUSED)
        {
            return Ok(envelope.rcpts.iter().map(|_| RcptResult::Bounced(reply.clone())).collect());
        }
        // RFC 6531 §3.5: a message that needs SMTPUTF8 is not sent to a server without it (the
        // relay does not downgrade); permanent, as Postfix has it.
        if envelope.needs_smtputf8
            && !caps.smtputf8
            && let Some(reply) = synthetic(SMTPUTF8_REFUSED)
        {
            return Ok(envelope.rcpts.iter().map(|_| RcptResult::Bounced(reply.clone())).collect());
        }
        let mail = Command::Mail {
            from: envelope.mail_from.to_owned(),
            size: caps.size.is_some().then_some(envelope.size),
            body_8bit: envelope.eight_bit && caps.eight_bit_mime,
            requiretls: envelope.requiretls && caps.requiretls,
            smtputf8: envelope.smtputf8 && caps.smtputf8,
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
            self.expect_quiet("MAIL").await?;
            self.write(&out, "MAIL", timeout).await?;
            let mail_reply = self.read_reply("MAIL", timeout).await?;
            for (i, _) in envelope.rcpts.iter().enumerate() {
                let reply = self.read_reply("RCPT", timeout).await?;
                record_rcpt(&mut results, &mut accepted, i, reply, &mail_reply);
            }
            let data = self.read_reply("DATA", self.timeouts.data_init).await?;
            // Exactly one reply per command of the group (RFC 2920 §3.1): anything beyond them
            // means every reply above may answer another command than the one we think.
            self.expect_quiet("the message").await?;
            if mail_reply.severity() != Severity::PositiveCompletion {
                // A server that answered DATA with 354 anyway now waits for a body that never
                // comes: that connection carries nothing more.
                self.spoiled |= data.code() == 354;
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
                self.reset_after_refusal(timeout).await;
                return Ok(results.into_iter().flatten().collect());
            }
            let data = self.command(&Command::Data, "DATA", self.timeouts.data_init).await?;
            self.expect_quiet("the message").await?;
            data
        };
        if accepted.is_empty() {
            if data_reply.code() == 354 {
                // A server that took pipelined DATA without recipients gets an empty message
                // it cannot deliver to anyone (RFC 2920 §3.1).
                self.write(b".\r\n", "final dot", timeout).await?;
                let _ = self.read_reply("final dot", self.timeouts.final_dot).await?;
            }
            self.reset_after_refusal(timeout).await;
            return Ok(results.into_iter().flatten().collect());
        }
        match data_reply.severity() {
            _ if data_reply.code() == 354 => {}
            Severity::TransientNegative | Severity::PermanentNegative => {
                return Ok(fill_accepted(results, &accepted, &data_reply));
            }
            // Only 354 leads to the body. A 2xx or another 3xx answers no DATA: taking it for
            // success would record a delivery of a message that was never sent.
            Severity::PositiveCompletion | Severity::PositiveIntermediate => {
                self.spoiled = true;
                return Err(SessionError::Unexpected {
                    stage: "DATA",
                    reply: data_reply.to_string().trim_end().to_owned(),
                });
            }
        }
        let mut body = Vec::with_capacity(message.len() + message.len() / 64 + 8);
        let mut stuffer = DotStuffer::new();
        stuffer.encode(message, &mut body);
        stuffer.finish(&mut body);
        self.write(&body, "message", self.timeouts.data_block.max(self.timeouts.command)).await?;
        let final_reply = self.read_reply("final dot", self.timeouts.final_dot).await?;
        if self.replies.pending() > 0 {
            // The outcome stands (the server answered the dot), but the connection is out of
            // step: it carries nothing more.
            self.spoiled = true;
        }
        match final_reply.severity() {
            Severity::PositiveCompletion => {
                for &i in &accepted {
                    results[i] = Some(RcptResult::Delivered(final_reply.clone()));
                }
                Ok(results
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| refusal(&final_reply)))
                    .collect())
            }
            Severity::TransientNegative | Severity::PermanentNegative => {
                Ok(fill_accepted(results, &accepted, &final_reply))
            }
            Severity::PositiveIntermediate => {
                self.spoiled = true;
                Err(SessionError::Unexpected {
                    stage: "final dot",
                    reply: final_reply.to_string().trim_end().to_owned(),
                })
            }
        }
    }

    /// RSET after a transaction with no recipient left; a connection that does not take it
    /// cleanly is not reused.
    async fn reset_after_refusal(&mut self, timeout: Duration) {
        let clean = matches!(
            self.command(&Command::Rset, "RSET", timeout).await,
            Ok(reply) if reply.code() == 250
        );
        self.spoiled |= !clean;
    }
}

/// The outcome of an 8-bit message for a next hop without 8BITMIME (RFC 3463 5.6.3:
/// "conversion required but not supported").
const EIGHT_BIT_REFUSED: &str =
    "554 5.6.3 message has 8-bit content and the server does not offer 8BITMIME\r\n";

const SMTPUTF8_REFUSED: &str =
    "553 5.6.7 SMTPUTF8 is required, but was not offered by the server\r\n";

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
    results.into_iter().map(|_| refusal(reply)).collect()
}

/// Accepted recipients get the refusal in `reply` (to DATA or the final dot); the others keep
/// theirs.
fn fill_accepted(
    mut results: Vec<Option<RcptResult>>,
    accepted: &[usize],
    reply: &Reply,
) -> Vec<RcptResult> {
    for &i in accepted {
        results[i] = Some(refusal(reply));
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| refusal(reply))).collect()
}

/// The outcome of a reply that did not deliver: 5xx bounces, anything else defers. Never
/// `Delivered`: only the reply to the final dot delivers, and it is built there.
fn refusal(reply: &Reply) -> RcptResult {
    match reply.severity() {
        Severity::PermanentNegative => RcptResult::Bounced(reply.clone()),
        Severity::PositiveCompletion
        | Severity::TransientNegative
        | Severity::PositiveIntermediate => RcptResult::Deferred(reply.clone()),
    }
}

#[cfg(test)]
mod tests {
    //! The transaction against a scripted server over an in-memory pipe: each command line the
    //! server reads is answered with the next chunk of the script (zero, one or several
    //! replies), and the server records what a delivery really needs (invariant I9).

    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    use super::*;

    const MESSAGE: &[u8] = b"Subject: t\r\n\r\nhello\r\n.dot\r\n";

    /// What the server saw: the replies it sent to a final dot that ended a body it had asked
    /// for with `354` (the only replies that may deliver).
    #[derive(Debug, Default)]
    struct Truth {
        dot_replies: Vec<String>,
    }

    /// Plays `script`, one chunk per command line (and one for the final dot), then closes.
    ///
    /// Like Postfix's smtpd, it holds its replies while pipelined input is waiting and writes
    /// them when it has nothing left to read (RFC 2920 §3.2 lets a server batch them), so what
    /// reaches the client in one read does not depend on scheduling.
    async fn server(io: DuplexStream, mut script: Vec<Vec<String>>) -> Truth {
        script.reverse();
        let (read, mut write) = tokio::io::split(io);
        let mut read = BufReader::new(read);
        let mut truth = Truth::default();
        let mut out = Vec::new();
        let mut line = Vec::new();
        let mut body: Option<Vec<u8>> = None;
        loop {
            if read.buffer().is_empty() && !out.is_empty() {
                if write.write_all(&out).await.is_err() {
                    return truth;
                }
                out.clear();
            }
            line.clear();
            if read.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return truth;
            }
            if let Some(received) = &mut body {
                if line != b".\r\n" {
                    received.extend_from_slice(&line);
                    continue;
                }
                // The body, up to the final dot, must be the whole message, dot-stuffed.
                let whole = received == b"Subject: t\r\n\r\nhello\r\n..dot\r\n";
                body = None;
                let Some(chunk) = script.pop() else { return truth };
                if whole && let Some(first) = chunk.first() {
                    truth.dot_replies.push(first.trim_end().to_owned());
                }
                out.extend_from_slice(chunk.concat().as_bytes());
                continue;
            }
            let Some(chunk) = script.pop() else { return truth };
            // The server's own view: its reply to DATA is the first of the chunk.
            if line.eq_ignore_ascii_case(b"DATA\r\n")
                && chunk.first().is_some_and(|r| r.starts_with("354"))
            {
                body = Some(Vec::new());
            }
            out.extend_from_slice(chunk.concat().as_bytes());
        }
    }

    /// Runs one transaction for `rcpts` against `script` (on a paused clock, so a script that
    /// falls silent costs a timeout of virtual time).
    fn run(
        pipelining: bool,
        rcpts: usize,
        script: Vec<Vec<String>>,
    ) -> (Result<Vec<RcptResult>, SessionError>, Truth, bool) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(server(theirs, script));
            let mut client = Client {
                stream: ours,
                replies: ReplyBuffer::new(),
                peer: "192.0.2.1:25".parse().unwrap(),
                timeouts: Timeouts::all(Duration::from_secs(10)),
                spoiled: false,
                capabilities: Capabilities { pipelining, ..Capabilities::default() },
            };
            let rcpts: Vec<String> = (0..rcpts).map(|i| format!("r{i}@example.test")).collect();
            let envelope = Envelope {
                mail_from: "s@example.test",
                rcpts: &rcpts,
                size: MESSAGE.len() as u64,
                eight_bit: false,
                requiretls: false,
                smtputf8: false,
                needs_smtputf8: false,
            };
            let result = client.transaction(&envelope, MESSAGE).await;
            let reusable = client.reusable().await;
            drop(client);
            (result, server.await.unwrap(), reusable)
        })
    }

    fn chunks(replies: &[&[&str]]) -> Vec<Vec<String>> {
        replies.iter().map(|c| c.iter().map(|r| format!("{r}\r\n")).collect()).collect()
    }

    fn delivered(result: &Result<Vec<RcptResult>, SessionError>) -> Vec<String> {
        match result {
            Ok(results) => results
                .iter()
                .filter_map(|r| match r {
                    RcptResult::Delivered(reply) => Some(reply.to_string().trim_end().to_owned()),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn a_2xx_or_3xx_to_data_is_a_protocol_error_not_a_delivery() {
        for pipelining in [false, true] {
            for reply in ["250 2.0.0 pretend", "334 what", "352 close to 354"] {
                let script = chunks(&[&["250 ok"], &["250 ok"], &[reply], &["250 queued"]]);
                let (result, truth, reusable) = run(pipelining, 1, script);
                assert!(
                    matches!(&result, Err(SessionError::Unexpected { stage: "DATA", .. })),
                    "{reply} (pipelining {pipelining}): {result:?}"
                );
                assert!(truth.dot_replies.is_empty() && !reusable);
            }
        }
    }

    #[test]
    fn a_refusal_of_data_fails_the_transaction_per_its_reply() {
        let script = chunks(&[&["250 ok"], &["250 ok"], &["451 4.3.0 later"]]);
        let (result, _, reusable) = run(true, 1, script);
        assert!(matches!(&result.unwrap()[..], [RcptResult::Deferred(r)] if r.code() == 451));
        assert!(reusable, "a clean refusal leaves the connection in step");
        let script = chunks(&[&["250 ok"], &["250 ok"], &["554 5.7.1 no"]]);
        let (result, _, _) = run(false, 1, script);
        assert!(matches!(&result.unwrap()[..], [RcptResult::Bounced(r)] if r.code() == 554));
    }

    /// One extra line anywhere shifts every later reply: each position is caught before the
    /// next command (lock-step) or after the group (pipelining), and nothing is delivered.
    #[test]
    fn one_unsolicited_line_anywhere_is_a_desync() {
        let extra = "250 2.0.0 extra";
        let cases: [(&str, Vec<Vec<String>>); 3] = [
            ("after MAIL", chunks(&[&["250 ok", extra], &["250 ok"], &["354 go"], &["250 q"]])),
            ("after RCPT", chunks(&[&["250 ok"], &["250 ok", extra], &["354 go"], &["250 q"]])),
            ("after 354", chunks(&[&["250 ok"], &["250 ok"], &["354 go", extra], &["250 q"]])),
        ];
        for (place, script) in cases {
            for pipelining in [false, true] {
                let (result, truth, reusable) = run(pipelining, 1, script.clone());
                assert!(delivered(&result).is_empty(), "{place}: {result:?}");
                assert!(
                    matches!(
                        &result,
                        Err(SessionError::Desync { .. } | SessionError::Unexpected { .. })
                    ),
                    "{place} (pipelining {pipelining}): {result:?}"
                );
                assert!(truth.dot_replies.is_empty() && !reusable, "{place}");
            }
        }
    }

    #[test]
    fn an_extra_line_after_the_final_reply_delivers_but_spoils_the_connection() {
        let script = chunks(&[&["250 ok"], &["250 ok"], &["354 go"], &["250 queued", "250 x"]]);
        let (result, truth, reusable) = run(true, 1, script);
        assert_eq!(delivered(&result), ["250 queued"]);
        assert_eq!(truth.dot_replies, ["250 queued"]);
        assert!(!reusable, "a connection out of step was offered for reuse");
    }

    #[test]
    fn a_parked_connection_answering_rset_twice_is_not_used() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (ours, theirs) = tokio::io::duplex(4096);
            let server =
                tokio::spawn(server(theirs, chunks(&[&["250 2.0.0 Ok", "250 2.0.0 extra"]])));
            let mut client = Client {
                stream: ours,
                replies: ReplyBuffer::new(),
                peer: "192.0.2.1:25".parse().unwrap(),
                timeouts: Timeouts::all(Duration::from_secs(10)),
                spoiled: false,
                capabilities: Capabilities::default(),
            };
            let rset = client.rset().await;
            assert!(matches!(rset, Err(SessionError::Desync { .. })), "{rset:?}");
            assert!(!client.reusable().await);
            drop(client);
            server.await.unwrap();
        });
    }

    fn reply() -> impl Strategy<Value = String> {
        // Weighted towards what a transaction expects, so that shifted replies line up often.
        let codes = prop_oneof![
            6 => Just(250u16),
            3 => Just(354u16),
            2 => prop::sample::select(vec![
                220u16, 221, 251, 252, 334, 421, 451, 452, 550, 552, 554,
            ]),
        ];
        (codes, any::<bool>(), 0u32..1000).prop_map(|(code, multi, tag)| {
            if multi {
                format!("{code}-first {tag}\r\n{code} r{tag}\r\n")
            } else {
                format!("{code} r{tag}\r\n")
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// I9: whatever the server sends, a recipient is delivered only on the reply the
        /// server gave to the final dot of a body it asked for with 354 and received whole.
        #[test]
        fn never_delivered_unless_the_server_took_the_whole_body(
            pipelining in any::<bool>(),
            rcpts in 1usize..4,
            // One to three replies per command: a server that omits one reply and adds
            // another in the same pipelined group is, on the wire, a correct server (the
            // client cannot tell), and one that omits a reply in lock-step times out.
            script in prop::collection::vec(prop::collection::vec(reply(), 1..4), 0..9),
        ) {
            let (result, truth, _) = run(pipelining, rcpts, script);
            for reply in delivered(&result) {
                let last = reply.lines().last().unwrap_or_default().to_owned();
                prop_assert!(
                    truth.dot_replies.iter().any(|r| r.lines().last() == Some(last.as_str())),
                    "delivered on {reply:?}, but the server's replies to a whole body were {:?}",
                    truth.dot_replies
                );
            }
        }
    }
}

#[cfg(test)]
mod eight_bit_tests {
    use super::*;
    use tokio::net::TcpListener;

    /// RFC 6152 §3: an 8-bit message for a server that does not offer 8BITMIME bounces with
    /// 5.6.3 before MAIL is sent; a 7-bit one goes through the same server.
    #[tokio::test]
    async fn eight_bit_content_is_not_sent_to_a_server_without_8bitmime() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.write_all(b"220 old ESMTP\r\n").await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    return String::from_utf8(seen).unwrap();
                }
                seen.extend_from_slice(&buf[..n]);
                let reply: &[u8] = if seen.ends_with(b"EHLO relay.test\r\n") {
                    b"250-old\r\n250 PIPELINING\r\n"
                } else if seen.ends_with(b"DATA\r\n") {
                    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"
                } else if seen.ends_with(b"\r\n.\r\n") {
                    b"250 2.0.0 taken\r\n"
                } else {
                    continue;
                };
                socket.write_all(reply).await.unwrap();
            }
        });
        let (mut client, _) = Client::connect(addr, Timeouts::default()).await.unwrap();
        client.ehlo("relay.test").await.unwrap();
        // A test inside the module: the permit is minted directly (crate code goes through a plan).
        let permit = PlaintextPermit(());
        let rcpts = vec!["x@example.net".to_owned()];
        let mut envelope = Envelope {
            mail_from: "a@example.test",
            rcpts: &rcpts,
            size: 20,
            eight_bit: true,
            requiretls: false,
            smtputf8: false,
            needs_smtputf8: false,
        };
        let results = client
            .transaction_plaintext(&permit, &envelope, "Subject: \u{e9}\r\n\r\n".as_bytes())
            .await
            .unwrap();
        let [RcptResult::Bounced(reply)] = results.as_slice() else { panic!("{results:?}") };
        assert_eq!(reply.code(), 554);
        assert_eq!(reply.enhanced().map(|e| e.to_string()).as_deref(), Some("5.6.3"));

        envelope.eight_bit = false;
        let results =
            client.transaction_plaintext(&permit, &envelope, b"Subject: e\r\n\r\n").await.unwrap();
        assert!(matches!(results.as_slice(), [RcptResult::Delivered(_)]), "{results:?}");
        drop(client);
        let seen = server.await.unwrap();
        assert_eq!(seen.matches("MAIL FROM").count(), 1, "{seen}");
        assert!(seen.is_ascii(), "{seen}");
    }
}
