//! `postwarden policy check` (issue 10 item 7): a component that implements the contract but
//! can never decide under the runtime limits must fail the check with the reason, and the
//! bundled policies must pass it.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use postwarden::cli::policy_check;
use postwarden_tests::wasm;

fn partner_wat() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/partner/wat/partner.wat");
    std::fs::read_to_string(path).unwrap()
}

/// The hand-written `partner` component with a 20 MiB initial memory whose last bytes are a
/// data segment: it compiles, implements the contract and configures (256 MiB cap), but no
/// decision instance fits the 16 MiB decision cap, so every decision would fault.
#[test]
fn a_policy_whose_memory_cannot_fit_the_decision_cap_fails_the_check() {
    let declared = "(memory (export \"memory\") 1)";
    let wat = partner_wat();
    assert_eq!(wat.matches(declared).count(), 1, "the fixture's memory declaration moved");
    let big = wat.replace(
        declared,
        "(memory (export \"memory\") 320)\n    (data (i32.const 0x13ffff0) \"beyond the 16 MiB cap\")",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.wat");
    std::fs::write(&file, big).unwrap();

    let mut out = String::new();
    let err = policy_check(&file, None, &mut out).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("policy `big`: a decision exceeded its memory limit of 16777216 bytes"),
        "{text}"
    );
    assert!(out.contains("implements postwarden:policy@"), "{out}");

    // The same component with its original memory passes, and runs a sample decision.
    let file = dir.path().join("partner.wat");
    std::fs::write(&file, partner_wat()).unwrap();
    let mut out = String::new();
    policy_check(&file, None, &mut out).unwrap();
    assert!(out.contains("instance: fits the decision limits (16 MiB, 10 ms)"), "{out}");
    assert!(out.contains("sample:   plan -> may; on-failure(handshake-failed) ->"), "{out}");
}

#[test]
fn the_bundled_policies_pass_the_check() {
    for name in ["opportunistic", "forced-tls", "postfix-map", "tofu", "partner"] {
        let mut out = String::new();
        policy_check(&wasm::policy(name), None, &mut out).unwrap();
        assert!(out.contains("instance: fits the decision limits"), "{name}: {out}");
        assert!(out.contains("settings: "), "{name}: {out}");
    }
    let mut out = String::new();
    let settings = r#"{"domains": {"example.com": "verify"}}"#;
    policy_check(&wasm::policy("forced-tls"), Some(settings), &mut out).unwrap();
    assert!(
        out.contains("sample:   plan -> verify") && out.contains("-> next-mx")
            || out.contains("-> defer"),
        "{out}"
    );
}

/// A policy that configures but faults on every decision fails the check, naming the fault.
#[test]
fn a_policy_that_faults_in_plan_fails_the_check() {
    let mut out = String::new();
    let err = policy_check(&wasm::policy("broken-policy"), Some(r#"{"mode": "trap"}"#), &mut out)
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("policy `broken_policy`: sample `plan` for example.com trapped"),
        "{text}"
    );
}
