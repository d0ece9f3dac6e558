//! The fake MX: one accept loop per listener, one task per connection, playing a
//! [`Behaviour`] and logging a [`crate::transcript::ConnectionLog`].
//!
//! The STARTTLS switch follows research §1.1: read the `STARTTLS` line, record any bytes already
//! buffered behind it (the client pipelined; invariant I2) and discard them, write the scripted
//! reply, then hand the bare `TcpStream` to rustls or to a raw responder. Nothing read before
//! the handshake survives into the TLS phase.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span};

use crate::scenario::{Act, Behaviour, BodyAct, Responder, Upgrade};
use crate::smtp::{self, Body, BodyProgress, Command, Input, MAX_COMMAND_LINE};
use crate::transcript::{Event, Recorder, Transcripts};

/// Durations the fake servers use, scaled down in tests.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Timing {
    /// How long a tarpit holds the connection before closing it.
    pub tarpit: Duration,
    /// Pause between the parts of an [`Act::Split`].
    pub pause: Duration,
    /// Interval between bytes of an [`Act::Drip`].
    pub drip: Duration,
    /// Wait before an [`Act::Delay`] reply.
    pub delay: Duration,
    /// A connection idle this long is closed.
    pub idle: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            tarpit: Duration::from_secs(5),
            pause: Duration::from_millis(300),
            drip: Duration::from_millis(20),
            delay: Duration::from_secs(1),
            idle: Duration::from_secs(60),
        }
    }
}

impl Timing {
    /// Short durations for tests: a tarpit of one second.
    pub fn fast() -> Self {
        Self {
            tarpit: Duration::from_secs(1),
            pause: Duration::from_millis(100),
            drip: Duration::from_millis(2),
            delay: Duration::from_millis(200),
            idle: Duration::from_secs(10),
        }
    }
}

/// Everything one listening MX host needs.
#[derive(Clone, Debug)]
pub struct MxPlan {
    /// The scenario domain (transcript key).
    pub domain: String,
    /// The MX host name (`{host}` in replies, and the SNI expected).
    pub host: String,
    /// What to play.
    pub behaviour: Behaviour,
    /// The TLS configuration when `behaviour.upgrade` is [`Upgrade::Tls`].
    pub tls: Option<Arc<ServerConfig>>,
    /// Durations.
    pub timing: Timing,
}

/// Accepts connections on `listener` until `shutdown`, one tracked task per connection.
pub async fn run(
    listener: TcpListener,
    plan: Arc<MxPlan>,
    transcripts: Transcripts,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, host = %plan.host, "accept failed");
                    continue;
                }
            },
        };
        let recorder = transcripts.open(&plan.domain, &plan.host, peer);
        let plan = plan.clone();
        let shutdown = shutdown.clone();
        let span = info_span!("connection", host = %plan.host, %peer);
        tracker.spawn(
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    result = session(tcp, &plan, &recorder) => {
                        if let Err(error) = result {
                            debug!(%error, "session ended with an error");
                        }
                    }
                }
                recorder.record(Event::Closed);
            }
            .instrument(span),
        );
    }
}

static NONCE: AtomicU64 = AtomicU64::new(1);

/// The transaction and phase state of one connection.
#[derive(Debug, Default)]
struct State {
    greeted: bool,
    mail_from: Option<String>,
    rcpts: Vec<String>,
}

impl State {
    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }
}

/// Whether the dialogue goes on.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Flow {
    Continue,
    Closed,
}

/// How a plaintext dialogue ended.
enum Next {
    Done,
    Upgrade,
}

/// The byte streams a connection runs over: plain TCP or TLS over TCP.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
    fn tcp_mut(&mut self) -> &mut TcpStream;
    fn refresh_keys(&mut self) {}
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn tcp_mut(&mut self) -> &mut TcpStream {
        self
    }
}

impl Socket for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn tcp_mut(&mut self) -> &mut TcpStream {
        self.get_mut().0
    }
    fn refresh_keys(&mut self) {
        if let Err(error) = self.get_mut().1.refresh_traffic_keys() {
            debug!(%error, "key update refused");
        }
    }
}

/// One connection in one phase (plaintext or TLS).
struct Conn<'a, S> {
    io: S,
    input: Input,
    tls: bool,
    plan: &'a MxPlan,
    rec: &'a Recorder,
    nonce: u64,
    /// Set while the greeting is being written: bytes arriving then are early talk.
    greeting: bool,
}

impl<'a, S: Socket> Conn<'a, S> {
    fn new(io: S, tls: bool, plan: &'a MxPlan, rec: &'a Recorder, nonce: u64) -> Self {
        Self { io, input: Input::new(), tls, plan, rec, nonce, greeting: false }
    }

    fn expand(&self, text: &str) -> String {
        text.replace("{host}", &self.plan.host).replace("{nonce}", &self.nonce.to_string())
    }

    /// Reads more bytes; `Ok(false)` on EOF or when the connection stays idle too long.
    async fn fill(&mut self) -> io::Result<bool> {
        match tokio::time::timeout(self.plan.timing.idle, self.io.read_buf(self.input.buffer_mut()))
            .await
        {
            Ok(Ok(0)) | Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(error)) => Err(error),
        }
    }

    /// During a scripted greeting, before writing its next part: takes whatever the client
    /// already sent, without waiting, and records it as early talk (RFC 5321 §4.3.1). Never
    /// used after STARTTLS, where it could swallow the start of a ClientHello.
    async fn poll_early(&mut self) -> io::Result<()> {
        if !self.greeting {
            return Ok(());
        }
        let had = self.input.peek().len();
        if let Ok(result) =
            tokio::time::timeout(Duration::ZERO, self.io.read_buf(self.input.buffer_mut())).await
        {
            result?;
        }
        if had == 0 && !self.input.is_empty() {
            let bytes = String::from_utf8_lossy(self.input.peek()).into_owned();
            self.rec.record(Event::EarlyTalk { bytes });
        }
        Ok(())
    }

    async fn send(&mut self, text: &str) -> io::Result<()> {
        let text = self.expand(text);
        self.rec.record(Event::Sent { reply: text.clone(), tls: self.tls });
        if self.plan.behaviour.key_update && self.tls {
            self.io.refresh_keys();
        }
        self.io.write_all(text.as_bytes()).await?;
        self.io.flush().await
    }

    async fn close(&mut self) -> Flow {
        // Best effort: the peer may already be gone.
        let _ = self.io.shutdown().await;
        Flow::Closed
    }

    async fn perform(&mut self, act: &Act) -> io::Result<Flow> {
        let timing = self.plan.timing;
        match act {
            Act::Reply(text) => self.send(text).await?,
            Act::Split(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(timing.pause).await;
                        self.poll_early().await?;
                    }
                    self.send(part).await?;
                }
            }
            Act::Drip(text) => {
                let text = self.expand(text);
                self.rec.record(Event::Sent { reply: text.clone(), tls: self.tls });
                for (i, byte) in text.as_bytes().iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(timing.drip).await;
                        self.poll_early().await?;
                    }
                    self.io.write_all(std::slice::from_ref(byte)).await?;
                    self.io.flush().await?;
                }
            }
            Act::Delay(text) => {
                tokio::time::sleep(timing.delay).await;
                self.send(text).await?;
            }
            Act::ReplyClose(text) => {
                self.send(text).await?;
                return Ok(self.close().await);
            }
            Act::Close => return Ok(self.close().await),
            Act::Hangup => {
                let _ = self.io.tcp_mut().shutdown().await;
                return Ok(Flow::Closed);
            }
            Act::Reset => {
                self.io.tcp().set_zero_linger()?;
                return Ok(Flow::Closed);
            }
            Act::Tarpit => {
                tokio::time::sleep(timing.tarpit).await;
                return Ok(self.close().await);
            }
            Act::Hold => {
                // Whatever the client sends is read and dropped, so the connection ends (and
                // `Closed` is recorded) the moment the client gives up.
                let deadline = tokio::time::Instant::now() + timing.tarpit;
                loop {
                    let read = self.io.read_buf(self.input.buffer_mut());
                    match tokio::time::timeout_at(deadline, read).await {
                        Ok(Ok(0) | Err(_)) => return Ok(Flow::Closed),
                        Ok(Ok(_)) => drop(self.input.take_all()),
                        Err(_) => return Ok(self.close().await),
                    }
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// The next command line; `None` when the client is gone or broke the line limit.
    async fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.input.starts_like_tls() && !self.tls {
                self.rec.record(Event::ClientHelloInPlaintext);
                self.input.take_all();
                self.send("500 5.5.1 Error: TLS was not started\r\n").await?;
                self.close().await;
                return Ok(None);
            }
            match self.input.next_line(MAX_COMMAND_LINE) {
                Ok(Some(line)) => return Ok(Some(line)),
                Ok(None) => {}
                Err(error) => {
                    self.send(&format!("500 5.5.2 Error: {error}\r\n")).await?;
                    self.close().await;
                    return Ok(None);
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Plays the command dialogue until the client leaves, the script closes, or STARTTLS
    /// is accepted with an upgrade to perform.
    async fn dialogue(&mut self, state: &mut State) -> io::Result<Next> {
        let plan = self.plan;
        let behaviour = &plan.behaviour;
        while let Some(line) = self.next_line().await? {
            let text = String::from_utf8_lossy(&line).into_owned();
            self.rec.record(Event::Received { line: text, tls: self.tls });
            let flow = match Command::parse(&line) {
                Command::Ehlo(_) => {
                    let act = if self.tls { &behaviour.ehlo_tls } else { &behaviour.ehlo };
                    state.greeted |= act.is_positive();
                    state.reset_transaction();
                    self.perform(act).await?
                }
                Command::Helo(_) => {
                    state.greeted |= behaviour.helo.is_positive();
                    state.reset_transaction();
                    self.perform(&behaviour.helo).await?
                }
                Command::StartTls if self.tls => {
                    self.send("503 5.5.1 Error: TLS already active\r\n").await?;
                    Flow::Continue
                }
                Command::StartTls => {
                    if !self.input.is_empty() {
                        let bytes = String::from_utf8_lossy(&self.input.take_all()).into_owned();
                        self.rec.record(Event::PipelinedAfterStartTls { bytes });
                    }
                    let flow = self.perform(&behaviour.starttls).await?;
                    if flow == Flow::Continue
                        && behaviour.starttls.is_positive()
                        && behaviour.upgrade != Upgrade::Stay
                    {
                        return Ok(Next::Upgrade);
                    }
                    flow
                }
                Command::Mail { from, .. } => {
                    if !state.greeted {
                        self.send("503 5.5.1 Error: send HELO/EHLO first\r\n").await?;
                        Flow::Continue
                    } else {
                        if behaviour.mail.is_positive() {
                            state.reset_transaction();
                            state.mail_from = Some(from);
                        }
                        self.perform(&behaviour.mail).await?
                    }
                }
                Command::Rcpt { to, .. } => self.rcpt(state, to).await?,
                Command::Data => self.data(state).await?,
                Command::Rset => {
                    state.reset_transaction();
                    self.send("250 2.0.0 Ok\r\n").await?;
                    Flow::Continue
                }
                Command::Noop => {
                    self.send("250 2.0.0 Ok\r\n").await?;
                    Flow::Continue
                }
                Command::Quit => {
                    if self.perform(&behaviour.quit).await? == Flow::Continue {
                        self.close().await;
                    }
                    Flow::Closed
                }
                Command::Auth(_) => {
                    self.send("535 5.7.8 Error: authentication failed\r\n").await?;
                    Flow::Continue
                }
                Command::Bdat(_) => {
                    self.send("502 5.5.1 Error: CHUNKING not offered\r\n").await?;
                    Flow::Continue
                }
                Command::Unknown(_) => {
                    self.send("502 5.5.2 Error: command not recognized\r\n").await?;
                    Flow::Continue
                }
            };
            if flow == Flow::Closed {
                break;
            }
        }
        Ok(Next::Done)
    }

    async fn rcpt(&mut self, state: &mut State, to: String) -> io::Result<Flow> {
        let plan = self.plan;
        let behaviour = &plan.behaviour;
        if state.mail_from.is_none() {
            self.send("503 5.5.1 Error: need MAIL command\r\n").await?;
            return Ok(Flow::Continue);
        }
        if behaviour.rcpt_limit.is_some_and(|limit| state.rcpts.len() >= limit) {
            self.send("452 4.5.3 Error: too many recipients\r\n").await?;
            return Ok(Flow::Continue);
        }
        let local = smtp::local_part(&to);
        let act = behaviour
            .rcpt_rules
            .iter()
            .find(|(name, _)| *name == local)
            .map_or(&behaviour.rcpt, |(_, act)| act);
        if act.is_positive() {
            state.rcpts.push(to);
        }
        self.perform(act).await
    }

    async fn data(&mut self, state: &mut State) -> io::Result<Flow> {
        let plan = self.plan;
        let behaviour = &plan.behaviour;
        if state.mail_from.is_none() || state.rcpts.is_empty() {
            self.send("554 5.5.1 Error: no valid recipients\r\n").await?;
            return Ok(Flow::Continue);
        }
        let flow = self.perform(&behaviour.data).await?;
        let proceeds = behaviour.data.text().is_some_and(|t| t.starts_with('3'));
        if flow == Flow::Closed || !proceeds {
            return Ok(flow);
        }
        if behaviour.body == BodyAct::CloseMidway {
            while self.input.is_empty() {
                if !self.fill().await? {
                    return Ok(Flow::Closed);
                }
            }
            return Ok(self.close().await);
        }
        let mut body = Body::new();
        let (size, overflow) = loop {
            match body.feed(&mut self.input) {
                Ok(BodyProgress::Done { size, overflow }) => break (size, overflow),
                Ok(BodyProgress::More) => {}
                Err(error) => {
                    self.send(&format!("500 5.5.2 Error: {error}\r\n")).await?;
                    return Ok(self.close().await);
                }
            }
            if !self.fill().await? {
                return Ok(Flow::Closed);
            }
        };
        let mail_from = state.mail_from.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut state.rcpts);
        if overflow {
            self.send("552 5.3.4 Error: message too big\r\n").await?;
            return Ok(Flow::Continue);
        }
        if behaviour.dot.is_positive() {
            self.rec.record(Event::MessageAccepted {
                mail_from,
                rcpts,
                size,
                tls: self.tls,
                queue_id: format!("Q-{}", self.nonce),
            });
        }
        self.perform(&behaviour.dot).await
    }
}

async fn session(tcp: TcpStream, plan: &MxPlan, rec: &Recorder) -> io::Result<()> {
    let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn::new(tcp, false, plan, rec, nonce);
    conn.greeting = true;
    if conn.perform(&plan.behaviour.greeting).await? == Flow::Closed {
        return Ok(());
    }
    conn.greeting = false;
    let mut state = State::default();
    if let Next::Done = conn.dialogue(&mut state).await? {
        return Ok(());
    }
    // STARTTLS was accepted; the buffer was emptied (and logged) when the command was read.
    let tcp = conn.io;
    match (&plan.behaviour.upgrade, &plan.tls) {
        (Upgrade::Raw(responder), _) => respond(tcp, responder, plan, rec).await,
        (Upgrade::Tls { .. }, Some(config)) => {
            handshake(tcp, config.clone(), plan, rec, nonce, state).await
        }
        _ => Ok(()),
    }
}

async fn handshake(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    plan: &MxPlan,
    rec: &Recorder,
    nonce: u64,
    mut state: State,
) -> io::Result<()> {
    check_client_hello(&tcp, plan, rec).await?;
    let mut tcp = tcp;
    if let Some(text) = &plan.behaviour.inject_before_server_hello {
        let text = text.replace("{host}", &plan.host);
        rec.record(Event::Sent { reply: text.clone(), tls: false });
        tcp.write_all(text.as_bytes()).await?;
        tcp.flush().await?;
    }
    let accepted = tokio::time::timeout(
        plan.timing.idle,
        TlsAcceptor::from(config).accept(tcp).into_fallible(),
    )
    .await;
    let tls = match accepted {
        Err(_) => {
            rec.record(Event::TlsFailed("handshake timed out".to_owned()));
            return Ok(());
        }
        Ok(Err((error, tcp))) => {
            rec.record(Event::TlsFailed(error.to_string()));
            return drain_after_failure(tcp, plan, rec).await;
        }
        Ok(Ok(tls)) => tls,
    };
    let (_, session) = tls.get_ref();
    rec.record(Event::TlsEstablished {
        version: session.protocol_version().map_or_else(String::new, |v| format!("{v:?}")),
        cipher: session
            .negotiated_cipher_suite()
            .map_or_else(String::new, |c| format!("{:?}", c.suite())),
        sni: session.server_name().map(str::to_owned),
    });
    let mut conn = Conn::new(tls, true, plan, rec, nonce);
    if let Some(banner) = &plan.behaviour.tls_banner {
        conn.send(banner).await?;
    }
    state.greeted = false;
    state.reset_transaction();
    conn.dialogue(&mut state).await?;
    Ok(())
}

/// Records I2 evidence: the first bytes after the go-ahead must start a TLS handshake record.
async fn check_client_hello(tcp: &TcpStream, plan: &MxPlan, rec: &Recorder) -> io::Result<()> {
    let mut head = [0u8; 64];
    let peeked = tokio::time::timeout(plan.timing.idle, tcp.peek(&mut head)).await;
    if let Ok(Ok(n)) = peeked
        && n > 0
        && head[0] != 0x16
    {
        let bytes = String::from_utf8_lossy(&head[..n]).into_owned();
        rec.record(Event::NotClientHello { bytes });
    }
    Ok(())
}

/// Plays a raw responder after the go-ahead.
async fn respond(
    mut tcp: TcpStream,
    responder: &Responder,
    plan: &MxPlan,
    rec: &Recorder,
) -> io::Result<()> {
    check_client_hello(&tcp, plan, rec).await?;
    if !read_record(&mut tcp, plan).await? {
        rec.record(Event::TlsFailed("client closed before its ClientHello".to_owned()));
        return Ok(());
    }
    let (name, bytes): (&str, Vec<u8>) = match responder {
        Responder::Alert(description) => {
            ("fatal alert", vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, *description])
        }
        Responder::LegacyHello => ("TLS 1.0 ServerHello (RC4-SHA)", server_hello([0x03, 0x01])),
        Responder::UnofferedSuite => ("TLS 1.2 ServerHello (RC4-SHA)", server_hello([0x03, 0x03])),
        Responder::Plaintext(text) => {
            let text = text.replace("{host}", &plan.host);
            rec.record(Event::Sent { reply: text.clone(), tls: false });
            ("plaintext instead of TLS", text.into_bytes())
        }
        Responder::Silence => {
            rec.record(Event::TlsFailed("responder: silence".to_owned()));
            tokio::time::sleep(plan.timing.tarpit).await;
            let _ = tcp.shutdown().await;
            return Ok(());
        }
    };
    rec.record(Event::TlsFailed(format!("responder: {name}")));
    tcp.write_all(&bytes).await?;
    tcp.flush().await?;
    drain_after_failure(tcp, plan, rec).await
}

/// A ServerHello with the given record/legacy version choosing TLS_RSA_WITH_RC4_128_SHA.
fn server_hello(version: [u8; 2]) -> Vec<u8> {
    let mut out = vec![0x16, version[0], version[1], 0x00, 0x2a, 0x02, 0x00, 0x00, 0x26];
    out.extend_from_slice(&version);
    out.extend_from_slice(&[0x42; 32]);
    out.extend_from_slice(&[0x00, 0x00, 0x05, 0x00]);
    out
}

/// Reads one TLS record (header and body) so that closing later is a FIN, not an RST.
async fn read_record(tcp: &mut TcpStream, plan: &MxPlan) -> io::Result<bool> {
    let read = async {
        let mut header = [0u8; 5];
        tcp.read_exact(&mut header).await?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await?;
        io::Result::Ok(())
    };
    match tokio::time::timeout(plan.timing.idle, read).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Ok(Err(error)) => Err(error),
        Err(_) => Ok(false),
    }
}

/// After a failed handshake, reads until the client leaves. TLS records (alerts, encrypted
/// data) are skipped; anything else is logged as a received line, so invariant I5 can flag SMTP
/// sent on a connection whose TLS state is unknown.
async fn drain_after_failure(mut tcp: TcpStream, plan: &MxPlan, rec: &Recorder) -> io::Result<()> {
    let mut input = Input::new();
    loop {
        loop {
            let head = input.peek();
            if head.len() >= 5 && (20..=23).contains(&head[0]) && head[1] == 0x03 {
                let len = 5 + usize::from(u16::from_be_bytes([head[3], head[4]]));
                if head.len() < len {
                    break;
                }
                input.advance(len);
            } else if head.len() >= 5 || head.first().is_some_and(|b| !(20..=23).contains(b)) {
                match input.next_line(MAX_COMMAND_LINE) {
                    // Only printable lines count: the tail of a TLS record that rustls
                    // half-consumed is not an SMTP command.
                    Ok(Some(line))
                        if !line.is_empty() && line.iter().all(|b| (0x20..0x7f).contains(b)) =>
                    {
                        let line = String::from_utf8_lossy(&line).into_owned();
                        rec.record(Event::Received { line, tls: false });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => input.take_all().clear(),
                }
            } else {
                break;
            }
        }
        let read = tokio::time::timeout(plan.timing.idle, tcp.read_buf(input.buffer_mut())).await;
        match read {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}
