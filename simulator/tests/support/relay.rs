//! A reference delivery client implementing the team's decisions (research §7), used to check
//! that every fake server behaves as its scenario's expected outcomes claim. It is a test
//! oracle for the catalogue, not a relay: one message, no queue, no retries in time.

use std::io;
use std::sync::Arc;

use postwarden_sim::fleet::RouteMx;
use postwarden_sim::scenario::{Outcome, Policy};
use postwarden_sim::{Fleet, Scenario};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Client, Reply, connect, danger_unverified_config, upgrade, verifying_config};

/// What happened to each recipient, and which MX host took the message.
#[derive(Debug)]
pub struct Delivery {
    /// Outcome per recipient, in the order given.
    pub results: Vec<(String, Outcome)>,
    /// The first label of the MX that accepted (any) recipient.
    pub via: Option<String>,
}

/// How one attempt on one MX ended.
enum Attempt {
    /// The transaction ran; per-recipient outcomes.
    Done(Vec<Outcome>),
    /// TLS was not offered or was refused (forced policies only).
    NoTls,
    /// The handshake, or the TLS session before its first reply, failed.
    TlsFailed,
    /// Connection, greeting or protocol trouble (replies out of step included): try the next
    /// MX.
    Transient,
    /// The message carries REQUIRETLS and the host does not advertise it after STARTTLS (RFC
    /// 8689 §4.2.1): try the next MX; bounce with 5.7.30 when none qualifies.
    NoRequireTls,
    /// The host completed the handshake and then refused the session inside TLS (issue 17
    /// item 1): its answer, never a reason for plaintext there. `code` is the reply's enhanced
    /// status code; a 5xx refusal ends the message only when every host refused permanently.
    RefusedInTls { permanent: bool, code: &'static str },
}

/// The security mode of the session carrying the transaction.
#[derive(Clone, Copy)]
enum Mode {
    Starttls,
    Reconnect,
}

/// Delivers one message for `locals` (local parts) to `scenario` under `policy`.
pub async fn deliver(
    fleet: &Fleet,
    scenario: &Scenario,
    policy: Policy,
    locals: &[&str],
) -> Delivery {
    let domain = scenario.domain();
    let rcpts: Vec<String> = locals.iter().map(|l| format!("{l}@{domain}")).collect();
    let route = fleet.route(&domain).expect("route");
    // REQUIRETLS raises every policy to a verified session (RFC 8689 §4.2.1).
    let policy = if scenario.requiretls { Policy::ForcedVerify } else { policy };
    let mut last = Outcome::DEFER;
    let mut other_failure = false;
    let mut permanent_refusal = false;
    // Under O, a host whose TLS failed is kept for a plaintext pass after every host was tried
    // with TLS (issue 10 item 8), most preferred first.
    let mut plain_later = Vec::new();
    for (index, mx) in route.mx.iter().enumerate() {
        let label = mx.host.split('.').next().unwrap_or_default().to_owned();
        let more = index + 1 < route.mx.len();
        let attempt = attempt(mx, policy, Mode::Starttls, &rcpts, scenario.requiretls, more).await;
        if matches!(attempt, Attempt::TlsFailed) && !policy.is_forced() {
            plain_later.push((mx, label));
            continue;
        }
        match attempt {
            Attempt::Done(results) => {
                let results = locals.iter().map(|l| (*l).to_owned()).zip(results).collect();
                return Delivery { results, via: Some(label) };
            }
            Attempt::NoRequireTls => continue,
            Attempt::RefusedInTls { permanent: true, .. } => {
                permanent_refusal = true;
                continue;
            }
            Attempt::RefusedInTls { permanent: false, code } => {
                last = Outcome::Defer { code: Some(code) };
            }
            Attempt::NoTls => last = Outcome::DEFER_NO_TLS,
            Attempt::TlsFailed => last = Outcome::DEFER_TLS_FAILED,
            Attempt::Transient => last = Outcome::DEFER,
        }
        other_failure = true;
    }
    for (mx, label) in plain_later {
        match attempt_plain_reconnect(mx, &rcpts).await {
            Attempt::Done(results) => {
                let results = locals.iter().map(|l| (*l).to_owned()).zip(results).collect();
                return Delivery { results, via: Some(label) };
            }
            _ => last = Outcome::DEFER,
        }
    }
    if (scenario.requiretls || permanent_refusal) && !other_failure {
        last = Outcome::Bounce;
    }
    Delivery { results: locals.iter().map(|l| ((*l).to_owned(), last)).collect(), via: None }
}

async fn attempt_plain_reconnect(mx: &RouteMx, rcpts: &[String]) -> Attempt {
    attempt(mx, Policy::Opportunistic, Mode::Reconnect, rcpts, false, false).await
}

/// Sends one command, unless the server already sent something nobody asked for: read as the
/// answer to this command it would shift every later reply (invariant I9).
async fn step<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    line: &str,
) -> io::Result<Reply> {
    if !client.buffered().is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "replies out of step"));
    }
    client.command(line).await
}

async fn attempt(
    mx: &RouteMx,
    policy: Policy,
    mode: Mode,
    rcpts: &[String],
    requiretls: bool,
    more_hosts: bool,
) -> Attempt {
    let Ok((mut client, greeting)) = connect(mx.addr()).await else {
        return Attempt::Transient;
    };
    if greeting.code != 220 {
        let _ = client.command("QUIT").await;
        return Attempt::Transient;
    }
    let Some(ehlo) = hello(&mut client).await else {
        return Attempt::Transient;
    };
    if let Mode::Reconnect = mode {
        return transaction(&mut client, rcpts, Outcome::PlainReconnect).await;
    }
    let offered = ehlo.as_ref().is_some_and(|r| r.has_capability("STARTTLS"));
    if !offered && !policy.is_forced() {
        if more_hosts {
            // O tries TLS at the other hosts before plaintext here (issue 10 item 8).
            let _ = client.command("QUIT").await;
            return Attempt::TlsFailed;
        }
        return transaction(&mut client, rcpts, Outcome::Plain).await;
    }
    let reply = match step(&mut client, "STARTTLS").await {
        Ok(reply) => reply,
        Err(_) => return Attempt::Transient,
    };
    if reply.code == 421 {
        return Attempt::Transient;
    }
    if !reply.is_positive() {
        if policy.is_forced() {
            let _ = client.command("QUIT").await;
            return Attempt::NoTls;
        }
        return transaction(&mut client, rcpts, Outcome::Plain).await;
    }
    let config: Arc<ClientConfig> = match policy {
        Policy::ForcedVerify => verifying_config(),
        Policy::Opportunistic | Policy::Forced => danger_unverified_config(),
    };
    let Ok(mut tls) = upgrade(client, config, &mx.host).await else {
        return Attempt::TlsFailed;
    };
    match step(&mut tls, "EHLO relay.test").await {
        Ok(reply) if reply.code == 250 => {
            if requiretls && !reply.has_capability("REQUIRETLS") {
                let _ = tls.command("QUIT").await;
                return Attempt::NoRequireTls;
            }
        }
        Ok(reply) if reply.code >= 400 => {
            // A refusal inside TLS; a 5xx to EHLO gets HELO first.
            let reply = if reply.code >= 500 {
                match step(&mut tls, "HELO relay.test").await {
                    Ok(helo) if helo.code == 250 => {
                        return transaction(&mut tls, rcpts, Outcome::Tls).await;
                    }
                    Ok(helo) if helo.code >= 400 => helo,
                    _ => return Attempt::Transient,
                }
            } else {
                reply
            };
            let code = reply
                .lines
                .first()
                .and_then(|l| l.split(' ').next())
                .filter(|c| c.split('.').count() == 3)
                .unwrap_or("4.0.0");
            return Attempt::RefusedInTls {
                permanent: reply.code >= 500,
                code: Box::leak(code.to_owned().into_boxed_str()),
            };
        }
        Ok(_) => {
            let _ = tls.command("QUIT").await;
            return Attempt::Transient;
        }
        // No reply ever came over the new TLS session: a TLS failure (HS-09, HS-12).
        Err(_) => return Attempt::TlsFailed,
    }
    transaction(&mut tls, rcpts, Outcome::Tls).await
}

/// EHLO, falling back to HELO on a 5xx. `Some(None)` means HELO was used (no extensions).
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>) -> Option<Option<Reply>> {
    let ehlo = step(client, "EHLO relay.test").await.ok()?;
    if ehlo.is_positive() {
        return Some(Some(ehlo));
    }
    if !(500..600).contains(&ehlo.code) {
        return None;
    }
    let helo = step(client, "HELO relay.test").await.ok()?;
    helo.is_positive().then_some(None)
}

fn classify(reply: &io::Result<Reply>) -> Option<Outcome> {
    match reply {
        Ok(r) if r.is_positive() => None,
        Ok(r) if (500..600).contains(&r.code) => Some(Outcome::Bounce),
        _ => Some(Outcome::DEFER),
    }
}

async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    rcpts: &[String],
    delivered: Outcome,
) -> Attempt {
    // Lock-step, and any reply out of step, 2xx/3xx other than 354 to DATA or lost connection
    // is trouble with this host: the next MX is tried.
    let Ok(mail) = step(client, "MAIL FROM:<sender@relay.test>").await else {
        return Attempt::Transient;
    };
    if let Some(failed) = classify(&Ok(mail)) {
        return Attempt::Done(vec![failed; rcpts.len()]);
    }
    let mut results: Vec<Option<Outcome>> = Vec::new();
    for rcpt in rcpts {
        let Ok(reply) = step(client, &format!("RCPT TO:<{rcpt}>")).await else {
            return Attempt::Transient;
        };
        results.push(classify(&Ok(reply)));
    }
    if results.iter().all(Option::is_some) {
        let _ = client.command("QUIT").await;
        return Attempt::Done(results.into_iter().flatten().collect());
    }
    let end = match step(client, "DATA").await {
        Ok(r) if r.code == 354 => {
            if !client.buffered().is_empty()
                || client.send(b"Subject: simulator\r\n\r\nhello\r\n.\r\n").await.is_err()
            {
                return Attempt::Transient;
            }
            match client.reply().await {
                Ok(r) if (300..400).contains(&r.code) => return Attempt::Transient,
                other => classify(&other),
            }
        }
        Ok(r) if r.code < 400 => return Attempt::Transient,
        Ok(r) => classify(&Ok(r)),
        Err(_) => return Attempt::Transient,
    };
    let _ = client.command("QUIT").await;
    client.shutdown().await;
    let accepted = end.unwrap_or(delivered);
    Attempt::Done(results.into_iter().map(|r| r.unwrap_or(accepted)).collect())
}
