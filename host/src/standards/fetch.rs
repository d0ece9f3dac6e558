//! Fetching an MTA-STS policy over HTTPS (RFC 8461 §3.3): `GET
//! https://mta-sts.<domain>/.well-known/mta-sts.txt`, the certificate verified for that name,
//! status 200 only, no redirects (§3.3: "HTTP 3xx redirects MUST NOT be followed"), no HTTP
//! caching, a size cap and one deadline for the whole exchange.
//!
//! HTTP/1.1 is written by hand over tokio-rustls, with `httparse` for the response head: one
//! request, `Connection: close`, a body by `Content-Length`, chunked, or until close. A general
//! HTTP client would bring its own resolver and redirect and cache behaviour, each of which the
//! RFC forbids or the simulator must control (research §1).

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::sts::{MAX_POLICY_BYTES, PolicyFile, parse_policy};
use super::sts_cache::FetchError;
use crate::delivery::route::{Lookup, Resolve};

/// The longest response head read.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Where and how policies are fetched.
#[derive(Clone)]
pub struct Fetcher {
    /// TLS with the relay's trust anchors ([`crate::delivery::tls::TlsContext::https_config`]).
    pub tls: Arc<ClientConfig>,
    /// The HTTPS port: 443, except in tests against the simulator.
    pub port: u16,
    /// The deadline for resolving, connecting, the handshake and the whole response.
    pub timeout: Duration,
}

impl Fetcher {
    /// Fetches and parses `domain`'s policy.
    pub async fn fetch(
        &self,
        resolver: &dyn Resolve,
        domain: &str,
    ) -> Result<PolicyFile, FetchError> {
        let host = format!("mta-sts.{domain}");
        let body = tokio::time::timeout(self.timeout, self.get(resolver, &host))
            .await
            .map_err(|_| {
                FetchError::Failed(format!("{host}: no answer within {:?}", self.timeout))
            })?
            .map_err(|why| FetchError::Failed(format!("{host}: {why}")))?;
        let text = String::from_utf8(body)
            .map_err(|_| FetchError::Invalid("the policy is not UTF-8".to_owned()))?;
        parse_policy(&text).map_err(FetchError::Invalid)
    }

    async fn get(&self, resolver: &dyn Resolve, host: &str) -> Result<Vec<u8>, String> {
        let addrs = match resolver.addrs(host).await? {
            Lookup::Found(addrs) if !addrs.is_empty() => addrs,
            _ => return Err("no address".to_owned()),
        };
        let mut last = String::new();
        let mut stream = None;
        for ip in addrs {
            match TcpStream::connect((ip, self.port)).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect to {ip}: {e}"),
            }
        }
        let stream = stream.ok_or(last)?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("name: {e}"))?;
        let mut tls = TlsConnector::from(self.tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let request = format!(
            "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n\
             User-Agent: postwarden\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        // Read until close or the cap: a policy, its head and chunk framing fit well within it.
        let cap = MAX_HEAD_BYTES + MAX_POLICY_BYTES + MAX_POLICY_BYTES / 8;
        let mut response = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                // Servers that close without close_notify are common; what was read is judged.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(format!("read: {e}")),
            }
            if response.len() > cap {
                return Err(format!("response larger than {cap} bytes"));
            }
        }
        body_of(&response)
    }
}

/// The body of a complete HTTP/1.1 response, if its status is 200.
fn body_of(response: &[u8]) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete HTTP response".to_owned()),
        Err(e) => return Err(format!("not an HTTP response: {e}")),
    };
    match parsed.code {
        Some(200) => {}
        Some(code @ 300..=399) => {
            return Err(format!("HTTP {code}: redirects are not followed (RFC 8461 §3.3)"));
        }
        Some(code) => return Err(format!("HTTP {code}")),
        None => return Err("no status".to_owned()),
    }
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &response[head_len..];
    let body = if header("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| format!("Content-Length `{length}`"))?;
        if rest.len() < length {
            return Err(format!("body cut short: {} of {length} bytes", rest.len()));
        }
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_POLICY_BYTES {
        return Err(format!("policy larger than {MAX_POLICY_BYTES} bytes"));
    }
    Ok(body)
}

/// Decodes a chunked body (RFC 9112 §7.1), ignoring chunk extensions and trailers.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| "chunked body cut short".to_owned())?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size `{size_text}`"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            return Err("chunked body cut short".to_owned());
        }
        if body.len() + size > MAX_POLICY_BYTES {
            return Err(format!("policy larger than {MAX_POLICY_BYTES} bytes"));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx.example\r\nmax_age: 86400\r\n";

    #[test]
    fn bodies_by_length_by_chunks_and_until_close() {
        let by_length =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{POLICY}", POLICY.len());
        assert_eq!(body_of(by_length.as_bytes()).unwrap(), POLICY.as_bytes());
        let (a, b) = POLICY.split_at(20);
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        assert_eq!(body_of(chunked.as_bytes()).unwrap(), POLICY.as_bytes());
        let until_close = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{POLICY}");
        assert_eq!(body_of(until_close.as_bytes()).unwrap(), POLICY.as_bytes());
    }

    #[test]
    fn anything_but_a_complete_200_is_refused() {
        let cases = [
            (
                "HTTP/1.1 301 Moved\r\nLocation: https://x/\r\n\r\n".to_owned(),
                "redirects are not followed",
            ),
            ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(), "HTTP 404"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort".to_owned(), "cut short"),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_owned(),
                "chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab".to_owned(),
                "cut short",
            ),
            ("HTTP/1.1 200 OK\r\n".to_owned(), "incomplete"),
            ("SMTP 220 hello\r\n\r\n".to_owned(), "not an HTTP response"),
            (format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(MAX_POLICY_BYTES + 1)), "larger than"),
        ];
        for (response, expected) in cases {
            let err = body_of(response.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{response:?}: {err}");
        }
    }

    /// Serves `response` once over TLS as `mta-sts.example.test` with a certificate for
    /// `cert_name` from a fresh CA; returns the fetcher (trusting that CA) and its resolver.
    async fn server(
        cert_name: &str,
        response: String,
    ) -> (Fetcher, crate::delivery::route::StaticResolver) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![cert_name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            assert!(request.starts_with(
                b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.test\r\n"
            ));
            let _ = tls.write_all(response.as_bytes()).await;
            let _ = tls.shutdown().await;
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let tls = crate::delivery::tls::TlsContext::new(roots).https_config().unwrap();
        let mut resolver = crate::delivery::route::StaticResolver::default();
        resolver.hosts.insert("mta-sts.example.test".into(), vec![[127, 0, 0, 1].into()]);
        (Fetcher { tls, port, timeout: Duration::from_secs(10) }, resolver)
    }

    #[tokio::test]
    async fn a_policy_is_fetched_over_verified_tls_and_parsed() {
        let ok = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{POLICY}", POLICY.len());
        let (fetcher, resolver) = server("mta-sts.example.test", ok.clone()).await;
        let policy = fetcher.fetch(&resolver, "example.test").await.unwrap();
        assert_eq!(policy.mx, ["mx.example"]);

        // A certificate for another name is a failed fetch, whatever it serves (§3.3).
        let (fetcher, resolver) = server("www.example.test", ok).await;
        match fetcher.fetch(&resolver, "example.test").await {
            Err(FetchError::Failed(why)) => assert!(why.contains("TLS"), "{why}"),
            other => panic!("expected a failed fetch, got {other:?}"),
        }

        // A valid response that is not a valid policy: invalid, not failed.
        let bad = "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nversion: STSv1\n".to_owned();
        let (fetcher, resolver) = server("mta-sts.example.test", bad).await;
        match fetcher.fetch(&resolver, "example.test").await {
            Err(FetchError::Invalid(why)) => assert!(why.contains("missing mode"), "{why}"),
            other => panic!("expected an invalid policy, got {other:?}"),
        }
    }
}
