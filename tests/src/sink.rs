//! A plaintext SMTP sink: the destination of end-to-end tests that count what arrived.
//!
//! It runs on its own thread (its own runtime), so tests with or without a runtime use it alike;
//! waiting is on a condition variable, never a sleep. It can hold the reply to the final dot
//! ([`Sink::hold`]) so that a test acts while a delivery is provably in flight.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One message as the sink received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The reverse-path.
    pub mail_from: String,
    /// The recipients.
    pub rcpts: Vec<String>,
    /// The message, dot-unstuffed, CRLF line ends.
    pub body: Vec<u8>,
}

impl Received {
    /// The value of the first `Subject:` header.
    pub fn subject(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.body);
        text.lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix("Subject: ").map(|s| s.trim_end().to_owned()))
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Hold the next final-dot reply until the gate opens.
    hold: bool,
    /// A transaction is waiting at the gate.
    holding: bool,
    /// Messages received while held (released later).
    release: bool,
}

/// The sink; it stops with the process.
#[derive(Clone)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Sink {
    /// Starts a sink on `127.0.0.1`, on a port of its own.
    pub fn start() -> Sink {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local address");
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let shared = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the sink's runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let state = shared.clone();
                    tokio::spawn(async move {
                        let _ = session(stream, state).await;
                    });
                }
            });
        });
        Sink { addr, state }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// How many messages arrived.
    pub fn count(&self) -> usize {
        self.lock().received.len()
    }

    /// Waits until `n` messages arrived or `within` passed; returns the count.
    pub fn wait_for(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while state.received.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = cvar.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        state.received.len()
    }

    /// From now on, the reply to a final dot waits for [`Sink::release`].
    pub fn hold(&self) {
        let mut state = self.lock();
        state.hold = true;
        state.release = false;
    }

    /// Waits until a transaction is held (the message received, its 250 not sent); `false`
    /// after `within`.
    pub fn wait_holding(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while !state.holding {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = cvar.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Sends the held replies and stops holding.
    pub fn release(&self) {
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.hold = false;
        state.release = true;
        cvar.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn session(stream: TcpStream, state: Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write.write_all(b"220 sink.test ESMTP\r\n").await?;
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let upper = text.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
        } else if upper.starts_with("HELO")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            from.clear();
            rcpts.clear();
            b"250 ok\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = addr_of(&text[10..]);
            rcpts.clear();
            b"250 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            rcpts.push(addr_of(&text[8..]));
            b"250 ok\r\n"
        } else if upper == "DATA" {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut body = Vec::new();
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                let unstuffed = if line.starts_with(b"..") { &line[1..] } else { &line[..] };
                body.extend_from_slice(unstuffed);
            }
            let received =
                Received { mail_from: from.clone(), rcpts: std::mem::take(&mut rcpts), body };
            let state = state.clone();
            // The gate is a condition variable: wait for it off the runtime.
            tokio::task::spawn_blocking(move || {
                let (lock, cvar) = &*state;
                let mut s = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if s.hold {
                    s.holding = true;
                    cvar.notify_all();
                    while !s.release {
                        s = cvar.wait(s).unwrap_or_else(|e| e.into_inner());
                    }
                    s.holding = false;
                }
                s.received.push(received);
                cvar.notify_all();
            })
            .await?;
            b"250 2.0.0 queued\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

fn addr_of(arg: &str) -> String {
    let arg = arg.trim();
    let inner = arg.strip_prefix('<').and_then(|a| a.split_once('>')).map_or(arg, |(a, _)| a);
    inner.to_owned()
}
