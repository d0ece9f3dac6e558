//! The inbound server on Tokio: accept loop, connection caps (global and per address),
//! per-connection tasks with their time limits (idle, whole session, DATA transfer rate).
//!
//! Each connection runs [`drive`] over a plaintext `TcpStream`; if the client starts TLS,
//! `drive` hands the stream back and runs again over the `TlsStream`, so the two halves of a
//! session are different types and nothing read in plaintext can reach the TLS half (the
//! [`Session`] has already dropped it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::anvil::{Anvil, ClientSlot, InboundStats};
use super::hello::{self, Hello};
use super::protocol::{Action, PendingSubmission, Reply, Session};
use super::staging::{self, Sink};
use super::{InboundOptions, Spool, Submission};

/// Size of one read from a client.
const READ_CHUNK: usize = 16 * 1024;

/// Pause after a failed `accept` (such as running out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts SMTP connections on `listener` until `shutdown` becomes `true` (or its sender is
/// dropped), then stops accepting, tells idle clients `421 4.3.2`, and returns once every
/// connection has ended. A message already handed to the spool is always answered.
///
/// Connections beyond `options.max_connections` are told `421 4.7.0 too many connections`
/// and closed at once, as are those beyond the per-address limits.
pub async fn serve(
    listener: TcpListener,
    options: Arc<InboundOptions>,
    spool: Arc<dyn Spool>,
    shutdown: watch::Receiver<bool>,
) {
    serve_reloadable(
        listener,
        watch::channel(options).1,
        spool,
        Arc::new(Anvil::default()),
        shutdown,
    )
    .await;
}

/// [`serve`] with options that can be replaced while it runs (SIGHUP), and the per-address
/// state and counters in `anvil`, which the caller keeps (for `/metrics`). Each new connection
/// takes the options current when it is accepted; connections already open keep theirs.
/// `max_connections` is read once, at start.
pub async fn serve_reloadable(
    listener: TcpListener,
    options: watch::Receiver<Arc<InboundOptions>>,
    spool: Arc<dyn Spool>,
    anvil: Arc<Anvil>,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(options.borrow().max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            () = requested(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, client) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let options = options.borrow().clone();
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    refuse(&stream, &options, "too many connections");
                    InboundStats::count(&anvil.stats.refused_global);
                    tracing::warn!(%client, "connection refused: too many connections");
                    continue;
                };
                let client_slot = match anvil.connect(client.ip(), &options, Instant::now()) {
                    Ok(client_slot) => client_slot,
                    Err(refusal) => {
                        refuse(&stream, &options, refusal.text());
                        let counter = match refusal {
                            super::Refusal::TooManyConnections => &anvil.stats.refused_per_client,
                            super::Refusal::TooFast => &anvil.stats.refused_rate,
                        };
                        InboundStats::count(counter);
                        tracing::warn!(%client, reason = refusal.text(), "connection refused");
                        continue;
                    }
                };
                let connection = Connection {
                    options: options.clone(),
                    spool: spool.clone(),
                    anvil: anvil.clone(),
                    shutdown: shutdown.clone(),
                    client,
                    client_slot: Some(client_slot),
                    started: Instant::now(),
                    data_started: None,
                    auth_failures_seen: 0,
                    sink: Sink::Undecided,
                };
                let span = tracing::info_span!("inbound", %client);
                connections.spawn(
                    async move {
                        connection.run(stream).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
    }
    drop(listener);
    tracing::info!(connections = connections.len(), "inbound server stopping");
    while connections.join_next().await.is_some() {}
}

/// Resolves once shutdown is requested: the value is `true` or the sender is gone.
async fn requested(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Tells an over-the-cap client why it is being dropped, without waiting: a fresh socket's
/// send buffer is empty, so the write succeeds unless the client is already gone.
fn refuse(stream: &TcpStream, options: &InboundOptions, why: &str) {
    let mut out = Vec::new();
    Reply::status(421, (4, 7, 0), format!("{} {why}", options.hostname)).encode(&mut out);
    let _ = stream.try_write(&out);
}

struct Connection {
    options: Arc<InboundOptions>,
    spool: Arc<dyn Spool>,
    anvil: Arc<Anvil>,
    shutdown: watch::Receiver<bool>,
    client: SocketAddr,
    /// The address's place in the per-address count, given back before the socket closes
    /// (so a client that saw the close may connect again at once).
    client_slot: Option<ClientSlot>,
    /// When the connection was accepted (`max_session_time`).
    started: Instant,
    /// The number and start of the message in DATA (`min_data_rate`).
    data_started: Option<(u64, Instant)>,
    /// AUTH failures already paused for.
    auth_failures_seen: u32,
    /// Where the message in DATA goes as it arrives.
    sink: Sink,
}

/// Why the server ends a session on its own.
#[derive(Clone, Copy, Debug, Eq, Ord, PartialEq, PartialOrd)]
enum Expiry {
    Idle,
    Session,
    DataRate,
}

/// How [`drive`] ended.
enum Ended<S> {
    /// The connection is finished (closed by either side, timed out or failed).
    Closed,
    /// The client asked for TLS and the `220` has been sent: handshake on this stream.
    StartTls(S),
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        self.run_session(stream).await;
        // A message cut off mid-DATA leaves its staging file.
        if let Sink::File(staging) = std::mem::replace(&mut self.sink, Sink::Undecided) {
            staging.discard().await;
        }
    }

    async fn run_session(&mut self, stream: TcpStream) {
        tracing::debug!("connection accepted");
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let mut session =
            Session::new(self.options.clone(), self.client).with_anvil(self.anvil.clone());
        let Ended::StartTls(stream) = self.drive(stream, &mut session).await else {
            tracing::debug!("connection closed");
            return;
        };
        // The session offers STARTTLS only when a TLS configuration exists.
        let Some(config) = self.options.tls.clone() else {
            return;
        };
        let (handshake_deadline, _) = self.read_deadline(None);
        if let Hello::LegacyOnly(version) = first_hello(&stream, handshake_deadline).await {
            let version = hello::version_name(version);
            tracing::info!(
                %version,
                "tls handshake refused: the client offers only {version} or older; \
                 TLS 1.2 is the minimum (protocol_version alert sent)"
            );
            let mut stream = stream;
            let _ = stream.write_all(&hello::PROTOCOL_VERSION_ALERT).await;
            let _ = stream.shutdown().await;
            return;
        }
        let handshake = TlsAcceptor::from(config).accept(stream);
        let stream = match tokio::time::timeout_at(handshake_deadline.into(), handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::info!(%error, "tls handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!("tls handshake timed out");
                return;
            }
        };
        let (_, tls) = stream.get_ref();
        let description = format!(
            "{} {}",
            tls.protocol_version().and_then(|v| v.as_str()).unwrap_or("TLS"),
            tls.negotiated_cipher_suite().and_then(|s| s.suite().as_str()).unwrap_or("unknown"),
        );
        tracing::debug!(tls = %description, "tls established");
        session.tls_established(description);
        // A second STARTTLS is refused by the session, so this always ends Closed.
        let _ = self.drive(stream, &mut session).await;
        tracing::debug!("connection closed");
    }

    /// Runs the session over `stream` until it closes or asks for TLS. Replies queued while
    /// handling one read leave in one write.
    async fn drive<S>(&mut self, mut stream: S, session: &mut Session) -> Ended<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut out = Vec::new();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match session.next_action() {
                Action::Read => {
                    self.pause_after_auth_failure(session).await;
                    self.stream_body(session).await;
                    if !self.flush(&mut stream, session, &mut out).await {
                        return Ended::Closed;
                    }
                    let data_received = session.data_received();
                    let number = session.message_number();
                    self.data_started = match (data_received, self.data_started) {
                        (Some(_), Some((n, at))) if n == number => Some((n, at)),
                        (Some(_), _) => Some((number, Instant::now())),
                        (None, _) => None,
                    };
                    let (deadline, expiry) = self.read_deadline(data_received);
                    let read = if deadline <= Instant::now() {
                        Err(expiry)
                    } else {
                        tokio::select! {
                            read = tokio::time::timeout_at(deadline.into(), read_flushing(&mut stream, &mut buf)) => {
                                read.map_err(|_| expiry)
                            }
                            () = requested(&mut self.shutdown) => {
                                let reply = Reply::status(421, (4, 3, 2), "server shutting down");
                                self.close_with(&mut stream, reply).await;
                                return Ended::Closed;
                            }
                        }
                    };
                    match read {
                        Ok(Ok(0)) => return Ended::Closed,
                        Ok(Ok(n)) => session.receive(&buf[..n]),
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "read failed");
                            return Ended::Closed;
                        }
                        Err(expiry) => {
                            let reply = self.expired(expiry);
                            self.close_with(&mut stream, reply).await;
                            return Ended::Closed;
                        }
                    }
                }
                Action::StartTls { discarded } => {
                    if discarded > 0 {
                        tracing::warn!(discarded, "bytes pipelined after STARTTLS discarded");
                    }
                    if !self.flush(&mut stream, session, &mut out).await {
                        return Ended::Closed;
                    }
                    return Ended::StartTls(stream);
                }
                Action::Submit(pending) => {
                    self.data_started = None;
                    let rcpts = pending.rcpts().len();
                    let size = pending.size();
                    let Some(submission) = self.submission(*pending).await else {
                        session.submitted(&Err("the message could not be staged".to_owned()));
                        continue;
                    };
                    let staged = submission.staged.as_ref().map(|s| s.path.clone());
                    let result = self.spool.accept(submission).await;
                    if let (Err(_), Some(path)) = (&result, staged) {
                        staging::remove(path).await;
                    }
                    match &result {
                        Ok(queue_id) => {
                            tracing::info!(%queue_id, rcpts, size, "message accepted")
                        }
                        Err(reason) => {
                            tracing::warn!(%reason, rcpts, size, "spool refused message")
                        }
                    }
                    session.submitted(&result);
                }
                Action::Close => {
                    self.pause_after_auth_failure(session).await;
                    self.client_slot = None;
                    if self.flush(&mut stream, session, &mut out).await {
                        let _ = stream.shutdown().await;
                    }
                    return Ended::Closed;
                }
            }
        }
    }

    /// Moves the message in DATA, as far as it has arrived, to its staging file (opened once
    /// [`staging::STAGE_AFTER`] bytes have arrived, with the `Received:` line first); throws
    /// away the file of a message that ended without being submitted (refused for its size or
    /// content).
    async fn stream_body(&mut self, session: &mut Session) {
        let current = session.data_received().map(|_| session.message_number());
        // What was kept for a message that has ended without being submitted (refused at its
        // dot, perhaps with the next message begun in the same batch) goes.
        match &self.sink {
            Sink::File(staging) if Some(staging.message) != current => {
                if let Sink::File(staging) = std::mem::replace(&mut self.sink, Sink::Undecided) {
                    staging.discard().await;
                }
            }
            Sink::Failed(n) if Some(*n) != current => self.sink = Sink::Undecided,
            _ => {}
        }
        let Some(number) = current else { return };
        if matches!(self.sink, Sink::Undecided)
            && session.data_received().unwrap_or(0) < staging::STAGE_AFTER
        {
            return;
        }
        if matches!(self.sink, Sink::Undecided) {
            self.sink = Sink::open(&self.spool, number).await;
            if let Sink::File(staging) = &mut self.sink {
                let header = session.received_header(SystemTime::now()).unwrap_or_default();
                if let Err(error) = staging.write(header.as_bytes()).await {
                    self.staging_failed(error).await;
                }
            }
        }
        match &mut self.sink {
            Sink::Memory | Sink::Undecided => {}
            Sink::Failed(_) => drop(session.take_body()),
            Sink::File(staging) => {
                if let Err(error) = staging.write(&session.take_body()).await {
                    self.staging_failed(error).await;
                }
            }
        }
    }

    async fn staging_failed(&mut self, error: std::io::Error) {
        tracing::warn!(%error, "cannot write a message body to the spool");
        if let Sink::File(staging) = std::mem::replace(&mut self.sink, Sink::Undecided) {
            self.sink = Sink::Failed(staging.message);
            staging.discard().await;
        }
    }

    /// The complete message for the spool: its staging file finished with the last bytes,
    /// or in memory (a spool without staging, or a message that began and ended within one
    /// batch of input, so it is small). `None` if staging failed (the client is told `451`).
    async fn submission(&mut self, mut pending: PendingSubmission) -> Option<Submission> {
        let now = SystemTime::now();
        let number = pending.number();
        match std::mem::replace(&mut self.sink, Sink::Undecided) {
            Sink::Undecided => Some(pending.into_submission(now)),
            Sink::Memory => {
                self.sink = Sink::Memory;
                Some(pending.into_submission(now))
            }
            Sink::Failed(n) if n == number => None,
            Sink::Failed(_) => Some(pending.into_submission(now)),
            Sink::File(staging) if staging.message != number => {
                staging.discard().await;
                Some(pending.into_submission(now))
            }
            Sink::File(mut staging) => {
                if let Err(error) = staging.write(&pending.take_body()).await {
                    tracing::warn!(%error, "cannot write a message body to the spool");
                    staging.discard().await;
                    return None;
                }
                match staging.finish().await {
                    Ok(staged) => Some(pending.into_staged_submission(now, staged)),
                    Err((error, path)) => {
                        tracing::warn!(%error, "cannot write a message body to the spool");
                        staging::remove(path).await;
                        None
                    }
                }
            }
        }
    }

    /// When the next read must have come, and which limit that is: the idle timeout, the end
    /// of the session, or (in DATA, `received` bytes so far) the moment the average rate
    /// since the `354` falls below `min_data_rate` if nothing more arrives.
    fn read_deadline(&self, received: Option<u64>) -> (Instant, Expiry) {
        let o = &self.options;
        let mut deadline = (Instant::now() + o.idle_timeout, Expiry::Idle);
        if !o.max_session_time.is_zero() {
            deadline = deadline.min((self.started + o.max_session_time, Expiry::Session));
        }
        if let (Some(received), Some((_, started)), true) =
            (received, self.data_started, o.min_data_rate > 0)
        {
            let earned = Duration::from_secs_f64(received as f64 / f64::from(o.min_data_rate));
            deadline = deadline.min((started + o.data_rate_grace.max(earned), Expiry::DataRate));
        }
        deadline
    }

    /// Logs and counts a limit that ended the session, and gives the last reply.
    fn expired(&mut self, expiry: Expiry) -> Reply {
        let stats = &self.anvil.stats;
        self.client_slot = None;
        match expiry {
            Expiry::Idle => {
                tracing::info!("idle timeout");
                Reply::status(421, (4, 4, 2), "idle timeout")
            }
            Expiry::Session => {
                InboundStats::count(&stats.session_time_exceeded);
                tracing::info!(limit = ?self.options.max_session_time, "session time limit");
                Reply::status(421, (4, 7, 0), "session time limit reached, closing connection")
            }
            Expiry::DataRate => {
                InboundStats::count(&stats.data_too_slow);
                tracing::info!(min_rate = self.options.min_data_rate, "data transfer too slow");
                Reply::status(
                    421,
                    (4, 7, 0),
                    format!(
                        "message transfer too slow (below {} bytes/s), closing connection",
                        self.options.min_data_rate
                    ),
                )
            }
        }
    }

    /// Holds back the reply to a failed AUTH for `auth_failure_delay`, so guessing is slow
    /// even before the address is refused.
    async fn pause_after_auth_failure(&mut self, session: &Session) {
        let failures = session.auth_failures();
        if failures > self.auth_failures_seen {
            self.auth_failures_seen = failures;
            tokio::time::sleep(self.options.auth_failure_delay).await;
        }
    }

    /// Writes the queued replies in one write; false if the client is gone or stopped
    /// reading for longer than the idle timeout.
    async fn flush<S>(&self, stream: &mut S, session: &mut Session, out: &mut Vec<u8>) -> bool
    where
        S: AsyncWrite + Unpin,
    {
        out.clear();
        session.write_replies(out);
        if out.is_empty() {
            return true;
        }
        let write = async {
            stream.write_all(out).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.options.idle_timeout, write).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::debug!(%error, "write failed");
                false
            }
            Err(_) => {
                tracing::info!("write timed out");
                false
            }
        }
    }

    /// Sends a last reply and closes, giving up quietly if the client does not read it.
    async fn close_with<S>(&self, stream: &mut S, reply: Reply)
    where
        S: AsyncWrite + Unpin,
    {
        let mut out = Vec::new();
        reply.encode(&mut out);
        let close = async {
            stream.write_all(&out).await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1).min(self.options.idle_timeout), close)
            .await;
    }
}

/// Reads from `stream`; while no input is there, writes out whatever the TLS layer queued on
/// its own. Processing input can make rustls queue records that no reply carries: a TLS 1.2
/// renegotiation request is answered with a `no_renegotiation` alert, which tokio-rustls only
/// sends with the next write. A client waiting for that alert would otherwise wait until the
/// idle timeout. On a plain TCP stream, and with nothing queued, the flush does nothing.
async fn read_flushing<S>(stream: &mut S, buf: &mut [u8]) -> std::io::Result<usize>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| {
        let mut read = tokio::io::ReadBuf::new(&mut *buf);
        match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read) {
            std::task::Poll::Ready(result) => {
                std::task::Poll::Ready(result.map(|()| read.filled().len()))
            }
            std::task::Poll::Pending => match std::pin::Pin::new(&mut *stream).poll_flush(cx) {
                std::task::Poll::Ready(Err(error)) => std::task::Poll::Ready(Err(error)),
                _ => std::task::Poll::Pending,
            },
        }
    })
    .await
}

/// What the client's first TLS record, once it has arrived, says about its versions. One peek,
/// without consuming anything: a ClientHello from a legacy-only client is a few hundred bytes
/// and arrives in one segment; if it is not all there, or anything goes wrong, rustls gets the
/// stream as it is and judges it.
async fn first_hello(stream: &TcpStream, deadline: Instant) -> Hello {
    if tokio::time::timeout_at(deadline.into(), stream.readable()).await.is_err() {
        return Hello::Other;
    }
    let mut buf = [0u8; 2048];
    match stream.peek(&mut buf).await {
        Ok(n) => match hello::classify(&buf[..n]) {
            Hello::NeedMore => Hello::Other,
            verdict => verdict,
        },
        Err(_) => Hello::Other,
    }
}
