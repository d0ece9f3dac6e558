//! The inbound SMTP server's `Session`: bytes from any client in, replies out.
//!
//! The first byte chooses the setup (STARTTLS and AUTH offered, client inside the relay
//! networks, spool answer, chunk size); the rest is the client's byte stream, delivered in
//! chunks. `StartTls` is answered by a completed handshake, `Submit` by the spool's answer.
//!
//! Checks: no panic; every reply is well framed (`ddd` + ` `/`-`, CRLF, no other CR or LF);
//! a message is only submitted once its `CRLF.CRLF` has been read, within the size limit, with a
//! `Received:` line free of bare CR/LF; nobody relays without a relay network or AUTH, and AUTH
//! never succeeds without TLS; between reads at most one partial line is buffered.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use postwarden::inbound::{Action, InboundOptions, Session, hash_password};

const MAX_LINE: usize = 512;
const MAX_MESSAGE: usize = 2048;

fn tls_config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let cert = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()])
                .expect("certificate");
            let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
                .expect("key");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .expect("server config");
            Arc::new(config)
        })
        .clone()
}

fn options(tls: bool) -> Arc<InboundOptions> {
    let mut credentials = HashMap::new();
    // user `alice`, password `secret`: AUTH PLAIN AGFsaWNlAHNlY3JldA==
    credentials.insert("alice".to_owned(), hash_password(b"salt", "secret"));
    Arc::new(InboundOptions {
        hostname: "relay.test".to_owned(),
        max_message_size: MAX_MESSAGE,
        max_recipients: 4,
        max_line_length: MAX_LINE,
        tls: tls.then(tls_config),
        credentials,
        ..InboundOptions::default()
    })
}

/// Every reply line is `ddd`, a space or hyphen (or nothing), text without CR or LF, CRLF.
fn check_replies(out: &[u8]) {
    assert!(out.is_empty() || out.ends_with(b"\r\n"), "reply not ended by CRLF");
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").expect("reply line without CRLF");
        assert!(line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(matches!(line.get(3), None | Some(b' ' | b'-')), "{line:?}");
        assert!(!line.contains(&b'\r'), "bare CR in a reply: {:?}", String::from_utf8_lossy(line));
        assert!(
            line.len() <= 512,
            "reply line of {} bytes: {:?}",
            line.len(),
            String::from_utf8_lossy(&line[..100.min(line.len())])
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&shape, stream)) = input.split_first() else { return };
    let tls = shape & 1 != 0;
    let relay_client = shape & 2 != 0;
    let spool_ok = shape & 4 == 0;
    let chunk = [1, 3, 7, 16, 64, 256, 1024, usize::MAX][usize::from(shape >> 5)];
    let client: SocketAddr =
        if relay_client { "127.0.0.1:2525" } else { "192.0.2.7:2525" }.parse().expect("addr");

    let mut session = Session::new(options(tls), client);
    // What the session has been given since the last handshake (it forgets the rest).
    let mut seen: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut chunks = stream.chunks(chunk.max(1));
    'session: loop {
        match session.next_action() {
            Action::Read => {
                assert!(session.buffered() < MAX_LINE, "{} bytes buffered", session.buffered());
                session.write_replies(&mut out);
                let Some(bytes) = chunks.next() else { break };
                seen.extend_from_slice(bytes);
                session.receive(bytes);
            }
            Action::StartTls { .. } => {
                assert!(tls);
                session.write_replies(&mut out);
                seen.clear();
                session.tls_established("TLSv1.3 fuzz".to_owned());
            }
            Action::Submit(pending) => {
                let consumed = seen.len() - session.buffered();
                let used = &seen[..consumed];
                assert!(
                    used.ends_with(b"\n.\r\n"),
                    "submitted without CRLF.CRLF: ...{:?}",
                    String::from_utf8_lossy(&used[used.len().saturating_sub(40)..])
                );
                assert!(pending.size() <= MAX_MESSAGE);
                assert!(!pending.rcpts().is_empty() && pending.rcpts().len() <= 4);
                assert!(
                    relay_client || session.authenticated_as().is_some(),
                    "open relay: accepted from outside the relay networks without AUTH"
                );
                let size = pending.size();
                let submission = pending.into_submission(SystemTime::UNIX_EPOCH);
                let header = &submission.body[..submission.body.len() - size];
                assert!(header.starts_with(b"Received: ") && header.ends_with(b"\r\n"));
                for (i, &b) in header.iter().enumerate() {
                    match b {
                        b'\r' => assert_eq!(header.get(i + 1), Some(&b'\n'), "bare CR"),
                        b'\n' => assert_eq!(header[i - 1], b'\r', "bare LF"),
                        _ => {}
                    }
                }
                assert!(submission.body.is_empty() || submission.body.ends_with(b"\r\n"));
                let answer = if spool_ok { Ok("ID1".to_owned()) } else { Err("full".to_owned()) };
                session.submitted(&answer);
            }
            Action::Close => {
                session.write_replies(&mut out);
                break 'session;
            }
        }
        if session.authenticated_as().is_some() {
            assert!(session.is_tls(), "AUTH succeeded without TLS");
        }
    }
    check_replies(&out);
});
