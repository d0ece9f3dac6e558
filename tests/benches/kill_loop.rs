//! Crash safety under load, repeated: the release relay takes mail over SMTP and delivers it to a
//! sink while it is `kill -9`ed, again and again; a last start drains the queue. Asserts that
//! nothing acknowledged is lost, and reports the duplicates (a crash between a next hop's `250`
//! and the relay's record of it, RFC 1047) and the messages delivered but never acknowledged
//! (killed between its fsync and its `250`).
//!
//! Run: `cargo bench -p postwarden-tests --bench kill_loop`. Knobs: `PW_KILL_RUNS` (default 20),
//! `PW_KILL_AFTER` (messages acknowledged per run before the kill, default 500), `PW_CLIENTS`
//! (submitting connections, 4), `PW_RELAY` (a relay binary instead of building this
//! checkout's release one). Half the messages have two recipients in two domains (two
//! transactions per delivery), so a kill also lands between the transactions of one message.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postwarden_tests::sink::Sink;
use postwarden_tests::wasm;

/// (subject, recipients) of the messages acknowledged so far.
type Acked = Mutex<Vec<(String, Vec<String>)>>;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let runs = knob("PW_KILL_RUNS", 20);
    let per_run = knob("PW_KILL_AFTER", 500);
    let clients = knob("PW_CLIENTS", 4);
    let bin = std::env::var_os("PW_RELAY").map_or_else(release_relay, PathBuf::from);
    let sink = Sink::start();
    let work = tempfile::tempdir_in(wasm::target_dir()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = write_config(work.path(), addr, sink.addr);
    println!("relay under test: {}", bin.display());
    println!("{runs} runs, kill -9 after {per_run} acknowledged, {clients} clients");

    // (subject, recipients) of every message acknowledged with 250.
    let acked: Arc<Acked> = Arc::default();
    let counter = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    for run in 1..=runs {
        let mut relay = start(&bin, &config, addr);
        let before = acked.lock().unwrap().len();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (acked, counter, stop) = (acked.clone(), counter.clone(), stop.clone());
                std::thread::spawn(move || submit_until_broken(addr, &acked, &counter, &stop))
            })
            .collect();
        // Kill at a point that moves from run to run.
        let target = before + per_run / 2 + (run * 7919) % per_run;
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked.lock().unwrap().len() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        relay.kill().unwrap();
        relay.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        println!(
            "run {run:>2}: {} acknowledged, {} received by the sink so far",
            acked.lock().unwrap().len() - before,
            sink.count()
        );
    }
    // A last start, no load: everything still queued goes out.
    let acked = acked.lock().unwrap().clone();
    let expected: usize = acked.iter().map(|(_, r)| r.len()).sum();
    let mut relay = start(&bin, &config, addr);
    let spool = work.path().join("spool/env");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let queued = std::fs::read_dir(&spool).map_or(0, |d| d.count());
        if queued == 0 && sink.count() >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain: {queued} queued, {} received",
            sink.count()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").arg("-TERM").arg(relay.id().to_string()).status();
    let _ = relay.wait();

    let mut copies: HashMap<(String, String), usize> = HashMap::new();
    for m in sink.received() {
        let subject = m.subject().unwrap_or_default();
        for r in m.rcpts {
            *copies.entry((subject.clone(), r)).or_default() += 1;
        }
    }
    let acked_pairs: HashSet<(String, String)> =
        acked.iter().flat_map(|(s, rs)| rs.iter().map(move |r| (s.clone(), r.clone()))).collect();
    let lost: Vec<_> = acked_pairs.iter().filter(|p| !copies.contains_key(*p)).collect();
    let duplicates: usize = copies.values().map(|c| c - 1).sum();
    let duplicated_messages = copies.values().filter(|c| **c > 1).count();
    let unacked = copies.keys().filter(|p| !acked_pairs.contains(*p)).count();
    println!(
        "{runs} kill -9 runs in {:.0?}: {} messages ({} recipients) acknowledged, {} lost, \
         {duplicates} duplicate deliveries ({duplicated_messages} recipients), {unacked} \
         recipients delivered but never acknowledged",
        started.elapsed(),
        acked.len(),
        acked_pairs.len(),
        lost.len(),
    );
    assert!(lost.is_empty(), "acknowledged but never delivered: {lost:?}");
}

fn write_config(work: &Path, addr: SocketAddr, sink: SocketAddr) -> PathBuf {
    let config = format!(
        r#"
[policy_engine]
cache_dir = "{work}/cache"
state_dir = "{work}/state"

[delivery]
helo_name = "relay.kill"
[delivery.routes]
"one.example" = "[{ip}]:{port}"
"two.example" = "[{ip}]:{port}"

[queue]
dir = "{work}/spool"
min_backoff = 1

[inbound]
listen = "{addr}"
"#,
        work = work.display(),
        ip = sink.ip(),
        port = sink.port(),
    );
    let path = work.join("relay.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn start(bin: &Path, config: &Path, addr: SocketAddr) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_file_name("relay.log"))
        .unwrap();
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the relay did not start: see {}", config.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn release_relay() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(wasm::workspace_root())
        .args(["build", "--quiet", "--release", "-p", "postwarden-cli", "--bin", "postwarden"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the release relay failed");
    wasm::target_dir().join("release").join("postwarden")
}

/// Submits messages on one connection until it breaks (the kill) or `stop`.
fn submit_until_broken(addr: SocketAddr, acked: &Acked, counter: &AtomicUsize, stop: &AtomicBool) {
    let Ok(stream) = TcpStream::connect(addr) else { return };
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut reply = || -> Option<String> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.as_bytes().get(3) == Some(&b' ') {
                return Some(line);
            }
        }
    };
    reply();
    if writer.write_all(b"EHLO load.test\r\n").is_err() || reply().is_none() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let rcpts: Vec<String> = if n.is_multiple_of(2) {
            vec![format!("u{n}@one.example"), format!("u{n}@two.example")]
        } else {
            vec![format!("u{n}@one.example")]
        };
        let mut batch = "MAIL FROM:<load@client.test>\r\n".to_owned();
        for r in &rcpts {
            batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        if writer.write_all(batch.as_bytes()).is_err() {
            return;
        }
        for _ in 0..rcpts.len() + 2 {
            match reply() {
                Some(r) if r.starts_with('2') || r.starts_with('3') => {}
                _ => return,
            }
        }
        let body = format!("Subject: kill {n}\r\n\r\nmessage {n}\r\n.\r\n");
        if writer.write_all(body.as_bytes()).is_err() {
            return;
        }
        match reply() {
            Some(r) if r.starts_with("250") => {
                acked.lock().unwrap().push((format!("kill {n}"), rcpts));
            }
            _ => return,
        }
    }
}
