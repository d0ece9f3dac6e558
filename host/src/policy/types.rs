//! The relay's own view of the policy contract's values.
//!
//! These mirror `policy-sdk/wit/policy.wit`, but belong to the host: the rest of the relay
//! never sees `bindgen!` output, so the wasm boundary can change without touching delivery code.

use std::fmt;

pub use super::facts::Facts;

/// How much TLS a delivery requires, weakest first (Postfix's security levels).
#[derive(
    Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// Opportunistic, certificate not checked.
    May,
    /// TLS required, certificate not checked.
    Encrypt,
    /// TLS required, certificate matched against DNSSEC-signed TLSA records (RFC 7672).
    Dane,
    /// TLS required, chain verified, name = MX host (or match names).
    Verify,
    /// TLS required, chain verified, name within the recipient domain (or match names).
    Secure,
}

impl TlsLevel {
    /// Whether plaintext delivery is forbidden at this level.
    pub fn is_forced(self) -> bool {
        self >= TlsLevel::Encrypt
    }

    /// Whether the certificate is checked against the trusted roots (PKIX) at this level.
    pub fn is_verified(self) -> bool {
        self >= TlsLevel::Verify
    }

    /// Whether the server is authenticated at this level, by PKIX or by DANE: what REQUIRETLS
    /// asks for (RFC 8689 §4.2.1).
    pub fn is_authenticated(self) -> bool {
        self >= TlsLevel::Dane
    }

    /// The level's name as written in configs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Dane => "dane",
            TlsLevel::Verify => "verify",
            TlsLevel::Secure => "secure",
        }
    }
}

impl fmt::Display for TlsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// Why a requirement applies: drives the floors the host keeps and TLS-RPT's policy type.
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialEq)]
pub enum TlsBasis {
    /// Local configuration.
    #[default]
    Local,
    /// The domain's MTA-STS policy.
    Sts,
    /// The host's DANE TLSA records.
    Dane,
}

impl TlsBasis {
    /// The name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsBasis::Local => "local",
            TlsBasis::Sts => "sts",
            TlsBasis::Dane => "dane",
        }
    }
}

/// A TLS requirement with its parameters.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Requirement {
    /// The level.
    pub level: TlsLevel,
    /// Names the certificate may match instead of the level's default.
    pub match_names: Vec<String>,
    /// The lowest acceptable TLS version (`None`: TLS 1.2).
    pub min_version: Option<TlsVersion>,
    /// Why it applies.
    pub basis: TlsBasis,
    /// The configured client certificate to present, by name (`[tls.client_identities]`).
    pub client_identity: Option<String>,
}

impl Requirement {
    /// A requirement of `level` with default parameters (basis local, no client certificate).
    pub fn new(level: TlsLevel) -> Self {
        Requirement {
            level,
            match_names: Vec::new(),
            min_version: None,
            basis: TlsBasis::Local,
            client_identity: None,
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level.as_str())?;
        if !self.match_names.is_empty() {
            write!(f, " match={}", self.match_names.join(":"))?;
        }
        match self.min_version {
            Some(TlsVersion::Tls13) => f.write_str(" min=tls1.3")?,
            Some(TlsVersion::Tls12) => f.write_str(" min=tls1.2")?,
            None => {}
        }
        if self.basis != TlsBasis::Local {
            write!(f, " basis={}", self.basis.as_str())?;
        }
        if let Some(identity) = &self.client_identity {
            write!(f, " cert={identity}")?;
        }
        Ok(())
    }
}

/// Whether `name` can name a client identity: what configs and policies may write (it is
/// also written into logs and the requirement's one-line form).
pub fn is_identity_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// One policy's answer to `plan`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Decision {
    /// Let the next policy decide.
    Abstain,
    /// This requirement applies.
    Require(Requirement),
}

/// What the relay knows about one delivery attempt to one MX host.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Context {
    /// Recipient domain, lower-case A-label.
    pub domain: String,
    /// MX host name being tried.
    pub mx_host: String,
    /// IP address being tried, empty if not resolved yet.
    pub ip: String,
    /// MX preference.
    pub mx_preference: u16,
    /// Position in the ordered MX list, from 0.
    pub mx_index: u32,
    /// Number of MX hosts.
    pub mx_count: u32,
    /// Delivery attempt number, from 1.
    pub attempt: u32,
    /// Seconds since the message was accepted.
    pub message_age: u64,
    /// The message was submitted with REQUIRETLS.
    pub requiretls: bool,
    /// The message carries `TLS-Required: No`.
    pub tls_required_no: bool,
    /// The message's submitter logged in with SMTP AUTH (host-only: not passed to policies;
    /// it decides whether `TLS-Required: No` may relax a forced requirement).
    pub authenticated: bool,
    /// What the relay gathered about this attempt (DNSSEC, MTA-STS, TLSA); shared, since a
    /// context is cloned for every policy call.
    pub facts: std::sync::Arc<Facts>,
}

impl Context {
    /// A context for the first attempt to `mx_host`, the only MX of `domain`.
    pub fn new(domain: &str, mx_host: &str) -> Self {
        Context {
            domain: domain.to_ascii_lowercase(),
            mx_host: mx_host.to_ascii_lowercase(),
            mx_count: 1,
            attempt: 1,
            ..Context::default()
        }
    }
}

/// Why a TLS step failed (the contract's failure classes).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Failure {
    /// STARTTLS not advertised.
    StarttlsNotOffered,
    /// STARTTLS answered with something other than 220.
    StarttlsRefused {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The handshake failed.
    HandshakeFailed(String),
    /// The certificate does not chain to a trusted root.
    CertificateUntrusted(String),
    /// The certificate has expired.
    CertificateExpired(String),
    /// The certificate is not valid yet.
    CertificateNotYetValid(String),
    /// No certificate name matches.
    CertificateNameMismatch(String),
    /// The server's TLS version is below the minimum.
    TlsVersionTooOld(String),
    /// The connection was lost during the TLS step.
    ConnectionLost(String),
    /// The TLS step timed out.
    Timeout(String),
    /// A DNSSEC answer the requirement depends on is bogus (before connecting).
    DnssecBogus(String),
    /// The TLSA lookup failed (before connecting; RFC 7672 §2.1.2).
    TlsaLookupFailed(String),
    /// Level `dane` without a usable TLSA set (before connecting).
    DaneRequired(String),
    /// Basis `sts` without a usable MTA-STS policy (before connecting).
    StsPolicyUnavailable(String),
    /// Basis `sts`, enforce mode, MX host not listed (before connecting).
    StsMxMismatch(String),
    /// The certificate matches no TLSA record.
    TlsaMismatch(String),
}

impl Failure {
    /// Every class name, in contract order (for `policy explain --failure`).
    pub const CLASSES: [&'static str; 16] = [
        "starttls-not-offered",
        "starttls-refused",
        "handshake-failed",
        "certificate-untrusted",
        "certificate-expired",
        "certificate-not-yet-valid",
        "certificate-name-mismatch",
        "tls-version-too-old",
        "connection-lost",
        "timeout",
        "dnssec-bogus",
        "tlsa-lookup-failed",
        "dane-required",
        "sts-policy-unavailable",
        "sts-mx-mismatch",
        "tlsa-mismatch",
    ];

    /// The class name.
    pub fn class(&self) -> &'static str {
        match self {
            Failure::StarttlsNotOffered => "starttls-not-offered",
            Failure::StarttlsRefused { .. } => "starttls-refused",
            Failure::HandshakeFailed(_) => "handshake-failed",
            Failure::CertificateUntrusted(_) => "certificate-untrusted",
            Failure::CertificateExpired(_) => "certificate-expired",
            Failure::CertificateNotYetValid(_) => "certificate-not-yet-valid",
            Failure::CertificateNameMismatch(_) => "certificate-name-mismatch",
            Failure::TlsVersionTooOld(_) => "tls-version-too-old",
            Failure::ConnectionLost(_) => "connection-lost",
            Failure::Timeout(_) => "timeout",
            Failure::DnssecBogus(_) => "dnssec-bogus",
            Failure::TlsaLookupFailed(_) => "tlsa-lookup-failed",
            Failure::DaneRequired(_) => "dane-required",
            Failure::StsPolicyUnavailable(_) => "sts-policy-unavailable",
            Failure::StsMxMismatch(_) => "sts-mx-mismatch",
            Failure::TlsaMismatch(_) => "tlsa-mismatch",
        }
    }

    /// The detail text, for the cases that carry one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Failure::StarttlsNotOffered | Failure::StarttlsRefused { .. } => None,
            Failure::HandshakeFailed(d)
            | Failure::CertificateUntrusted(d)
            | Failure::CertificateExpired(d)
            | Failure::CertificateNotYetValid(d)
            | Failure::CertificateNameMismatch(d)
            | Failure::TlsVersionTooOld(d)
            | Failure::ConnectionLost(d)
            | Failure::Timeout(d)
            | Failure::DnssecBogus(d)
            | Failure::TlsaLookupFailed(d)
            | Failure::DaneRequired(d)
            | Failure::StsPolicyUnavailable(d)
            | Failure::StsMxMismatch(d)
            | Failure::TlsaMismatch(d) => Some(d),
        }
    }

    /// Whether the failure was found before connecting (a precondition of the requirement).
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            Failure::DnssecBogus(_)
                | Failure::TlsaLookupFailed(_)
                | Failure::DaneRequired(_)
                | Failure::StsPolicyUnavailable(_)
                | Failure::StsMxMismatch(_)
        )
    }

    /// A failure of the named class with a placeholder detail (for `policy explain`).
    pub fn from_class(class: &str) -> Option<Self> {
        let detail = || format!("simulated {class}");
        Some(match class {
            "starttls-not-offered" => Failure::StarttlsNotOffered,
            "starttls-refused" => {
                Failure::StarttlsRefused { code: 454, text: "4.7.0 TLS not available".to_owned() }
            }
            "handshake-failed" => Failure::HandshakeFailed(detail()),
            "certificate-untrusted" => Failure::CertificateUntrusted(detail()),
            "certificate-expired" => Failure::CertificateExpired(detail()),
            "certificate-not-yet-valid" => Failure::CertificateNotYetValid(detail()),
            "certificate-name-mismatch" => Failure::CertificateNameMismatch(detail()),
            "tls-version-too-old" => Failure::TlsVersionTooOld(detail()),
            "connection-lost" => Failure::ConnectionLost(detail()),
            "timeout" => Failure::Timeout(detail()),
            "dnssec-bogus" => Failure::DnssecBogus(detail()),
            "tlsa-lookup-failed" => Failure::TlsaLookupFailed(detail()),
            "dane-required" => Failure::DaneRequired(detail()),
            "sts-policy-unavailable" => Failure::StsPolicyUnavailable(detail()),
            "sts-mx-mismatch" => Failure::StsMxMismatch(detail()),
            "tlsa-mismatch" => Failure::TlsaMismatch(detail()),
            _ => return None,
        })
    }

    /// Whether no TLS handshake was started, so plaintext may continue on the same connection.
    pub fn allows_continue_plaintext(&self) -> bool {
        matches!(self, Failure::StarttlsNotOffered | Failure::StarttlsRefused { .. })
    }

    /// The enhanced status code a deferral for this failure carries: 4.7.4 when TLS was not
    /// offered or refused ("security features not supported"), 4.7.5 otherwise ("cryptographic
    /// failure"), as Postfix does.
    pub fn defer_code(&self) -> &'static str {
        if self.allows_continue_plaintext() { "4.7.4" } else { "4.7.5" }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::StarttlsNotOffered => f.write_str("STARTTLS not offered"),
            Failure::StarttlsRefused { code, text } => write!(f, "STARTTLS refused: {code} {text}"),
            _ => write!(f, "{}: {}", self.class(), self.detail().unwrap_or_default()),
        }
    }
}

/// What to do after a TLS failure.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Action {
    /// Plaintext on the same connection.
    ContinuePlaintext,
    /// New connection to the same MX, without STARTTLS.
    ReconnectPlaintext,
    /// Try the next MX host.
    NextMx,
    /// Keep the message queued.
    Defer {
        /// Enhanced status code, e.g. `4.7.5`.
        code: String,
        /// Why.
        reason: String,
    },
    /// Bounce the recipients.
    Bounce {
        /// Enhanced status code, e.g. `5.7.30`.
        code: String,
        /// Why.
        reason: String,
    },
}

impl Action {
    /// A deferral.
    pub fn defer(code: &str, reason: impl Into<String>) -> Self {
        Action::Defer { code: code.to_owned(), reason: reason.into() }
    }

    /// A bounce.
    pub fn bounce(code: &str, reason: impl Into<String>) -> Self {
        Action::Bounce { code: code.to_owned(), reason: reason.into() }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ContinuePlaintext => f.write_str("continue-plaintext"),
            Action::ReconnectPlaintext => f.write_str("reconnect-plaintext"),
            Action::NextMx => f.write_str("next-mx"),
            Action::Defer { code, reason } => write!(f, "defer {code} ({reason})"),
            Action::Bounce { code, reason } => write!(f, "bounce {code} ({reason})"),
        }
    }
}

/// What a successful delivery looked like.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DeliveryReport {
    /// The requirement it ran under.
    pub requirement: Requirement,
    /// TLS version, `None` for plaintext.
    pub tls_version: Option<TlsVersion>,
    /// Cipher suite name, empty for plaintext.
    pub cipher: String,
    /// Whether the certificate verified against the roots and the MX host name.
    pub certificate_verified: bool,
}
