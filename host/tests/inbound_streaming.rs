//! Messages go to the spool as they arrive (never held whole in memory), over real sockets,
//! through the queue's own adapter (`QueueSpool`) and spool directory.
//!
//! The memory figure (10 concurrent 20 MB messages) is in `inbound_memory.rs`, alone in its
//! test binary so that nothing else shares the process.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use postwarden::inbound::{InboundOptions, Spool, Submission, serve};
use postwarden::queue::store::SpoolDir;
use postwarden::queue::{Queue, QueueOptions};
use postwarden::service::QueueSpool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

/// The queue's adapter, telling the test when a staging file is handed out and what each
/// accepted submission looked like.
struct Observed {
    inner: QueueSpool,
    staged: mpsc::UnboundedSender<PathBuf>,
    accepted: mpsc::UnboundedSender<Submission>,
}

impl Spool for Observed {
    fn accept(
        &self,
        submission: Submission,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        let _ = self.accepted.send(submission.clone());
        self.inner.accept(submission)
    }

    fn stage(&self) -> Option<Result<(PathBuf, std::fs::File), String>> {
        let staged = self.inner.stage();
        if let Some(Ok((path, _))) = &staged {
            let _ = self.staged.send(path.clone());
        }
        staged
    }
}

struct Server {
    addr: SocketAddr,
    queue: Arc<Queue>,
    dir: tempfile::TempDir,
    staged: mpsc::UnboundedReceiver<PathBuf>,
    accepted: mpsc::UnboundedReceiver<Submission>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start(options: InboundOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SpoolDir::open(dir.path()).unwrap());
    let queue = Queue::new(store, QueueOptions::default());
    let (staged_tx, staged) = mpsc::unbounded_channel();
    let (accepted_tx, accepted) = mpsc::unbounded_channel();
    let spool =
        Observed { inner: QueueSpool(queue.clone()), staged: staged_tx, accepted: accepted_tx };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(serve(listener, Arc::new(options), Arc::new(spool), shutdown));
    Server { addr, queue, dir, staged, accepted, stop, task }
}

fn options() -> InboundOptions {
    InboundOptions { hostname: "relay.test".into(), ..Default::default() }
}

/// Reads one reply (all its lines) from `stream`.
async fn reply(stream: &mut TcpStream) -> String {
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&text));
        text.push(byte[0]);
        if text.ends_with(b"\r\n") {
            let last = text[..text.len() - 2].rsplit(|&b| b == b'\n').next().unwrap();
            if last.len() < 4 || last[3] == b' ' {
                return String::from_utf8(text).unwrap().trim_end().to_owned();
            }
        }
    }
}

async fn cmd(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
    reply(stream).await
}

async fn in_data(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(reply(&mut s).await.starts_with("220"));
    assert!(cmd(&mut s, "EHLO client.test").await.starts_with("250"));
    assert!(cmd(&mut s, "MAIL FROM:<a@example.test>").await.starts_with("250"));
    assert!(cmd(&mut s, "RCPT TO:<x@example.net>").await.starts_with("250"));
    assert!(cmd(&mut s, "DATA").await.starts_with("354"));
    s
}

fn tmp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("tmp")).unwrap().count()
}

/// The spool hands out a staging file while the message is still arriving (the event below
/// comes before the final dot is sent); the queue ends up with exactly the message, its
/// `Received:` line first, and `TLS-Required: No` is still seen in the header block. A small
/// message stays in memory and never needs a staging file.
#[tokio::test]
async fn a_message_is_written_to_the_spool_as_it_arrives() {
    let mut server = start(options()).await;
    let mut s = in_data(server.addr).await;
    let mut message = b"Subject: big\r\nTLS-Required: No\r\n\r\n".to_vec();
    for n in 0..20_000 {
        message.extend_from_slice(format!("line {n:06} ..........................\r\n").as_bytes());
    }
    let half = message.len() / 2;
    s.write_all(&message[..half]).await.unwrap();
    let staged = tokio::time::timeout(WAIT, server.staged.recv()).await.unwrap().unwrap();
    assert!(staged.starts_with(server.dir.path().join("tmp")), "{}", staged.display());
    s.write_all(&message[half..]).await.unwrap();
    let done = cmd(&mut s, ".").await;
    assert!(done.starts_with("250 2.0.0 message accepted, queued as "), "{done}");
    let id = done.rsplit(' ').next().unwrap().to_owned();

    let submission = server.accepted.recv().await.unwrap();
    assert!(submission.body.is_empty());
    assert!(submission.tls_required_no);
    let staged_body = submission.staged.unwrap();
    assert_eq!(staged_body.path, staged);
    let stored = server.queue.store().body(&id).unwrap();
    assert_eq!(stored.len() as u64, staged_body.len);
    assert!(stored.starts_with(b"Received: from client.test ([127.0.0.1])\r\n"));
    assert!(stored.ends_with(&message), "the stored body is the message after its Received line");
    assert!(server.queue.store().envelope(&id).unwrap().tls_required_no);
    assert_eq!(tmp_files(server.dir.path()), 0, "the staging file was renamed into place");

    let small = cmd(&mut s, "MAIL FROM:<a@example.test>").await;
    assert!(small.starts_with("250"), "{small}");
    assert!(cmd(&mut s, "RCPT TO:<x@example.net>").await.starts_with("250"));
    assert!(cmd(&mut s, "DATA").await.starts_with("354"));
    assert!(cmd(&mut s, "Subject: small\r\n\r\nhi\r\n.").await.starts_with("250 2.0.0"));
    let submission = server.accepted.recv().await.unwrap();
    assert!(submission.staged.is_none());
    assert!(submission.body.ends_with(b"Subject: small\r\n\r\nhi\r\n"));
    assert!(server.staged.try_recv().is_err());
}

/// A message refused at the final dot (too large, or holding NUL), and one whose client went
/// away mid-DATA, leave nothing in the spool; the session goes on after a refusal.
#[tokio::test]
async fn refused_or_abandoned_messages_leave_no_file() {
    let mut server = start(InboundOptions { max_message_size: 100_000, ..options() }).await;
    let mut s = in_data(server.addr).await;
    s.write_all(&b"0123456789abcdef0123456789abcdef\r\n".repeat(4000)).await.unwrap();
    server.staged.recv().await.unwrap();
    assert_eq!(cmd(&mut s, ".").await, "552 5.3.4 message size exceeds the limit");
    assert_eq!(cmd(&mut s, "MAIL FROM:<a@example.test>").await, "250 2.1.0 sender ok");
    assert!(cmd(&mut s, "RCPT TO:<x@example.net>").await.starts_with("250"));
    assert!(cmd(&mut s, "DATA").await.starts_with("354"));
    s.write_all(&b"Subject: nul\r\n\r\n".repeat(4500)).await.unwrap();
    s.write_all(b"a\0b\r\n").await.unwrap();
    server.staged.recv().await.unwrap();
    assert_eq!(cmd(&mut s, ".").await, "554 5.6.0 message contains NUL characters");

    let mut gone = in_data(server.addr).await;
    gone.write_all(&b"x".repeat(80_000)).await.unwrap();
    server.staged.recv().await.unwrap();
    drop(gone);
    drop(s);

    // `serve` returns once every connection has ended, cleanup included.
    server.stop.send(true).unwrap();
    tokio::time::timeout(WAIT, server.task).await.unwrap().unwrap();
    assert_eq!(tmp_files(server.dir.path()), 0);
    assert!(server.queue.store().list().unwrap().is_empty());
    assert!(server.accepted.try_recv().is_err());
}

/// A message refused at its dot with the next one pipelined behind it in the same write: the
/// second message is stored exactly, nothing of the first's staging file leaks into it.
#[tokio::test]
async fn a_refused_message_never_leaks_into_the_next_one() {
    let mut server = start(InboundOptions { max_message_size: 100_000, ..options() }).await;
    let mut s = in_data(server.addr).await;
    let line = b"0123456789abcdef0123456789abcdef\r\n";
    s.write_all(&line.repeat(2000)).await.unwrap();
    server.staged.recv().await.unwrap();
    let mut rest = line.repeat(1000);
    rest.extend_from_slice(
        b".\r\nMAIL FROM:<b@example.test>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n",
    );
    let second = b"Subject: second\r\n\r\nonly this\r\n";
    rest.extend_from_slice(second);
    rest.extend_from_slice(b".\r\n");
    s.write_all(&rest).await.unwrap();
    assert_eq!(reply(&mut s).await, "552 5.3.4 message size exceeds the limit");
    assert!(reply(&mut s).await.starts_with("250"));
    assert!(reply(&mut s).await.starts_with("250"));
    assert!(reply(&mut s).await.starts_with("354"));
    let done = reply(&mut s).await;
    assert!(done.starts_with("250 2.0.0 message accepted"), "{done}");
    let id = done.rsplit(' ').next().unwrap();
    let stored = server.queue.store().body(id).unwrap();
    assert!(stored.starts_with(b"Received: from client.test"));
    let after_received = stored.windows(8).position(|w| w == b" +0000\r\n").unwrap() + 8;
    assert_eq!(&stored[after_received..], second, "{}", String::from_utf8_lossy(&stored));
}
