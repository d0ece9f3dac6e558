//! A submission client written here, not the relay's: plaintext or STARTTLS, optional
//! AUTH PLAIN, one message. Tests use it to hand mail to a running relay the way an
//! application would, without minting the relay's own plaintext permits.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// How long any reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What to submit and how.
#[derive(Clone, Debug, Default)]
pub struct Submission<'a> {
    /// `MAIL FROM` address.
    pub from: &'a str,
    /// `RCPT TO` addresses.
    pub to: &'a [&'a str],
    /// Header and body, CRLF line ends, without the final dot.
    pub body: &'a str,
    /// Upgrade with STARTTLS first (the certificate is not checked: the tests' relays use a
    /// generated one).
    pub starttls: bool,
    /// AUTH PLAIN with this user and password (needs `starttls`).
    pub auth: Option<(&'a str, &'a str)>,
}

/// The replies of one submission.
#[derive(Clone, Debug)]
pub struct Replies {
    /// The reply to AUTH, when it was sent.
    pub auth: Option<String>,
    /// The reply to the final dot, or to the first command refused before it.
    pub last: String,
}

impl Replies {
    /// Whether the message was queued (`250` to the final dot).
    pub fn queued(&self) -> bool {
        self.last.starts_with("250")
    }
}

/// Submits one message to `addr`.
pub async fn submit(addr: SocketAddr, s: &Submission<'_>) -> io::Result<Replies> {
    let tcp = TcpStream::connect(addr).await?;
    let mut io = BufStream::new(tcp);
    expect(&reply(&mut io).await?, "220")?;
    expect(&command(&mut io, "EHLO app.client.example").await?, "250")?;
    if !s.starttls {
        return transaction(&mut io, s, None).await;
    }
    expect(&command(&mut io, "STARTTLS").await?, "220")?;
    let tcp = io.into_inner();
    let connector = tokio_rustls::TlsConnector::from(accept_any_certificate());
    let name = ServerName::try_from("relay.postwarden.test")
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio::time::timeout(REPLY_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let mut io = BufStream::new(tls);
    expect(&command(&mut io, "EHLO app.client.example").await?, "250")?;
    let auth = match s.auth {
        Some((user, password)) => {
            let token = base64(format!("\0{user}\0{password}").as_bytes());
            Some(command(&mut io, &format!("AUTH PLAIN {token}")).await?)
        }
        None => None,
    };
    if let Some(refused) = auth.as_ref().filter(|r| !r.starts_with("235")) {
        return Ok(Replies { auth: Some(refused.clone()), last: refused.clone() });
    }
    transaction(&mut io, s, auth).await
}

async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufStream<S>,
    s: &Submission<'_>,
    auth: Option<String>,
) -> io::Result<Replies> {
    let done = |last: String| Ok(Replies { auth: auth.clone(), last });
    let mail = command(io, &format!("MAIL FROM:<{}>", s.from)).await?;
    if !mail.starts_with("250") {
        return done(mail);
    }
    for rcpt in s.to {
        let reply = command(io, &format!("RCPT TO:<{rcpt}>")).await?;
        if !reply.starts_with("250") {
            return done(reply);
        }
    }
    let data = command(io, "DATA").await?;
    if !data.starts_with("354") {
        return done(data);
    }
    io.write_all(s.body.as_bytes()).await?;
    if !s.body.ends_with("\r\n") {
        io.write_all(b"\r\n").await?;
    }
    let last = command(io, ".").await?;
    let _ = command(io, "QUIT").await;
    done(last)
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufStream<S>,
    line: &str,
) -> io::Result<String> {
    io.write_all(format!("{line}\r\n").as_bytes()).await?;
    io.flush().await?;
    reply(io).await
}

/// One reply, every line of it.
async fn reply<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufStream<S>) -> io::Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(REPLY_TIMEOUT, io.read_line(&mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply timed out"))??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("eof after {all:?}")));
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(all);
        }
    }
}

fn expect(reply: &str, code: &str) -> io::Result<()> {
    if reply.starts_with(code) {
        Ok(())
    } else {
        Err(io::Error::other(format!("expected {code}, got {reply:?}")))
    }
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A client configuration that accepts any certificate but checks handshake signatures.
/// Test-only: the relays under test present a generated certificate.
pub fn accept_any_certificate() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AcceptAny(provider.clone()));
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
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

#[cfg(test)]
mod tests {
    #[test]
    fn base64_known_values() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"\0u\0p"), "AHUAcA==");
    }
}
