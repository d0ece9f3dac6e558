//! Relay throughput over STARTTLS: the real relay (a release `postwarden run` process, bundled
//! `opportunistic` policy, fsync'd spool) between an SMTP injector and a TLS sink.
//!
//! Run: `cargo bench -p postwarden-tests --bench relay_throughput`. Knobs: `PW_MESSAGES` (per
//! round, default 2000), `PW_ROUNDS` (3), `PW_CLIENTS` (injector connections, 10), `PW_RELAY`
//! (a relay binary to use instead of building this checkout's), `PW_POSTFIX=yes|no` (measure
//! this machine's Postfix instead, with `smtp_tls_connection_reuse` set so; it is configured by
//! `scripts/bench-postfix.sh`, which needs root and rewrites /etc/postfix: a scratch machine only).
//! Postfix's CPU is its master process and every child, including the ones that exited.
//!
//! What it measures, per round: messages per second from the first MAIL to the last message
//! received by the sink; the relay process's CPU time per message (user + system, from
//! `/proc/<pid>/stat`); what the sink saw (connections, full and resumed TLS handshakes). The
//! reference (guide, same kind of machine): Postfix ≈430 msg/s over STARTTLS with its defaults,
//! ≈800 msg/s with TLS connection reuse; the target is ≥ 2× the latter.
//!
//! The injector and the sink run in this process, on the same two cores as the relay: the
//! figures are for the whole pipeline on one machine, as Postfix's were.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postwarden_sim::certs::{CertKind, TestCa, TlsKnobs};
use postwarden_tests::wasm;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const DOMAIN: &str = "bench.example";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let messages = knob("PW_MESSAGES", 2000);
    let rounds = knob("PW_ROUNDS", 3);
    let clients = knob("PW_CLIENTS", 10);
    // `PW_RELAY`: another relay binary (to compare builds on the same machine and disk).
    let postfix = std::env::var("PW_POSTFIX").ok();
    let relay_bin = match &postfix {
        Some(_) => PathBuf::new(),
        None => std::env::var_os("PW_RELAY").map_or_else(release_relay, PathBuf::from),
    };
    let policy = wasm::policy("opportunistic");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let sink = Sink::start().await;
        let postfix = match &postfix {
            Some(reuse) => Some(Postfix::start(sink.addr, reuse).await),
            None => None,
        };
        println!(
            "relay under test: {}",
            match &postfix {
                Some(p) => format!("Postfix (smtp_tls_connection_reuse = {})", p.reuse),
                None => format!("Postwarden {}", relay_bin.display()),
            }
        );
        println!(
            "{} messages per round, {clients} injector connections, 1 recipient, {} byte body",
            messages,
            body(0).len()
        );
        println!(
            "{:<7} {:>9} {:>12} {:>10} {:>12} {:>8} {:>6} {:>8}",
            "round", "msg/s", "relay CPU", "accept/s", "bench CPU", "conns", "full", "resumed"
        );
        let mut rates = Vec::new();
        let mut cpus = Vec::new();
        for round in 1..=rounds {
            let work = tempfile::tempdir_in(wasm::target_dir()).unwrap();
            let mut relay = match &postfix {
                Some(p) => Relay { child: None, addr: p.addr, postfix_master: Some(p.master) },
                None => Relay::start(&relay_bin, work.path(), &policy, sink.addr).await,
            };
            let before = sink.snapshot();
            let bench_cpu = cpu_of("self");
            let relay_cpu = relay.cpu();
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let share = messages / clients + usize::from(c < messages % clients);
                tasks.push(tokio::spawn(inject(relay.addr, c, share)));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let accepted = started.elapsed();
            sink.wait_for(before.messages + messages as u64).await;
            let elapsed = started.elapsed();
            let relay_cpu = relay.cpu() - relay_cpu;
            let bench_cpu = cpu_of("self") - bench_cpu;
            relay.stop();
            let seen = sink.snapshot().minus(&before);
            assert_eq!(seen.messages, messages as u64, "the sink got duplicates");
            assert_eq!(seen.over_tls, seen.messages, "every message must cross inside TLS");
            let rate = messages as f64 / elapsed.as_secs_f64();
            let per_msg = relay_cpu.as_secs_f64() * 1e6 / messages as f64;
            println!(
                "{:<7} {:>9.0} {:>9.0} µs {:>10.0} {:>9.0} µs {:>8} {:>6} {:>8}",
                round,
                rate,
                per_msg,
                messages as f64 / accepted.as_secs_f64(),
                bench_cpu.as_secs_f64() * 1e6 / messages as f64,
                seen.connections,
                seen.full,
                seen.resumed
            );
            rates.push(rate);
            cpus.push(per_msg);
        }
        if postfix.is_some() {
            Postfix::stop();
        }
        rates.sort_by(f64::total_cmp);
        cpus.sort_by(f64::total_cmp);
        let median_rate = rates[rates.len() / 2];
        let vs_guide = match postfix {
            Some(_) => String::new(),
            None => format!(
                " ({:.2}× the guide's Postfix figure with reuse, 800; {:.2}× its default, 430)",
                median_rate / 800.0,
                median_rate / 430.0
            ),
        };
        println!(
            "median: {median_rate:.0} msg/s{vs_guide}, relay CPU {:.0} µs/msg",
            cpus[cpus.len() / 2]
        );
    });
}

/// Builds the release relay binary (the bench profile does not build other packages' bins).
fn release_relay() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(wasm::workspace_root())
        .args(["build", "--quiet", "--release", "-p", "postwarden-cli", "--bin", "postwarden"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the release relay failed");
    wasm::target_dir().join("release").join("postwarden")
}

/// User + system CPU time of a process (`self` or a pid) so far.
fn cpu_of(pid: &str) -> Duration {
    let fields = stat_fields(pid).unwrap();
    ticks(fields[11] + fields[12])
}

/// The numeric fields of `/proc/<pid>/stat` from the state on (state itself as 0): index 1 is
/// the parent, 11/12 user/system time, 13/14 those of reaped children, in clock ticks.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(|f| f.trim().parse().unwrap_or(0)).collect())
}

fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 1000 / clock_ticks())
}

/// Postfix's CPU: the master, its reaped children, and its live children (and theirs).
fn postfix_cpu(master: u32) -> Duration {
    let Some(m) = stat_fields(&master.to_string()) else { return Duration::ZERO };
    let mut total = m[11] + m[12] + m[13] + m[14];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && f[1] == u64::from(master)
        {
            total += f[11] + f[12] + f[13] + f[14];
        }
    }
    ticks(total)
}

/// This machine's Postfix, configured by `scripts/bench-postfix.sh` to relay to the sink.
struct Postfix {
    addr: SocketAddr,
    master: u32,
    reuse: String,
}

impl Postfix {
    async fn start(sink: SocketAddr, reuse: &str) -> Postfix {
        let addr = free_port().await;
        let script = wasm::workspace_root().join("scripts/bench-postfix.sh");
        let status = Command::new(&script)
            .args(["start", &addr.port().to_string(), &sink.port().to_string(), reuse])
            .status()
            .expect("runs the Postfix script");
        assert!(status.success(), "{} start failed", script.display());
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "Postfix did not start listening on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = std::fs::read_to_string("/var/spool/postfix/pid/master.pid").unwrap();
        Postfix { addr, master: pid.trim().parse().unwrap(), reuse: reuse.to_owned() }
    }

    fn stop() {
        let script = wasm::workspace_root().join("scripts/bench-postfix.sh");
        let _ = Command::new(script).arg("stop").status();
    }
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(100)
    })
}

/// The relay under test: a Postwarden process with its own spool, or Postfix's master.
struct Relay {
    child: Option<Child>,
    addr: SocketAddr,
    postfix_master: Option<u32>,
}

impl Relay {
    async fn start(bin: &Path, work: &Path, policy: &Path, sink: SocketAddr) -> Relay {
        let addr = free_port().await;
        let config = format!(
            r#"
[policy_engine]
cache_dir = "{work}/cache"
state_dir = "{work}/state"

[[policy]]
name = "opportunistic"
path = "{policy}"

[delivery]
helo_name = "relay.bench"
[delivery.routes]
"{DOMAIN}" = "[{ip}]:{port}"

[queue]
dir = "{work}/spool"
min_backoff = 1
concurrency = 20
per_destination = 20

[inbound]
listen = "{addr}"
relay_networks = ["127.0.0.0/8"]

[logging]
level = "info"
"#,
            work = work.display(),
            policy = policy.display(),
            ip = sink.ip(),
            port = sink.port(),
        );
        let path = work.join("relay.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(work.join("relay.log")).unwrap();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "the relay did not start: see {}", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Relay { child: Some(child), addr, postfix_master: None }
    }

    fn cpu(&self) -> Duration {
        match (&self.child, self.postfix_master) {
            (Some(child), _) => cpu_of(&child.id().to_string()),
            (None, Some(master)) => postfix_cpu(master),
            (None, None) => Duration::ZERO,
        }
    }

    fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// A ~2 KiB message, like a typical notification.
fn body(n: usize) -> String {
    let mut body = format!(
        "From: app@client.test\r\nTo: user{n}@{DOMAIN}\r\nSubject: bench message {n}\r\n\
         Message-ID: <{n}.bench@client.test>\r\n\r\n"
    );
    while body.len() < 2000 {
        body.push_str("The quick brown fox jumps over the lazy dog, again and again.\r\n");
    }
    body
}

/// One injector connection: `count` pipelined transactions, then QUIT.
async fn inject(addr: SocketAddr, client: usize, count: usize) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut io = BufReader::new(stream);
    expect(&mut io, "220").await;
    io.get_mut().write_all(b"EHLO client.test\r\n").await.unwrap();
    expect(&mut io, "250").await;
    for i in 0..count {
        let n = client * 1_000_000 + i;
        let mut batch =
            format!("MAIL FROM:<app@client.test>\r\nRCPT TO:<user{n}@{DOMAIN}>\r\nDATA\r\n")
                .into_bytes();
        io.get_mut().write_all(&batch).await.unwrap();
        expect(&mut io, "250").await;
        expect(&mut io, "250").await;
        expect(&mut io, "354").await;
        batch.clear();
        batch.extend_from_slice(body(n).as_bytes());
        batch.extend_from_slice(b".\r\n");
        io.get_mut().write_all(&batch).await.unwrap();
        expect(&mut io, "250").await;
    }
    io.get_mut().write_all(b"QUIT\r\n").await.unwrap();
}

/// Reads one (possibly multi-line) reply and checks its code.
async fn expect<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>, code: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(io.read_line(&mut line).await.unwrap() > 0, "connection closed");
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) != Some(&b'-') {
            return;
        }
    }
}

/// What the sink has seen.
#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    /// Messages whose DATA came inside TLS.
    over_tls: AtomicU64,
    connections: AtomicU64,
    full: AtomicU64,
    resumed: AtomicU64,
}

#[derive(Clone, Copy)]
struct Seen {
    messages: u64,
    over_tls: u64,
    connections: u64,
    full: u64,
    resumed: u64,
}

impl Seen {
    fn minus(&self, o: &Seen) -> Seen {
        Seen {
            messages: self.messages - o.messages,
            over_tls: self.over_tls - o.over_tls,
            connections: self.connections - o.connections,
            full: self.full - o.full,
            resumed: self.resumed - o.resumed,
        }
    }
}

/// A destination MX: STARTTLS with a certificate from the simulator's CA, PIPELINING, accepts
/// everything, keeps nothing but counts.
struct Sink {
    addr: SocketAddr,
    counters: Arc<Counters>,
}

impl Sink {
    async fn start() -> Sink {
        let ca = TestCa::new().unwrap();
        let host = "mx.bench.example";
        let identity = ca.issue(CertKind::Valid, host).unwrap();
        let config = ca.server_config(&identity, host, &TlsKnobs::default()).unwrap();
        let acceptor = TlsAcceptor::from(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (acceptor, c) = (acceptor.clone(), c.clone());
                tokio::spawn(async move {
                    let _ = sink_session(stream, acceptor, c).await;
                });
            }
        });
        Sink { addr, counters }
    }

    fn snapshot(&self) -> Seen {
        let c = &self.counters;
        Seen {
            messages: c.messages.load(Ordering::Relaxed),
            over_tls: c.over_tls.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            full: c.full.load(Ordering::Relaxed),
            resumed: c.resumed.load(Ordering::Relaxed),
        }
    }

    async fn wait_for(&self, messages: u64) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.counters.messages.load(Ordering::Relaxed) < messages {
            assert!(
                Instant::now() < deadline,
                "the sink got {:?} of {messages}",
                self.snapshot().messages
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn sink_session(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    counters.connections.fetch_add(1, Ordering::Relaxed);
    stream.set_nodelay(true)?;
    let mut plain = BufReader::new(stream);
    plain.get_mut().write_all(b"220 mx.bench.example ESMTP sink\r\n").await?;
    if !serve(&mut plain, false, &counters).await? {
        return Ok(());
    }
    let tls = acceptor.accept(plain.into_inner()).await?;
    let kind = tls.get_ref().1.handshake_kind();
    let counter = match kind {
        Some(rustls::HandshakeKind::Resumed) => &counters.resumed,
        _ => &counters.full,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let mut tls = BufReader::new(tls);
    serve(&mut tls, true, &counters).await?;
    Ok(())
}

/// Serves SMTP until QUIT or EOF (`false`) or an accepted STARTTLS (`true`). Replies are
/// batched while pipelined commands are still buffered.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    tls: bool,
    counters: &Counters,
) -> std::io::Result<bool> {
    let mut out = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Ok(false);
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" if tls => {
                out.extend_from_slice(b"250-mx.bench.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            }
            "EHLO" => out.extend_from_slice(
                b"250-mx.bench.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
            ),
            "STAR" if !tls => {
                out.extend_from_slice(b"220 go ahead\r\n");
                send(io, &mut out).await?;
                return Ok(true);
            }
            "DATA" => {
                out.extend_from_slice(b"354 go\r\n");
                send(io, &mut out).await?;
                loop {
                    line.clear();
                    if io.read_line(&mut line).await? == 0 {
                        return Ok(false);
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                counters.messages.fetch_add(1, Ordering::Relaxed);
                if tls {
                    counters.over_tls.fetch_add(1, Ordering::Relaxed);
                }
                out.extend_from_slice(b"250 2.0.0 kept\r\n");
            }
            "QUIT" => {
                out.extend_from_slice(b"221 bye\r\n");
                send(io, &mut out).await?;
                return Ok(false);
            }
            _ => out.extend_from_slice(b"250 ok\r\n"),
        }
        if io.buffer().is_empty() {
            send(io, &mut out).await?;
        }
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !out.is_empty() {
        io.get_mut().write_all(out).await?;
        io.get_mut().flush().await?;
        out.clear();
    }
    Ok(())
}
