//! The inbound server on Tokio: accept loop, connection cap, per-connection tasks.
//!
//! Each connection runs [`drive`] over a plaintext `TcpStream`; if the client starts TLS,
//! `drive` hands the stream back and runs again over the `TlsStream`, so the two halves of a
//! session are different types and nothing read in plaintext can reach the TLS half (the
//! [`Session`] has already dropped it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::protocol::{Action, Reply, Session};
use super::{InboundOptions, Spool};

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
/// and closed at once.
pub async fn serve(
    listener: TcpListener,
    options: Arc<InboundOptions>,
    spool: Arc<dyn Spool>,
    shutdown: watch::Receiver<bool>,
) {
    serve_reloadable(listener, watch::channel(options).1, spool, shutdown).await;
}

/// [`serve`] with options that can be replaced while it runs (SIGHUP): each new connection
/// takes the options current when it is accepted; connections already open keep theirs.
/// `max_connections` is read once, at start.
pub async fn serve_reloadable(
    listener: TcpListener,
    options: watch::Receiver<Arc<InboundOptions>>,
    spool: Arc<dyn Spool>,
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
                    refuse(&stream, &options);
                    tracing::warn!(%client, "connection refused: too many connections");
                    continue;
                };
                let connection = Connection {
                    options: options.clone(),
                    spool: spool.clone(),
                    shutdown: shutdown.clone(),
                    client,
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
fn refuse(stream: &TcpStream, options: &InboundOptions) {
    let mut out = Vec::new();
    Reply::status(421, (4, 7, 0), format!("{} too many connections", options.hostname))
        .encode(&mut out);
    let _ = stream.try_write(&out);
}

struct Connection {
    options: Arc<InboundOptions>,
    spool: Arc<dyn Spool>,
    shutdown: watch::Receiver<bool>,
    client: SocketAddr,
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
        tracing::debug!("connection accepted");
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let mut session = Session::new(self.options.clone(), self.client);
        let Ended::StartTls(stream) = self.drive(stream, &mut session).await else {
            tracing::debug!("connection closed");
            return;
        };
        // The session offers STARTTLS only when a TLS configuration exists.
        let Some(config) = self.options.tls.clone() else {
            return;
        };
        let handshake = TlsAcceptor::from(config).accept(stream);
        let stream = match tokio::time::timeout(self.options.idle_timeout, handshake).await {
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
                    if !self.flush(&mut stream, session, &mut out).await {
                        return Ended::Closed;
                    }
                    let idle = self.options.idle_timeout;
                    let read = tokio::select! {
                        read = tokio::time::timeout(idle, stream.read(&mut buf)) => read,
                        () = requested(&mut self.shutdown) => {
                            let reply = Reply::status(421, (4, 3, 2), "server shutting down");
                            self.close_with(&mut stream, reply).await;
                            return Ended::Closed;
                        }
                    };
                    match read {
                        Ok(Ok(0)) => return Ended::Closed,
                        Ok(Ok(n)) => session.receive(&buf[..n]),
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "read failed");
                            return Ended::Closed;
                        }
                        Err(_) => {
                            tracing::info!("idle timeout");
                            let reply = Reply::status(421, (4, 4, 2), "idle timeout");
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
                    let rcpts = pending.rcpts().len();
                    let size = pending.size();
                    let submission = pending.into_submission(SystemTime::now());
                    let result = self.spool.accept(submission).await;
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
                    if self.flush(&mut stream, session, &mut out).await {
                        let _ = stream.shutdown().await;
                    }
                    return Ended::Closed;
                }
            }
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
