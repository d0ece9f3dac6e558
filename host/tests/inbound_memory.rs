//! Memory while receiving: 10 clients send a 20 MB message each at the same time, through the
//! queue's adapter into a spool directory. Messages go to disk as they arrive, so the peak RSS
//! of this process may grow by at most 100 MB (held whole, the same load grew a relay from
//! 13 MB to 475 MB). The test asserts 50 MB, so that the in-memory path (≈130 MB in this
//! harness) cannot pass it; streamed, the growth is about 5 MB.
//!
//! Alone in its test binary: the figure is the whole process's. The `#[ignore]`d variant
//! takes messages in memory, as before, for comparison:
//! `cargo test -p postwarden --test inbound_memory -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use postwarden::inbound::{InboundOptions, Spool, Submission, serve};
use postwarden::queue::store::SpoolDir;
use postwarden::queue::{Queue, QueueOptions};
use postwarden::service::QueueSpool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CLIENTS: usize = 10;
const MESSAGE: usize = 20_000_000;

/// The queue's adapter, optionally without staging (messages in memory).
struct Adapter {
    inner: QueueSpool,
    stage: bool,
}

impl Spool for Adapter {
    fn accept(
        &self,
        submission: Submission,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        self.inner.accept(submission)
    }

    fn stage(&self) -> Option<Result<(PathBuf, std::fs::File), String>> {
        if self.stage { self.inner.stage() } else { None }
    }
}

/// `VmRSS` or `VmHWM` of this process, in kB.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Reads one reply and checks its code.
async fn expect(io: &mut BufReader<TcpStream>, code: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(io.read_line(&mut line).await.unwrap() > 0, "connection closed");
        assert!(line.starts_with(code), "{line}");
        if line.as_bytes()[3] == b' ' {
            return;
        }
    }
}

async fn send(addr: SocketAddr, chunk: Arc<Vec<u8>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut io = BufReader::new(stream);
    expect(&mut io, "220").await;
    for (command, code) in [
        ("EHLO client.test\r\n", "250"),
        ("MAIL FROM:<a@example.test>\r\n", "250"),
        ("RCPT TO:<x@example.net>\r\n", "250"),
        ("DATA\r\n", "354"),
    ] {
        io.get_mut().write_all(command.as_bytes()).await.unwrap();
        expect(&mut io, code).await;
    }
    for _ in 0..MESSAGE / chunk.len() {
        io.get_mut().write_all(&chunk).await.unwrap();
    }
    io.get_mut().write_all(b".\r\n").await.unwrap();
    expect(&mut io, "250").await;
}

/// Returns (RSS before in kB, peak RSS after in kB, messages in the queue).
async fn run(stage: bool) -> (u64, u64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SpoolDir::open(dir.path()).unwrap());
    let queue = Queue::new(store, QueueOptions::default());
    let spool = Arc::new(Adapter { inner: QueueSpool(queue.clone()), stage });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let options = InboundOptions { hostname: "relay.test".into(), ..Default::default() };
    tokio::spawn(serve(listener, Arc::new(options), spool, shutdown));
    // 1 MB of 100-octet lines.
    let line = [b"x".repeat(98), b"\r\n".to_vec()].concat();
    let chunk: Arc<Vec<u8>> = Arc::new(line.repeat(10_000));
    assert_eq!(MESSAGE % chunk.len(), 0);
    let before = status_kb("VmRSS:");
    let clients: Vec<_> = (0..CLIENTS).map(|_| tokio::spawn(send(addr, chunk.clone()))).collect();
    for client in clients {
        client.await.unwrap();
    }
    let peak = status_kb("VmHWM:");
    let queued = queue.store().list().unwrap().len();
    for envelope in queue.store().list().unwrap() {
        assert!(queue.store().body(&envelope.id).unwrap().len() > MESSAGE);
    }
    (before, peak, queued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_20_mb_messages_stay_under_100_mb_of_rss() {
    let (before, peak, queued) = run(true).await;
    eprintln!(
        "streamed: RSS before {} MB, peak {} MB, growth {} MB, {queued} messages queued",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
    assert_eq!(queued, CLIENTS);
    assert!(peak.saturating_sub(before) <= 50 * 1024, "peak grew by {} kB", peak - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "comparison figure; run alone with --ignored"]
async fn in_memory_for_comparison() {
    let (before, peak, queued) = run(false).await;
    eprintln!(
        "in memory: RSS before {} MB, peak {} MB, growth {} MB, {queued} messages queued",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
}
