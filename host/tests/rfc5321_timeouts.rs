//! RFC 5321 §4.5.3.2: every wait is bounded (invariant I7), with the RFC's defaults. Tokio's
//! paused clock lets a five-minute timeout elapse in an instant, deterministically.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use postwarden::delivery::client::{Client, SessionError, Timeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// "Initial 220 Message: 5 Minutes" — a server that accepts and never greets.
#[tokio::test(start_paused = true)]
async fn a_silent_server_times_out_after_the_greeting_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(socket);
    });
    let started = tokio::time::Instant::now();
    let result = Client::connect(addr, Timeouts::default()).await;
    assert!(
        matches!(result, Err(SessionError::Timeout { stage: "greeting" })),
        "{:?}",
        result.err()
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(300) && waited < Duration::from_secs(301), "{waited:?}");
}

/// A server that greets, then answers EHLO one byte per minute: the reply must complete within
/// the command timeout as a whole, not per byte (a drip-feeding tarpit cannot hold us forever).
#[tokio::test(start_paused = true)]
async fn a_drip_fed_reply_is_bounded_as_a_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(b"220 tarpit ESMTP\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = socket.read(&mut buf).await;
        for byte in b"250-tarpit\r\n250 PIPELINING\r\n".iter().cycle() {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if socket.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    });
    let timeouts = Timeouts { command: Duration::from_secs(300), ..Timeouts::default() };
    let (mut client, _) = Client::connect(addr, timeouts).await.unwrap();
    let started = tokio::time::Instant::now();
    let result = client.ehlo("relay.example").await;
    assert!(matches!(result, Err(SessionError::Timeout { stage: "EHLO" })), "{result:?}");
    assert!(started.elapsed() <= Duration::from_secs(301), "{:?}", started.elapsed());
}
