//! The inbound server's limits over real sockets on 127.0.0.1: connections per client address
//! and per minute (after Postfix's anvil), the session time limit, the minimum transfer rate in
//! DATA, AUTH failures counted across connections, denied recipients counted as errors, and
//! the rules about message content (NUL, bare line ends).
//!
//! Time limits are small configured values; every test waits on the server's reply or close,
//! never on a sleep. Certificates are made in-process with rcgen.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postwarden::inbound::{
    Anvil, BareNewline, InboundOptions, IpNet, Spool, Submission, hash_password, serve_reloadable,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct MemSpool {
    submissions: Mutex<Vec<Submission>>,
}

impl Spool for MemSpool {
    fn accept(
        &self,
        submission: Submission,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        Box::pin(async move {
            let mut submissions = self.submissions.lock().unwrap();
            submissions.push(submission);
            Ok(format!("Q{}", submissions.len()))
        })
    }
}

struct Server {
    addr: SocketAddr,
    spool: Arc<MemSpool>,
    anvil: Arc<Anvil>,
    _stop: watch::Sender<bool>,
}

async fn start(options: InboundOptions) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spool = Arc::new(MemSpool::default());
    let anvil = Arc::new(Anvil::default());
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(serve_reloadable(
        listener,
        tokio::sync::watch::channel(Arc::new(options)).1,
        spool.clone(),
        anvil.clone(),
        shutdown,
    ));
    Server { addr, spool, anvil, _stop: stop }
}

/// Loopback is a relay network, so it is exempt from the per-address connection limits
/// unless the test says otherwise; no test here waits a second for a failed AUTH.
fn options() -> InboundOptions {
    InboundOptions {
        hostname: "relay.test".into(),
        auth_failure_delay: Duration::ZERO,
        ..Default::default()
    }
}

struct Client<S> {
    stream: S,
    buf: Vec<u8>,
}

impl Client<TcpStream> {
    async fn connect(addr: SocketAddr) -> Self {
        Client { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    async fn greeted(addr: SocketAddr) -> Self {
        let mut client = Self::connect(addr).await;
        let greeting = client.reply().await;
        assert!(greeting.starts_with("220 relay.test ESMTP"), "{greeting}");
        client
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    async fn reply(&mut self) -> String {
        loop {
            if let Some(reply) = self.take_reply() {
                return reply;
            }
            let n = self.read_some().await;
            assert!(n > 0, "connection closed; buffered: {:?}", String::from_utf8_lossy(&self.buf));
        }
    }

    fn take_reply(&mut self) -> Option<String> {
        let mut start = 0;
        while let Some(lf) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + lf + 1];
            start += lf + 1;
            if line.len() < 6 || line[3] == b' ' {
                let text = String::from_utf8(self.buf[..start].to_vec()).unwrap();
                self.buf.drain(..start);
                return Some(text.trim_end().replace("\r\n", "\n"));
            }
        }
        None
    }

    async fn read_some(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("no reply within the test timeout")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn expect_eof(&mut self) {
        assert_eq!(self.read_some().await, 0, "{:?}", String::from_utf8_lossy(&self.buf));
    }

    async fn envelope(&mut self, rcpt: &str) {
        assert!(self.cmd("EHLO client.test").await.starts_with("250-relay.test"));
        assert_eq!(self.cmd("MAIL FROM:<a@example.test>").await, "250 2.1.0 sender ok");
        assert_eq!(self.cmd(&format!("RCPT TO:<{rcpt}>")).await, "250 2.1.5 recipient ok");
    }
}

/// Postfix's `smtpd_client_connection_count_limit`: one address cannot hold every slot. The
/// slot is given back before the server closes, so a client that saw the close may come back
/// at once.
#[tokio::test]
async fn connections_per_client_address_are_capped() {
    let server = start(InboundOptions {
        max_connections_per_client: 2,
        max_connection_rate_per_client: 0,
        limit_exempt_networks: Some(Vec::new()),
        ..options()
    })
    .await;
    let mut first = Client::greeted(server.addr).await;
    let _second = Client::greeted(server.addr).await;
    let mut third = Client::connect(server.addr).await;
    assert_eq!(third.reply().await, "421 4.7.0 relay.test too many connections from your address");
    third.expect_eof().await;
    assert_eq!(server.anvil.stats.refused_per_client.load(Ordering::Relaxed), 1);

    assert!(first.cmd("QUIT").await.starts_with("221"));
    first.expect_eof().await;
    let mut again = Client::connect(server.addr).await;
    assert!(again.reply().await.starts_with("220 relay.test"));
}

/// The default exempts the relay networks (loopback here), as Postfix exempts `$mynetworks`.
#[tokio::test]
async fn relay_networks_are_exempt_by_default() {
    let server = start(InboundOptions { max_connections_per_client: 1, ..options() }).await;
    let _first = Client::greeted(server.addr).await;
    let _second = Client::greeted(server.addr).await;
}

/// Postfix's `smtpd_client_connection_rate_limit`: new connections per address per minute.
#[tokio::test]
async fn connection_rate_per_client_address_is_capped() {
    let server = start(InboundOptions {
        max_connections_per_client: 0,
        max_connection_rate_per_client: 3,
        limit_exempt_networks: Some(Vec::new()),
        ..options()
    })
    .await;
    for _ in 0..3 {
        let mut c = Client::greeted(server.addr).await;
        assert!(c.cmd("QUIT").await.starts_with("221"));
        c.expect_eof().await;
    }
    let mut fourth = Client::connect(server.addr).await;
    assert_eq!(
        fourth.reply().await,
        "421 4.7.0 relay.test too many connections from your address in the last minute"
    );
    fourth.expect_eof().await;
    assert_eq!(server.anvil.stats.refused_rate.load(Ordering::Relaxed), 1);
}

/// A client that keeps the session busy (NOOP after NOOP, never idle) is still closed when
/// the session time is up.
#[tokio::test]
async fn session_time_is_limited() {
    let server = start(InboundOptions {
        max_session_time: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(60),
        ..options()
    })
    .await;
    let mut c = Client::greeted(server.addr).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let last = loop {
        let reply = c.cmd("NOOP").await;
        if reply != "250 2.0.0 ok" {
            break reply;
        }
        assert!(tokio::time::Instant::now() < deadline, "never closed");
    };
    assert_eq!(last, "421 4.7.0 session time limit reached, closing connection");
    c.expect_eof().await;
    assert_eq!(server.anvil.stats.session_time_exceeded.load(Ordering::Relaxed), 1);
}

/// A message trickling in below `min_data_rate` is cut once the grace period is over (the
/// idle timeout, a minute here, would never fire: the test's own limit is 10 s), and nothing
/// reaches the spool; a fast message under the same settings goes through.
#[tokio::test]
async fn data_slower_than_the_minimum_rate_is_cut() {
    let server = start(InboundOptions {
        min_data_rate: 1000,
        data_rate_grace: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(60),
        ..options()
    })
    .await;
    let mut fast = Client::greeted(server.addr).await;
    fast.envelope("x@example.net").await;
    assert!(fast.cmd("DATA").await.starts_with("354"));
    fast.send(&b"0123456789abcdef\r\n".repeat(10_000)).await;
    assert!(fast.cmd(".").await.starts_with("250 2.0.0"));

    let mut slow = Client::greeted(server.addr).await;
    slow.envelope("x@example.net").await;
    assert!(slow.cmd("DATA").await.starts_with("354"));
    slow.send(b"Subject: slow\r\n").await;
    assert_eq!(
        slow.reply().await,
        "421 4.7.0 message transfer too slow (below 1000 bytes/s), closing connection"
    );
    slow.expect_eof().await;
    assert_eq!(server.spool.submissions.lock().unwrap().len(), 1);
    assert_eq!(server.anvil.stats.data_too_slow.load(Ordering::Relaxed), 1);
}

/// Postfix's `smtpd_hard_error_limit`: a client that is denied recipient after recipient is
/// closed like one that sends garbage.
#[tokio::test]
async fn denied_recipients_count_towards_the_error_limit() {
    let server = start(InboundOptions {
        relay_networks: vec!["10.0.0.0/8".parse::<IpNet>().unwrap()],
        max_errors: 5,
        ..options()
    })
    .await;
    let mut c = Client::greeted(server.addr).await;
    c.cmd("EHLO client.test").await;
    assert_eq!(c.cmd("MAIL FROM:<a@example.test>").await, "250 2.1.0 sender ok");
    for n in 0..4 {
        assert_eq!(c.cmd(&format!("RCPT TO:<{n}@example.net>")).await, "554 5.7.1 relaying denied");
    }
    c.send(b"RCPT TO:<4@example.net>\r\n").await;
    assert_eq!(c.reply().await, "554 5.7.1 relaying denied");
    assert_eq!(c.reply().await, "421 4.7.0 too many errors");
    c.expect_eof().await;
    assert_eq!(server.anvil.stats.too_many_errors.load(Ordering::Relaxed), 1);
}

/// NUL has no place in SMTP text (RFC 5321 §4.5.2 and RFC 6152 exclude it from 7bit and 8bit
/// data) and receivers disagree about it, so the relay refuses the message rather than
/// forwarding or silently altering it. The session goes on.
#[tokio::test]
async fn nul_in_a_message_is_refused() {
    let server = start(options()).await;
    let mut c = Client::greeted(server.addr).await;
    c.envelope("x@example.net").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(b"Subject: nul\r\n\r\na\0b\r\n").await;
    assert_eq!(c.cmd(".").await, "554 5.6.0 message contains NUL characters");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert!(server.spool.submissions.lock().unwrap().is_empty());
}

/// `bare_newline = "reject"` (Postfix's `smtpd_forbid_bare_newline = reject`): a bare LF or
/// bare CR in DATA refuses the message; the default normalises (the message is taken).
#[tokio::test]
async fn bare_newline_reject_or_normalize() {
    let strict = start(InboundOptions { bare_newline: BareNewline::Reject, ..options() }).await;
    for body in [&b"Subject: lf\r\n\r\na\nb\r\n"[..], b"Subject: cr\r\n\r\na\rb\r\n"] {
        let mut c = Client::greeted(strict.addr).await;
        c.envelope("x@example.net").await;
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(body).await;
        assert_eq!(
            c.cmd(".").await,
            "550 5.5.2 message contains a bare CR or LF; lines must end with CRLF"
        );
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    }
    let mut c = Client::greeted(strict.addr).await;
    c.envelope("x@example.net").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: ok\r\n\r\nfine\r\n.").await.starts_with("250 2.0.0"));
    assert_eq!(strict.spool.submissions.lock().unwrap().len(), 1);

    let lenient = start(options()).await;
    let mut c = Client::greeted(lenient.addr).await;
    c.envelope("x@example.net").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: lf\r\n\r\na\nb\r\n.").await.starts_with("250 2.0.0"));
}

mod auth {
    //! AUTH failures counted per client address across connections (RFC 4954 §6: 454 is
    //! "Temporary authentication failure").

    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    /// A server certificate for `relay.test` and a client that trusts exactly it.
    fn tls_pair() -> (Arc<rustls::ServerConfig>, tokio_rustls::TlsConnector) {
        let provider = || Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()]).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    fn plain(user: &str, password: &str) -> String {
        let data = format!("\0{user}\0{password}");
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.as_bytes().chunks(3) {
            let n =
                chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                out.push(if i <= chunk.len() {
                    table[(n >> (18 - 6 * i) & 63) as usize] as char
                } else {
                    '='
                });
            }
        }
        out
    }

    type Tls = Client<tokio_rustls::client::TlsStream<TcpStream>>;

    async fn logged_out(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> Tls {
        let mut c = Client::greeted(addr).await;
        c.cmd("EHLO client.test").await;
        assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 ready to start TLS");
        let name = ServerName::try_from("relay.test").unwrap();
        let stream = connector.connect(name, c.stream).await.unwrap();
        let mut c = Client { stream, buf: Vec::new() };
        assert!(c.cmd("EHLO client.test").await.contains("AUTH PLAIN LOGIN"));
        c
    }

    /// The attack: many connections, three guesses each. Once the address has used up
    /// `auth_failure_limit`, every connection from it is refused AUTH, the right password
    /// included, and the failures are counted for `/metrics`.
    #[tokio::test]
    async fn failures_are_limited_per_address_across_connections() {
        let (tls, connector) = tls_pair();
        let credentials = HashMap::from([("alice".to_owned(), hash_password(b"NaCl", "s3cret"))]);
        let server = start(InboundOptions {
            tls: Some(tls),
            credentials,
            auth_failure_limit: 4,
            ..options()
        })
        .await;
        let wrong = format!("AUTH PLAIN {}", plain("alice", "guess"));
        let right = format!("AUTH PLAIN {}", plain("alice", "s3cret"));
        let invalid = "535 5.7.8 authentication credentials invalid";

        let mut first = logged_out(server.addr, &connector).await;
        assert_eq!(first.cmd(&wrong).await, invalid);
        assert_eq!(first.cmd(&wrong).await, invalid);
        first.send(format!("{wrong}\r\n").as_bytes()).await;
        assert_eq!(first.reply().await, invalid);
        assert_eq!(first.reply().await, "421 4.7.0 too many authentication failures");

        let mut second = logged_out(server.addr, &connector).await;
        assert_eq!(second.cmd(&wrong).await, invalid);
        let refused =
            "454 4.7.0 too many authentication failures from your address; try again later";
        assert_eq!(second.cmd(&right).await, refused);
        let mut third = logged_out(server.addr, &connector).await;
        assert_eq!(third.cmd(&right).await, refused);
        assert_eq!(third.cmd("AUTH PLAIN").await, refused);

        let stats = &server.anvil.stats;
        assert_eq!(stats.auth_failures.load(Ordering::Relaxed), 4);
        assert_eq!(stats.auth_refused.load(Ordering::Relaxed), 3);
    }

    /// With the limit off, the right password works after failures on other connections:
    /// the refusal above comes from the cross-connection count, nothing else.
    #[tokio::test]
    async fn without_the_limit_the_right_password_works() {
        let (tls, connector) = tls_pair();
        let credentials = HashMap::from([("alice".to_owned(), hash_password(b"NaCl", "s3cret"))]);
        let server = start(InboundOptions {
            tls: Some(tls),
            credentials,
            auth_failure_limit: 0,
            ..options()
        })
        .await;
        for _ in 0..2 {
            let mut c = logged_out(server.addr, &connector).await;
            for _ in 0..2 {
                let reply = c.cmd(&format!("AUTH PLAIN {}", plain("alice", "guess"))).await;
                assert!(reply.starts_with("535"), "{reply}");
            }
        }
        let mut c = logged_out(server.addr, &connector).await;
        assert_eq!(
            c.cmd(&format!("AUTH PLAIN {}", plain("alice", "s3cret"))).await,
            "235 2.7.0 authentication successful"
        );
    }
}
