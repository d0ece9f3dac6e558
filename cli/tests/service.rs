//! The relay binary as operators run it: crash safety under load (`kill -9`), restart resuming
//! delivery, and the demo.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postwarden::queue::store::{QueueStore, SpoolDir};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A config with no policies (the opportunistic default), every domain of the test routed to a
/// closed port so deliveries defer, and retries an hour apart.
fn write_config(dir: &Path, port: u16, admin: u16) -> std::path::PathBuf {
    let text = format!(
        r#"
[policy_engine]
cache_dir = "cache"
state_dir = "state"

[delivery]
[delivery.routes]
"example.com" = "[127.0.0.1]:1"
[delivery.timeouts]
connect = 1

[queue]
dir = "spool"
min_backoff = 3600

[inbound]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[logging]
format = "json"
"#
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_postwarden"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "relay did not start listening on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends messages on one connection until it breaks; records every queue id acknowledged.
fn submit_until_broken(
    addr: SocketAddr,
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let Ok(stream) = TcpStream::connect(addr) else { return };
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut read_reply = || -> Option<String> {
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
    read_reply();
    if writer.write_all(b"EHLO load.test\r\n").is_err() || read_reply().is_none() {
        return;
    }
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let batch =
            format!("MAIL FROM:<load@client.test>\r\nRCPT TO:<user{n}@example.com>\r\nDATA\r\n");
        if writer.write_all(batch.as_bytes()).is_err() {
            return;
        }
        for _ in 0..3 {
            if read_reply().is_none() {
                return;
            }
        }
        let body = format!("Subject: load {n}\r\n\r\nmessage {n}\r\n.\r\n");
        if writer.write_all(body.as_bytes()).is_err() {
            return;
        }
        match read_reply() {
            Some(reply) if reply.starts_with("250") => {
                if let Some(id) = reply.trim_end().rsplit(' ').next() {
                    acked.lock().unwrap().push(id.to_owned());
                }
            }
            _ => return,
        }
    }
}

/// "A 250 after DATA means the message is on disk": kill -9 the relay under load, then every
/// message it acknowledged must be in the spool, and a restart must resume delivery.
#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_port = free_port();
    let config = write_config(dir.path(), port, admin_port);
    let mut relay = start(&config);
    wait_listening(addr);

    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || submit_until_broken(addr, acked, stop))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.kill().unwrap(); // SIGKILL, mid-transaction for some clients
    relay.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 50, "too little load to prove anything: {}", acked.len());
    let spool = SpoolDir::inspect(dir.path().join("spool"));
    let stored: std::collections::HashSet<String> =
        spool.list().unwrap().into_iter().map(|e| e.id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    eprintln!(
        "kill -9 under load: {} acknowledged, {} in the spool, {} lost",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    for id in &acked {
        assert!(!spool.body(id).unwrap().is_empty(), "{id}: body missing");
    }
    drop(spool);

    // Restart: the queue is picked up and every message gets its (deferred) attempt.
    let mut relay = start(&config);
    wait_listening(addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spool = SpoolDir::inspect(dir.path().join("spool"));
        let list = spool.list().unwrap();
        let waiting = list.iter().filter(|e| e.attempts == 0).count();
        if waiting == 0 {
            assert!(list.len() >= acked.len());
            let first = list.iter().find(|e| acked.contains(&e.id)).unwrap();
            let last = first.rcpts[0].last.clone().unwrap();
            assert!(last.0.starts_with('4'), "deferred, not lost or bounced: {last:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{waiting} messages never attempted after the restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The admin listener reports the queue and the deferrals.
    wait_listening(format!("127.0.0.1:{admin_port}").parse().unwrap());
    let metrics = http_get(admin_port, "/metrics");
    assert!(metrics.contains("postwarden_recipients_deferred_total"), "{metrics}");
    assert!(metrics.contains("postwarden_connections_opened_total"), "{metrics}");
    assert!(metrics.contains("postwarden_tls_handshakes_total{kind=\"resumed\"}"), "{metrics}");
    let queued: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("postwarden_queue_messages "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(queued >= acked.len(), "{metrics}");
    let queue = http_get(admin_port, &format!("/queue/{}", acked[0]));
    assert!(queue.contains(&acked[0]) && queue.contains("\"state\":\"pending\""), "{queue}");

    let _ = Command::new("kill").arg("-TERM").arg(relay.id().to_string()).status();
    let status = relay.wait().unwrap();
    assert!(status.success(), "SIGTERM must stop the relay cleanly: {status:?}");
}

/// The README's main command: simulator fleet, relay, bundled policies, the outcome table.
#[test]
fn the_demo_runs_and_every_outcome_matches_the_catalogue() {
    let output = Command::new(env!("CARGO_BIN_EXE_postwarden")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("cap-01.sim.test") && stdout.contains("forced-tls: verify"),
        "{stdout}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    let (matched, total) = summary.split_once(" of ").unwrap();
    let total = total.split_whitespace().next().unwrap();
    assert_eq!(matched, total, "{summary}");
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The relay with its log (JSON lines on stderr) read by a thread: tests wait for a log line
/// (an event), never for time to pass.
struct Logged {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Logged {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_postwarden"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Logged { child, lines }
    }

    /// The next log line containing `needle` (earlier lines are consumed).
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    }

    fn hup(&self) {
        let status = Command::new("kill").arg("-HUP").arg(self.child.id().to_string()).status();
        assert!(status.unwrap().success());
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        assert!(self.child.wait().unwrap().success());
    }
}

/// The reply to `RCPT TO:<user@example.com>` from a client on 127.0.0.1.
fn rcpt_reply(port: u16) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "eof after {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220"));
    writer.write_all(b"EHLO app.example\r\n").unwrap();
    assert!(reply().starts_with("250"));
    writer.write_all(b"MAIL FROM:<app@client.example>\r\n").unwrap();
    assert!(reply().starts_with("250"));
    writer.write_all(b"RCPT TO:<user@example.com>\r\n").unwrap();
    let rcpt = reply();
    let _ = writer.write_all(b"QUIT\r\n");
    rcpt
}

/// SIGHUP puts a changed configuration in force as one change, or refuses all of it and says
/// why: policies and a narrowed `relay_networks` take effect (a real client is then refused);
/// a changed restart-only key is refused with its name logged and nothing else changes; a
/// policy that fails to configure is refused too, and the relay lives on.
#[test]
fn sighup_reloads_what_it_can_as_one_change_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config_with = |name: &str, level: &str, networks: &str, spool: &str| {
        format!(
            "[policy_engine]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n\
             [[policy]]\nname = \"{name}\"\npath = \"{}\"\n[policy.settings.domains]\n\"example.com\" = \"{level}\"\n\
             [delivery.routes]\n\"example.com\" = \"[127.0.0.1]:1\"\n\
             [queue]\ndir = \"{spool}\"\nmin_backoff = 3600\n\
             [inbound]\nlisten = \"127.0.0.1:{port}\"\nrelay_networks = [{networks}]\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n[logging]\nformat = \"json\"\n",
            postwarden_tests::wasm::policy("forced-tls").display()
        )
    };
    let loopback = "\"127.0.0.0/8\"";
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config_with("first", "verify", loopback, "spool")).unwrap();
    let relay = Logged::start(&path);
    relay.wait_for("postwarden running");
    assert!(http_get(admin, "/metrics").contains("policy=\"first\""));
    assert!(rcpt_reply(port).starts_with("250"), "loopback may relay");

    // Policies and relay networks together.
    std::fs::write(&path, config_with("second", "encrypt", "\"10.0.0.0/8\"", "spool")).unwrap();
    relay.hup();
    relay.wait_for("configuration reloaded");
    assert!(http_get(admin, "/metrics").contains("policy=\"second\""));
    let refused = rcpt_reply(port);
    assert!(refused.starts_with("554"), "a narrowed relay_networks takes effect: {refused}");

    // A restart-only key (the spool directory) with reloadable ones: all refused, by name.
    std::fs::write(&path, config_with("third", "encrypt", loopback, "spool2")).unwrap();
    relay.hup();
    let line = relay.wait_for("reload refused");
    assert!(line.contains("queue.dir"), "{line}");
    let metrics = http_get(admin, "/metrics");
    assert!(metrics.contains("policy=\"second\"") && !metrics.contains("policy=\"third\""));
    assert!(rcpt_reply(port).starts_with("554"), "relay_networks did not change either");

    // `may` is not a forced level: forced-tls's configure refuses it, so does the reload.
    std::fs::write(&path, config_with("fourth", "may", loopback, "spool")).unwrap();
    relay.hup();
    relay.wait_for("reload refused");
    let metrics = http_get(admin, "/metrics");
    assert!(metrics.contains("policy=\"second\"") && !metrics.contains("policy=\"fourth\""));
    assert!(rcpt_reply(port).starts_with("554"));
    relay.stop();
}

/// `check-config` runs the checks `run` runs: each of these files used to pass it and then
/// fail at start (or, for the zero timeout, run with a useless value).
#[test]
fn check_config_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("garbage.pem"), "not a certificate\n").unwrap();
    std::fs::write(d.join("users-bad"), "alice plaintext-password\n").unwrap();
    std::fs::write(d.join("a-file"), "").unwrap();
    let base = "[policy_engine]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n";
    let check = |extra: &str| {
        let path = d.join("relay.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_postwarden"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, stderr) = check("[queue]\ndir = \"spool\"\n");
    assert!(ok, "the base file is fine: {stderr}");
    for (extra, key) in [
        ("[inbound]\ntls_cert = \"missing.pem\"\ntls_key = \"missing.key\"\n", "inbound.tls_cert"),
        ("[inbound]\ntls_cert = \"garbage.pem\"\ntls_key = \"garbage.pem\"\n", "inbound.tls_"),
        ("[tls]\nca_files = [\"garbage.pem\"]\n", "tls.ca_files[0]"),
        ("[tls]\nca_files = [\"missing.pem\"]\n", "tls.ca_files[0]"),
        ("[inbound]\ncredentials_file = \"missing-users\"\n", "inbound.credentials_file"),
        ("[inbound]\ncredentials_file = \"users-bad\"\n", "inbound.credentials_file"),
        ("[queue]\ndir = \"a-file\"\n", "queue.dir"),
        ("[queue]\ndir = \"a-file/spool\"\n", "queue.dir"),
        ("[inbound]\nidle_timeout = 0\n", "inbound.idle_timeout"),
        ("[delivery.timeouts]\nconnect = 0\n", "delivery.timeouts.connect"),
    ] {
        let (ok, stderr) = check(extra);
        assert!(!ok, "check-config accepted:\n{extra}");
        assert!(stderr.contains(key), "{extra}: the error does not name {key}: {stderr}");
    }
}
