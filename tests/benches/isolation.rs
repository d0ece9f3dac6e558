//! Isolation figures (issue 10, items 3 and 4), reported, not asserted.
//!
//! Run: `cargo bench -p postwarden-tests --bench isolation`. `PW_CASE=tarpit|policy|both`
//! (default both).
//!
//! - `tarpit`: one domain whose server takes the data and never answers the final dot, with
//!   1,000 messages queued (`PW_TARPIT`), and 100 healthy domains with 10 messages each
//!   (`PW_HEALTHY_DOMAINS`, `PW_PER_DOMAIN`), all due when the relay starts (default queue
//!   settings: 20 deliveries at once, 20 per destination, `final_dot` 600 s). Reports the delay
//!   of each healthy message from the relay's start to its arrival (p50, p99, max), or how many
//!   arrived when `PW_CAP_SECS` (default 120) ran out. Goal: p99 ≤ 2 s.
//! - `policy`: a policy that burns its whole deadline (10 ms) on every decision of a
//!   1,000-message backlog (`PW_BACKLOG`), and an inbound client measuring connect + greeting +
//!   NOOP (`PW_PROBES`, default 300, one after the other) while the backlog is decided. Goal:
//!   p99 ≤ 10 ms.
//!
//! The relay runs in process on a runtime of its own (two workers), the servers and clients on
//! another.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[allow(dead_code)]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postwarden::queue::{NewMessage, Queue};
use postwarden::service::Relay;
use postwarden_tests::chains;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let case = std::env::var("PW_CASE").unwrap_or_else(|_| "both".into());
    if case == "tarpit" || case == "both" {
        tarpit();
    }
    if case == "policy" || case == "both" {
        policy();
    }
}

fn client_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn relay_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Fills the spool of `config` before the relay starts.
fn prefill(rt: &tokio::runtime::Runtime, config: &postwarden::config::Config, rcpts: Vec<String>) {
    let spool = Arc::new(postwarden::queue::store::SpoolDir::open(&config.queue.dir).unwrap());
    let queue = Queue::new(spool, Default::default());
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (n, rcpt) in rcpts.into_iter().enumerate() {
            let queue = queue.clone();
            tasks.spawn(async move {
                let message = NewMessage {
                    mail_from: "app@client.example".into(),
                    rcpts: vec![rcpt],
                    body: format!("Subject: m{n}\r\n\r\nhi\r\n").into_bytes(),
                    staged: None,
                    requiretls: false,
                    tls_required_no: false,
                    authenticated: false,
                    smtputf8: false,
                };
                queue.accept_durably(message).await.unwrap();
            });
            if tasks.len() >= 50 {
                tasks.join_next().await;
            }
        }
        while tasks.join_next().await.is_some() {}
    });
}

/// A plain SMTP server; `answer` false: never answers the final dot. Each final dot answered
/// records its arrival time.
async fn server(answer: bool, arrivals: Arc<Mutex<Vec<Instant>>>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 bench ESMTP\r\n").await.ok()?;
                while let Some(line) = lines.next_line().await.ok()? {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 bench\r\n",
                        "QUIT" => return Some(()),
                        "DATA" => {
                            write.write_all(b"354 go\r\n").await.ok()?;
                            while let Some(line) = lines.next_line().await.ok()? {
                                if line == "." {
                                    break;
                                }
                            }
                            if !answer {
                                while let Ok(Some(_)) = lines.next_line().await {}
                                return Some(());
                            }
                            arrivals.lock().unwrap().push(Instant::now());
                            b"250 2.0.0 ok\r\n"
                        }
                        _ => b"250 2.0.0 ok\r\n",
                    };
                    write.write_all(reply).await.ok()?;
                }
                Some(())
            });
        }
    });
    addr
}

fn tarpit() {
    let tarpit_n = knob("PW_TARPIT", 1000);
    let domains = knob("PW_HEALTHY_DOMAINS", 100);
    let per_domain = knob("PW_PER_DOMAIN", 10);
    let cap = Duration::from_secs(knob("PW_CAP_SECS", 120) as u64);
    let clients = client_rt();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let tarpit = clients.block_on(server(false, Arc::default()));
    let healthy = clients.block_on(server(true, arrivals.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut routes = format!("\"tarpit.example\" = \"[127.0.0.1]:{}\"\n", tarpit.port());
    for d in 0..domains {
        routes.push_str(&format!("\"h{d}.example\" = \"[127.0.0.1]:{}\"\n", healthy.port()));
    }
    let toml = format!(
        "[delivery]\nhelo_name = \"relay.bench\"\n[delivery.routes]\n{routes}\
         [queue]\ndir = \"spool\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n"
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    // The tarpit's messages first: the order the old first-in first-out scheduler served.
    let mut rcpts: Vec<String> = (0..tarpit_n).map(|n| format!("u{n}@tarpit.example")).collect();
    for n in 0..per_domain {
        for d in 0..domains {
            rcpts.push(format!("u{n}@h{d}.example"));
        }
    }
    prefill(&clients, &config, rcpts);
    let want = domains * per_domain;

    let rt = relay_rt();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let started = Instant::now();
    let relay = rt.block_on(Relay::start(&config, listener)).unwrap();
    while arrivals.lock().unwrap().len() < want && started.elapsed() < cap {
        std::thread::sleep(Duration::from_millis(10));
    }
    let delays: Vec<Duration> =
        arrivals.lock().unwrap().iter().map(|t| t.duration_since(started)).collect();
    println!(
        "tarpit: {tarpit_n} messages to a tarpit, {domains} healthy domains x {per_domain}: \
         {} of {want} healthy delivered",
        delays.len()
    );
    if delays.len() == want {
        println!(
            "  healthy delay after due: p50 {}  p99 {}  max {}",
            common::fmt(common::quantile(&delays, 0.5)),
            common::fmt(common::quantile(&delays, 0.99)),
            common::fmt(common::quantile(&delays, 1.0)),
        );
    } else {
        println!("  not all delivered within {cap:?}: p99 > {cap:?}");
    }
    drop(relay);
    rt.shutdown_background();
    clients.shutdown_background();
}

fn policy() {
    let backlog = knob("PW_BACKLOG", 1000);
    let probes = knob("PW_PROBES", 300);
    let dir = tempfile::tempdir().unwrap();
    let routes: String =
        (0..backlog).map(|n| format!("\"d{n}.backlog.example\" = \"[127.0.0.1]:1\"\n")).collect();
    let toml = format!(
        "[[policy]]\nname = \"burner\"\npath = \"{{wasm:broken-policy}}\"\n\
         settings = {{ mode = \"loop\" }}\n\
         [delivery]\nhelo_name = \"relay.bench\"\n[delivery.routes]\n{routes}\
         [queue]\ndir = \"spool\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n"
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    let clients = client_rt();
    // One domain per message, so that no destination window limits how many decide at once.
    prefill(&clients, &config, (0..backlog).map(|n| format!("u@d{n}.backlog.example")).collect());
    let rt = relay_rt();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let relay = rt.block_on(Relay::start(&config, listener)).unwrap();
    let chain = relay.chains.current();
    let faults = || chain.counters().faults.load(std::sync::atomic::Ordering::Relaxed);
    // Probing starts once decisions are ending (the backlog is being decided).
    while faults() < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = faults();
    let addr = relay.smtp_addr;
    let samples = clients.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..probes {
            let t = Instant::now();
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 512];
            let mut seen = Vec::new();
            while !seen.ends_with(b"\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            stream.write_all(b"NOOP\r\n").await.unwrap();
            let mark = seen.len();
            while !seen[mark..].ends_with(b"\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            samples.push(t.elapsed());
            let _ = stream.write_all(b"QUIT\r\n").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples
    });
    let decided = faults() - before;
    println!(
        "policy: {backlog} messages, every decision burns its 10 ms deadline; {probes} inbound \
         connect+greeting+NOOP (5 ms apart) while {decided} decisions ended:"
    );
    println!(
        "  inbound p50 {}  p99 {}  max {}",
        common::fmt(common::quantile(&samples, 0.5)),
        common::fmt(common::quantile(&samples, 0.99)),
        common::fmt(common::quantile(&samples, 1.0)),
    );
    drop(relay);
    rt.shutdown_background();
    clients.shutdown_background();
}
