//! The catalogue runs green for every bundled policy, and the runner fails loudly when an
//! expectation is wrong.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use postwarden_conformance::expect::Expectations;
use postwarden_conformance::{RunOptions, report, run};
use postwarden_tests::wasm;

/// (policy crate, expectation file stem): the files under `conformance/expectations/`.
const BUNDLED: [(&str, &str); 5] = [
    ("opportunistic", "opportunistic"),
    ("forced-tls", "forced-tls-encrypt"),
    ("forced-tls", "forced-tls-verify"),
    ("postfix-map", "postfix-map-verify"),
    ("tofu", "tofu"),
];

fn options(krate: &str, stem: &str) -> RunOptions {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("expectations");
    let settings = std::fs::read_to_string(dir.join(format!("{stem}.settings.json")))
        .unwrap_or_else(|_| "{}".to_owned());
    let expectations = Expectations::load(&dir.join(format!("{stem}.toml"))).unwrap();
    RunOptions::new(stem, wasm::policy(krate), &settings, expectations)
}

/// The configurations run one after the other: each already runs its ~100 scenarios at once,
/// and timing scenarios (a greeting dripped byte by byte) must not be starved by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bundled_policy_passes_the_whole_catalogue() {
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    for (krate, stem) in BUNDLED {
        let report = run(&options(krate, stem)).await.unwrap();
        assert!(
            report.results.len() >= 100,
            "{}: only {} scenarios",
            report.name,
            report.results.len()
        );
        eprintln!(
            "{}: {} scenarios in {:.1} s",
            report.name,
            report.results.len(),
            report.elapsed.as_secs_f64()
        );
        if report.failures() > 0 {
            failed.push(report::table(&report));
        }
    }
    assert!(failed.is_empty(), "conformance failures:\n{}", failed.join("\n"));
    eprintln!(
        "whole catalogue x {} bundled configurations: {:.1} s",
        BUNDLED.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_expectation_fails_with_a_clear_message() {
    let wrong =
        Expectations::parse("default = \"forced\"\n[scenario]\n\"CAP-01\" = \"defer 4.7.4\"\n")
            .unwrap();
    let mut options = RunOptions::new(
        "forced",
        wasm::policy("forced-tls"),
        r#"{"domains": {".sim.test": "encrypt"}}"#,
        wrong,
    );
    options.only = Some(vec!["CAP-01".into(), "CAP-02".into()]);
    let report = run(&options).await.unwrap();
    assert_eq!(report.failures(), 1);
    let table = report::table(&report);
    assert!(
        table.contains("FAIL CAP-01") && table.contains("user: expected DEFER 4.7.4, got TLS"),
        "{table}"
    );
    let junit = report::junit(&[report]);
    assert!(
        junit.contains("failures=\"1\"")
            && junit.contains("<failure message=\"user: expected DEFER 4.7.4, got TLS\""),
        "{junit}"
    );
}

/// When a policy faults, the failure report says so: the deferral's reason names the policy
/// and the fault, so an author sees "trapped" rather than a bare 4.7.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulting_policy_is_diagnosed_in_the_report() {
    let expect = Expectations::parse("default = \"opportunistic\"\n").unwrap();
    let mut options =
        RunOptions::new("broken", wasm::policy("broken-policy"), r#"{"mode": "trap"}"#, expect);
    options.only = Some(vec!["CAP-01".into()]);
    let report = run(&options).await.unwrap();
    assert_eq!(report.failures(), 1);
    let table = report::table(&report);
    assert!(table.contains("expected TLS, got DEFER 4.7.0"), "{table}");
    assert!(table.contains("the relay's reason:") && table.contains("trapped"), "{table}");
}
