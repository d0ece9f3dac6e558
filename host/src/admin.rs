//! The admin listener (loopback): `/metrics` in Prometheus text format, queue and message status
//! as JSON.
//!
//! A deliberately tiny HTTP/1.1 responder: one request per connection, GET only, bounded
//! request size. It exposes counters and the queue, never accepts changes (those go through
//! the `postwarden queue` commands and the local control socket, [`crate::control`]), and
//! should only ever listen on loopback.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::policy::ChainHandle;
use crate::queue::Queue;
use crate::queue::store::{RecipientState, now};

/// What the admin listener reports on.
#[derive(Clone)]
pub struct AdminState {
    /// The queue.
    pub queue: Arc<Queue>,
    /// The policy chain.
    pub chains: Arc<ChainHandle>,
    /// The deliverer (connection counters).
    pub deliverer: Arc<crate::delivery::Deliverer>,
}

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: AdminState, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, &state)).await;
                });
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() > 8192 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics(state)),
        ("GET", "/queue") => ("200 OK", "application/json", queue_json(state, None)),
        ("GET", p) if p.starts_with("/queue/") => {
            match queue_json(state, Some(&p["/queue/".len()..])) {
                body if body == "null" => (
                    "404 Not Found",
                    "application/json",
                    "{\"error\":\"no such message\"}".to_owned(),
                ),
                body => ("200 OK", "application/json", body),
            }
        }
        ("GET", _) => {
            ("404 Not Found", "text/plain", "try /metrics, /queue or /queue/<id>\n".to_owned())
        }
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The Prometheus exposition.
pub fn metrics(state: &AdminState) -> String {
    let mut out = String::new();
    let c = &state.queue.counters;
    let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    counter(
        "postwarden_messages_accepted_total",
        "Messages accepted and fsync'd.",
        &[("", c.accepted.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_recipients_delivered_total",
        "Recipients delivered, by TLS outcome.",
        &[
            ("{tls=\"verified\"}", c.delivered_tls_verified.load(Ordering::Relaxed)),
            ("{tls=\"unverified\"}", c.delivered_tls_unverified.load(Ordering::Relaxed)),
            ("{tls=\"plaintext\"}", c.delivered_plaintext.load(Ordering::Relaxed)),
        ],
    );
    counter(
        "postwarden_recipients_deferred_total",
        "Recipient attempts deferred.",
        &[("", c.deferred.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_recipients_bounced_total",
        "Recipients bounced.",
        &[("", c.bounced.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_queue_quarantined_total",
        "Queue entries moved to quarantine (corrupt envelope, missing or altered body).",
        &[("", c.quarantined.load(Ordering::Relaxed))],
    );
    let s = &state.deliverer.stats;
    counter(
        "postwarden_connections_opened_total",
        "Outbound SMTP connections opened.",
        &[("", s.opened.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_transactions_reused_total",
        "Transactions carried by a kept-open TLS connection instead of a new one.",
        &[("", s.reused.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_tls_handshakes_total",
        "Outbound TLS handshakes, full or resuming an earlier session.",
        &[
            ("{kind=\"full\"}", s.tls_full.load(Ordering::Relaxed)),
            ("{kind=\"resumed\"}", s.tls_resumed.load(Ordering::Relaxed)),
        ],
    );
    let chain = state.chains.current();
    let counters = chain.counters();
    counter(
        "postwarden_policy_plans_total",
        "Policy chain plans, by who decided.",
        &[
            ("{decided=\"policy\"}", counters.decided.load(Ordering::Relaxed)),
            ("{decided=\"default\"}", counters.defaulted.load(Ordering::Relaxed)),
        ],
    );
    let faults: Vec<(String, u64)> = chain
        .policies()
        .iter()
        .map(|p| (format!("{{policy=\"{}\"}}", p.name()), p.stats().faults.load(Ordering::Relaxed)))
        .collect();
    let faults: Vec<(&str, u64)> = faults.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    counter(
        "postwarden_policy_faults_total",
        "Policy faults (each made the attempt defer).",
        &faults,
    );
    let calls: Vec<(String, u64)> = chain
        .policies()
        .iter()
        .map(|p| (format!("{{policy=\"{}\"}}", p.name()), p.stats().calls.load(Ordering::Relaxed)))
        .collect();
    let calls: Vec<(&str, u64)> = calls.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    counter("postwarden_policy_calls_total", "Calls into policies.", &calls);

    let list = state.queue.store().list().unwrap_or_default();
    let oldest = list.iter().map(|e| now().saturating_sub(e.created)).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP postwarden_queue_messages Messages in the queue.\n# TYPE postwarden_queue_messages gauge"
    );
    let _ = writeln!(out, "postwarden_queue_messages {}", list.len());
    let _ = writeln!(
        out,
        "# HELP postwarden_queue_oldest_seconds Age of the oldest queued message.\n# TYPE postwarden_queue_oldest_seconds gauge"
    );
    let _ = writeln!(out, "postwarden_queue_oldest_seconds {oldest}");
    let quarantined = state.queue.store().quarantined().map_or(0, |q| q.len());
    let _ = writeln!(
        out,
        "# HELP postwarden_queue_quarantined Entries in the quarantine directory (see `postwarden queue list`).\n# TYPE postwarden_queue_quarantined gauge"
    );
    let _ = writeln!(out, "postwarden_queue_quarantined {quarantined}");
    out
}

fn queue_json(state: &AdminState, id: Option<&str>) -> String {
    let list = state.queue.store().list().unwrap_or_default();
    let to_json = |e: &crate::queue::store::Envelope| {
        serde_json::json!({
            "id": e.id,
            "from": e.mail_from,
            "age_seconds": now().saturating_sub(e.created),
            "attempts": e.attempts,
            "next_attempt_in": e.next_attempt.saturating_sub(now()),
            "requiretls": e.requiretls,
            "recipients": e.rcpts.iter().map(|r| serde_json::json!({
                "address": r.address,
                "state": match r.state {
                    RecipientState::Pending => "pending",
                    RecipientState::Delivered => "delivered",
                    RecipientState::Bounced => "bounced",
                },
                "last": r.last.as_ref().map(|(code, reason)| serde_json::json!({"code": code, "reason": reason})),
                "tls": r.tls_log,
            })).collect::<Vec<_>>(),
        })
    };
    match id {
        None => serde_json::Value::Array(list.iter().map(to_json).collect()).to_string(),
        Some(id) => list
            .iter()
            .find(|e| e.id == id)
            .map_or_else(|| "null".to_owned(), |e| to_json(e).to_string()),
    }
}
