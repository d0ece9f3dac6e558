//! The test certificate authority and the server certificates of §2.4 (CERT).
//!
//! One [`TestCa`] per fleet: a root and an intermediate with fixed validity dates, plus a second,
//! untrusted root and a name-constrained intermediate for the negative cases. Keys are random (rcgen
//! offers no seeded generation), but names and dates are fixed, so whether a certificate verifies
//! never depends on the day the tests run.
//!
//! [`TestCa::issue`] makes a [`ServerIdentity`] for a host name and a [`CertKind`];
//! [`TestCa::server_config`] turns an identity and [`TlsKnobs`] into a rustls `ServerConfig`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
    SignatureAlgorithm, date_time_ymd,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// Number of extra SAN entries in a [`CertKind::Large`] certificate (badssl `1000-sans`).
pub const LARGE_SAN_COUNT: usize = 1000;

/// The DNS subtree the name-constrained intermediate may issue for; no simulator host is in it.
pub const PERMITTED_SUBTREE: &str = "permitted.invalid";

/// The name a [`CertKind::WrongHost`] certificate is valid for.
pub const WRONG_HOST: &str = "wrong.host.sim.test";

/// Errors while building certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen refused to generate a key or a certificate.
    #[error("certificate generation failed for {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// RSA key generation failed.
    #[error("rsa key generation failed: {0}")]
    Rsa(String),
    /// rustls refused the configuration (for example, a key it cannot use).
    #[error("tls configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A client-certificate verifier could not be built.
    #[error("client verifier failed: {0}")]
    ClientVerifier(String),
}

/// The server certificate variants (research §2.4 and the algorithm rows of §4).
///
/// Every variant is judged the same way under O and F (the certificate is not checked); the
/// scenario table says what FV must do with it.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum CertKind {
    /// Root → intermediate → leaf, SAN = the host, ECDSA P-256 (CERT-01).
    Valid,
    /// A self-signed leaf for the host (CERT-02).
    SelfSigned,
    /// A chain to a second root that nobody is told to trust (CERT-03).
    UntrustedRoot,
    /// Valid chain, but the SAN is [`WRONG_HOST`] (CERT-04).
    WrongHost,
    /// Valid chain, validity 2001-01-01 to 2002-01-01 (CERT-05).
    Expired,
    /// Valid chain, validity 3900-01-01 to 3950-01-01 (CERT-06).
    NotYetValid,
    /// The server sends the leaf without its intermediate (CERT-07).
    MissingIntermediate,
    /// The host name only in the subject CN; no SAN extension (CERT-08).
    CnOnly,
    /// SAN = the host, empty subject (CERT-09).
    SanOnly,
    /// `*.<parent of host>`, which matches the host (CERT-10).
    Wildcard,
    /// `*.<grandparent of host>`, which does not match: a wildcard covers one label (CERT-10).
    WildcardTooDeep,
    /// SAN = the parent domain of the host (the recipient domain), not the MX name (CERT-11).
    RecipientDomain,
    /// Only an IP SAN, `127.0.0.1` (CERT-12).
    IpOnly,
    /// The leaf is itself a CA certificate (CERT-13).
    LeafIsCa,
    /// The leaf's extended key usage is clientAuth only (CERT-13).
    ClientAuthOnly,
    /// Issued by an intermediate constrained to [`PERMITTED_SUBTREE`] (CERT-17).
    NameConstraintViolated,
    /// The host plus [`LARGE_SAN_COUNT`] more SANs (CERT-18).
    Large,
    /// Leaf, an unrelated extra CA certificate, then the intermediate (CERT-19).
    ExtraIntermediates,
    /// An Ed25519 leaf (CERT-20).
    Ed25519,
    /// An ECDSA P-384 leaf (CERT-20).
    EcdsaP384,
    /// An RSA-2048 leaf (badssl `rsa2048`); the key is generated once per process (~3 s unoptimised).
    Rsa2048,
}

impl CertKind {
    /// Whether an FV relay that trusts only [`TestCa::root_pem`] and matches the MX host name
    /// must accept this certificate.
    pub fn verifies(self) -> bool {
        matches!(
            self,
            Self::Valid
                | Self::SanOnly
                | Self::Wildcard
                | Self::Large
                | Self::ExtraIntermediates
                | Self::Ed25519
                | Self::EcdsaP384
                | Self::Rsa2048
        )
    }
}

/// A certificate chain (leaf first) and its private key, ready for rustls.
pub struct ServerIdentity {
    /// The chain the server sends, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Which protocol versions the server offers.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum TlsVersions {
    /// TLS 1.2 and TLS 1.3 (rustls default).
    #[default]
    Both,
    /// TLS 1.2 only (HS-03).
    Tls12,
    /// TLS 1.3 only (HS-04).
    Tls13,
}

/// Which key-exchange groups the server supports.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum KxGroups {
    /// The ring provider's defaults.
    #[default]
    Default,
    /// secp384r1 only: a rustls client's first key share (X25519) is refused, forcing a
    /// HelloRetryRequest (HS-05).
    Secp384Only,
}

/// Whether the server asks for a client certificate.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum ClientAuth {
    /// No CertificateRequest.
    #[default]
    Off,
    /// CertificateRequest, but an empty answer is accepted (HS-10).
    Optional,
    /// A certificate from the test CA is mandatory (HS-09).
    Required,
}

/// Server-side TLS knobs (research §1.2). ALPN is never offered.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct TlsKnobs {
    /// Protocol versions offered.
    pub versions: TlsVersions,
    /// Key-exchange groups supported.
    pub groups: KxGroups,
    /// Maximum TLS record payload; `Some(32)` splits every reply into tiny records (HS-11).
    pub max_fragment_size: Option<usize>,
    /// Client-certificate request.
    pub client_auth: ClientAuth,
    /// Sign the handshake with a key that does not match the certificate (HS-08).
    pub mismatched_key: bool,
    /// Serve the identity only when SNI equals the host; otherwise a self-signed one (HS-16).
    pub require_sni: bool,
}

/// One test CA: a root, an intermediate, and the odd issuers the negative variants need.
pub struct TestCa {
    root_der: CertificateDer<'static>,
    root_pem: String,
    intermediate: Issuer<'static, KeyPair>,
    intermediate_der: CertificateDer<'static>,
    constrained: Issuer<'static, KeyPair>,
    constrained_der: CertificateDer<'static>,
    other_root: Issuer<'static, KeyPair>,
    other_root_der: CertificateDer<'static>,
}

impl TestCa {
    /// Creates the roots and intermediates, valid from 2020-01-01 to 4000-01-01.
    pub fn new() -> Result<Self, CertError> {
        let (root, root_cert) = self_signed_ca("Postwarden Simulator Root CA")?;
        let root_pem = root_cert.pem();
        let root_der = root_cert.der().clone();
        let (intermediate, intermediate_der) =
            intermediate_ca("Postwarden Simulator Intermediate CA", &root, None)?;
        let constraints = NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName(PERMITTED_SUBTREE.to_owned())],
            excluded_subtrees: Vec::new(),
        };
        let (constrained, constrained_der) = intermediate_ca(
            "Postwarden Simulator Constrained Intermediate CA",
            &root,
            Some(constraints),
        )?;
        let (other_root, other_root_cert) = self_signed_ca("Untrusted Interception Root CA")?;
        let other_root_der = other_root_cert.der().clone();
        Ok(Self {
            root_der,
            root_pem,
            intermediate,
            intermediate_der,
            constrained,
            constrained_der,
            other_root,
            other_root_der,
        })
    }

    /// The root certificate in PEM: the only trust anchor a relay under test should be given.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate in DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// A rustls root store holding only the test root.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // The root was produced by rcgen a moment ago; webpki parses its own output.
        let _ = roots.add(self.root_der.clone());
        roots
    }

    /// A client certificate chain from the test CA (for exercising HS-09 with a client that
    /// does present one).
    pub fn client_identity(&self, name: &str) -> Result<ServerIdentity, CertError> {
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256, name)?;
        let mut params = leaf_params(name)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.intermediate).map_err(gen_err(name))?;
        Ok(ServerIdentity {
            chain: vec![cert.der().clone(), self.intermediate_der.clone()],
            key: key_der(&key),
        })
    }

    /// Issues a certificate of `kind` for `host` (the MX host name).
    pub fn issue(&self, kind: CertKind, host: &str) -> Result<ServerIdentity, CertError> {
        let key = match kind {
            CertKind::Ed25519 => generate(&rcgen::PKCS_ED25519, host)?,
            CertKind::EcdsaP384 => generate(&rcgen::PKCS_ECDSA_P384_SHA384, host)?,
            CertKind::Rsa2048 => rsa_2048_key()?,
            _ => generate(&rcgen::PKCS_ECDSA_P256_SHA256, host)?,
        };
        let mut params = leaf_params(host)?;
        let mut issuer = &self.intermediate;
        let mut extra: Vec<CertificateDer<'static>> = vec![self.intermediate_der.clone()];
        match kind {
            CertKind::Valid
            | CertKind::Ed25519
            | CertKind::EcdsaP384
            | CertKind::Rsa2048
            | CertKind::MissingIntermediate => {}
            CertKind::SelfSigned => {
                let cert = params.self_signed(&key).map_err(gen_err(host))?;
                return Ok(ServerIdentity { chain: vec![cert.der().clone()], key: key_der(&key) });
            }
            CertKind::UntrustedRoot => {
                issuer = &self.other_root;
                extra = vec![self.other_root_der.clone()];
            }
            CertKind::WrongHost => params.subject_alt_names = vec![dns(WRONG_HOST)?],
            CertKind::Expired => {
                params.not_before = date_time_ymd(2001, 1, 1);
                params.not_after = date_time_ymd(2002, 1, 1);
            }
            CertKind::NotYetValid => {
                params.not_before = date_time_ymd(3900, 1, 1);
                params.not_after = date_time_ymd(3950, 1, 1);
            }
            CertKind::CnOnly => params.subject_alt_names.clear(),
            CertKind::SanOnly => params.distinguished_name = DistinguishedName::new(),
            CertKind::Wildcard => {
                params.subject_alt_names = vec![dns(&format!("*.{}", parent(host)))?];
            }
            CertKind::WildcardTooDeep => {
                params.subject_alt_names = vec![dns(&format!("*.{}", parent(parent(host))))?];
            }
            CertKind::RecipientDomain => params.subject_alt_names = vec![dns(parent(host))?],
            CertKind::IpOnly => {
                params.subject_alt_names =
                    vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
            }
            CertKind::LeafIsCa => {
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages.push(KeyUsagePurpose::KeyCertSign);
            }
            CertKind::ClientAuthOnly => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            CertKind::NameConstraintViolated => {
                issuer = &self.constrained;
                extra = vec![self.constrained_der.clone()];
            }
            CertKind::Large => {
                for i in 0..LARGE_SAN_COUNT {
                    params.subject_alt_names.push(dns(&format!("san-{i:04}.{host}"))?);
                }
            }
            CertKind::ExtraIntermediates => {
                extra = vec![self.other_root_der.clone(), self.intermediate_der.clone()];
            }
        }
        let cert = params.signed_by(&key, issuer).map_err(gen_err(host))?;
        let mut chain = vec![cert.der().clone()];
        if kind != CertKind::MissingIntermediate {
            chain.extend(extra);
        }
        Ok(ServerIdentity { chain, key: key_der(&key) })
    }

    /// Builds a server configuration that serves `identity` with `knobs`, for `host`.
    ///
    /// The provider is always ring's, whatever process default is installed.
    pub fn server_config(
        &self,
        identity: &ServerIdentity,
        host: &str,
        knobs: &TlsKnobs,
    ) -> Result<Arc<ServerConfig>, CertError> {
        let mut provider = rustls::crypto::ring::default_provider();
        if knobs.groups == KxGroups::Secp384Only {
            provider.kx_groups = vec![rustls::crypto::ring::kx_group::SECP384R1];
        }
        let provider = Arc::new(provider);
        let versions: &[&rustls::SupportedProtocolVersion] = match knobs.versions {
            TlsVersions::Both => rustls::ALL_VERSIONS,
            TlsVersions::Tls12 => &[&rustls::version::TLS12],
            TlsVersions::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let builder = match knobs.client_auth {
            ClientAuth::Off => builder.with_no_client_auth(),
            ClientAuth::Optional | ClientAuth::Required => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(self.root_store()),
                    provider.clone(),
                );
                let verifier = if knobs.client_auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                let verifier =
                    verifier.build().map_err(|e| CertError::ClientVerifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key_source = if knobs.mismatched_key {
            generate(&rcgen::PKCS_ECDSA_P256_SHA256, host).map(|k| key_der(&k))?
        } else {
            identity.key.clone_key()
        };
        let signer = provider.key_provider.load_private_key(key_source)?;
        let certified = Arc::new(CertifiedKey::new(identity.chain.clone(), signer));
        let fallback = if knobs.require_sni {
            let other = self.issue(CertKind::SelfSigned, host)?;
            let signer = provider.key_provider.load_private_key(other.key)?;
            Some(Arc::new(CertifiedKey::new(other.chain, signer)))
        } else {
            None
        };
        let resolver = Resolver { host: host.to_ascii_lowercase(), certified, fallback };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.max_fragment_size = knobs.max_fragment_size;
        Ok(Arc::new(config))
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A client configuration that trusts only `ca` and uses ring: what tests use to play the relay.
pub fn client_config(ca: &TestCa) -> Result<rustls::ClientConfig, CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(ca.root_store())
        .with_no_client_auth())
}

/// The ring provider, for callers building their own configurations.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Picks the certificate: the real one, or (when SNI is required and absent or different) the
/// self-signed fallback. Also used without a fallback, because `with_single_cert` refuses a key
/// that does not match the certificate (HS-08 needs exactly that).
#[derive(Debug)]
struct Resolver {
    host: String,
    certified: Arc<CertifiedKey>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match &self.fallback {
            Some(fallback) if hello.server_name() != Some(self.host.as_str()) => {
                Some(fallback.clone())
            }
            _ => Some(self.certified.clone()),
        }
    }
}

fn valid_from() -> OffsetDateTime {
    date_time_ymd(2020, 1, 1)
}

fn valid_to() -> OffsetDateTime {
    date_time_ymd(4000, 1, 1)
}

fn self_signed_ca(name: &str) -> Result<(Issuer<'static, KeyPair>, rcgen::Certificate), CertError> {
    let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256, name)?;
    let params = ca_params(name, BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).map_err(gen_err(name))?;
    Ok((Issuer::new(params, key), cert))
}

fn intermediate_ca(
    name: &str,
    root: &Issuer<'static, KeyPair>,
    constraints: Option<NameConstraints>,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), CertError> {
    let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256, name)?;
    let mut params = ca_params(name, BasicConstraints::Constrained(0));
    params.name_constraints = constraints;
    let cert = params.signed_by(&key, root).map_err(gen_err(name))?;
    Ok((Issuer::new(params, key), cert.der().clone()))
}

fn ca_params(name: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = valid_from();
    params.not_after = valid_to();
    params.distinguished_name = distinguished(name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

fn leaf_params(host: &str) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.not_before = valid_from();
    params.not_after = date_time_ymd(3999, 12, 31);
    params.distinguished_name = distinguished(host);
    params.subject_alt_names = vec![dns(host)?];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn distinguished(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Postwarden simulator");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn dns(name: &str) -> Result<SanType, CertError> {
    let ia5 = name.try_into().map_err(gen_err(name))?;
    Ok(SanType::DnsName(ia5))
}

/// The host without its first label (`mx1.cap-01.sim.test` → `cap-01.sim.test`).
fn parent(host: &str) -> &str {
    host.split_once('.').map_or(host, |(_, rest)| rest)
}

fn generate(alg: &'static SignatureAlgorithm, what: &str) -> Result<KeyPair, CertError> {
    KeyPair::generate_for(alg).map_err(gen_err(what))
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate { what: what.to_owned(), source }
}

/// One RSA-2048 key per process: generating it costs seconds in an unoptimised build, and a
/// random key shared by every RSA leaf of a test run changes nothing about what is tested.
fn rsa_2048_key() -> Result<KeyPair, CertError> {
    static PKCS8: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    let der = PKCS8.get_or_init(|| {
        use rsa::pkcs8::EncodePrivateKey;
        let key =
            rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|e| e.to_string())?;
        let doc = key.to_pkcs8_der().map_err(|e| e.to_string())?;
        Ok(doc.as_bytes().to_vec())
    });
    let der = der.as_ref().map_err(|e| CertError::Rsa(e.clone()))?;
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_slice()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .map_err(gen_err("rsa-2048"))
}
