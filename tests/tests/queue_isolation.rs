//! Isolation in the relay: no destination stalls the others (issue 10, item 3).
//!
//! The test drives the real relay in process over real sockets, with small SMTP servers written
//! here, and judges by events (what the servers saw, in what order), never by elapsed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use postwarden::queue::dispatch::INITIAL_WINDOW;
use postwarden::service::Relay;
use postwarden_tests::chains;
use postwarden_tests::submit::Submission;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// What a test server does after the final dot.
#[derive(Clone, Copy)]
enum Answer {
    /// `250`: delivered.
    Accept,
    /// Nothing, ever: the connection hangs until the relay gives up on it.
    Never,
}

/// Connections of a tarpit that reached the final dot and are waiting, and those the relay
/// has closed since.
#[derive(Clone, Copy, Debug, Default)]
struct Tarpit {
    hanging: usize,
    closed: usize,
}

/// A minimal SMTP server (no STARTTLS, no PIPELINING). Each message received is sent on
/// `delivered` (for `Accept`); `Never` connections are counted in `tarpit`.
async fn server(
    answer: Answer,
    delivered: mpsc::UnboundedSender<String>,
    tarpit: watch::Sender<Tarpit>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        // Owned here: aborting the server closes every connection it holds.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (delivered, tarpit) = (delivered.clone(), tarpit.clone());
            connections.spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 test ESMTP\r\n").await.ok()?;
                let mut body = String::new();
                while let Some(line) = lines.next_line().await.ok()? {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 test\r\n",
                        "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 ok\r\n",
                        "QUIT" => {
                            write.write_all(b"221 2.0.0 bye\r\n").await.ok()?;
                            return Some(());
                        }
                        "DATA" => {
                            write.write_all(b"354 go ahead\r\n").await.ok()?;
                            body.clear();
                            while let Some(line) = lines.next_line().await.ok()? {
                                if line == "." {
                                    break;
                                }
                                body.push_str(&line);
                                body.push('\n');
                            }
                            match answer {
                                Answer::Accept => {
                                    let _ = delivered.send(body.clone());
                                    b"250 2.0.0 queued\r\n"
                                }
                                Answer::Never => {
                                    tarpit.send_modify(|t| t.hanging += 1);
                                    // Read (and ignore) until the relay gives up and closes.
                                    while let Ok(Some(_)) = lines.next_line().await {}
                                    tarpit.send_modify(|t| {
                                        t.hanging -= 1;
                                        t.closed += 1;
                                    });
                                    return Some(());
                                }
                            }
                        }
                        _ => b"502 5.5.2 unknown\r\n",
                    };
                    write.write_all(reply).await.ok()?;
                }
                Some(())
            });
        }
    });
    (addr, task)
}

async fn submit(relay: &Relay, to: &str, subject: &str) {
    let body =
        format!("From: <app@client.example>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nhi\r\n");
    let submission =
        Submission { from: "app@client.example", to: &[to], body: &body, ..Default::default() };
    let replies = postwarden_tests::submit::submit(relay.smtp_addr, &submission).await.unwrap();
    assert!(replies.queued(), "{replies:?}");
}

/// Issue 10, item 3: a destination that takes the data and never answers the final dot held
/// every delivery slot (a global slot was taken before waiting for the destination's own limit,
/// and due messages were served first-in first-out), so one message to a healthy domain waited
/// a whole `final_dot` timeout per wave of tarpit messages. Now a delivery waiting for its
/// destination holds no slot, destinations take turns, and a destination that never gets mail
/// through keeps its initial window: the healthy message is delivered while every tarpit
/// connection is still hanging, and the tarpit has no more than its initial window of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tarpit_destination_does_not_hold_back_a_healthy_one() {
    let (delivered, mut healthy_inbox) = mpsc::unbounded_channel();
    let (tarpit_state, mut tarpit_seen) = watch::channel(Tarpit::default());
    let (tarpit_addr, tarpit) =
        server(Answer::Never, delivered.clone(), tarpit_state.clone()).await;
    let (healthy_addr, healthy) = server(Answer::Accept, delivered, tarpit_state).await;
    let dir = tempfile::tempdir().unwrap();
    // The old scheduler let 8 tarpit deliveries take all 8 slots; `final_dot` is long enough
    // that nothing here can time out before the healthy message is through, and short enough
    // that the old scheduler fails this test instead of hanging it.
    let toml = format!(
        "[delivery]\nhelo_name = \"relay.postwarden.test\"\n\
         [delivery.routes]\n\"tarpit.example\" = \"[127.0.0.1]:{tarpit}\"\n\"healthy.example\" = \"[127.0.0.1]:{healthy}\"\n\
         [delivery.timeouts]\nfinal_dot = 30\n\
         [queue]\ndir = \"spool\"\nconcurrency = 8\nper_destination = 8\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n",
        tarpit = tarpit_addr.port(),
        healthy = healthy_addr.port(),
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(&config, listener).await.unwrap();

    for n in 0..12 {
        submit(&relay, "user@tarpit.example", &format!("tarpit {n}")).await;
    }
    // The tarpit holds as many connections as the relay will give it before the healthy
    // message is even queued.
    tarpit_seen.wait_for(|t| t.hanging >= INITIAL_WINDOW).await.unwrap();
    submit(&relay, "user@healthy.example", "healthy").await;

    let body = healthy_inbox.recv().await.expect("the healthy server stopped");
    assert!(body.contains("Subject: healthy"), "{body}");
    let seen = *tarpit_seen.borrow();
    assert_eq!(
        seen.closed, 0,
        "the healthy message waited for tarpit connections to time out: {seen:?}"
    );
    assert!(
        seen.hanging <= INITIAL_WINDOW,
        "a destination that never took a message got {} concurrent deliveries (initial window \
         {INITIAL_WINDOW})",
        seen.hanging
    );

    // Closing the tarpit's connections lets their deliveries fail at once, so that shutdown
    // does not wait for `final_dot`.
    tarpit.abort();
    let _ = tarpit.await;
    relay.shutdown(Duration::from_secs(20)).await;
    healthy.abort();
}
