//! Builds policy crates to wasm components, once per test process, and finds the output.
//!
//! Tests always run against freshly built components: `cargo build` is called every time (a
//! no-op when nothing changed), so a stale `.wasm` can never make a test pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every policy crate the tests use: the bundled policies and the fixtures.
pub const CRATES: [&str; 5] =
    ["opportunistic", "forced-tls", "postfix-map", "tofu", "broken-policy"];

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
    let path =
        target_dir().join("wasm32-wasip2/policy").join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn build_all() -> Result<(), String> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "--profile",
        "policy",
        "--target",
        "wasm32-wasip2",
    ]);
    for krate in CRATES {
        cmd.args(["-p", krate]);
    }
    let output = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n(is the target installed? `rustup target add wasm32-wasip2`)",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
