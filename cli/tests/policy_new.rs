//! `postwarden policy new` creates, for each language, a project whose `make test` builds the
//! component from source and passes the simulator's whole catalogue, out of the box.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use postwarden_tests::{polyglot, wasm};

fn postwarden() -> Command {
    Command::new(env!("CARGO_BIN_EXE_postwarden"))
}

/// Runs `make test` in a new project of `lang` and checks the catalogue passed.
fn scaffold_and_test(lang: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join(format!("acme-{lang}"));
    let output =
        postwarden().args(["policy", "new", "--lang", lang]).arg(&project).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("make test"), "{stdout}");

    let mut make = Command::new("make");
    make.arg("test")
        .current_dir(&project)
        .env("POSTWARDEN", env!("CARGO_BIN_EXE_postwarden"))
        .env("POSTWARDEN_SIM", wasm::binary("postwarden-conformance", "postwarden-sim"))
        // The toolchains scripts/polyglot-tools.sh installed (the project's README shows how
        // an author installs them).
        .env("COMPONENTIZE_PY", polyglot::componentize_py())
        .env("COMPONENTIZE_JS", polyglot::componentize_js())
        // Reuse the dependencies the workspace build already compiled where possible.
        .env("CARGO_TARGET_DIR", wasm::target_dir().join("scaffold"));
    let output = make.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = stdout.lines().last().unwrap_or_default().to_owned();
    if !output.status.success()
        || !summary.starts_with("policy: ")
        || !summary.contains(", 0 failed")
        || !Path::new(&project).join("policy.wasm").exists()
    {
        return Err(format!("make test failed for {lang}:\n{stdout}\n{stderr}"));
    }
    Ok(summary)
}

/// One language after the other: a project's conformance run includes timing scenarios, which
/// should not share two cores with another project's cargo build.
#[test]
fn every_language_gets_a_project_that_builds_and_passes_its_conformance_test() {
    let mut failed = Vec::new();
    for lang in ["rust", "python", "js"] {
        match scaffold_and_test(lang) {
            Ok(summary) => eprintln!("{lang}: {summary}"),
            Err(e) => failed.push(e),
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn policy_new_refuses_a_non_empty_directory_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let output =
        postwarden().args(["policy", "new", "--lang", "python"]).arg(dir.path()).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exists and is not empty"), "{stderr}");
    assert_eq!(std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(), "mine");

    let output = postwarden()
        .args(["policy", "new", "--lang", "rust", "--name", "Bad_Name"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("`Bad_Name` is not a usable policy name"),
        "{stderr}"
    );
    assert!(!dir.path().join("x").exists());
}
