//! Expectation files: what a policy must do against each scenario.
//!
//! ```toml
//! # Which column of the catalogue applies by default: opportunistic | forced | forced-verify.
//! default = "forced"
//! # Another column for whole families (the id before the dash), for policies that treat
//! # some destinations differently from others.
//! [family]
//! CERT = "forced-verify"
//! # Single scenarios that differ from the column (e.g. a policy that bounces instead).
//! [scenario]
//! "CAP-01" = "tls"
//! "STL-02" = "defer 4.7.4"
//! "HS-03"  = "plain*"
//! ```
//!
//! Outcome words: `tls` (delivered over TLS), `plain` (plaintext on the same connection),
//! `plain*` (plaintext on a new connection after a TLS failure), `defer` or `defer 4.7.5`
//! (kept queued, optionally with that enhanced code), `bounce`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use postwarden_sim::{Outcome, Policy, Scenario};
use serde::Deserialize;

/// A parsed expectation file.
#[derive(Clone, Debug)]
pub struct Expectations {
    /// The catalogue column used when a scenario has no override.
    pub default: Policy,
    /// Per-family columns (family names upper-case, e.g. `CERT`).
    pub families: BTreeMap<String, Policy>,
    /// Per-scenario overrides (ids upper-case).
    pub overrides: BTreeMap<String, Expect>,
}

/// One expected outcome from a file.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Expect {
    /// Delivered over TLS.
    Tls,
    /// Plaintext, same connection.
    Plain,
    /// Plaintext, new connection.
    PlainReconnect,
    /// Deferred, optionally with this code.
    Defer(Option<String>),
    /// Bounced.
    Bounce,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: String,
    #[serde(default)]
    family: BTreeMap<String, String>,
    #[serde(default)]
    scenario: BTreeMap<String, String>,
}

impl Expectations {
    /// Reads an expectation file; errors name the file and the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses expectation text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let default = parse_column(&file.default).map_err(|e| format!("default: {e}"))?;
        let mut families = BTreeMap::new();
        for (family, column) in file.family {
            let name = family.to_ascii_uppercase();
            let known = postwarden_sim::scenario::catalogue()
                .iter()
                .any(|s| s.id.split('-').next() == Some(name.as_str()));
            if !known {
                return Err(format!("family.\"{family}\": no scenario id starts with `{name}-`"));
            }
            let column = parse_column(&column).map_err(|e| format!("family.\"{family}\": {e}"))?;
            families.insert(name, column);
        }
        let mut overrides = BTreeMap::new();
        for (id, word) in file.scenario {
            let expect = Expect::parse(&word).ok_or_else(|| {
                format!(
                    "scenario.\"{id}\": `{word}` is not tls, plain, plain*, defer [code] or bounce"
                )
            })?;
            if postwarden_sim::scenario::find(&id).is_none() {
                return Err(format!("scenario.\"{id}\": no such scenario in the catalogue"));
            }
            overrides.insert(id.to_ascii_uppercase(), expect);
        }
        Ok(Expectations { default, families, overrides })
    }

    /// A file with only a default column.
    pub fn column(default: Policy) -> Self {
        Expectations { default, families: BTreeMap::new(), overrides: BTreeMap::new() }
    }

    /// What is expected of `scenario`: its override, else its family's column, else the
    /// default column.
    pub fn expected(&self, scenario: &Scenario) -> Expected {
        if let Some(expect) = self.overrides.get(scenario.id) {
            return Expected::File(expect.clone());
        }
        Expected::Catalogue(scenario.expected.outcome(self.column_of(scenario)))
    }

    /// The catalogue column that applies to `scenario`: its family's, else the default.
    pub fn column_of(&self, scenario: &Scenario) -> Policy {
        let family = scenario.id.split('-').next().unwrap_or_default();
        self.families.get(family).copied().unwrap_or(self.default)
    }
}

fn parse_column(word: &str) -> Result<Policy, String> {
    match word {
        "opportunistic" => Ok(Policy::Opportunistic),
        "forced" => Ok(Policy::Forced),
        "forced-verify" => Ok(Policy::ForcedVerify),
        other => Err(format!("`{other}` is not opportunistic, forced or forced-verify")),
    }
}

impl Expect {
    /// Parses an outcome word.
    pub fn parse(word: &str) -> Option<Self> {
        let mut parts = word.split_whitespace();
        let expect = match parts.next()? {
            "tls" => Expect::Tls,
            "plain" => Expect::Plain,
            "plain*" => Expect::PlainReconnect,
            "bounce" => Expect::Bounce,
            "defer" => Expect::Defer(parts.next().map(str::to_owned)),
            _ => return None,
        };
        parts.next().is_none().then_some(expect)
    }
}

/// An expectation, from the catalogue or from a file.
#[derive(Clone, Debug)]
pub enum Expected {
    /// The catalogue's outcome for the default column.
    Catalogue(Outcome),
    /// An override from the file.
    File(Expect),
}

/// What the relay did for one recipient.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Observed {
    /// Delivered over TLS (via this MX host).
    Tls(String),
    /// Plaintext on the same connection.
    Plain(String),
    /// Plaintext on a new connection.
    PlainReconnect(String),
    /// Deferred with this code.
    Defer(String),
    /// Bounced with this code.
    Bounce(String),
}

impl Observed {
    /// The accepting MX host, for deliveries.
    pub fn mx(&self) -> Option<&str> {
        match self {
            Observed::Tls(mx) | Observed::Plain(mx) | Observed::PlainReconnect(mx) => Some(mx),
            _ => None,
        }
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Tls(_) => f.write_str("TLS"),
            Observed::Plain(_) => f.write_str("PLAIN"),
            Observed::PlainReconnect(_) => f.write_str("PLAIN*"),
            Observed::Defer(code) => write!(f, "DEFER {code}"),
            Observed::Bounce(code) => write!(f, "BOUNCE {code}"),
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Catalogue(outcome) => write!(f, "{outcome}"),
            Expected::File(Expect::Tls) => f.write_str("TLS"),
            Expected::File(Expect::Plain) => f.write_str("PLAIN"),
            Expected::File(Expect::PlainReconnect) => f.write_str("PLAIN*"),
            Expected::File(Expect::Defer(None)) => f.write_str("DEFER"),
            Expected::File(Expect::Defer(Some(code))) => write!(f, "DEFER {code}"),
            Expected::File(Expect::Bounce) => f.write_str("BOUNCE"),
        }
    }
}

/// Whether `observed` satisfies `outcome` (a single, non-split catalogue outcome).
pub fn outcome_accepts(outcome: &Outcome, observed: &Observed) -> bool {
    match (outcome, observed) {
        (Outcome::AnyOf(options), _) => options.iter().any(|o| outcome_accepts(o, observed)),
        (Outcome::Tls, Observed::Tls(_))
        | (Outcome::Plain, Observed::Plain(_))
        | (Outcome::PlainReconnect, Observed::PlainReconnect(_))
        | (Outcome::Bounce, Observed::Bounce(_))
        | (Outcome::Defer { code: None }, Observed::Defer(_)) => true,
        (Outcome::Defer { code: Some(want) }, Observed::Defer(got)) => want == got,
        _ => false,
    }
}

/// Whether `observed` satisfies a file expectation.
pub fn expect_accepts(expect: &Expect, observed: &Observed) -> bool {
    match (expect, observed) {
        (Expect::Tls, Observed::Tls(_))
        | (Expect::Plain, Observed::Plain(_))
        | (Expect::PlainReconnect, Observed::PlainReconnect(_))
        | (Expect::Bounce, Observed::Bounce(_))
        | (Expect::Defer(None), Observed::Defer(_)) => true,
        (Expect::Defer(Some(want)), Observed::Defer(got)) => want == got,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words_and_names_bad_keys() {
        let ok =
            Expectations::parse("default = \"forced\"\n[scenario]\n\"cap-01\" = \"defer 4.7.4\"\n")
                .unwrap();
        assert_eq!(ok.default, Policy::Forced);
        assert_eq!(ok.overrides["CAP-01"], Expect::Defer(Some("4.7.4".into())));
        let err = Expectations::parse("default = \"forced\"\n[scenario]\n\"CAP-01\" = \"maybe\"\n")
            .unwrap_err();
        assert!(err.contains("scenario.\"CAP-01\": `maybe`"), "{err}");
        let err = Expectations::parse("default = \"forced\"\n[scenario]\n\"XYZ-99\" = \"tls\"\n")
            .unwrap_err();
        assert!(err.contains("no such scenario"), "{err}");
        let err = Expectations::parse("default = \"strict\"\n").unwrap_err();
        assert!(err.contains("default: `strict`"), "{err}");
    }

    #[test]
    fn families_pick_their_column_and_overrides_win() {
        let text = "default = \"opportunistic\"\n[family]\ncert = \"forced-verify\"\n\
                    [scenario]\n\"CERT-02\" = \"bounce\"\n";
        let file = Expectations::parse(text).unwrap();
        let column = |id: &str| match file.expected(&postwarden_sim::scenario::find(id).unwrap()) {
            Expected::Catalogue(outcome) => outcome.to_string(),
            Expected::File(expect) => format!("file {expect:?}"),
        };
        // CERT-03: a self-signed certificate, where the columns differ.
        let cert = postwarden_sim::scenario::find("CERT-03").unwrap();
        assert_eq!(column("CERT-03"), cert.expected.outcome(Policy::ForcedVerify).to_string());
        assert_ne!(column("CERT-03"), cert.expected.outcome(Policy::Opportunistic).to_string());
        assert_eq!(column("CERT-02"), "file Bounce");
        let cap = postwarden_sim::scenario::find("CAP-02").unwrap();
        assert_eq!(column("CAP-02"), cap.expected.outcome(Policy::Opportunistic).to_string());
        let err =
            Expectations::parse("default = \"forced\"\n[family]\nNOPE = \"forced\"\n").unwrap_err();
        assert!(err.contains("family.\"NOPE\": no scenario id starts with `NOPE-`"), "{err}");
        let err =
            Expectations::parse("default = \"forced\"\n[family]\nHS = \"strict\"\n").unwrap_err();
        assert!(err.contains("family.\"HS\": `strict`"), "{err}");
    }
}
