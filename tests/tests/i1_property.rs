#![allow(clippy::unwrap_used)]

//! Invariant I1 as a property, through real wasm policies: under a forced requirement (a
//! forced verdict, or REQUIRETLS), no attempt ever ends in plaintext, whatever the domain, MX
//! list, attempt, flags and sequence of TLS failures; and a domain configured as forced always
//! gets a forced verdict (or a deferral), never an opportunistic one.
//!
//! Each case walks one delivery the way the delivery engine does: plan for the MX, then on a
//! failure ask the chain what to do, moving to the next MX on `next-mx`; a successful handshake
//! is reported to every policy (so `tofu` learns, and later cases see what it remembered).
//!
//! The number of cases follows `PROPTEST_CASES` (proptest's default, 256, otherwise); it was
//! run once with `PROPTEST_CASES=100000`.

use std::sync::OnceLock;

use postwarden::policy::{
    Action, Chain, Context, DeliveryReport, Failure, PolicyEngine, TlsLevel, TlsVersion, Verdict,
};
use postwarden_tests::chains;
use proptest::prelude::*;
use tempfile::TempDir;

const CHAIN: &str = r#"
[[policy]]
name = "forced"
path = "{wasm:forced-tls}"
[policy.settings.domains]
"bank.example" = "verify"
".bank.example" = { level = "secure", match = [".bank.example"] }
"legacy.example" = { level = "encrypt", min_version = "tls13" }

[[policy]]
name = "postfix"
path = "{wasm:postfix-map}"
[policy.settings]
map = """
pay.example        secure match=nexthop:dot-nexthop
.pay.example       verify
enc.example        encrypt
plain.example      none
may.example        may
[mx.pinned.example] encrypt
"""

[[policy]]
name = "tofu"
path = "{wasm:tofu}"
"#;

/// Domains the configuration forces (the exact names and subdomains of the dotted keys).
fn configured_forced(domain: &str) -> bool {
    ["bank.example", "legacy.example", "pay.example", "enc.example"].contains(&domain)
        || domain.ends_with(".bank.example")
        || domain.ends_with(".pay.example")
}

fn chain() -> &'static Chain {
    static CHAIN_ONCE: OnceLock<(Chain, PolicyEngine, TempDir)> = OnceLock::new();
    &CHAIN_ONCE.get_or_init(|| chains::load(CHAIN).unwrap()).0
}

fn domain() -> impl Strategy<Value = String> {
    let base = prop::sample::select(vec![
        "bank.example",
        "legacy.example",
        "pay.example",
        "enc.example",
        "plain.example",
        "may.example",
        "pinned.example",
        "example.org",
        "example",
    ]);
    (prop::option::of("[a-z0-9-]{1,8}"), base).prop_map(|(label, base)| match label {
        Some(label) => format!("{label}.{base}"),
        None => base.to_owned(),
    })
}

fn failure() -> impl Strategy<Value = Option<Failure>> {
    let d = "[ -~]{0,12}";
    prop_oneof![
        Just(None),
        Just(Some(Failure::StarttlsNotOffered)),
        (400u16..600, d).prop_map(|(code, text)| Some(Failure::StarttlsRefused { code, text })),
        d.prop_map(|s| Some(Failure::HandshakeFailed(s))),
        d.prop_map(|s| Some(Failure::CertificateUntrusted(s))),
        d.prop_map(|s| Some(Failure::CertificateExpired(s))),
        d.prop_map(|s| Some(Failure::CertificateNotYetValid(s))),
        d.prop_map(|s| Some(Failure::CertificateNameMismatch(s))),
        d.prop_map(|s| Some(Failure::TlsVersionTooOld(s))),
        d.prop_map(|s| Some(Failure::ConnectionLost(s))),
        d.prop_map(|s| Some(Failure::Timeout(s))),
    ]
}

#[derive(Debug)]
struct Case {
    domain: String,
    mx_hosts: Vec<String>,
    attempt: u32,
    message_age: u64,
    requiretls: bool,
    tls_required_no: bool,
    /// What happens at each MX: `None` is a handshake that succeeds.
    outcomes: Vec<Option<Failure>>,
    verified: bool,
    tls13: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        domain(),
        prop::collection::vec(
            prop_oneof![Just("mx.pinned.example".to_owned()), "mx[0-9]\\.[a-z]{1,6}\\.example"],
            1..4,
        ),
        1u32..30,
        0u64..1_000_000,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(failure(), 4),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                domain,
                mx_hosts,
                attempt,
                message_age,
                requiretls,
                tls_required_no,
                outcomes,
                verified,
                tls13,
            )| Case {
                domain,
                mx_hosts,
                attempt,
                message_age,
                requiretls,
                tls_required_no,
                outcomes,
                verified,
                tls13,
            },
        )
}

/// Runs one delivery of `case`; returns an error naming the step that broke I1.
fn deliver(case: &Case) -> Result<(), String> {
    let chain = chain();
    let count = u32::try_from(case.mx_hosts.len()).unwrap();
    for (index, mx) in case.mx_hosts.iter().enumerate() {
        let mut ctx = Context::new(&case.domain, mx);
        ctx.mx_index = u32::try_from(index).unwrap();
        ctx.mx_count = count;
        ctx.attempt = case.attempt;
        ctx.message_age = case.message_age;
        ctx.requiretls = case.requiretls;
        ctx.tls_required_no = case.tls_required_no;
        let plan = chain.plan(&ctx);
        let requirement = match &plan.verdict {
            Verdict::Require(r) => r.clone(),
            Verdict::Defer { .. } => return Ok(()),
        };
        let forced = requirement.level.is_forced() || case.requiretls;
        // `TLS-Required: No` never relaxes locally configured forced TLS by default
        // (`tls_required_no = "never"`, issue 11 item 7): no case is exempt.
        if configured_forced(&case.domain) && !forced {
            return Err(format!("configured forced, planned {requirement} ({:?})", plan.trace));
        }
        if case.requiretls && requirement.level < TlsLevel::Verify {
            return Err(format!("REQUIRETLS planned {requirement}"));
        }
        match &case.outcomes[index] {
            None => {
                let report = DeliveryReport {
                    requirement: requirement.clone(),
                    tls_version: Some(if case.tls13 {
                        TlsVersion::Tls13
                    } else {
                        TlsVersion::Tls12
                    }),
                    cipher: "TLS13_AES_128_GCM_SHA256".to_owned(),
                    certificate_verified: case.verified,
                };
                chain.on_delivered(&ctx, &report);
                return Ok(());
            }
            Some(failure) => {
                let response = chain.on_failure(&plan, &ctx, failure);
                match response.action {
                    Action::ContinuePlaintext | Action::ReconnectPlaintext if forced => {
                        return Err(format!(
                            "{} under {requirement} (requiretls {}) after {failure} at {mx}",
                            response.action, case.requiretls
                        ));
                    }
                    Action::NextMx if index + 1 < case.mx_hosts.len() => continue,
                    // At the last MX, next-mx ends the host loop: a deferral, or under a
                    // requirement that allows plaintext the plaintext pass, whose permit only a
                    // non-forced plan yields (checked by the plan assertions above).
                    Action::NextMx => return Ok(()),
                    _ => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn no_plaintext_under_a_forced_requirement(case in case()) {
        if let Err(broken) = deliver(&case) {
            prop_assert!(false, "I1 broken: {broken}\n{case:?}");
        }
    }
}
