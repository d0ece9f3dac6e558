//! Outbound delivery: one message, one recipient domain, every MX, the TLS the policy chain
//! decides, and one outcome per recipient.
//!
//! # Layout
//! - [`route`]: static routes, MX lookup (hickory), implicit and null MX, ordering.
//! - [`tls`]: rustls client configuration per requirement and certificate verdicts.
//! - [`client`]: the SMTP connection; STARTTLS as a change of type; the transaction.
//! - [`reuse`]: TLS connections kept open for the next message under the same requirement.
//! - this module: the attempt loop over MX hosts, carrying out the policy's failure actions,
//!   and the outcome records.

pub mod client;
pub mod reuse;
pub mod route;
pub mod tls;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use self::client::{Client, Envelope, PlaintextPermit, RcptResult, StartTls, Timeouts, TlsInfo};
use self::reuse::{ConnectionCache, Key, Parked, ReuseLimits};
use self::route::{MxHost, Router};
use self::tls::TlsContext;
use crate::policy::chain::REQUIRETLS_CODE;
use crate::policy::{Action, Chain, Context, DeliveryReport, Failure, Plan, Requirement, Verdict};
use crate::smtp::Reply;

/// One message to deliver.
#[derive(Clone, Debug)]
pub struct Message<'a> {
    /// Reverse-path (empty for the null sender).
    pub mail_from: &'a str,
    /// The message, headers and body, with CRLF line ends.
    pub body: &'a [u8],
    /// The message was submitted with REQUIRETLS.
    pub requiretls: bool,
    /// The message carries `TLS-Required: No`.
    pub tls_required_no: bool,
    /// The submitter logged in with SMTP AUTH.
    pub authenticated: bool,
    /// The sender asked for SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Delivery attempt number, from 1.
    pub attempt: u32,
    /// Seconds since acceptance.
    pub age: u64,
}

/// The final word on one recipient for this attempt.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Status {
    /// The next hop accepted the message.
    Delivered {
        /// MX host name.
        mx: String,
        /// Address connected to.
        ip: SocketAddr,
        /// TLS session, or `None` for plaintext.
        tls: Option<TlsInfo>,
        /// How plaintext came about, when it did.
        fallback: Fallback,
        /// The policy that decided.
        decided_by: String,
        /// The requirement it ran under.
        requirement: String,
        /// The server's final reply.
        reply: String,
    },
    /// Try again later.
    Deferred {
        /// Enhanced status code.
        code: String,
        /// Why.
        reason: String,
    },
    /// Give up; the sender gets a bounce.
    Bounced {
        /// Enhanced status code.
        code: String,
        /// Why.
        reason: String,
    },
}

/// Why a delivery went out in plaintext.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Fallback {
    /// No fallback: TLS, or plaintext because the requirement was `none`.
    No,
    /// STARTTLS missing or refused; the same connection continued in plaintext.
    SameConnection,
    /// TLS failed after STARTTLS was accepted; a new connection delivered without STARTTLS.
    Reconnect,
}

/// The outcome for one recipient.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RecipientOutcome {
    /// The recipient.
    pub rcpt: String,
    /// What happened.
    pub status: Status,
}

/// The outcome of delivering to one domain.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DomainOutcome {
    /// One entry per recipient, in the order given.
    pub recipients: Vec<RecipientOutcome>,
    /// The compact TLS summary for the log, in the spirit of Postfix 3.11's `tls=level:result`
    /// (one entry per host tried), so "which messages went in cleartext" is one grep away.
    pub tls_log: String,
}

/// Connection counters, exported as Prometheus metrics.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections opened (TCP connected and greeted).
    pub opened: AtomicU64,
    /// Transactions carried by a parked connection instead of a new one.
    pub reused: AtomicU64,
    /// TLS handshakes completed in full.
    pub tls_full: AtomicU64,
    /// TLS handshakes that resumed an earlier session.
    pub tls_resumed: AtomicU64,
}

/// Delivers messages: routing, policy, SMTP and TLS.
pub struct Deliverer {
    /// Routes, trust anchors and timeouts: replaced as a whole by a reload (SIGHUP), while
    /// deliveries in flight finish with the settings they started with.
    settings: std::sync::RwLock<Arc<Settings>>,
    helo_name: String,
    reuse: Arc<ConnectionCache>,
    /// The MTA-STS cache: kept across reloads (forgetting a cached policy is a downgrade).
    sts: crate::standards::gather::Gatherer,
    /// What the connections did.
    pub stats: ConnectionStats,
}

/// What a reload can replace in a running [`Deliverer`].
struct Settings {
    router: Router,
    tls: TlsContext,
    timeouts: Timeouts,
    /// How MTA-STS policies are fetched; `None`: MTA-STS facts are not gathered.
    sts: Option<crate::standards::fetch::Fetcher>,
}

/// What one attempt at one address came to.
enum HostResult {
    /// The transaction ran; per-recipient results.
    Done(Vec<RcptResult>, DeliveredVia),
    /// Try the next host or address (connection failure, greeting refused, next-mx action).
    Next { code: String, reason: String },
    /// The policy answered `next-mx` to a TLS failure under a requirement that allows
    /// plaintext: try the next host, and should none deliver, come back here in plaintext
    /// (see [`Deliverer::deliver`]).
    NextTryingTls { code: String, reason: String },
    /// Stop: every pending recipient gets this.
    Final(Status),
}

/// How a transaction went through, for the outcome records.
struct DeliveredVia {
    tls: Option<TlsInfo>,
    fallback: Fallback,
    requirement: Requirement,
}

impl Deliverer {
    /// A deliverer introducing itself as `helo_name`.
    pub fn new(router: Router, tls: TlsContext, timeouts: Timeouts, helo_name: &str) -> Self {
        Deliverer {
            settings: std::sync::RwLock::new(Arc::new(Settings {
                router,
                tls,
                timeouts,
                sts: None,
            })),
            helo_name: helo_name.to_owned(),
            reuse: ConnectionCache::new(ReuseLimits::default()),
            sts: Default::default(),
            stats: ConnectionStats::default(),
        }
    }

    /// Gathers MTA-STS facts for every domain without a static route, fetching policies with
    /// `fetcher`. A builder step: before the deliverer is shared, its settings are its own.
    pub fn with_mta_sts(mut self, fetcher: crate::standards::fetch::Fetcher) -> Self {
        let settings = self.settings.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        match Arc::get_mut(settings) {
            Some(settings) => settings.sts = Some(fetcher),
            None => tracing::error!("MTA-STS not enabled: the deliverer was already in use"),
        }
        self
    }

    /// Replaces the connection reuse limits (`idle` zero: never reuse).
    pub fn with_reuse(mut self, limits: ReuseLimits) -> Self {
        self.reuse = ConnectionCache::new(limits);
        self
    }

    /// The settings in force.
    fn settings(&self) -> Arc<Settings> {
        self.settings.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Puts `other`'s routes, trust anchors and timeouts in force (SIGHUP). Connections parked
    /// for reuse are dropped: they were verified against the old trust anchors.
    pub fn replace_settings(&self, other: &Deliverer) {
        let settings = other.settings();
        *self.settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
        self.reuse.clear();
    }

    /// Connections parked for reuse now.
    pub fn parked_connections(&self) -> usize {
        self.reuse.len()
    }

    /// Delivers `message` to `rcpts`, all in `domain`, under `chain`.
    ///
    /// An address no SMTP command can carry (a control character, `<` or `>` outside a quoted
    /// local part: an envelope the inbound side would refuse today) is a permanent problem of
    /// that recipient alone: it bounces with 5.1.3 and the others are delivered without it,
    /// rather than the encoder aborting the transaction for every recipient of the domain. A
    /// sender no command can carry bounces every recipient (5.1.7).
    pub async fn deliver(
        &self,
        chain: &Chain,
        message: &Message<'_>,
        domain: &str,
        rcpts: &[String],
    ) -> DomainOutcome {
        let unsendable = |command: crate::smtp::Command| command.encode(&mut Vec::new()).err();
        let sender = crate::smtp::Command::Mail {
            from: message.mail_from.to_owned(),
            size: None,
            body_8bit: false,
            requiretls: false,
            smtputf8: message.smtputf8,
        };
        let bounce = |code: &str, reason: String| Status::Bounced { code: code.to_owned(), reason };
        if let Some(e) = unsendable(sender) {
            let status = bounce("5.1.7", format!("553 the sender cannot be sent: {e}"));
            let recipients = rcpts
                .iter()
                .map(|r| RecipientOutcome { rcpt: r.clone(), status: status.clone() })
                .collect();
            return DomainOutcome { recipients, tls_log: String::new() };
        }
        let refused: Vec<Option<Status>> = rcpts
            .iter()
            .map(|to| {
                let e = unsendable(crate::smtp::Command::Rcpt { to: to.clone() })?;
                Some(bounce("5.1.3", format!("553 the recipient cannot be sent: {e}")))
            })
            .collect();
        if refused.iter().all(Option::is_none) {
            return self.deliver_sendable(chain, message, domain, rcpts).await;
        }
        let sendable: Vec<String> = rcpts
            .iter()
            .zip(&refused)
            .filter(|(_, r)| r.is_none())
            .map(|(t, _)| t.clone())
            .collect();
        let outcome = if sendable.is_empty() {
            DomainOutcome { recipients: Vec::new(), tls_log: String::new() }
        } else {
            self.deliver_sendable(chain, message, domain, &sendable).await
        };
        let (mut delivered, tls_log) = (outcome.recipients.into_iter(), outcome.tls_log);
        let recipients = rcpts
            .iter()
            .zip(refused)
            .filter_map(|(rcpt, refused)| match refused {
                Some(status) => Some(RecipientOutcome { rcpt: rcpt.clone(), status }),
                None => delivered.next(),
            })
            .collect();
        DomainOutcome { recipients, tls_log }
    }

    /// [`Deliverer::deliver`] for recipients that can all be sent.
    async fn deliver_sendable(
        &self,
        chain: &Chain,
        message: &Message<'_>,
        domain: &str,
        rcpts: &[String],
    ) -> DomainOutcome {
        let mut log = String::new();
        let every = |status: Status| DomainOutcome {
            recipients: rcpts
                .iter()
                .map(|r| RecipientOutcome { rcpt: r.clone(), status: status.clone() })
                .collect(),
            tls_log: String::new(),
        };
        let settings = self.settings();
        let hosts = match settings.router.route(domain).await {
            Ok(hosts) => hosts,
            Err(e) if e.is_temporary() => {
                return every(Status::Deferred {
                    code: e.code().to_owned(),
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                return every(Status::Bounced { code: e.code().to_owned(), reason: e.to_string() });
            }
        };
        let mut last = ("4.4.1".to_owned(), format!("no MX host of {domain} could be reached"));
        // A host that refused permanently (a 5xx inside TLS; no REQUIRETLS, RFC 8689 §4.2.1)
        // ends the message only when every host did: one that failed for another reason may
        // take it later, so then the message is deferred, not bounced.
        let mut other_failure = false;
        let mut permanent_refusal = None;
        let count = u32::try_from(hosts.len()).unwrap_or(u32::MAX);
        // Addresses passed over by `next-mx` after a TLS failure under a requirement that
        // allows plaintext, most preferred first: the plaintext pass below.
        let mut plaintext_later: Vec<(&MxHost, SocketAddr, Context, Plan, Requirement)> =
            Vec::new();
        // One envelope for every host and address: the body is scanned for 8-bit octets once.
        let envelope = Envelope {
            mail_from: message.mail_from,
            rcpts,
            size: message.body.len() as u64,
            eight_bit: message.body.iter().any(|b| *b >= 0x80),
            requiretls: message.requiretls,
            smtputf8: message.smtputf8,
            needs_smtputf8: message.smtputf8 && needs_smtputf8(message, rcpts),
        };
        let sts = match &settings.sts {
            Some(fetcher) if !settings.router.is_static(domain) => Some(
                self.sts
                    .entry(
                        settings.router.resolver(),
                        fetcher,
                        &domain.to_ascii_lowercase(),
                        unix_now,
                    )
                    .await,
            ),
            _ => None,
        };
        for (index, host) in hosts.iter().enumerate() {
            let facts = Arc::new(crate::policy::Facts {
                sts: sts
                    .as_ref()
                    .map_or_else(Default::default, |e| e.status(unix_now(), &host.name)),
                ..Default::default()
            });
            for &addr in &host.addrs {
                let ctx = Context {
                    domain: domain.to_ascii_lowercase(),
                    mx_host: host.name.clone(),
                    ip: addr.ip().to_string(),
                    mx_preference: host.preference,
                    mx_index: u32::try_from(index).unwrap_or(u32::MAX),
                    mx_count: count,
                    attempt: message.attempt,
                    message_age: message.age,
                    requiretls: message.requiretls,
                    tls_required_no: message.tls_required_no,
                    authenticated: message.authenticated,
                    // MTA-STS when gathered; DNSSEC and TLSA are not looked up yet.
                    facts: facts.clone(),
                };
                let plan = chain.plan_async(&ctx).await;
                let requirement = match &plan.verdict {
                    Verdict::Require(r) => r.clone(),
                    Verdict::Defer { code, reason } => {
                        let _ = write!(log, "{}tls=fault:defer", sep(&log));
                        let mut outcome =
                            every(Status::Deferred { code: code.clone(), reason: reason.clone() });
                        outcome.tls_log = log;
                        return outcome;
                    }
                };
                let attempt = Attempt {
                    chain,
                    plan: &plan,
                    ctx: &ctx,
                    requirement: &requirement,
                    host,
                    addr,
                    message,
                    envelope: envelope.clone(),
                };
                let result = self.attempt(&attempt).await;
                match result {
                    HostResult::Done(results, via) => {
                        let _ = write!(
                            log,
                            "{}tls={}:{}",
                            sep(&log),
                            requirement.level,
                            tls_word(&via.tls, via.fallback)
                        );
                        return self
                            .finish(chain, &ctx, &plan, host, addr, rcpts, results, via, log)
                            .await;
                    }
                    HostResult::Next { code, reason } => {
                        let _ =
                            write!(log, "{}tls={}:next({})", sep(&log), requirement.level, code);
                        tracing::info!(domain, mx = %host.name, %addr, %code, "trying next host: {reason}");
                        if code.starts_with('5') {
                            permanent_refusal = Some((code, reason));
                        } else {
                            other_failure = true;
                            last = (code, reason);
                        }
                    }
                    HostResult::NextTryingTls { code, reason } => {
                        let _ =
                            write!(log, "{}tls={}:next({})", sep(&log), requirement.level, code);
                        tracing::info!(domain, mx = %host.name, %addr, %code, "trying TLS at the next host: {reason}");
                        other_failure = true;
                        last = (code, reason);
                        plaintext_later.push((host, addr, ctx, plan, requirement));
                    }
                    HostResult::Final(status) => {
                        let word = match &status {
                            Status::Bounced { code, .. } => format!("bounce({code})"),
                            Status::Deferred { code, .. } => format!("defer({code})"),
                            Status::Delivered { .. } => "ok".to_owned(),
                        };
                        let _ = write!(log, "{}tls={}:{word}", sep(&log), requirement.level);
                        let mut outcome = every(status);
                        outcome.tls_log = log;
                        return outcome;
                    }
                }
            }
        }
        // Every host was tried with TLS and none delivered. `next-mx` under a requirement that
        // allows plaintext means "TLS elsewhere first", not "TLS or nothing" (that is what the
        // forced levels are for): fall back to plaintext now, in the same attempt, at the most
        // preferred host that was passed over for a TLS failure. A deferral would only bring
        // the same answer later.
        for (host, addr, ctx, plan, requirement) in &plaintext_later {
            let attempt = Attempt {
                chain,
                plan,
                ctx,
                requirement,
                host,
                addr: *addr,
                message,
                envelope: envelope.clone(),
            };
            let result = match self.open(*addr, &host.name).await {
                Ok(client) => attempt.plaintext(client, Fallback::Reconnect).await,
                Err(reason) => HostResult::Next { code: "4.4.1".into(), reason },
            };
            match result {
                HostResult::Done(results, via) => {
                    let word = tls_word(&via.tls, via.fallback);
                    let _ = write!(log, "{}tls={}:{word}", sep(&log), requirement.level);
                    return self
                        .finish(chain, ctx, plan, host, *addr, rcpts, results, via, log)
                        .await;
                }
                HostResult::Next { code, reason } | HostResult::NextTryingTls { code, reason } => {
                    let _ = write!(log, "{}tls={}:next({})", sep(&log), requirement.level, code);
                    tracing::info!(domain, mx = %host.name, %addr, %code, "plaintext fallback failed: {reason}");
                    other_failure = true;
                    last = (code, reason);
                }
                HostResult::Final(status) => {
                    let mut outcome = every(status);
                    outcome.tls_log = log;
                    return outcome;
                }
            }
        }
        let status = match permanent_refusal {
            Some((code, reason)) if !other_failure => Status::Bounced { code, reason },
            _ => Status::Deferred { code: last.0, reason: last.1 },
        };
        let mut outcome = every(status);
        outcome.tls_log = log;
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        chain: &Chain,
        ctx: &Context,
        plan: &Plan,
        host: &MxHost,
        addr: SocketAddr,
        rcpts: &[String],
        results: Vec<RcptResult>,
        via: DeliveredVia,
        tls_log: String,
    ) -> DomainOutcome {
        // `tls-required-no(over NAME)` when the header relaxed a forced answer: the plaintext
        // delivery is not credited to the forcing policy.
        let decided_by = plan.decider.to_string();
        let mut any_delivered = false;
        let recipients = rcpts
            .iter()
            .zip(results)
            .map(|(rcpt, result)| {
                let status = match result {
                    RcptResult::Delivered(reply) => {
                        any_delivered = true;
                        Status::Delivered {
                            mx: host.name.clone(),
                            ip: addr,
                            tls: via.tls.clone(),
                            fallback: via.fallback,
                            decided_by: decided_by.clone(),
                            requirement: via.requirement.to_string(),
                            reply: reply.to_string().trim_end().to_owned(),
                        }
                    }
                    RcptResult::Deferred(reply) => {
                        Status::Deferred { code: code_of(&reply, "4.0.0"), reason: text_of(&reply) }
                    }
                    RcptResult::Bounced(reply) => {
                        Status::Bounced { code: code_of(&reply, "5.0.0"), reason: text_of(&reply) }
                    }
                };
                RecipientOutcome { rcpt: rcpt.clone(), status }
            })
            .collect();
        if any_delivered {
            let report = DeliveryReport {
                requirement: via.requirement.clone(),
                tls_version: via.tls.as_ref().map(|t| t.version),
                cipher: via.tls.as_ref().map(|t| t.cipher.clone()).unwrap_or_default(),
                certificate_verified: via.tls.as_ref().is_some_and(|t| t.verified),
            };
            chain.on_delivered_async(ctx, &report).await;
        }
        DomainOutcome { recipients, tls_log }
    }

    /// One attempt at one address of one host.
    async fn attempt(&self, a: &Attempt<'_>) -> HostResult {
        let (requirement, host, addr) = (a.requirement, a.host, a.addr);
        let next = |code: &str, reason: String| HostResult::Next { code: code.to_owned(), reason };
        let key = Key {
            domain: a.ctx.domain.clone(),
            mx: host.name.to_ascii_lowercase(),
            addr,
            requirement: requirement.clone(),
        };
        // The floors of the requirement's basis, before any connection: what the facts cannot
        // support fails here, as a failure class the deciding policy reacts to.
        if let Some(failure) = a.ctx.facts.precondition(requirement) {
            return self.after_failure(a, None, failure).await;
        }
        if requirement.level != crate::policy::TlsLevel::None
            && let Some(result) = self.reuse(a, &key).await
        {
            return result;
        }
        let mut client = match self.open(addr, &host.name).await {
            Ok(client) => client,
            Err(reason) => return next("4.4.1", reason),
        };
        if requirement.level == crate::policy::TlsLevel::None {
            return a.plaintext(client, Fallback::No).await;
        }
        let offered = client.capabilities.starttls;
        let failure = if !offered && !requirement.level.is_forced() {
            // Under `may`, STARTTLS is sent only when offered. Under `encrypt` and stronger it is
            // sent even when not advertised: a stripped capability must not cost us TLS.
            Failure::StarttlsNotOffered
        } else {
            let (config, judge) = match self.settings().tls.client_config(
                requirement,
                &a.ctx.domain,
                &host.name,
                addr.port(),
            ) {
                Ok(pair) => pair,
                Err(reason) => {
                    return HostResult::Final(Status::Deferred { code: "4.7.5".into(), reason });
                }
            };
            let server_name = server_name(&host.name, addr);
            match client.starttls(config, server_name, &judge, &self.helo_name).await {
                StartTls::Upgraded(mut tls_client, info) => {
                    let handshakes =
                        if info.resumed { &self.stats.tls_resumed } else { &self.stats.tls_full };
                    handshakes.fetch_add(1, Ordering::Relaxed);
                    if a.message.requiretls && !tls_client.capabilities.requiretls {
                        tls_client.quit().await;
                        return requiretls_missing(host, addr);
                    }
                    let result = tls_client.transaction_tls(&a.envelope, a.message.body).await;
                    return match result {
                        Ok(results) => {
                            if tls_client.reusable().await {
                                self.reuse.park(key, Parked::new(*tls_client, info.clone()));
                            }
                            HostResult::Done(
                                results,
                                DeliveredVia {
                                    tls: Some(info),
                                    fallback: Fallback::No,
                                    requirement: requirement.clone(),
                                },
                            )
                        }
                        Err(e) => next("4.4.2", format!("{} [{}]: {e}", host.name, addr.ip())),
                    };
                }
                StartTls::Refused { reply, client: refused } => {
                    client = *refused;
                    if offered {
                        Failure::StarttlsRefused { code: reply.code(), text: text_of(&reply) }
                    } else {
                        Failure::StarttlsNotOffered
                    }
                }
                StartTls::Failed(failure) => return self.after_failure(a, None, failure).await,
                StartTls::RefusedInTls { reply, info } => {
                    // A refusal of this host, in its own words: the next host, or defer (bounce
                    // on 5xx) once none is left; never plaintext here (`Next`, not
                    // `NextTryingTls`, keeps it out of the plaintext pass).
                    let handshakes =
                        if info.resumed { &self.stats.tls_resumed } else { &self.stats.tls_full };
                    handshakes.fetch_add(1, Ordering::Relaxed);
                    let default = if reply.code() >= 500 { "5.0.0" } else { "4.0.0" };
                    return next(
                        &code_of(&reply, default),
                        format!(
                            "{} [{}] refused the session after STARTTLS: {}",
                            host.name,
                            addr.ip(),
                            text_of(&reply)
                        ),
                    );
                }
                StartTls::OutOfStep(e) => {
                    return next("4.4.2", format!("{} [{}]: {e}", host.name, addr.ip()));
                }
            }
        };
        self.after_failure(a, Some(client), failure).await
    }

    /// The transaction over a parked connection for `key`, if there is one that still answers
    /// `RSET` with 250. `None`: open a new connection.
    async fn reuse(&self, a: &Attempt<'_>, key: &Key) -> Option<HostResult> {
        let mut parked = self.reuse.take(key)?;
        if let Err(e) = parked.client.rset().await {
            tracing::debug!(mx = %key.mx, addr = %key.addr, "parked connection unusable: {e}");
            return None;
        }
        if a.message.requiretls && !parked.client.capabilities.requiretls {
            // The same check as on a new connection, with the same answer.
            self.reuse.park(key.clone(), parked);
            return Some(requiretls_missing(a.host, key.addr));
        }
        let result = parked.client.transaction_tls(&a.envelope, a.message.body).await;
        Some(match result {
            Ok(results) => {
                parked.uses += 1;
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                let info = parked.info.clone();
                if parked.client.reusable().await {
                    self.reuse.park(key.clone(), parked);
                }
                HostResult::Done(
                    results,
                    DeliveredVia {
                        tls: Some(info),
                        fallback: Fallback::No,
                        requirement: a.requirement.clone(),
                    },
                )
            }
            Err(e) => HostResult::Next {
                code: "4.4.2".into(),
                reason: format!("{} [{}]: {e}", a.host.name, key.addr.ip()),
            },
        })
    }

    /// Carries out the policy's answer to a TLS failure.
    async fn after_failure(
        &self,
        a: &Attempt<'_>,
        plain: Option<Client<TcpStream>>,
        failure: Failure,
    ) -> HostResult {
        let (host, addr) = (a.host, a.addr);
        let response = a.chain.on_failure_async(a.plan, a.ctx, &failure).await;
        tracing::info!(
            domain = %a.ctx.domain, mx = %host.name, failure = failure.class(), action = %response.action,
            policy = %response.decider, "tls failure"
        );
        let plaintext_action =
            matches!(response.action, Action::ContinuePlaintext | Action::ReconnectPlaintext);
        if plaintext_action && PlaintextPermit::from_plan(a.plan, a.message.requiretls).is_none() {
            return HostResult::Final(forced_plaintext_refused(a.requirement));
        }
        match response.action {
            Action::ContinuePlaintext => match plain {
                Some(client) => a.plaintext(client, Fallback::SameConnection).await,
                None => HostResult::Final(Status::Deferred {
                    code: "4.7.0".into(),
                    reason: format!(
                        "cannot continue in plaintext after {}: connection unusable",
                        failure.class()
                    ),
                }),
            },
            Action::ReconnectPlaintext => {
                if let Some(client) = plain {
                    client.quit().await;
                }
                match self.open(addr, &host.name).await {
                    Ok(client) => a.plaintext(client, Fallback::Reconnect).await,
                    Err(reason) => HostResult::Next { code: "4.4.1".into(), reason },
                }
            }
            Action::NextMx => {
                let code = failure.defer_code().to_owned();
                let reason = format!("{} at {} [{}]", failure, host.name, addr.ip());
                match PlaintextPermit::from_plan(a.plan, a.message.requiretls) {
                    Some(_) => HostResult::NextTryingTls { code, reason },
                    None => HostResult::Next { code, reason },
                }
            }
            Action::Defer { code, reason } => HostResult::Final(Status::Deferred { code, reason }),
            Action::Bounce { code, reason } => HostResult::Final(Status::Bounced { code, reason }),
        }
    }

    /// Connects, reads the greeting and sends EHLO.
    async fn open(&self, addr: SocketAddr, mx: &str) -> Result<Client<TcpStream>, String> {
        let (mut client, greeting) = Client::connect(addr, self.settings().timeouts)
            .await
            .map_err(|e| format!("{mx} [{}]: {e}", addr.ip()))?;
        // Only 220 greets (RFC 5321 §4.3.1); a 554 refuses, and anything else is not SMTP.
        if greeting.code() != 220 {
            return Err(format!(
                "{mx} [{}] greeted with {}",
                addr.ip(),
                greeting.to_string().trim_end()
            ));
        }
        client.ehlo(&self.helo_name).await.map_err(|e| format!("{mx} [{}]: {e}", addr.ip()))?;
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(client)
    }
}

/// Everything one attempt at one address works with.
struct Attempt<'a> {
    chain: &'a Chain,
    plan: &'a Plan,
    ctx: &'a Context,
    requirement: &'a Requirement,
    host: &'a MxHost,
    addr: SocketAddr,
    message: &'a Message<'a>,
    envelope: Envelope<'a>,
}

impl Attempt<'_> {
    /// The transaction in plaintext, if the requirement allows it: the permit is checked here,
    /// once, for every path that leads to plaintext (requirement `none`, continue, reconnect).
    async fn plaintext(&self, mut client: Client<TcpStream>, fallback: Fallback) -> HostResult {
        let Some(permit) = PlaintextPermit::from_plan(self.plan, self.message.requiretls) else {
            client.quit().await;
            return HostResult::Final(forced_plaintext_refused(self.requirement));
        };
        let peer = client.peer();
        match client.transaction_plaintext(&permit, &self.envelope, self.message.body).await {
            Ok(results) => {
                // The outcome goes back to the queue now, to be recorded (a crash between the
                // server's 250 and that record duplicates the message); QUIT needs no waiting.
                tokio::spawn(client.quit());
                let requirement = self.requirement.clone();
                HostResult::Done(results, DeliveredVia { tls: None, fallback, requirement })
            }
            Err(e) => {
                HostResult::Next { code: "4.4.2".into(), reason: format!("[{}]: {e}", peer.ip()) }
            }
        }
    }
}

/// Whether a message sent with SMTPUTF8 needs it from the next hop (Postfix's rule): UTF-8 in
/// the sender, in one of these recipients, or in the header section. UTF-8 only in the body
/// needs 8BITMIME, not SMTPUTF8.
fn needs_smtputf8(message: &Message<'_>, rcpts: &[String]) -> bool {
    let body = message.body;
    let headers_end =
        body.windows(4).position(|w| w == b"\r\n\r\n").map_or(body.len(), |end| end + 2);
    !message.mail_from.is_ascii()
        || rcpts.iter().any(|r| !r.is_ascii())
        || !body[..headers_end].is_ascii()
}

/// RFC 8689 §4.2.1: a next hop that does not advertise REQUIRETLS after STARTTLS does not
/// qualify; the session ends and the remaining MX hosts are tried. Only when none qualifies does
/// the message bounce with 5.7.30 (see [`Deliverer::deliver`]).
fn requiretls_missing(host: &MxHost, addr: SocketAddr) -> HostResult {
    HostResult::Next {
        code: REQUIRETLS_CODE.to_owned(),
        reason: format!("REQUIRETLS: {} [{}] does not advertise REQUIRETLS", host.name, addr.ip()),
    }
}

/// The belt to the chain's braces: should a plaintext action ever reach delivery under a
/// forced requirement, defer.
fn forced_plaintext_refused(requirement: &Requirement) -> Status {
    Status::Deferred {
        code: "4.7.0".into(),
        reason: format!("plaintext refused: requirement is {}", requirement.level),
    }
}

fn server_name(mx: &str, addr: SocketAddr) -> ServerName<'static> {
    match ServerName::try_from(mx.to_owned()) {
        Ok(name) => name,
        Err(_) => ServerName::IpAddress(addr.ip().into()),
    }
}

fn tls_word(tls: &Option<TlsInfo>, fallback: Fallback) -> String {
    match tls {
        None => match fallback {
            Fallback::No => "plaintext".to_owned(),
            Fallback::SameConnection => "plaintext(fallback)".to_owned(),
            Fallback::Reconnect => "plaintext(reconnect)".to_owned(),
        },
        Some(info) => format!(
            "{}{}",
            match info.version {
                crate::policy::TlsVersion::Tls13 => "tls1.3",
                crate::policy::TlsVersion::Tls12 => "tls1.2",
            },
            if info.verified { ",verified" } else { ",unverified" }
        ),
    }
}

fn sep(log: &str) -> &'static str {
    if log.is_empty() { "" } else { " " }
}

fn code_of(reply: &Reply, default: &str) -> String {
    reply.enhanced().map_or_else(|| default.to_owned(), |c| c.to_string())
}

fn text_of(reply: &Reply) -> String {
    format!("{} {}", reply.code(), reply.text().replace('\n', " "))
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Deliverer {
    /// Builds the deliverer described by `config`: resolver, routes, trust, timeouts.
    pub fn from_config(config: &crate::config::Config) -> Result<Arc<Self>, String> {
        let delivery = &config.delivery;
        let resolver = route::HickoryResolver::new(&delivery.dns_servers)?;
        let router = Router::new(
            Box::new(resolver),
            delivery.port,
            delivery.parsed_routes()?,
            delivery.mx_shuffle_seed,
        );
        let tls = config.tls.context()?;
        let mut reuse = ReuseLimits::default();
        if !delivery.connection_reuse {
            reuse.idle = Duration::ZERO;
        }
        let mut deliverer =
            Deliverer::new(router, tls, delivery.timeouts.to_timeouts(), &delivery.helo_name)
                .with_reuse(reuse);
        if config.standards.mta_sts {
            let fetcher = crate::standards::fetch::Fetcher {
                tls: config.tls.context()?.https_config()?,
                port: config.standards.sts_https_port,
                timeout: Duration::from_secs(config.standards.sts_timeout),
            };
            deliverer = deliverer.with_mta_sts(fetcher);
        }
        Ok(Arc::new(deliverer))
    }
}
