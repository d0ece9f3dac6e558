//! The local control socket: `postwarden queue …` against a running relay.
//!
//! Why a socket rather than the files: while the relay runs, the spool is its own. Accepts are
//! half-written in `tmp/` and bodies reach `msg/` before their envelope (see
//! [`crate::queue::store`]); a second process that "recovers" or rewrites envelopes there
//! deletes acknowledged mail or puts delivered recipients back. So the relay holds the spool's
//! lock for its lifetime, and queue commands against it are requests on this socket, carried
//! out by the relay in-process under each message's claim ([`Queue::claim`]), serialised with
//! its deliveries. With no relay running, the command takes the lock itself and runs the same
//! [`execute`] on the spool directly (offline), so a relay cannot start meanwhile.
//!
//! The socket is a Unix socket, mode 0600 (created under a temporary name, restricted, then
//! renamed into place), and a connecting process must run as the socket's owner or root
//! (`SO_PEERCRED`). One request per connection: a JSON line in, a JSON line out.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::queue::Queue;
use crate::queue::store::{RecipientState, StoreError, now};

/// A queue command.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// One line per message, then the quarantined entries.
    List,
    /// One message in full.
    Show {
        /// Queue id.
        id: String,
    },
    /// Make one message (or all) due now.
    Retry {
        /// Queue id; `None`: every message.
        id: Option<String>,
    },
    /// Remove a message without delivering it.
    Delete {
        /// Queue id.
        id: String,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct Response {
    /// Whether the command succeeded (the exit status).
    pub ok: bool,
    /// What to print (on stdout when `ok`, else on stderr).
    pub output: String,
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// Carries out `request` on `queue`'s store. Blocking (file I/O, fsync): call it off the async
/// workers. Every change goes through [`Queue::retry`] / [`Queue::delete`], under the message's
/// claim; reading commands take no claim and change nothing.
pub fn execute(queue: &Queue, request: &Request) -> Response {
    match run(queue, request) {
        Ok(output) => Response { ok: true, output },
        Err(e) => Response { ok: false, output: format!("{e}\n") },
    }
}

fn run(queue: &Queue, request: &Request) -> Result<String, StoreError> {
    use std::fmt::Write as _;
    let store = queue.store();
    let mut out = String::new();
    match request {
        Request::List => {
            let t = now();
            let listing = store.scan()?;
            for e in &listing.envelopes {
                let pending = e.pending().count();
                let first = e.pending().next().map_or("", |r| r.address.as_str());
                let last = e
                    .pending()
                    .find_map(|r| r.last.as_ref())
                    .map_or(String::new(), |(c, r)| format!("{c} {r}"));
                let _ = writeln!(
                    out,
                    "{}  age {}s  attempts {}  next in {}s  from <{}>  {pending} pending (first {})  {}",
                    escape(&e.id),
                    t.saturating_sub(e.created),
                    e.attempts,
                    e.next_attempt.saturating_sub(t),
                    escape(&e.mail_from),
                    escape(first),
                    escape(&last),
                );
            }
            for (id, reason) in &listing.corrupt {
                let _ = writeln!(
                    out,
                    "{}  CORRUPT (quarantined by the relay's next scan)  {}",
                    escape(id),
                    escape(reason)
                );
            }
            let quarantined = store.quarantined()?;
            for q in &quarantined {
                let _ = writeln!(out, "{}  QUARANTINED  {}", escape(&q.id), escape(&q.reason));
            }
            let _ = writeln!(
                out,
                "{} messages, {} quarantined",
                listing.envelopes.len() + listing.corrupt.len(),
                quarantined.len()
            );
        }
        Request::Show { id } => {
            let e = store.envelope(id)?;
            let _ = writeln!(out, "id:          {}", escape(&e.id));
            let _ = writeln!(out, "from:        <{}>", escape(&e.mail_from));
            let _ = writeln!(out, "created:     {}", e.created);
            let _ = writeln!(out, "attempts:    {}", e.attempts);
            let _ = writeln!(out, "next:        {}", e.next_attempt);
            let _ = writeln!(out, "requiretls:  {}", e.requiretls);
            match (e.body_len, &e.body_sha256) {
                (Some(len), Some(sha)) => {
                    let _ = writeln!(out, "body:        {len} bytes, sha256 {}", escape(sha));
                }
                _ => {
                    let _ = writeln!(out, "body:        (no length or checksum recorded)");
                }
            }
            for r in &e.rcpts {
                let state = match r.state {
                    RecipientState::Pending => "pending",
                    RecipientState::Delivered => "delivered",
                    RecipientState::Bounced => "bounced",
                };
                let last = r.last.as_ref().map_or(String::new(), |(c, t)| format!(" {c} {t}"));
                let _ = writeln!(
                    out,
                    "rcpt:        <{}> {state}{} [{}]",
                    escape(&r.address),
                    escape(&last),
                    escape(&r.tls_log)
                );
            }
        }
        Request::Retry { id: Some(id) } => {
            if queue.retry(id)? {
                let _ = writeln!(out, "{}: due now", escape(id));
            } else {
                let _ = writeln!(out, "{}: being delivered now", escape(id));
            }
        }
        Request::Retry { id: None } => {
            let (due, busy) = queue.retry_all()?;
            let _ = writeln!(out, "{due} messages due now, {busy} being delivered");
        }
        Request::Delete { id } => {
            if queue.delete(id)? {
                let _ = writeln!(out, "{}: deleted", escape(id));
            } else {
                return Err(StoreError::Task(format!(
                    "{}: being delivered now; try again when the attempt is over",
                    escape(id)
                )));
            }
        }
    }
    Ok(out)
}

/// `s` with control characters (CR, LF, ESC, ...) and backslashes escaped, so that a field
/// of an envelope cannot forge lines or drive the operator's terminal.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Binds the control socket at `path`, mode 0600, replacing a stale one. Only the owner of the
/// spool's lock may call this (a live relay's socket would be taken over).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let staging = staging_path(path);
    let _ = std::fs::remove_file(&staging);
    let listener = std::os::unix::net::UnixListener::bind(&staging)?;
    // Restricted before it has its name: nobody can connect in between.
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staging, path)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.new", std::process::id()));
    path.with_file_name(name)
}

/// Serves requests on `listener` until `shutdown` turns true, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    queue: Arc<Queue>,
    mut shutdown: watch::Receiver<bool>,
) {
    let owner = std::fs::metadata(&path).map(|m| m.uid()).ok();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let queue = queue.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, owner, queue).await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(stream: UnixStream, owner: Option<u32>, queue: Arc<Queue>) -> std::io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let response = if peer != 0 && Some(peer) != owner {
        Response { ok: false, output: format!("uid {peer} may not control this relay\n") }
    } else {
        let mut line = String::new();
        let mut reader =
            tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
        tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => tokio::task::spawn_blocking(move || execute(&queue, &request))
                .await
                .unwrap_or_else(|e| Response { ok: false, output: format!("failed: {e}\n") }),
            Err(e) => Response { ok: false, output: format!("bad request: {e}\n") },
        }
    };
    let mut bytes = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

/// Sends `request` to the relay listening on `path` and returns its answer. A relay that is
/// starting holds the spool's lock before its socket exists: connecting is retried for a few
/// seconds.
pub fn call(path: &Path, request: &Request) -> std::io::Result<Response> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => break stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("a\r\nb\x1b[31m\\"), "a\\r\\nb\\u{1b}[31m\\\\");
        assert_eq!(escape("plain <a@b.example>"), "plain <a@b.example>");
    }

    #[test]
    fn requests_round_trip_as_json() {
        for request in [
            Request::List,
            Request::Show { id: "x".into() },
            Request::Retry { id: None },
            Request::Delete { id: "y".into() },
        ] {
            let json = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
        }
        assert!(serde_json::from_str::<Request>(r#"{"command":"format-disk"}"#).is_err());
    }
}
