//! Every edition of the `partner` policy (Rust, Python, JavaScript, WAT) passes the same
//! expectations over the whole catalogue, through the `postwarden-sim conformance` command a
//! policy author runs.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use postwarden_tests::polyglot::{self, Lang};

#[test]
fn every_language_passes_the_same_expectations() {
    let dir = polyglot::partner_dir();
    let mut failed = Vec::new();
    for lang in Lang::ALL {
        let policy = polyglot::partner(lang);
        let junit = tempfile::NamedTempFile::new().unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_postwarden-sim"))
            .arg("conformance")
            .arg("--policy")
            .arg(&policy)
            .arg("--settings")
            .arg(dir.join("settings.json"))
            .arg("--expect")
            .arg(dir.join("expect.toml"))
            .arg("--junit")
            .arg(junit.path())
            .arg("--cache-dir")
            .arg(postwarden_tests::wasm::target_dir().join("polyglot/cache"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = stdout.lines().last().unwrap_or_default().to_owned();
        eprintln!("{}: {summary}", lang.name());
        let junit = std::fs::read_to_string(junit.path()).unwrap();
        if !output.status.success()
            || !summary.contains(", 0 failed")
            || !junit.contains("failures=\"0\"")
        {
            failed.push(format!(
                "{} ({}): {}\n{stdout}{}",
                lang.name(),
                policy.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        // The run covered the catalogue, not a subset.
        let passed: usize =
            summary.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or_default();
        assert!(passed >= 100, "{}: {summary}", lang.name());
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
