//! TLS client configuration per requirement, and certificate checks that say *why* they failed.
//!
//! - `may` and `encrypt` accept any certificate (RFC 7435: an unverified encrypted channel beats
//!   plaintext), but still compute whether it *would* have verified against the MX host name,
//!   so every delivery records "certificate verified: yes/no".
//! - `verify` requires a chain to the trusted roots and a name matching the MX host (or the
//!   requirement's match names).
//! - `secure` requires a chain and a name within the recipient domain (`domain` or any
//!   subdomain), or one of the match names.
//!
//! Handshake signatures are always checked, whatever the level. Revocation is not checked
//! (as in most MTAs; documented). SNI is the MX host name.
//!
//! A requirement may name a client identity (`[tls.client_identities.NAME]`): the relay then
//! presents that certificate when the server asks for one, for partners whose servers require
//! mutual TLS. The identity is part of the requirement, so it is part of the configuration's
//! key: a session resumed under one identity is never offered under another or under none.
//!
//! TLS sessions resume. rustls resumes a session only under the verifier instance that checked
//! it, so there is one verifier (and one client configuration) per requirement and set of
//! acceptable names: a session checked under `may` can never stand in for a `verify` check.
//! Each configuration has its own session cache, and the server's port is part of the key
//! (rustls keys sessions by server name only): a ticket is only ever offered where it can
//! resume. With one cache for everything, alternating `may` and `verify` to one server, or two
//! servers on one address, spent every ticket on a handshake that could not use it (0 resumed).
//! The verdict a delivery records is computed from the peer's chain after the handshake, so a
//! resumed session reports the same verdict as a full one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::policy::{Failure, Requirement, TlsLevel, TlsVersion};

/// The trust anchors and the client configurations (each with its session cache) shared by
/// every outbound TLS connection.
#[derive(Clone, Debug)]
pub struct TlsContext {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    configs: Arc<Mutex<Configs>>,
    identities: Arc<HashMap<String, ClientIdentity>>,
}

/// A client certificate chain and its key, checked to belong together.
#[derive(Debug)]
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// Checks that `key` can sign and is the key of the chain's leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, String> {
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| format!("the key cannot sign: {e}"))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
        Ok(ClientIdentity { chain, key })
    }
}

/// Client configurations by requirement, the names a certificate may match under it, and the
/// server's port.
type Configs = HashMap<(Requirement, Vec<String>, u16), (Arc<ClientConfig>, CertJudge)>;

/// Most configurations kept; past this the cache starts over (and its sessions with it).
const MAX_CONFIGS: usize = 4096;

/// Server names whose sessions one configuration keeps: one MX host under `may`, `encrypt`
/// and `verify`; the hosts of one domain under `secure` or match names.
const SESSIONS_PER_CONFIG: usize = 16;

impl TlsContext {
    /// Trust `roots`. Session tickets are cached per configuration so that a new connection
    /// under the same requirement to the same server resumes instead of a full handshake.
    pub fn new(roots: RootCertStore) -> Self {
        TlsContext {
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            configs: Arc::default(),
            identities: Arc::default(),
        }
    }

    /// A client configuration for HTTPS to policy hosts (MTA-STS, RFC 8461 §3.3): the
    /// certificate must chain to the relay's trust anchors and name the host; no client
    /// certificate, no session reuse across policy hosts' names (rustls keys by name).
    pub fn https_config(&self) -> Result<Arc<ClientConfig>, String> {
        let verifier =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| format!("trust roots: {e}"))?;
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The same context, able to present `identities` (by name) to servers that ask.
    pub fn with_client_identities(mut self, identities: HashMap<String, ClientIdentity>) -> Self {
        self.identities = Arc::new(identities);
        self.configs = Arc::default();
        self
    }

    /// The public web PKI roots (webpki-roots) plus `extra` PEM CA files' contents.
    pub fn with_webpki_roots(extra: &[CertificateDer<'static>]) -> Self {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in extra {
            // A CA file that does not parse is refused when the config is loaded.
            let _ = roots.add(cert.clone());
        }
        TlsContext::new(roots)
    }

    /// A client configuration enforcing `requirement` for a delivery to `mx_host` (on `port`)
    /// of `domain`, and the judge that gives the verdict on the chain the server presented.
    /// Both are shared by every connection under the same requirement and names to the same
    /// port (which lets sessions resume).
    pub fn client_config(
        &self,
        requirement: &Requirement,
        domain: &str,
        mx_host: &str,
        port: u16,
    ) -> Result<(Arc<ClientConfig>, CertJudge), String> {
        if requirement.level == TlsLevel::Dane {
            // Fail closed: a `dane` requirement must never run as `encrypt`.
            return Err("DANE verification is not available in this relay yet".to_owned());
        }
        let names = match requirement.level {
            TlsLevel::Verify | TlsLevel::Secure if !requirement.match_names.is_empty() => {
                requirement.match_names.clone()
            }
            TlsLevel::Secure => vec![domain.to_owned(), format!(".{domain}")],
            _ => vec![mx_host.to_owned()],
        };
        let key = (requirement.clone(), names, port);
        let mut configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = configs.get(&key) {
            return Ok(found.clone());
        }
        let built = self.build(requirement, key.1.clone())?;
        if configs.len() >= MAX_CONFIGS {
            configs.clear();
        }
        configs.insert(key, built.clone());
        Ok(built)
    }

    fn build(
        &self,
        requirement: &Requirement,
        names: Vec<String>,
    ) -> Result<(Arc<ClientConfig>, CertJudge), String> {
        // With no trust anchors at all, rustls refuses to build a chain verifier; that must not
        // break `may` and `encrypt`, which never needed one: every chain is then "untrusted".
        let webpki = match self.roots.is_empty() {
            true => None,
            false => Some(
                WebPkiServerVerifier::builder_with_provider(
                    self.roots.clone(),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| format!("trust roots: {e}"))?,
            ),
        };
        let verifier = Arc::new(PolicyVerifier {
            webpki,
            provider: self.provider.clone(),
            names,
            enforce: requirement.level.is_verified(),
        });
        let versions: &[&rustls::SupportedProtocolVersion] = match requirement.min_version {
            Some(TlsVersion::Tls13) => &[&rustls::version::TLS13],
            _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let mut config = match &requirement.client_identity {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let identity = self.identities.get(name).ok_or_else(|| {
                    format!("the policy named client identity `{name}`, which [tls.client_identities] does not configure")
                })?;
                builder
                    .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                    .map_err(|e| format!("client identity `{name}`: {e}"))?
            }
        };
        config.resumption = rustls::client::Resumption::store(Arc::new(
            rustls::client::ClientSessionMemoryCache::new(SESSIONS_PER_CONFIG),
        ));
        Ok((Arc::new(config), CertJudge(verifier)))
    }
}

/// Judges a server's chain by the rules of one requirement (the verifier's own rules).
#[derive(Clone, Debug)]
pub struct CertJudge(Arc<PolicyVerifier>);

impl CertJudge {
    /// The verdict on `chain` (leaf first), now.
    pub fn judge(&self, chain: &[CertificateDer<'_>]) -> CertVerdict {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return CertVerdict::NotVerified(Failure::CertificateUntrusted(
                "no certificate".to_owned(),
            ));
        };
        match self.0.check(leaf, intermediates, UnixTime::now()) {
            Ok(()) => CertVerdict::Verified,
            Err(e) => CertVerdict::NotVerified(classify_cert_error(&e)),
        }
    }
}

/// What the certificate check found.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum CertVerdict {
    /// Chain and name verified.
    Verified,
    /// Not verified, with the failure class it maps to.
    NotVerified(Failure),
}

/// Checks the chain and names as the requirement demands; fails the handshake only when the
/// requirement enforces them.
#[derive(Debug)]
struct PolicyVerifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    /// Acceptable names: exact, or `.suffix` for any name below it.
    names: Vec<String>,
    /// Fail the handshake when the certificate does not verify (`verify`, `secure`).
    enforce: bool,
}

impl PolicyVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        };
        let mut candidates: Vec<String> = Vec::new();
        let mut suffixes: Vec<&str> = Vec::new();
        for name in &self.names {
            match name.strip_prefix('.') {
                Some(_) => suffixes.push(name),
                None => candidates.push(name.clone()),
            }
        }
        if !suffixes.is_empty() {
            // Names in the certificate that fall under a suffix pattern become candidates; a
            // wildcard `*.x` is probed with a label of our own.
            if let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) {
                for dns in cert.valid_dns_names() {
                    let probe = match dns.strip_prefix("*.") {
                        Some(rest) => format!("wildcard-probe.{rest}"),
                        None => dns.to_owned(),
                    };
                    if suffixes.iter().any(|s| suffix_matches(s, &probe)) {
                        candidates.push(probe);
                    }
                }
            }
        }
        let mut first_error = None;
        for candidate in &candidates {
            let Ok(server_name) = ServerName::try_from(candidate.as_str()) else { continue };
            match webpki.verify_server_cert(end_entity, intermediates, &server_name, &[], now) {
                Ok(_) => return Ok(()),
                // A chain or time problem is the same for every name: report it rather than a
                // name mismatch from another candidate.
                Err(e) if !is_name_error(&e) => return Err(e),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if candidates.is_empty() {
            // No candidate name: still check the chain, with a name that cannot match, so an
            // untrusted chain is reported as such rather than as a name mismatch.
            let probe = ServerName::try_from("name-check.invalid").map_err(|_| {
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            })?;
            webpki.verify_server_cert(end_entity, intermediates, &probe, &[], now)?;
        }
        Err(first_error
            .unwrap_or(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)))
    }
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, now) {
            Err(e) if self.enforce => Err(e),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn suffix_matches(suffix: &str, name: &str) -> bool {
    name.len() > suffix.len() && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

fn is_name_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// Maps a certificate error to the contract's failure class.
pub fn classify_cert_error(e: &rustls::Error) -> Failure {
    let detail = e.to_string();
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                Failure::CertificateExpired(detail)
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Failure::CertificateNotYetValid(detail)
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Failure::CertificateNameMismatch(detail)
            }
            _ => Failure::CertificateUntrusted(detail),
        },
        _ => Failure::CertificateUntrusted(detail),
    }
}

/// Maps a handshake error (as surfaced by tokio-rustls, an `io::Error` wrapping a
/// `rustls::Error`) to the contract's failure class.
pub fn classify_handshake_error(e: &std::io::Error) -> Failure {
    match rustls_error(e) {
        Some(err @ rustls::Error::InvalidCertificate(_)) => classify_cert_error(err),
        Some(
            err @ (rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
            | rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::ServerDoesNotSupportTls12Or13
                | rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
                | rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
            )),
        ) => Failure::TlsVersionTooOld(err.to_string()),
        Some(err) => Failure::HandshakeFailed(err.to_string()),
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => Failure::ConnectionLost(e.to_string()),
            std::io::ErrorKind::TimedOut => Failure::Timeout(e.to_string()),
            _ => Failure::HandshakeFailed(e.to_string()),
        },
    }
}

fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}
