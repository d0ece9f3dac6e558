//! MTA-STS (RFC 8461), sans-IO: the `_mta-sts` TXT record, the policy file, and the MX pattern
//! rule.
//!
//! Strict where leniency has cost others a downgrade or a false policy (research §3.5): a TXT
//! record counts only when it *begins* with `v=STSv1;` and is the only such record (§3.1); a
//! policy needs `version: STSv1`, a valid `mode`, a bounded `max_age` and, unless its mode is
//! `none`, at least one `mx` pattern. Lenient where the RFC and real servers are: LF line ends,
//! unknown fields ignored, trailing whitespace. A wildcard covers exactly one label (§4.1).
//! Fetching, caching and the precedence rules live above this module.

use std::fmt;

use crate::policy::facts::StsMode;

/// The longest `max_age` a policy may carry (RFC 8461 §3.2: about one year).
pub const MAX_AGE_LIMIT: u32 = 31_557_600;

/// The policy file's size limit (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// A valid `_mta-sts` TXT record.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct StsRecord {
    /// The policy's `id`: a change means the policy file changed.
    pub id: String,
}

/// Why the `_mta-sts` TXT answer does not announce a policy. Every case means "the domain has
/// no available MTA-STS policy" (RFC 8461 §3.1).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum RecordError {
    /// No record begins with `v=STSv1;`.
    None,
    /// More than one does.
    Several(usize),
    /// The one that does is not valid.
    Invalid(String),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::None => f.write_str("no v=STSv1 TXT record"),
            RecordError::Several(n) => write!(f, "{n} v=STSv1 TXT records (exactly one allowed)"),
            RecordError::Invalid(why) => write!(f, "invalid v=STSv1 TXT record: {why}"),
        }
    }
}

/// Picks and parses the `_mta-sts` record from a TXT answer (each record given as its strings
/// already joined, RFC 7208 §3.3 style).
pub fn parse_record(records: &[String]) -> Result<StsRecord, RecordError> {
    let candidates: Vec<&String> = records.iter().filter(|r| r.starts_with("v=STSv1;")).collect();
    match candidates.as_slice() {
        [] => Err(RecordError::None),
        [one] => parse_one_record(one).map_err(RecordError::Invalid),
        many => Err(RecordError::Several(many.len())),
    }
}

/// `sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]`, with
/// `sts-field-delim = *WSP ";" *WSP`; `id` is required, at most once, 1 to 32 letters or digits;
/// extensions are `name=value` with the RFC's character sets, and ignored.
fn parse_one_record(record: &str) -> Result<StsRecord, String> {
    let mut fields = record.split(';').map(|f| f.trim_matches([' ', '\t']));
    fields.next(); // "v=STSv1", checked by the caller
    let mut id = None;
    let mut last_empty = false;
    for field in fields {
        if last_empty {
            return Err("an empty field before the end".to_owned());
        }
        if field.is_empty() {
            // Only a trailing delimiter may leave an empty field.
            last_empty = true;
            continue;
        }
        let Some((name, value)) = field.split_once('=') else {
            return Err(format!("field `{field}` is not name=value"));
        };
        if name == "id" {
            if id.is_some() {
                return Err("id given twice".to_owned());
            }
            if value.is_empty()
                || value.len() > 32
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("id `{value}` is not 1 to 32 letters or digits"));
            }
            id = Some(value.to_owned());
        } else if !is_extension_name(name) || !is_extension_value(value) {
            return Err(format!("field `{field}` is not a valid extension"));
        }
    }
    id.map(|id| StsRecord { id }).ok_or_else(|| "no id".to_owned())
}

fn is_extension_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn is_extension_value(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| matches!(b, 0x21..=0x3a | 0x3c | 0x3e..=0x7e))
}

/// A valid policy file.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PolicyFile {
    /// The mode.
    pub mode: StsMode,
    /// How long the policy may be cached, in seconds.
    pub max_age: u32,
    /// The MX patterns, lower-case, without trailing dots.
    pub mx: Vec<String>,
}

/// Parses a policy file (RFC 8461 §3.2). The error says what is wrong, for the operator and
/// for TLS-RPT's `sts-policy-invalid`.
pub fn parse_policy(text: &str) -> Result<PolicyFile, String> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(format!("larger than {MAX_POLICY_BYTES} bytes"));
    }
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    for (number, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line).trim_end_matches([' ', '\t']);
        if line.is_empty() {
            continue;
        }
        let at = |why: String| format!("line {}: {why}", number + 1);
        let Some((key, value)) = line.split_once(':') else {
            return Err(at(format!("`{line}` is not key: value")));
        };
        let value = value.trim_start_matches([' ', '\t']);
        let twice = || at(format!("`{key}` given twice"));
        match key {
            "version" => {
                if version.is_some() {
                    return Err(twice());
                }
                if value != "STSv1" {
                    return Err(at(format!("version `{value}` is not STSv1")));
                }
                version = Some(());
            }
            "mode" => {
                if mode.is_some() {
                    return Err(twice());
                }
                mode = Some(match value {
                    "enforce" => StsMode::Enforce,
                    "testing" => StsMode::Testing,
                    "none" => StsMode::None,
                    other => {
                        return Err(at(format!("mode `{other}` is not enforce, testing or none")));
                    }
                });
            }
            "max_age" => {
                if max_age.is_some() {
                    return Err(twice());
                }
                // `1*10DIGIT`, at most MAX_AGE_LIMIT (`parse` alone would accept a `+`).
                let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                max_age = match value.parse::<u32>() {
                    Ok(seconds) if digits && seconds <= MAX_AGE_LIMIT => Some(seconds),
                    _ => {
                        return Err(at(format!(
                            "max_age `{value}` is not a number of seconds up to {MAX_AGE_LIMIT}"
                        )));
                    }
                };
            }
            "mx" => {
                let pattern = value.trim_end_matches('.').to_ascii_lowercase();
                if !is_mx_pattern(&pattern) {
                    return Err(at(format!("mx `{value}` is not a host name or *.name")));
                }
                mx.push(pattern);
            }
            // Extensions (RFC 8461 §3.2: unknown fields are ignored).
            _ => {}
        }
    }
    let (Some(()), Some(mode), Some(max_age)) = (version, mode, max_age) else {
        let missing: Vec<&str> = [
            version.is_none().then_some("version"),
            mode.is_none().then_some("mode"),
            max_age.is_none().then_some("max_age"),
        ]
        .into_iter()
        .flatten()
        .collect();
        return Err(format!("missing {}", missing.join(", ")));
    };
    if mode != StsMode::None && mx.is_empty() {
        return Err("no mx pattern (required unless mode is none)".to_owned());
    }
    Ok(PolicyFile { mode, max_age, mx })
}

/// A host name, optionally with a leading `*.` wildcard label: letters, digits, `-`, `_`,
/// dot-separated non-empty labels.
fn is_mx_pattern(pattern: &str) -> bool {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        })
}

/// Whether `host` matches one of `patterns` (RFC 8461 §4.1): exactly, or through a leading
/// `*.` that stands for exactly one label. Case and trailing dots do not matter.
pub fn mx_matches(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|pattern| match pattern.strip_prefix("*.") {
        Some(parent) => {
            host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent)
        }
        None => *pattern == host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn exactly_one_record_beginning_with_the_version_counts() {
        let id = |id: &str| Ok(StsRecord { id: id.to_owned() });
        assert_eq!(
            parse_record(&records(&["v=STSv1; id=20160831085700Z;"])),
            id("20160831085700Z")
        );
        assert_eq!(parse_record(&records(&["v=spf1 -all", "v=STSv1;id=a1"])), id("a1"));
        assert_eq!(parse_record(&records(&["v=STSv1; id=x; ext_1=a.b"])), id("x"));
        // A record that merely contains the version is not one (research §3.5).
        assert_eq!(parse_record(&records(&["x v=STSv1; id=1"])), Err(RecordError::None));
        assert_eq!(parse_record(&records(&["v=STSv1"])), Err(RecordError::None));
        assert_eq!(parse_record(&[]), Err(RecordError::None));
        assert_eq!(
            parse_record(&records(&["v=STSv1; id=1", "v=STSv1; id=2"])),
            Err(RecordError::Several(2))
        );
        for bad in [
            "v=STSv1;",
            "v=STSv1; id=",
            "v=STSv1; id=has-dash",
            "v=STSv1; id=123456789012345678901234567890123",
            "v=STSv1; id=1; id=2",
            "v=STSv1; id=1;; x=y",
            "v=STSv1; id=1; bad",
            "v=STSv1; id=1; x=a b",
        ] {
            assert!(
                matches!(parse_record(&records(&[bad])), Err(RecordError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_rfc_example_policy_parses_with_crlf_or_lf() {
        let rfc = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n\
                   mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";
        let expected = PolicyFile {
            mode: StsMode::Enforce,
            max_age: 604_800,
            mx: vec![
                "mail.example.com".into(),
                "*.example.net".into(),
                "backupmx.example.com".into(),
            ],
        };
        assert_eq!(parse_policy(rfc), Ok(expected.clone()));
        assert_eq!(parse_policy(&rfc.replace("\r\n", "\n")), Ok(expected.clone()));
        // Unknown fields are ignored; trailing whitespace and a missing final newline are fine.
        let lenient = "version: STSv1 \nmode:enforce\nfoo: bar\nmx: Mail.Example.com.\n\
                       mx: *.example.net\nmx: backupmx.example.com\nmax_age:604800";
        assert_eq!(parse_policy(lenient), Ok(expected));
    }

    #[test]
    fn invalid_policies_say_why() {
        let ok = "version: STSv1\nmode: testing\nmx: mx.example\nmax_age: 86400\n";
        assert!(parse_policy(ok).is_ok());
        let cases = [
            (ok.replace("version: STSv1\n", ""), "missing version"),
            (ok.replace("STSv1", "STSv2"), "version `STSv2`"),
            (ok.replace("testing", "report"), "mode `report`"),
            (ok.replace("86400", "31557601"), "max_age `31557601`"),
            (ok.replace("86400", "-1"), "max_age `-1`"),
            (ok.replace("86400", "12345678901"), "max_age `12345678901`"),
            (ok.replace("86400", "+5"), "max_age `+5`"),
            (ok.replace("mx: mx.example\n", ""), "no mx pattern"),
            (ok.replace("mx.example", "*.*.example"), "mx `*.*.example`"),
            (ok.replace("mx.example", "a..example"), "mx `a..example`"),
            (format!("{ok}mode: enforce\n"), "`mode` given twice"),
            (ok.replace("mode: testing", "mode testing"), "is not key: value"),
            ("x".repeat(MAX_POLICY_BYTES + 1), "larger than"),
        ];
        for (text, expected) in cases {
            let err = parse_policy(&text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        // `none` may come without mx patterns.
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").is_ok());
    }

    #[test]
    fn a_wildcard_covers_exactly_one_label() {
        let patterns = vec!["*.example.net".to_owned(), "mail.example.com".to_owned()];
        assert!(mx_matches(&patterns, "mx1.example.net"));
        assert!(mx_matches(&patterns, "MX1.Example.NET."));
        assert!(mx_matches(&patterns, "mail.example.com"));
        // RFC 8461 §4.1: not the parent, not two labels (research §3.4).
        assert!(!mx_matches(&patterns, "example.net"));
        assert!(!mx_matches(&patterns, "a.b.example.net"));
        assert!(!mx_matches(&patterns, "xexample.net"));
        assert!(!mx_matches(&patterns, "other.example.com"));
        assert!(!mx_matches(&[], "mail.example.com"));
    }
}
