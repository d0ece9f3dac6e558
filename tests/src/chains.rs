//! Policy chains built from configuration text, the way the relay builds them.

use std::path::Path;

use postwarden::config::Config;
use postwarden::policy::{self, Chain, PolicyEngine, StateMode};
use tempfile::TempDir;

/// A chain loaded from `toml`, with its cache and state directories in a fresh temporary
/// directory (kept alive by the returned guard). `{wasm:NAME}` in the text is replaced by the
/// path of policy crate NAME built to wasm, and `{dir}` by the temporary directory.
pub fn load(toml: &str) -> anyhow::Result<(Chain, PolicyEngine, TempDir)> {
    let dir = tempfile::tempdir()?;
    let (chain, engine) = load_in(toml, dir.path())?;
    Ok((chain, engine, dir))
}

/// Like [`load`], in an existing directory (to test restarts: same cache, same state).
pub fn load_in(toml: &str, dir: &Path) -> anyhow::Result<(Chain, PolicyEngine)> {
    let config = config_in(toml, dir)?;
    let engine = policy::engine_from_config(&config)?;
    let chain = policy::load_chain(&engine, &config, StateMode::Persistent)?;
    Ok((chain, engine))
}

/// Parses `toml` after the substitutions of [`load`]; the config file is `DIR/relay.toml`.
pub fn config_in(toml: &str, dir: &Path) -> anyhow::Result<Config> {
    let text = substitute(toml, dir);
    let header = "[policy_engine]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n";
    let text = if text.contains("[policy_engine]") { text } else { format!("{header}{text}") };
    let path = dir.join("relay.toml");
    std::fs::write(&path, &text)?;
    Ok(Config::load(&path)?)
}

fn substitute(toml: &str, dir: &Path) -> String {
    let mut out = toml.replace("{dir}", &dir.display().to_string());
    while let Some(start) = out.find("{wasm:") {
        let Some(len) = out[start..].find('}') else { break };
        let name = &out[start + 6..start + len];
        let path = crate::wasm::policy(name).display().to_string();
        out.replace_range(start..=start + len, &path);
    }
    out
}
