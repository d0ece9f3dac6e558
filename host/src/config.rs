//! The relay's configuration file (TOML).
//!
//! Serde data that parses into valid types: unknown keys are errors, every field has a
//! documented default, and every error names the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{Limits, TlsLevel};

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of the policy engine.
    #[serde(default)]
    pub policy_engine: PolicyEngineConfig,
    /// The policy chain, in order (`[[policy]]` tables).
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyConfig>,
}

/// `[policy_engine]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEngineConfig {
    /// Where compiled policies are cached (default `/var/lib/postwarden/policy-cache`).
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Where the policies' persistent key-value stores live (default
    /// `/var/lib/postwarden/policy-state`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The requirement when every policy abstains (default `may`).
    #[serde(default = "default_level")]
    pub default_level: TlsLevel,
    /// Whether a `TLS-Required: No` header relaxes forced requirements to `may` (default true,
    /// as RFC 8689 §5 asks).
    #[serde(default = "yes")]
    pub honor_tls_required_no: bool,
    /// Policy calls that may run at once (default 128).
    #[serde(default = "default_concurrency")]
    pub max_concurrent_calls: u32,
}

impl Default for PolicyEngineConfig {
    fn default() -> Self {
        PolicyEngineConfig {
            cache_dir: default_cache_dir(),
            state_dir: default_state_dir(),
            default_level: default_level(),
            honor_tls_required_no: true,
            max_concurrent_calls: default_concurrency(),
        }
    }
}

/// One `[[policy]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A unique name, used in logs, metrics and deferral reasons.
    pub name: String,
    /// The component file (`.wasm`, or `.wat` component text); relative paths are relative to
    /// the config file.
    pub path: PathBuf,
    /// Optional hex SHA-256 pin: the policy is refused if the file does not match.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Deadline per call, in milliseconds (default 10).
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Memory cap per call, in MiB (default 16).
    #[serde(default = "default_memory_mib")]
    pub memory_limit_mib: u64,
    /// Deadline of `configure`, which runs once at load, in milliseconds (default 1000).
    #[serde(default = "default_configure_deadline_ms")]
    pub configure_deadline_ms: u64,
    /// Memory cap of `configure`, in MiB (default 256): enough to parse large tables.
    #[serde(default = "default_configure_memory_mib")]
    pub configure_memory_limit_mib: u64,
    /// The policy's own settings, handed to its `configure` as JSON.
    #[serde(default)]
    pub settings: toml::Table,
}

impl PolicyConfig {
    /// The settings as the JSON text `configure` receives.
    pub fn settings_json(&self) -> String {
        serde_json::to_string(&self.settings).unwrap_or_else(|_| "{}".to_owned())
    }

    /// The per-call limits.
    pub fn limits(&self) -> Limits {
        let mib = |n: u64| usize::try_from(n.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        Limits {
            deadline: Duration::from_millis(self.deadline_ms),
            memory: mib(self.memory_limit_mib),
            configure_deadline: Duration::from_millis(self.configure_deadline_ms),
            configure_memory: mib(self.configure_memory_limit_mib),
        }
    }
}

/// A configuration error, naming the file and, where known, the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, starting with the key.
    pub message: String,
}

impl Config {
    /// Reads and validates `path`. Relative paths inside are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text that came from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError { path: path.to_owned(), message };
        let mut config: Config =
            toml::from_str(text).map_err(|e| error(describe_toml_error(&e)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(error)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.policy_engine.cache_dir);
        resolve(&mut self.policy_engine.state_dir);
        for policy in &mut self.policies {
            resolve(&mut policy.path);
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.policy_engine.max_concurrent_calls == 0 {
            return Err("policy_engine.max_concurrent_calls: must be at least 1".to_owned());
        }
        let mut names = std::collections::HashSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            let key = |field: &str| format!("policy[{i}].{field} (policy `{}`)", policy.name);
            let valid_name = !policy.name.is_empty()
                && policy.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(format!(
                    "{}: must be non-empty letters, digits, `-` or `_`",
                    key("name")
                ));
            }
            if !names.insert(&policy.name) {
                return Err(format!("{}: duplicate policy name", key("name")));
            }
            if !(1..=60_000).contains(&policy.deadline_ms) {
                return Err(format!("{}: must be between 1 and 60000", key("deadline_ms")));
            }
            let max_mib = (crate::policy::engine::MAX_MEMORY_LIMIT >> 20) as u64;
            if !(1..=max_mib).contains(&policy.memory_limit_mib) {
                return Err(format!(
                    "{}: must be between 1 and {max_mib}",
                    key("memory_limit_mib")
                ));
            }
            if let Some(pin) = &policy.sha256
                && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!("{}: must be 64 hex digits", key("sha256")));
            }
        }
        Ok(())
    }
}

/// Toml's messages carry line, column and a snippet; keep them and name the key when known.
fn describe_toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim_end().replace('\n', "\n  ")
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("/var/lib/postwarden/policy-cache")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/postwarden/policy-state")
}

fn default_level() -> TlsLevel {
    TlsLevel::May
}

fn yes() -> bool {
    true
}

fn default_concurrency() -> u32 {
    128
}

fn default_deadline_ms() -> u64 {
    10
}

fn default_memory_mib() -> u64 {
    16
}

fn default_configure_deadline_ms() -> u64 {
    1000
}

fn default_configure_memory_mib() -> u64 {
    256
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_and_key() {
        let path = Path::new("/etc/postwarden/relay.toml");
        let cases = [
            (
                "[[policy]]\nname = \"a\"\npath = \"a.wasm\"\ndeadline = 5\n",
                "unknown field `deadline`",
            ),
            (
                "[[policy]]\nname = \"a\"\npath = \"a.wasm\"\ndeadline_ms = 0\n",
                "policy[0].deadline_ms (policy `a`)",
            ),
            (
                "[[policy]]\nname = \"a\"\npath = \"a.wasm\"\n[[policy]]\nname = \"a\"\npath = \"b.wasm\"\n",
                "policy[1].name (policy `a`): duplicate",
            ),
            ("[policy_engine]\ndefault_level = \"maybe\"\n", "unknown variant `maybe`"),
            ("[[policy]]\nname = \"a\"\npath = \"a.wasm\"\nsha256 = \"xyz\"\n", "policy[0].sha256"),
        ];
        for (text, expected) in cases {
            let err = Config::parse(text, path).unwrap_err().to_string();
            assert!(err.starts_with("/etc/postwarden/relay.toml: "), "{err}");
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn paths_are_relative_to_the_file_and_settings_become_json() {
        let text = "[[policy]]\nname = \"forced\"\npath = \"p/forced.wasm\"\n[policy.settings.domains]\n\"a.example\" = \"verify\"\n";
        let config = Config::parse(text, Path::new("/etc/pw/relay.toml")).unwrap();
        assert_eq!(config.policies[0].path, Path::new("/etc/pw/p/forced.wasm"));
        assert_eq!(config.policies[0].settings_json(), r#"{"domains":{"a.example":"verify"}}"#);
        assert_eq!(config.policies[0].limits(), Limits::default());
    }
}
