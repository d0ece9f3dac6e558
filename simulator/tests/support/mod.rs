//! Test helpers: a minimal SMTP client written here (not the relay's), TLS client
//! configurations trusting the test CA, and fleet start-up with one CA per test binary.

#![allow(dead_code, clippy::unwrap_used)]

pub mod relay;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use postwarden_sim::certs::{self, TestCa};
use postwarden_sim::{Fleet, FleetOptions, Timing};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long the client waits for any reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// One CA per test binary: issuing is cheap, but the RSA key is not.
pub fn ca() -> Arc<TestCa> {
    static CA: OnceLock<Arc<TestCa>> = OnceLock::new();
    CA.get_or_init(|| Arc::new(TestCa::new().unwrap())).clone()
}

/// Starts a fleet serving `ids` with fast timing.
pub async fn fleet(ids: &[&str]) -> Fleet {
    Fleet::start(FleetOptions {
        scenarios: Some(ids.iter().map(|s| (*s).to_owned()).collect()),
        timing: Timing::fast(),
        ca: Some(ca()),
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

/// The address of a scenario's MX host by name (`mx1`, `mx2`).
pub fn mx_addr(fleet: &Fleet, id: &str, mx: &str) -> (SocketAddr, String) {
    let scenario = fleet.scenarios().iter().find(|s| s.id == id).unwrap();
    let route = fleet.route(&scenario.domain()).unwrap();
    let host = format!("{mx}.{}", scenario.domain());
    let entry = route.mx.iter().find(|m| m.host == host).unwrap();
    (entry.addr(), host)
}

/// A client configuration trusting only the test CA (FV).
pub fn verifying_config() -> Arc<ClientConfig> {
    Arc::new(certs::client_config(&ca()).unwrap())
}

/// A client configuration that accepts any certificate but still checks handshake signatures
/// (O and F). Test-only, hence the name.
pub fn danger_unverified_config() -> Arc<ClientConfig> {
    let provider = certs::provider();
    let verifier = Arc::new(DangerAcceptAny(provider.clone()));
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct DangerAcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for DangerAcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One SMTP reply.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text of each line, after the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// Whether any line after the first names this keyword (case-insensitive), as an EHLO
    /// capability. The first line is included too: team decision, STARTTLS on any line counts.
    pub fn has_capability(&self, keyword: &str) -> bool {
        self.lines.iter().any(|l| {
            l.split_whitespace().next().is_some_and(|word| word.eq_ignore_ascii_case(keyword))
        })
    }

    /// Whether the reply is a positive completion (2xx).
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// A minimal SMTP client over any stream, with its own receive buffer.
pub struct Client<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps a stream.
    pub fn new(io: S) -> Self {
        Self { io, buf: Vec::new() }
    }

    /// One `read` call (what arrived together), with the reply timeout; 0 on EOF.
    pub async fn read_once(&mut self) -> io::Result<usize> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(REPLY_TIMEOUT, self.io.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply timeout"))??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Bytes received and not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > 1 << 20 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
                }
                if self.read_once().await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in reply"));
                }
                continue;
            };
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_owned();
            let bytes = line.as_bytes();
            let valid = bytes.len() >= 3
                && bytes[..3].iter().all(u8::is_ascii_digit)
                && matches!(bytes.get(3), None | Some(b' ' | b'-'));
            if !valid {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply {line:?}"),
                ));
            }
            let code: u16 = line[..3].parse().unwrap();
            if lines.is_empty() || lines.iter().all(|(c, _)| *c == code) {
                lines.push((code, line.get(4..).unwrap_or("").to_owned()));
            } else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "mixed codes"));
            }
            if bytes.get(3) != Some(&b'-') {
                return Ok(Reply { code, lines: lines.into_iter().map(|(_, l)| l).collect() });
            }
            if lines.len() > 20_000 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
            }
        }
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// Closes politely (best effort).
    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }

    /// Sends a small message to `rcpts`, returning the final-dot reply.
    pub async fn transaction(&mut self, from: &str, rcpts: &[&str]) -> io::Result<Reply> {
        let mail = self.command(&format!("MAIL FROM:<{from}>")).await?;
        if !mail.is_positive() {
            return Ok(mail);
        }
        for rcpt in rcpts {
            self.command(&format!("RCPT TO:<{rcpt}>")).await?;
        }
        let data = self.command("DATA").await?;
        if data.code != 354 {
            return Ok(data);
        }
        self.send(b"Subject: simulator test\r\n\r\nhello\r\n.\r\n").await?;
        self.reply().await
    }
}

/// Connects and reads the greeting.
pub async fn connect(addr: SocketAddr) -> io::Result<(Client<TcpStream>, Reply)> {
    let tcp = TcpStream::connect(addr).await?;
    let mut client = Client::new(tcp);
    let greeting = client.reply().await?;
    Ok((client, greeting))
}

/// Performs the handshake after a 220 to STARTTLS. Leftover plaintext is discarded (the
/// Postfix behaviour of research §3.2).
pub async fn upgrade(
    client: Client<TcpStream>,
    config: Arc<ClientConfig>,
    host: &str,
) -> io::Result<Client<TlsStream<TcpStream>>> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls =
        tokio::time::timeout(REPLY_TIMEOUT, TlsConnector::from(config).connect(name, client.io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timeout"))??;
    Ok(Client::new(tls))
}

/// The rustls error inside an I/O error, if any.
pub fn rustls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
}
