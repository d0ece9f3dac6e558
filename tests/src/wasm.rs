//! Builds policy crates to wasm components, once per test process, and finds the output.
//!
//! Tests always run against freshly built components: `cargo build` is called every time (a
//! no-op when nothing changed), so a stale `.wasm` can never make a test pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The bundled policies, built for `wasm32-unknown-unknown`: no WASI imports, so a fresh
/// instance per decision is cheapest. The host wraps the core module into a component.
pub const BUNDLED: [&str; 5] = ["opportunistic", "forced-tls", "postfix-map", "tofu", "partner"];

/// Test fixtures, built for `wasm32-wasip2`: a real WASI-importing component, so that the
/// deny-by-default WASI is exercised.
pub const FIXTURES: [&str; 1] = ["broken-policy"];

/// The target a policy crate is built for.
pub fn target(name: &str) -> &'static str {
    if FIXTURES.contains(&name) { "wasm32-wasip2" } else { "wasm32-unknown-unknown" }
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target"),
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned).unwrap_or_default()
}

/// The component built from policy crate `name` (e.g. `forced-tls`). Panics with the build's
/// output if the build fails: a test cannot run without its policy.
pub fn policy(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_all) {
        panic!("building the policies to wasm failed:\n{e}");
    }
    let file = format!("{}.wasm", name.replace('-', "_"));
    let path = target_dir().join(target(name)).join("policy").join(file);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn build_all() -> Result<(), String> {
    build("wasm32-unknown-unknown", &BUNDLED)?;
    build("wasm32-wasip2", &FIXTURES)
}

fn build(target: &str, crates: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "--profile",
        "policy",
        "--target",
        target,
    ]);
    for krate in crates {
        cmd.args(["-p", krate]);
    }
    let output = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n(is the target installed? `rustup target add {target}`)",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A binary of this workspace (dev profile), built if stale: for tests in one package that run
/// another package's command, such as `postwarden-sim` from the `postwarden` CLI's tests.
pub fn binary(package: &str, name: &str) -> PathBuf {
    let output = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", package, "--bin", name])
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    assert!(
        output.status.success(),
        "building {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    target_dir().join("debug").join(name)
}
