//! `postwarden queue …` beside a running relay: commands go through the relay's control socket,
//! never recover or rewrite its spool behind its back, and cannot lose, resurrect or redeliver
//! mail. The relay is the real binary, mail arrives over SMTP and leaves to a sink.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postwarden_tests::sink::Sink;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A relay routing `example.com` to the sink and `example.net` to a closed port (deferrals).
fn write_config(dir: &Path, port: u16, sink: SocketAddr) -> PathBuf {
    let text = format!(
        r#"
[policy_engine]
cache_dir = "cache"
state_dir = "state"

[delivery]
[delivery.routes]
"example.com" = "[{ip}]:{sink_port}"
"example.net" = "[127.0.0.1]:1"
[delivery.timeouts]
connect = 2

[queue]
dir = "spool"
min_backoff = 3600

[inbound]
listen = "127.0.0.1:{port}"
"#,
        ip = sink.ip(),
        sink_port = sink.port()
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Relay {
    child: Child,
}

impl Relay {
    fn start(config: &Path, addr: SocketAddr) -> Relay {
        let log = std::fs::File::create(config.with_file_name("relay.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_postwarden"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // The control socket is the last thing a starting relay sets up.
        let socket = config.with_file_name("spool").join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() || !socket.exists() {
            assert!(Instant::now() < deadline, "relay did not start on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Relay { child }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn queue(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postwarden"))
        .arg("queue")
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An SMTP client that submits messages on one connection.
struct Submitter {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Submitter {
    fn connect(addr: SocketAddr) -> Submitter {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut s =
            Submitter { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) };
        s.reply();
        s.writer.write_all(b"EHLO load.test\r\n").unwrap();
        s.reply();
        s
    }

    fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "relay closed");
            if line.as_bytes().get(3) == Some(&b' ') {
                return line;
            }
        }
    }

    /// Sends one message; returns its queue id.
    fn send(&mut self, rcpts: &[String], subject: &str) -> String {
        let mut batch = "MAIL FROM:<load@client.test>\r\n".to_owned();
        for r in rcpts {
            batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        self.writer.write_all(batch.as_bytes()).unwrap();
        for _ in 0..rcpts.len() + 1 {
            let reply = self.reply();
            assert!(reply.starts_with('2'), "{reply}");
        }
        let reply = self.reply();
        assert!(reply.starts_with("354"), "{reply}");
        let body = format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n.\r\n");
        self.writer.write_all(body.as_bytes()).unwrap();
        let reply = self.reply();
        assert!(reply.starts_with("250"), "{reply}");
        reply.trim_end().rsplit(' ').next().unwrap().to_owned()
    }
}

/// Issue 11 item 1 (a): `queue list`, `show`, `retry` (one and all) run in a loop while the relay
/// accepts and delivers a load; every acknowledged message reaches the sink exactly once and
/// the queue drains (nothing lost, nothing resurrected). `PW_QUEUE_LOAD` sets the number of
/// messages (default 1,000 for the suite; the issue's figure is 10,000).
#[test]
fn queue_commands_beside_a_loaded_relay_lose_and_resurrect_nothing() {
    let total: usize =
        std::env::var("PW_QUEUE_LOAD").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = write_config(dir.path(), port, sink.addr);
    let relay = Relay::start(&config, addr);

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let commands = {
        let (config, acked, done) = (config.clone(), acked.clone(), done.clone());
        std::thread::spawn(move || {
            let mut runs = 0usize;
            while !done.load(Ordering::Relaxed) {
                let last = acked.lock().unwrap().last().cloned();
                let mut run = |args: &[&str]| {
                    let output = queue(&config, args);
                    runs += 1;
                    output
                };
                let list = run(&["list"]);
                assert!(list.status.success(), "queue list: {}", stderr(&list));
                assert!(!stdout(&list).contains("QUARANTINED"), "{}", stdout(&list));
                let retry = run(&["retry"]);
                assert!(retry.status.success(), "queue retry: {}", stderr(&retry));
                if let Some(id) = last {
                    // The message may be gone by now (delivered): that is an error, not a
                    // resurrection.
                    let _ = run(&["show", &id]);
                    let _ = run(&["retry", &id]);
                }
            }
            runs
        })
    };
    let clients = 4;
    let senders: Vec<_> = (0..clients)
        .map(|c| {
            let acked = acked.clone();
            std::thread::spawn(move || {
                let mut s = Submitter::connect(addr);
                for n in (c..total).step_by(clients) {
                    let id = s.send(&[format!("user{n}@example.com")], &format!("load {n}"));
                    acked.lock().unwrap().push(id);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let got = sink.wait_for(total, Duration::from_secs(600));
    // Let the commands run on while the last deliveries are recorded, then stop them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let drained = loop {
        let list = stdout(&queue(&config, &["list"]));
        if list.trim_end().ends_with("\n0 messages, 0 quarantined")
            || list.trim_end() == "0 messages, 0 quarantined"
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    done.store(true, Ordering::Relaxed);
    let runs = commands.join().unwrap();

    let mut copies: HashMap<String, usize> = HashMap::new();
    for m in sink.received() {
        *copies.entry(m.subject().unwrap()).or_default() += 1;
    }
    let lost = (0..total).filter(|n| !copies.contains_key(&format!("load {n}"))).count();
    let duplicates: usize = copies.values().map(|c| c - 1).sum();
    eprintln!(
        "{total} messages, {} acknowledged, {got} received, {lost} lost, {duplicates} delivered \
         twice, {runs} queue commands run meanwhile",
        acked.lock().unwrap().len()
    );
    assert_eq!(acked.lock().unwrap().len(), total);
    assert_eq!(lost, 0, "acknowledged but never delivered");
    assert_eq!(duplicates, 0, "delivered twice (resurrected)");
    assert!(drained, "the queue did not drain: {}", stdout(&queue(&config, &["list"])));
    assert!(runs > 10, "too few commands ran to prove anything: {runs}");
    drop(relay);
}

/// Issue 11 item 1 (b): a queue command never recovers a spool it does not own. Beside a live
/// relay (through its socket), and beside a spool locked by someone else with no socket (it
/// refuses), `tmp/` files and bodies without envelope stay where they are.
#[test]
fn queue_commands_never_recover_a_locked_spool() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = write_config(dir.path(), port, sink.addr);
    let spool = dir.path().join("spool");
    {
        let relay = Relay::start(&config, addr);
        let mode = std::fs::metadata(spool.join("control.sock")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        // What an accept in progress looks like: staged files, a body before its envelope.
        std::fs::write(spool.join("tmp/.tmpSTAGED"), b"half an accept").unwrap();
        std::fs::write(spool.join("msg/inflight.eml"), b"Subject: x\r\n\r\nx\r\n").unwrap();
        for args in [&["list"][..], &["retry"], &["show", "nonesuch"], &["delete", "nonesuch"]] {
            let _ = queue(&config, args);
        }
        let list = queue(&config, &["list"]);
        assert!(list.status.success(), "{}", stderr(&list));
        assert!(stdout(&list).contains("0 messages"), "{}", stdout(&list));
        assert!(spool.join("tmp/.tmpSTAGED").exists(), "a queue command removed a staged file");
        assert!(spool.join("msg/inflight.eml").exists(), "a queue command removed a body");
        drop(relay);
    }
    // Locked by another process, no socket to talk to: refuse, touch nothing.
    let holder = postwarden::queue::store::SpoolDir::open_offline(&spool).unwrap();
    let list = queue(&config, &["list"]);
    assert!(!list.status.success());
    assert!(stderr(&list).contains("control socket"), "{}", stderr(&list));
    assert!(spool.join("tmp/.tmpSTAGED").exists());
    assert!(spool.join("msg/inflight.eml").exists());
    drop(holder);
    // No relay: the command works offline, still without recovering.
    let list = queue(&config, &["list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(spool.join("msg/inflight.eml").exists());
}

/// Issue 11 item 1 (c): `retry` and `delete` of a message being delivered wait their turn
/// (they say so and change nothing); after the delivery, `retry` cannot recreate the removed
/// envelope, and on a partly delivered message it never puts delivered recipients back.
#[test]
fn retry_never_resurrects_delivered_recipients_or_removed_envelopes() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = write_config(dir.path(), port, sink.addr);
    let env = |id: &str| dir.path().join("spool/env").join(format!("{id}.json"));
    let relay = Relay::start(&config, addr);
    let mut client = Submitter::connect(addr);

    // In flight: the sink has the message and holds its 250.
    sink.hold();
    let id = client.send(&["one@example.com".to_owned()], "held");
    assert!(sink.wait_holding(Duration::from_secs(30)), "the delivery never reached the sink");
    let before = std::fs::read(env(&id)).unwrap();
    let retry = queue(&config, &["retry", &id]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    assert!(stdout(&retry).contains("being delivered now"), "{}", stdout(&retry));
    let all = queue(&config, &["retry"]);
    assert!(stdout(&all).contains("1 being delivered"), "{}", stdout(&all));
    let delete = queue(&config, &["delete", &id]);
    assert!(!delete.status.success(), "{}", stdout(&delete));
    assert!(stderr(&delete).contains("being delivered"), "{}", stderr(&delete));
    assert_eq!(std::fs::read(env(&id)).unwrap(), before, "the envelope changed in flight");
    sink.release();
    assert_eq!(sink.wait_for(1, Duration::from_secs(30)), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env(&id).exists() {
        assert!(Instant::now() < deadline, "the delivered message stayed queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let retry = queue(&config, &["retry", &id]);
    assert!(!retry.status.success());
    assert!(stderr(&retry).contains("no message"), "{}", stderr(&retry));
    assert!(!env(&id).exists(), "retry recreated a removed envelope");

    // Partly delivered: example.com accepted, example.net deferred.
    let id = client.send(&["two@example.com".to_owned(), "two@example.net".to_owned()], "split");
    let deadline = Instant::now() + Duration::from_secs(30);
    let shown = |id: &str| stdout(&queue(&config, &["show", id]));
    // Until the first attempt is over, retry says "being delivered now" and changes nothing.
    loop {
        let retry = stdout(&queue(&config, &["retry", &id]));
        if retry.contains("due now") {
            break;
        }
        assert!(retry.contains("being delivered now"), "{retry}");
        assert!(Instant::now() < deadline, "no attempt: {}", shown(&id));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The retry runs: the deferred recipient is tried again, the delivered one is not.
    while !shown(&id).contains("attempts:    2") {
        assert!(Instant::now() < deadline, "the retry did not run: {}", shown(&id));
        std::thread::sleep(Duration::from_millis(20));
    }
    let show = shown(&id);
    assert!(show.contains("<two@example.com> delivered"), "{show}");
    assert!(show.contains("<two@example.net> pending"), "{show}");
    assert_eq!(sink.count(), 2, "one copy each, nothing delivered twice");
    drop(relay);
}

/// Issue 11 item 3: a recipient's delivery is on disk as soon as its transaction is over, not
/// when the whole attempt ends. A message for two domains (delivered side by side, one job per
/// domain): the first accepts, the second holds its `250`; meanwhile the stored envelope
/// already says the first recipient is delivered (a crash now would not send it again).
#[test]
fn each_transaction_is_recorded_before_the_next_one() {
    let first = Sink::start();
    let second = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = write_config(dir.path(), port, first.addr);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "\"example.net\" = \"[127.0.0.1]:1\"",
        &format!("\"example.org\" = \"[127.0.0.1]:{}\"", second.addr.port()),
    );
    std::fs::write(&config, text).unwrap();
    let relay = Relay::start(&config, addr);
    second.hold();
    let id = Submitter::connect(addr)
        .send(&["a@example.com".to_owned(), "b@example.org".to_owned()], "two domains");
    assert!(second.wait_holding(Duration::from_secs(30)), "the second transaction never came");
    assert_eq!(first.wait_for(1, Duration::from_secs(30)), 1, "the first transaction never came");
    // The first transaction is over and the second waits for its reply until `release`: the
    // attempt has not ended, yet the first recipient's delivery must reach the disk.
    let spool = postwarden::queue::store::SpoolDir::inspect(dir.path().join("spool"));
    use postwarden::queue::store::RecipientState;
    let state = |address: &str| {
        let stored = postwarden::queue::store::QueueStore::envelope(&spool, &id).unwrap();
        stored.rcpts.iter().find(|r| r.address == address).unwrap().state
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while state("a@example.com") != RecipientState::Delivered {
        assert!(Instant::now() < deadline, "a@example.com not recorded while the attempt runs");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(state("b@example.org"), RecipientState::Pending);
    second.release();
    assert_eq!(second.wait_for(1, Duration::from_secs(30)), 1);
    assert_eq!(first.count(), 1);
    drop(relay);
}
