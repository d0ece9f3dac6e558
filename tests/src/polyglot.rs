//! The `partner` policy in every language, and other non-Rust guests, built from source.
//!
//! Rust editions go through [`crate::wasm`] (cargo). Python and JavaScript are built with the
//! toolchains `scripts/polyglot-tools.sh` installs (componentize-py, componentize-js); WAT is
//! loaded as text, with no build at all. A component is rebuilt whenever it is older than any
//! of its sources or the WIT, so a stale build can never make a test pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::wasm::{target_dir, workspace_root};

/// A language a policy can be written in.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Lang {
    /// Rust, with `postwarden-policy-sdk`, built for `wasm32-unknown-unknown`.
    Rust,
    /// Python, with componentize-py (a WASI component: CPython inside).
    Python,
    /// JavaScript, with componentize-js (a WASI component: SpiderMonkey inside).
    Js,
    /// A hand-written WAT component.
    Wat,
}

impl Lang {
    /// Every language, in the order tables list them.
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::Wat];

    /// A short name, as `postwarden policy new --lang` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::Wat => "wat",
        }
    }
}

/// The `partner` policy's directory (specification, settings, expectations, editions).
pub fn partner_dir() -> PathBuf {
    workspace_root().join("policies/partner")
}

/// The `partner` policy's component in `lang`, built if stale. Panics with the build's output
/// when the build fails: a test cannot run without its policy.
pub fn partner(lang: Lang) -> PathBuf {
    let dir = partner_dir();
    let built = match lang {
        Lang::Rust => return crate::wasm::policy("partner"),
        Lang::Wat => return dir.join("wat/partner.wat"),
        Lang::Python => python(&dir.join("python"), "app", "partner-py"),
        Lang::Js => javascript(&dir.join("js/policy.js"), "partner-js"),
    };
    built.unwrap_or_else(|e| {
        panic!("building the {} edition of `partner` failed:\n{e}", lang.name())
    })
}

/// The sandbox probe (`tests/fixtures/sandbox-probe`): a Python policy that tries to reach
/// files, sockets and the environment and reports what happened in its `configure` error.
pub fn sandbox_probe() -> PathBuf {
    let dir = workspace_root().join("tests/fixtures/sandbox-probe");
    python(&dir, "app", "sandbox-probe")
        .unwrap_or_else(|e| panic!("building the sandbox probe failed:\n{e}"))
}

/// The WIT directory every guest is built against.
pub fn wit_dir() -> PathBuf {
    workspace_root().join("policy-sdk/wit")
}

/// componentize-py, as installed by `scripts/polyglot-tools.sh` (or `$POSTWARDEN_COMPONENTIZE_PY`).
pub fn componentize_py() -> PathBuf {
    tool("POSTWARDEN_COMPONENTIZE_PY", target_dir().join("polyglot/venv/bin/componentize-py"))
}

/// componentize-js, as installed by `scripts/polyglot-tools.sh` (or `$POSTWARDEN_COMPONENTIZE_JS`).
pub fn componentize_js() -> PathBuf {
    tool(
        "POSTWARDEN_COMPONENTIZE_JS",
        workspace_root().join("tools/polyglot/node_modules/.bin/componentize-js"),
    )
}

fn tool(var: &str, default: PathBuf) -> PathBuf {
    let path = std::env::var_os(var).map_or(default, PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: run scripts/polyglot-tools.sh (or set {var})",
        path.display()
    );
    path
}

/// Builds a componentize-py app (module `module` in `src`) into `target/polyglot/NAME.wasm`.
fn python(src: &Path, module: &str, name: &str) -> Result<PathBuf, String> {
    let wit = wit_dir();
    build(name, &[src, &wit], |out| {
        let mut cmd = Command::new(componentize_py());
        cmd.arg("-d").arg(&wit).args(["-w", "policy", "componentize", module, "-p"]);
        cmd.arg(src).arg("-o").arg(out);
        cmd
    })
}

/// Builds a componentize-js module into `target/polyglot/NAME.wasm`, without the features whose
/// WASI interfaces (wasi:http) the relay does not provide.
fn javascript(src: &Path, name: &str) -> Result<PathBuf, String> {
    let wit = wit_dir();
    build(name, &[src, &wit], |out| {
        let mut cmd = Command::new(componentize_js());
        cmd.arg(src).arg("-w").arg(&wit).args(["-n", "policy", "-d", "http", "fetch-event"]);
        cmd.arg("-o").arg(out);
        cmd
    })
}

/// Runs `command(tmp)` unless `target/polyglot/NAME.wasm` is newer than every file in
/// `inputs`, then moves the output into place (atomically: test processes run in parallel).
fn build(
    name: &str,
    inputs: &[&Path],
    command: impl FnOnce(&Path) -> Command,
) -> Result<PathBuf, String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = target_dir().join("polyglot");
    let out = dir.join(format!("{name}.wasm"));
    let newest_input = inputs.iter().filter_map(|p| newest(p)).max();
    let built = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(input)) = (built, newest_input)
        && built > input
    {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!("{name}.{}.tmp.wasm", std::process::id()));
    let mut cmd = command(&tmp);
    let output = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

/// The newest modification time of a file, or of the files below a directory.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "__pycache__")
        .filter_map(|e| newest(&e.path()))
        .max()
}
