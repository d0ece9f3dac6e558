//! The policy chain: which policy decides, what the relay does when one fails, and the rules the
//! host enforces whatever a policy answers.
//!
//! The rule (also in the README):
//! 1. Policies are asked in configuration order; the first that does not abstain decides, and
//!    only its `on-failure` is consulted for that attempt.
//! 2. If every policy abstains, the configured default requirement applies (opportunistic,
//!    `may`) with the built-in opportunistic failure handling.
//! 3. A policy that faults (trap, deadline, memory cap, invalid answer) makes the attempt
//!    *defer* with a 4.7.0 reason naming it: never plaintext, never a skip to the next policy,
//!    because a broken forced-TLS policy must not silently become opportunistic.
//! 4. Host rules override answers: a REQUIRETLS message needs at least `verify` and never falls
//!    back to plaintext (5.7.30 when it cannot be met); a plaintext action under a forced
//!    requirement, or `continue-plaintext` after a handshake started, is an invalid answer.
//!    `TLS-Required: No` (RFC 8689 §5) never relaxes a forced requirement by default: a domain
//!    forced by local agreement is a promise that nothing goes out in clear for any reason.
//!    The operator may opt in ([`TlsRequiredNo`]), for every relaying client or only for
//!    authenticated submitters; each relaxation is then logged at warn and counted, and the
//!    plan's decider says the header decided, not the forcing policy.
//! 5. Every successful delivery is reported to every policy (`on-delivered`), so policies that
//!    learn (`tofu`) see deliveries others decided.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::instance::{LoadedPolicy, PolicyFault};
use super::types::{Action, Context, Decision, DeliveryReport, Failure, Requirement, TlsLevel};

/// The enhanced code of a deferral caused by a faulty policy.
pub const FAULT_CODE: &str = "4.7.0";
/// The enhanced code of a REQUIRETLS non-delivery (RFC 8689 §5).
pub const REQUIRETLS_CODE: &str = "5.7.30";

/// The ordered list of loaded policies plus the host's rules. Cloning is cheap and shares the
/// policies and counters (a clone goes with each call to the policy pool).
#[derive(Clone, Debug)]
pub struct Chain {
    policies: Arc<[Arc<LoadedPolicy>]>,
    default: Requirement,
    tls_required_no: TlsRequiredNo,
    counters: Arc<Counters>,
}

/// Whether a `TLS-Required: No` header may relax a forced requirement to `may`
/// (`policy_engine.tls_required_no`).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsRequiredNo {
    /// Never: forced stays forced whatever the message says (the default).
    #[default]
    Never,
    /// Only for messages whose submitter logged in with SMTP AUTH.
    Authenticated,
    /// For every message from a client allowed to relay.
    Any,
}

impl TlsRequiredNo {
    /// Whether a message submitted with (`true`) or without AUTH may be relaxed.
    pub fn allows(self, authenticated: bool) -> bool {
        match self {
            TlsRequiredNo::Never => false,
            TlsRequiredNo::Authenticated => authenticated,
            TlsRequiredNo::Any => true,
        }
    }
}

impl std::fmt::Display for TlsRequiredNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsRequiredNo::Never => "never",
            TlsRequiredNo::Authenticated => "authenticated",
            TlsRequiredNo::Any => "any",
        })
    }
}

/// Chain-wide counters (exported as metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Plans decided by a policy.
    pub decided: AtomicU64,
    /// Plans where every policy abstained.
    pub defaulted: AtomicU64,
    /// Calls that faulted, all policies together.
    pub faults: AtomicU64,
    /// Plans where `TLS-Required: No` relaxed a forced requirement to `may`.
    pub tls_required_no_relaxed: AtomicU64,
    /// Plans where `TLS-Required: No` was present but a forced requirement was kept.
    pub tls_required_no_ignored: AtomicU64,
}

/// Who decided a plan.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Decider {
    /// The named policy.
    Policy(String),
    /// Every policy abstained; the configured default applied.
    Default,
    /// A `TLS-Required: No` header relaxed what this decider forced (the operator opted in).
    TlsRequiredNo(Box<Decider>),
}

impl std::fmt::Display for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decider::Policy(name) => f.write_str(name),
            Decider::Default => f.write_str("(default)"),
            Decider::TlsRequiredNo(over) => write!(f, "tls-required-no(over {over})"),
        }
    }
}

/// The outcome of planning one attempt.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Verdict {
    /// Connect under this requirement.
    Require(Requirement),
    /// Do not connect: keep the message queued (a policy faulted).
    Defer {
        /// Enhanced status code.
        code: String,
        /// Why, naming the policy.
        reason: String,
    },
}

/// A plan and how it came about (the `explain` trace).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Plan {
    /// What to do.
    pub verdict: Verdict,
    /// Who decided.
    pub decider: Decider,
    /// Index of the deciding policy in the chain, if any.
    decider_index: Option<usize>,
    /// What the decider answered, before host rules adjusted it: its `on-failure` answers are
    /// judged against this.
    asked: Option<Requirement>,
    /// One line per policy asked: its name and answer.
    pub trace: Vec<String>,
    /// Host rules that changed the answer.
    pub adjustments: Vec<String>,
    /// `TLS-Required: No` relaxed the decider's forced answer: failures get the built-in
    /// opportunistic handling, not the forcing policy's.
    relaxed: bool,
}

impl Plan {
    /// The requirement, when the verdict is to connect.
    pub fn requirement(&self) -> Option<&Requirement> {
        match &self.verdict {
            Verdict::Require(r) => Some(r),
            Verdict::Defer { .. } => None,
        }
    }
}

/// What to do after a failure, and why.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Response {
    /// The action to carry out.
    pub action: Action,
    /// Who chose it.
    pub decider: Decider,
    /// Host rules that changed the answer, or the fault that replaced it.
    pub adjustments: Vec<String>,
}

impl Chain {
    /// A chain of `policies` (in order) with the default requirement for when all abstain.
    pub fn new(
        policies: Vec<Arc<LoadedPolicy>>,
        default: TlsLevel,
        tls_required_no: TlsRequiredNo,
    ) -> Self {
        Chain {
            policies: policies.into(),
            default: Requirement::new(default),
            tls_required_no,
            counters: Arc::default(),
        }
    }

    /// The policies, in order.
    pub fn policies(&self) -> &[Arc<LoadedPolicy>] {
        &self.policies
    }

    /// Chain-wide counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Chooses the requirement for one attempt.
    pub fn plan(&self, ctx: &Context) -> Plan {
        let mut trace = Vec::new();
        let mut decided = None;
        for (index, policy) in self.policies.iter().enumerate() {
            let (result, logs) = policy.plan(ctx);
            let logged = logs.iter().map(|l| format!(" [log: {l}]")).collect::<String>();
            match result {
                Ok(Decision::Abstain) => trace.push(format!("{}: abstain{logged}", policy.name())),
                Ok(Decision::Require(requirement)) => {
                    trace.push(format!("{}: {requirement}{logged}", policy.name()));
                    match validate_requirement(&requirement) {
                        Ok(()) => decided = Some((index, requirement)),
                        Err(why) => {
                            return self.fault(policy, index, PolicyFault::Invalid(why), trace);
                        }
                    }
                    break;
                }
                Err(fault) => return self.fault(policy, index, fault, trace),
            }
        }
        let (mut decider, decider_index, mut requirement) = match decided {
            Some((index, r)) => {
                self.counters.decided.fetch_add(1, Ordering::Relaxed);
                (Decider::Policy(self.policies[index].name().to_owned()), Some(index), r)
            }
            None => {
                self.counters.defaulted.fetch_add(1, Ordering::Relaxed);
                (Decider::Default, None, self.default.clone())
            }
        };
        let asked = Some(requirement.clone());
        let mut adjustments = Vec::new();
        let mut relaxed = false;
        // REQUIRETLS asks for an authenticated server, by PKIX or by DANE (RFC 8689 §4.2.1).
        if ctx.requiretls && !requirement.level.is_authenticated() {
            adjustments.push(format!("REQUIRETLS raised {} to verify", requirement.level));
            requirement.level = TlsLevel::Verify;
        } else if ctx.tls_required_no && !ctx.requiretls && requirement.level.is_forced() {
            let mode = self.tls_required_no;
            if mode.allows(ctx.authenticated) {
                tracing::warn!(
                    domain = %ctx.domain,
                    mx = %ctx.mx_host,
                    policy = %decider,
                    level = %requirement.level,
                    tls_required_no = %mode,
                    authenticated = ctx.authenticated,
                    "TLS-Required: No relaxes forced TLS to may (operator opt-in)"
                );
                self.counters.tls_required_no_relaxed.fetch_add(1, Ordering::Relaxed);
                adjustments.push(format!(
                    "TLS-Required: No relaxed {} to may (tls_required_no = {mode})",
                    requirement.level
                ));
                requirement = Requirement::new(TlsLevel::May);
                decider = Decider::TlsRequiredNo(Box::new(decider));
                relaxed = true;
            } else {
                self.counters.tls_required_no_ignored.fetch_add(1, Ordering::Relaxed);
                let who = if ctx.authenticated { "" } else { ", submitter not authenticated" };
                adjustments.push(format!(
                    "TLS-Required: No ignored: forced {} kept (tls_required_no = {mode}{who})",
                    requirement.level
                ));
            }
        }
        Plan {
            verdict: Verdict::Require(requirement),
            decider,
            decider_index,
            asked,
            trace,
            adjustments,
            relaxed,
        }
    }

    /// Chooses what to do after `failure` under `plan`.
    pub fn on_failure(&self, plan: &Plan, ctx: &Context, failure: &Failure) -> Response {
        let Some(requirement) = plan.requirement() else {
            return Response {
                action: Action::defer(FAULT_CODE, "no requirement was planned"),
                decider: plan.decider.clone(),
                adjustments: Vec::new(),
            };
        };
        let answered = match (plan.decider_index, &plan.asked, plan.relaxed) {
            (Some(index), Some(asked), false) => {
                let policy = &self.policies[index];
                let (result, _logs) = policy.on_failure(ctx, failure);
                match result.and_then(|a| validate_action(&a, asked, failure).map(|()| a)) {
                    Ok(action) => action,
                    Err(fault) => {
                        let (code, reason) = self.record_fault(policy, &fault);
                        return Response {
                            action: Action::Defer { code, reason },
                            decider: plan.decider.clone(),
                            adjustments: Vec::new(),
                        };
                    }
                }
            }
            _ => builtin_on_failure(requirement, ctx, failure),
        };
        let mut adjustments = Vec::new();
        let action = if ctx.requiretls {
            requiretls_override(answered, ctx, failure, &mut adjustments)
        } else {
            answered
        };
        Response { action, decider: plan.decider.clone(), adjustments }
    }

    /// Reports a successful delivery to every policy. Faults are logged and counted only: the
    /// message is already delivered.
    pub fn on_delivered(&self, ctx: &Context, report: &DeliveryReport) {
        for policy in self.policies.iter() {
            if let Err(fault) = policy.on_delivered(ctx, report) {
                self.record_fault(policy, &fault);
            }
        }
    }

    /// Counts and logs a fault; returns the deferral it causes.
    fn record_fault(&self, policy: &LoadedPolicy, fault: &PolicyFault) -> (String, String) {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        policy.stats().faults.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            policy = policy.name(),
            kind = fault.kind(),
            "policy fault, deferring: {fault}"
        );
        (FAULT_CODE.to_owned(), format!("policy `{}` {fault}", policy.name()))
    }

    fn fault(
        &self,
        policy: &LoadedPolicy,
        index: usize,
        fault: PolicyFault,
        mut trace: Vec<String>,
    ) -> Plan {
        let (code, reason) = self.record_fault(policy, &fault);
        trace.push(format!("{}: FAULT {fault}", policy.name()));
        Plan {
            verdict: Verdict::Defer { code, reason },
            decider: Decider::Policy(policy.name().to_owned()),
            decider_index: Some(index),
            asked: None,
            trace,
            adjustments: Vec::new(),
            relaxed: false,
        }
    }
}

/// The relay's entry points: the same calls, run on the policy pool (see [`super::pool`]), so
/// that the caller's task waits without holding an async worker, and the policies' store writes
/// are on disk before the answer is acted upon.
impl Chain {
    /// [`Chain::plan`] on the policy pool.
    pub async fn plan_async(&self, ctx: &Context) -> Plan {
        let (chain, ctx) = (self.clone(), ctx.clone());
        match self.off_workers(move || chain.plan(&ctx)).await {
            Ok(plan) => plan,
            Err(why) => Plan {
                verdict: Verdict::Defer { code: FAULT_CODE.to_owned(), reason: why.clone() },
                decider: Decider::Default,
                decider_index: None,
                asked: None,
                relaxed: false,
                trace: vec![why],
                adjustments: Vec::new(),
            },
        }
    }

    /// [`Chain::on_failure`] on the policy pool.
    pub async fn on_failure_async(
        &self,
        plan: &Plan,
        ctx: &Context,
        failure: &Failure,
    ) -> Response {
        let (chain, plan2, ctx, failure) =
            (self.clone(), plan.clone(), ctx.clone(), failure.clone());
        match self.off_workers(move || chain.on_failure(&plan2, &ctx, &failure)).await {
            Ok(response) => response,
            Err(why) => Response {
                action: Action::defer(FAULT_CODE, why),
                decider: plan.decider.clone(),
                adjustments: Vec::new(),
            },
        }
    }

    /// [`Chain::on_delivered`] on the policy pool.
    pub async fn on_delivered_async(&self, ctx: &Context, report: &DeliveryReport) {
        let (chain, ctx, report) = (self.clone(), ctx.clone(), report.clone());
        if let Err(why) = self.off_workers(move || chain.on_delivered(&ctx, &report)).await {
            tracing::warn!("on-delivered not reported: {why}");
        }
    }

    /// Runs `f` (calls into this chain's policies) on the pool, then waits until what they wrote
    /// to their stores is durable. A chain without policies has nothing to run off the workers.
    async fn off_workers<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, String> {
        let Some(first) = self.policies.first() else { return Ok(f()) };
        let result = first.pool().run(f).await.map_err(|e| {
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            format!("policy call failed: {e}")
        })?;
        for policy in self.policies.iter() {
            if let Some(pending) = policy.kv().pending() {
                pending.wait().await;
            }
        }
        Ok(result)
    }
}

/// The relay's own opportunistic behaviour, for the default requirement (and for a
/// `TLS-Required: No` relaxation), the same as the bundled `opportunistic` policy's: with
/// several MX hosts, TLS at the next one (delivery falls back to plaintext at the most
/// preferred once every host failed TLS); with one, plaintext on the same connection when no
/// handshake started, a new plaintext connection otherwise. Under a forced default: next MX,
/// then defer.
pub fn builtin_on_failure(requirement: &Requirement, ctx: &Context, failure: &Failure) -> Action {
    if !requirement.level.is_forced() {
        return if ctx.mx_count > 1 {
            Action::NextMx
        } else if failure.allows_continue_plaintext() {
            Action::ContinuePlaintext
        } else {
            Action::ReconnectPlaintext
        };
    }
    if ctx.mx_index + 1 < ctx.mx_count {
        return Action::NextMx;
    }
    Action::defer(
        failure.defer_code(),
        format!("TLS is required ({}), but {} at {}", requirement.level, failure, ctx.mx_host),
    )
}

/// REQUIRETLS (RFC 8689): never plaintext; when the requirement cannot be met on any MX, the
/// message is not delivered (5.7.30).
fn requiretls_override(
    action: Action,
    ctx: &Context,
    failure: &Failure,
    adjustments: &mut Vec<String>,
) -> Action {
    match action {
        Action::ContinuePlaintext | Action::ReconnectPlaintext => {
            adjustments.push(format!("REQUIRETLS forbids {action}"));
            if ctx.mx_index + 1 < ctx.mx_count {
                Action::NextMx
            } else {
                Action::bounce(
                    REQUIRETLS_CODE,
                    format!("REQUIRETLS: verified TLS to {} failed: {failure}", ctx.mx_host),
                )
            }
        }
        other => other,
    }
}

/// Checks a requirement a policy returned from `plan` before the relay acts on it.
///
/// Public for the fuzz targets only (fuzz/), which feed it arbitrary guest values.
#[doc(hidden)]
pub fn validate_requirement(requirement: &Requirement) -> Result<(), String> {
    if requirement.match_names.len() > 64 {
        return Err(format!("{} match names (at most 64)", requirement.match_names.len()));
    }
    for name in &requirement.match_names {
        let bare = name.strip_prefix('.').unwrap_or(name);
        let valid = !bare.is_empty()
            && bare.len() <= 253
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*'));
        if !valid {
            return Err(format!("match name {name:?} is not a host name"));
        }
    }
    if let Some(name) = &requirement.client_identity
        && !crate::policy::types::is_identity_name(name)
    {
        return Err(format!("client identity {name:?} is not an identity name"));
    }
    Ok(())
}

/// Checks an action a policy returned from `on-failure` under `requirement`.
///
/// Public for the fuzz targets only (fuzz/), which feed it arbitrary guest values.
#[doc(hidden)]
pub fn validate_action(
    action: &Action,
    requirement: &Requirement,
    failure: &Failure,
) -> Result<(), PolicyFault> {
    let invalid = |why: String| Err(PolicyFault::Invalid(why));
    match action {
        Action::ContinuePlaintext | Action::ReconnectPlaintext if requirement.level.is_forced() => {
            invalid(format!("{action} under a forced requirement ({})", requirement.level))
        }
        Action::ContinuePlaintext if !failure.allows_continue_plaintext() => invalid(format!(
            "continue-plaintext after {}: the connection is unusable",
            failure.class()
        )),
        Action::Defer { reason, .. } | Action::Bounce { reason, .. }
            if reason.trim().is_empty() =>
        {
            invalid(format!("{action} without a reason"))
        }
        _ => Ok(()),
    }
}
