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
    /// The inbound server's per-address state and limit counters.
    pub inbound: Arc<crate::inbound::Anvil>,
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
    let line = String::from_utf8_lossy(&request).into_owned();
    // Every page reads the spool (each envelope, per request): that is blocking file I/O, so
    // it runs on the blocking pool, not on an async worker (ARCHITECTURE.md).
    let state = state.clone();
    let page = tokio::task::spawn_blocking(move || page(&line, &state));
    let (status, content_type, body) = page.await.map_err(std::io::Error::other)?;
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Status, content type and body for the request line `line`.
fn page(line: &str, state: &AdminState) -> (&'static str, &'static str, String) {
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    match (method, path) {
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
    }
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
    let i = &state.inbound.stats;
    counter(
        "postwarden_inbound_connections_refused_total",
        "Inbound connections refused by a limit: the server's cap, the per-address cap, the per-address rate.",
        &[
            ("{limit=\"global\"}", i.refused_global.load(Ordering::Relaxed)),
            ("{limit=\"per_client\"}", i.refused_per_client.load(Ordering::Relaxed)),
            ("{limit=\"rate\"}", i.refused_rate.load(Ordering::Relaxed)),
        ],
    );
    counter(
        "postwarden_inbound_auth_failures_total",
        "Failed AUTH attempts (wrong user name or password).",
        &[("", i.auth_failures.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_inbound_auth_refused_total",
        "AUTH refused (454) because the client's address failed too often recently.",
        &[("", i.auth_refused.load(Ordering::Relaxed))],
    );
    counter(
        "postwarden_inbound_sessions_closed_total",
        "Inbound sessions the server closed on a limit.",
        &[
            ("{limit=\"session_time\"}", i.session_time_exceeded.load(Ordering::Relaxed)),
            ("{limit=\"data_rate\"}", i.data_too_slow.load(Ordering::Relaxed)),
            ("{limit=\"errors\"}", i.too_many_errors.load(Ordering::Relaxed)),
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
    counter(
        "postwarden_tls_required_no_total",
        "Plans of a forced requirement for a message with `TLS-Required: No`: relaxed to may \
         (policy_engine.tls_required_no allowed it) or ignored (forced kept).",
        &[
            ("{outcome=\"relaxed\"}", counters.tls_required_no_relaxed.load(Ordering::Relaxed)),
            ("{outcome=\"ignored\"}", counters.tls_required_no_ignored.load(Ordering::Relaxed)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::{Anvil, InboundStats};

    /// The inbound limits' counters (AUTH failures across connections among them) are on
    /// `/metrics`.
    #[tokio::test]
    async fn inbound_limit_counters_are_exported() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::default();
        config.policy_engine.cache_dir = dir.path().join("cache");
        let engine = crate::policy::engine_from_config(&config).unwrap();
        let chain = crate::policy::load_chain(&engine, &config, crate::policy::StateMode::Snapshot)
            .unwrap();
        let store = crate::queue::store::SpoolDir::open(dir.path().join("spool")).unwrap();
        let inbound = Arc::new(Anvil::default());
        for _ in 0..3 {
            InboundStats::count(&inbound.stats.auth_failures);
        }
        InboundStats::count(&inbound.stats.auth_refused);
        InboundStats::count(&inbound.stats.refused_per_client);
        let state = AdminState {
            queue: Queue::new(Arc::new(store), crate::queue::QueueOptions::default()),
            chains: Arc::new(ChainHandle::new(chain)),
            deliverer: crate::delivery::Deliverer::from_config(&config).unwrap(),
            inbound,
        };
        let text = metrics(&state);
        for line in [
            "postwarden_inbound_auth_failures_total 3",
            "postwarden_inbound_auth_refused_total 1",
            "postwarden_inbound_connections_refused_total{limit=\"per_client\"} 1",
            "postwarden_inbound_connections_refused_total{limit=\"rate\"} 0",
            "postwarden_inbound_sessions_closed_total{limit=\"session_time\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
