//! The MTA-STS policy host: one HTTPS listener on 127.0.0.1 answering for every
//! `mta-sts.<domain>` of the fleet's [`StsTable`] (RFC 8461 §3.3).
//!
//! The ClientHello's SNI names the domain; its [`HttpsKnobs`] pick the certificate and the
//! answer. No SNI, or a name the table does not serve, ends the connection before the
//! handshake. One request per connection, read up to the end of its head (bodies are never
//! read), answered with `Connection: close`. Each connection is logged in the domain's
//! transcript as a [`Service::MtaStsHttps`] connection, so tests can count fetches.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span};

use crate::sts::{Framing, HttpsKnobs, StsTable, WELL_KNOWN_PATH};
use crate::transcript::{Event, Recorder, Service, Transcripts};

/// The largest request head read; a longer one is answered 431.
const MAX_HEAD: usize = 16 * 1024;

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` until `shutdown`, one tracked task per connection.
pub async fn run(
    listener: TcpListener,
    table: StsTable,
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
                    debug!(%error, "sts https accept failed");
                    continue;
                }
            },
        };
        let (table, transcripts, shutdown) = (table.clone(), transcripts.clone(), shutdown.clone());
        let span = info_span!("sts_connection", %peer);
        tracker.spawn(
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = connection(tcp, peer, &table, &transcripts) => {}
                }
            }
            .instrument(span),
        );
    }
}

/// One connection: SNI, handshake, request head, answer. Logs `Closed` when it ends, however
/// it ends (also when the fleet shuts down mid-delay: the guard logs on drop).
async fn connection(tcp: TcpStream, peer: SocketAddr, table: &StsTable, transcripts: &Transcripts) {
    let start = match LazyConfigAcceptor::new(Acceptor::default(), tcp).await {
        Ok(start) => start,
        Err(error) => {
            debug!(%error, "no client hello");
            return;
        }
    };
    let sni = start.client_hello().server_name().map(str::to_ascii_lowercase);
    let Some(domain) = sni.as_deref().and_then(|s| s.strip_prefix("mta-sts.")).map(str::to_owned)
    else {
        debug!(?sni, "client hello without an mta-sts name");
        return;
    };
    let Some(config) = table.entry(&domain).and_then(|e| e.tls) else {
        debug!(%domain, "no mta-sts host for this name");
        return;
    };
    let host = format!("mta-sts.{domain}");
    let rec = Closing(transcripts.open_service(&domain, &host, Service::MtaStsHttps, peer));
    let mut tls = match start.into_stream(config).await {
        Ok(tls) => tls,
        Err(error) => {
            rec.0.record(Event::TlsFailed(error.to_string()));
            return;
        }
    };
    let (_, session) = tls.get_ref();
    rec.0.record(Event::TlsEstablished {
        version: session.protocol_version().map_or_else(String::new, |v| format!("{v:?}")),
        cipher: session
            .negotiated_cipher_suite()
            .map_or_else(String::new, |c| format!("{:?}", c.suite())),
        sni: session.server_name().map(str::to_owned),
    });
    if let Err(error) = exchange(&mut tls, &domain, table, &rec.0).await {
        debug!(%error, "sts https exchange ended with an error");
    }
}

/// Reads the request head and answers it as the domain's knobs say, read afresh now.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    domain: &str,
    table: &StsTable,
    rec: &Recorder,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let Some(head) = head else {
        let (status, body) = (431, b"request head too large\n".to_vec());
        return respond(stream, rec, &error_knobs(status, body)).await;
    };
    let request = parse_head(&head);
    rec.record(Event::HttpRequest {
        method: request.method.clone(),
        target: request.target.clone(),
        host: request.host.clone(),
    });
    let Some(knobs) = table.knobs(domain).and_then(|k| k.https) else {
        return Ok(());
    };
    if !knobs.delay.is_zero() {
        tokio::time::sleep(knobs.delay).await;
    }
    if knobs.close_without_reply {
        return stream.shutdown().await;
    }
    let path = request.target.split('?').next().unwrap_or_default();
    if path != WELL_KNOWN_PATH {
        return respond(stream, rec, &error_knobs(404, b"not found\n".to_vec())).await;
    }
    if request.method != "GET" {
        return respond(stream, rec, &error_knobs(405, b"method not allowed\n".to_vec())).await;
    }
    respond(stream, rec, &knobs).await
}

/// Logs `Closed` when the connection task ends, however it ends.
struct Closing(Recorder);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.record(Event::Closed);
    }
}

/// The parts of a request head the responder looks at.
#[derive(Debug, Default, Eq, PartialEq)]
struct RequestHead {
    method: String,
    target: String,
    host: Option<String>,
}

/// Reads until the blank line ending the head; `None` when it exceeds [`MAX_HEAD`]. An early
/// end of stream returns what arrived.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(Some(head));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// Splits the request line and finds `Host`, leniently: a malformed head still gets logged.
fn parse_head(head: &[u8]) -> RequestHead {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let mut words = lines.next().unwrap_or_default().split_ascii_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or_default().to_owned();
    let host = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().to_owned());
    RequestHead { method, target, host }
}

fn error_knobs(status: u16, body: Vec<u8>) -> HttpsKnobs {
    HttpsKnobs { status, body, ..HttpsKnobs::default() }
}

/// Writes the response `knobs` describe, then closes (close_notify and FIN).
async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    rec: &Recorder,
    knobs: &HttpsKnobs,
) -> std::io::Result<()> {
    rec.record(Event::HttpResponse { status: knobs.status, body_len: knobs.body.len() });
    stream.write_all(&response_bytes(knobs)).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// The whole response: status line, headers, framed body.
fn response_bytes(knobs: &HttpsKnobs) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", knobs.status, reason(knobs.status));
    if let Some(content_type) = &knobs.content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(location) = &knobs.location {
        head.push_str(&format!("Location: {location}\r\n"));
    }
    match knobs.framing {
        Framing::ContentLength => {
            head.push_str(&format!("Content-Length: {}\r\n", knobs.body.len()));
        }
        Framing::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    match knobs.framing {
        Framing::ContentLength => bytes.extend_from_slice(&knobs.body),
        Framing::Chunked(size) => {
            for chunk in knobs.body.chunks(size.max(1)) {
                bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                bytes.extend_from_slice(chunk);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
    }
    bytes
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_is_parsed_leniently() {
        let head = b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nhOsT: mta-sts.a.sim.test\r\n\r\n";
        let parsed = parse_head(head);
        assert_eq!(parsed.method, "GET");
        assert_eq!(parsed.target, WELL_KNOWN_PATH);
        assert_eq!(parsed.host.as_deref(), Some("mta-sts.a.sim.test"));
        assert_eq!(
            parse_head(b"garbage"),
            RequestHead { method: "garbage".into(), ..Default::default() }
        );
    }

    #[test]
    fn chunked_body_ends_with_a_zero_chunk() {
        let knobs = HttpsKnobs {
            body: b"abcde".to_vec(),
            framing: Framing::Chunked(2),
            content_type: None,
            ..HttpsKnobs::default()
        };
        let text = String::from_utf8(response_bytes(&knobs)).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n2\r\nab\r\n2\r\ncd\r\n1\r\ne\r\n0\r\n\r\n"), "{text}");
    }
}
