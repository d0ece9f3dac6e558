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
    /// Outbound delivery.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Trust anchors for outbound TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The durable queue.
    #[serde(default)]
    pub queue: QueueConfig,
    /// The SMTP listener that applications and other MTAs submit to.
    #[serde(default)]
    pub inbound: InboundConfig,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// What the relay looks up about destinations' own TLS (MTA-STS).
    #[serde(default)]
    pub standards: StandardsConfig,
}

/// `[standards]`: facts the relay gathers for policies about what destinations publish.
/// Reloadable; what was learnt (the MTA-STS cache) survives a reload.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardsConfig {
    /// Look up MTA-STS policies (RFC 8461) and hand them to policies as facts (default
    /// false: only a policy that asks for them, such as `standards`, uses them).
    #[serde(default)]
    pub mta_sts: bool,
    /// The HTTPS port policy hosts are asked on: 443, except against a simulator.
    #[serde(default = "default_https_port")]
    pub sts_https_port: u16,
    /// Seconds for one policy fetch, from resolving to the last byte (default 10).
    #[serde(default = "default_sts_timeout")]
    pub sts_timeout: u64,
}

fn default_https_port() -> u16 {
    443
}

fn default_sts_timeout() -> u64 {
    10
}

impl Default for StandardsConfig {
    fn default() -> Self {
        StandardsConfig {
            mta_sts: false,
            sts_https_port: default_https_port(),
            sts_timeout: default_sts_timeout(),
        }
    }
}

/// `[admin]`: `/metrics` (Prometheus) and queue status as JSON.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where to listen; keep it on loopback (default: no admin listener).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `[logging]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` or `json` (default `text`). Every delivery attempt logs its `tls=level:result`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `postwarden=debug` (default `info`; `RUST_LOG`
    /// overrides it).
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { format: default_log_format(), level: default_log_level() }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// `[inbound]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Where to listen (default `127.0.0.1:2525`).
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// Networks allowed to relay without AUTH (default loopback only). Everyone else gets
    /// `554 5.7.1`: never an open relay.
    #[serde(default = "default_networks")]
    pub relay_networks: Vec<crate::inbound::IpNet>,
    /// Largest message in bytes (default 25 MiB).
    #[serde(default = "default_max_message")]
    pub max_message_size: usize,
    /// Most recipients per message (default 100).
    #[serde(default = "default_max_rcpts")]
    pub max_recipients: usize,
    /// Most simultaneous connections (default 100).
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Idle timeout in seconds (default 300).
    #[serde(default = "default_idle")]
    pub idle_timeout: u64,
    /// PEM certificate chain for STARTTLS (with `tls_key`); none: STARTTLS not offered.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Development mode: offer STARTTLS with a self-signed certificate generated at start for
    /// the relay's name (ignored when `tls_cert` is set). Never for production.
    #[serde(default)]
    pub tls_self_signed: bool,
    /// A credentials file for AUTH over TLS: one `user:sha256:<salt-hex>:<hash-hex>` per line.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,

    // Limits per client address, per session and on message content (the inbound side's
    // answer to Postfix's anvil, smtpd_hard_error_limit and smtpd_forbid_bare_newline).
    /// Most connections open at once from one client address (default 10; 0: no limit).
    /// IPv6 addresses count by /64. Over it: `421 4.7.0`.
    #[serde(default = "default_max_conns_per_client")]
    pub max_connections_per_client: u32,
    /// Most connections one client address may open per minute (default 60; 0: no limit).
    #[serde(default = "default_max_conn_rate_per_client")]
    pub max_connection_rate_per_client: u32,
    /// Networks the two per-address limits do not apply to (default: `relay_networks`, as
    /// Postfix exempts `$mynetworks`: they may send anything already, and an application that
    /// opens a connection per message must not be throttled). `[]` limits everyone.
    #[serde(default)]
    pub limit_exempt_networks: Option<Vec<crate::inbound::IpNet>>,
    /// Longest session in seconds, whatever the client does (default 3600; 0: no limit).
    #[serde(default = "default_max_session_time")]
    pub max_session_time: u64,
    /// Slowest average rate of a message in DATA, bytes per second, after `data_rate_grace`
    /// (default 1024; 0: no limit). A slower client is told `421 4.7.0`.
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: u32,
    /// Seconds DATA may take before `min_data_rate` applies (default 30).
    #[serde(default = "default_data_rate_grace")]
    pub data_rate_grace: u64,
    /// AUTH failures from one client address, over all its connections, after which AUTH is
    /// refused with `454 4.7.0` for the rest of `auth_failure_window` (default 10; 0: no
    /// limit). One connection is still closed after 3 failures.
    #[serde(default = "default_auth_failure_limit")]
    pub auth_failure_limit: u32,
    /// The window of `auth_failure_limit`, in seconds (default 600).
    #[serde(default = "default_auth_failure_window")]
    pub auth_failure_window: u64,
    /// Pause before answering a failed AUTH, in milliseconds (default 1000).
    #[serde(default = "default_auth_failure_delay_ms")]
    pub auth_failure_delay_ms: u64,
    /// Errors a session may make (syntax, sequence, denied recipients) before `421 4.7.0`
    /// (default 20, Postfix's `smtpd_hard_error_limit`).
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// A bare CR or LF in a message: `normalize` (accept; sent on as CRLF) or `reject`
    /// (`550 5.5.2`) (default `normalize`; Postfix's `smtpd_forbid_bare_newline`). Only
    /// `CRLF . CRLF` ends a message either way.
    #[serde(default)]
    pub bare_newline: crate::inbound::BareNewline,
}

fn default_max_conns_per_client() -> u32 {
    crate::inbound::DEFAULT_MAX_CONNECTIONS_PER_CLIENT
}

fn default_max_conn_rate_per_client() -> u32 {
    crate::inbound::DEFAULT_MAX_CONNECTION_RATE_PER_CLIENT
}

fn default_max_session_time() -> u64 {
    crate::inbound::DEFAULT_MAX_SESSION_TIME.as_secs()
}

fn default_min_data_rate() -> u32 {
    crate::inbound::DEFAULT_MIN_DATA_RATE
}

fn default_data_rate_grace() -> u64 {
    crate::inbound::DEFAULT_DATA_RATE_GRACE.as_secs()
}

fn default_auth_failure_limit() -> u32 {
    crate::inbound::DEFAULT_AUTH_FAILURE_LIMIT
}

fn default_auth_failure_window() -> u64 {
    crate::inbound::DEFAULT_AUTH_FAILURE_WINDOW.as_secs()
}

fn default_auth_failure_delay_ms() -> u64 {
    crate::inbound::DEFAULT_AUTH_FAILURE_DELAY.as_millis() as u64
}

fn default_max_errors() -> u32 {
    crate::inbound::DEFAULT_MAX_ERRORS
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            listen: default_listen(),
            relay_networks: default_networks(),
            max_message_size: default_max_message(),
            max_recipients: default_max_rcpts(),
            max_connections: default_max_conns(),
            idle_timeout: default_idle(),
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            credentials_file: None,
            max_connections_per_client: default_max_conns_per_client(),
            max_connection_rate_per_client: default_max_conn_rate_per_client(),
            limit_exempt_networks: None,
            max_session_time: default_max_session_time(),
            min_data_rate: default_min_data_rate(),
            data_rate_grace: default_data_rate_grace(),
            auth_failure_limit: default_auth_failure_limit(),
            auth_failure_window: default_auth_failure_window(),
            auth_failure_delay_ms: default_auth_failure_delay_ms(),
            max_errors: default_max_errors(),
            bare_newline: Default::default(),
        }
    }
}

impl InboundConfig {
    /// The server's options, reading the certificate and the credentials file.
    pub fn options(&self, hostname: &str) -> Result<crate::inbound::InboundOptions, String> {
        use rustls_pki_types::pem::PemObject;
        let provider = || std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) if self.tls_self_signed => {
                let certified = rcgen::generate_simple_self_signed(vec![hostname.to_owned()])
                    .map_err(|e| format!("inbound.tls_self_signed: {e}"))?;
                let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
                    certified.signing_key.serialize_der().into(),
                );
                let config = rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .and_then(|b| {
                        b.with_no_client_auth()
                            .with_single_cert(vec![certified.cert.der().clone()], key)
                    })
                    .map_err(|e| format!("inbound.tls_self_signed: {e}"))?;
                Some(std::sync::Arc::new(config))
            }
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("inbound.tls_cert ({}): {e}", cert.display()))?;
                let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("inbound.tls_key ({}): {e}", key.display()))?;
                let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
                .map_err(|e| format!("inbound.tls_cert/tls_key: {e}"))?;
                Some(std::sync::Arc::new(config))
            }
            _ => return Err("inbound.tls_cert and inbound.tls_key go together".to_owned()),
        };
        let mut credentials = std::collections::HashMap::new();
        if let Some(path) = &self.credentials_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("inbound.credentials_file ({}): {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((user, hash)) =
                    line.split_once(':').filter(|(_, h)| h.starts_with("sha256:"))
                else {
                    return Err(format!(
                        "inbound.credentials_file ({}) line {}: expected `user:sha256:<salt>:<hash>`",
                        path.display(),
                        n + 1
                    ));
                };
                credentials.insert(user.to_owned(), hash.to_owned());
            }
        }
        Ok(crate::inbound::InboundOptions {
            hostname: hostname.to_owned(),
            relay_networks: self.relay_networks.clone(),
            max_message_size: self.max_message_size,
            max_recipients: self.max_recipients,
            max_connections: self.max_connections,
            idle_timeout: Duration::from_secs(self.idle_timeout),
            max_connections_per_client: self.max_connections_per_client,
            max_connection_rate_per_client: self.max_connection_rate_per_client,
            limit_exempt_networks: self.limit_exempt_networks.clone(),
            max_session_time: Duration::from_secs(self.max_session_time),
            min_data_rate: self.min_data_rate,
            data_rate_grace: Duration::from_secs(self.data_rate_grace),
            auth_failure_limit: self.auth_failure_limit,
            auth_failure_window: Duration::from_secs(self.auth_failure_window),
            auth_failure_delay: Duration::from_millis(self.auth_failure_delay_ms),
            max_errors: self.max_errors,
            bare_newline: self.bare_newline,
            tls,
            credentials,
            ..Default::default()
        })
    }
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 2525))
}

fn default_networks() -> Vec<crate::inbound::IpNet> {
    crate::inbound::IpNet::loopback().to_vec()
}

fn default_max_message() -> usize {
    25 << 20
}

fn default_max_rcpts() -> usize {
    100
}

fn default_max_conns() -> usize {
    100
}

fn default_true() -> bool {
    true
}

fn default_idle() -> u64 {
    300
}

/// `[queue]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The spool directory (default `/var/spool/postwarden`).
    #[serde(default = "default_spool")]
    pub dir: PathBuf,
    /// First retry delay in seconds (default 300, Postfix's `minimal_backoff_time`).
    #[serde(default = "default_min_backoff")]
    pub min_backoff: u64,
    /// Longest retry delay in seconds (default 4000, Postfix's `maximal_backoff_time`).
    #[serde(default = "default_max_backoff")]
    pub max_backoff: u64,
    /// Seconds after which undelivered recipients bounce (default 432000: 5 days).
    #[serde(default = "default_lifetime")]
    pub max_lifetime: u64,
    /// Seconds after which the sender gets a delay warning (default: never). Forced-TLS
    /// failures otherwise sit silently in the queue.
    #[serde(default)]
    pub delay_warning: Option<u64>,
    /// Messages delivered at once (default 20).
    #[serde(default = "default_queue_concurrency")]
    pub concurrency: usize,
    /// Deliveries to one destination domain at once (default 20).
    #[serde(default = "default_queue_concurrency")]
    pub per_destination: usize,
    /// The local control socket through which `postwarden queue` commands reach the running
    /// relay (a Unix socket, mode 0600, only its owner's user and root may talk to it).
    /// Default: `control.sock` in the spool directory.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dir: default_spool(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            max_lifetime: default_lifetime(),
            delay_warning: None,
            concurrency: default_queue_concurrency(),
            per_destination: default_queue_concurrency(),
            control_socket: None,
        }
    }
}

impl QueueConfig {
    /// Where the control socket is.
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| self.dir.join("control.sock"))
    }

    /// As the queue's options; `hostname` names the relay in DSNs.
    pub fn options(&self, hostname: &str) -> crate::queue::QueueOptions {
        crate::queue::QueueOptions {
            min_backoff: Duration::from_secs(self.min_backoff),
            max_backoff: Duration::from_secs(self.max_backoff.max(self.min_backoff)),
            max_lifetime: Duration::from_secs(self.max_lifetime),
            delay_warning: self.delay_warning.map(Duration::from_secs),
            concurrency: self.concurrency.max(1),
            per_destination: self.per_destination.max(1),
            hostname: hostname.to_owned(),
        }
    }
}

fn default_spool() -> PathBuf {
    PathBuf::from("/var/spool/postwarden")
}

fn default_min_backoff() -> u64 {
    300
}

fn default_max_backoff() -> u64 {
    4000
}

fn default_lifetime() -> u64 {
    5 * 86_400
}

fn default_queue_concurrency() -> usize {
    20
}

/// `[delivery]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// The name sent in EHLO (default: `localhost`; set it to the relay's public name).
    #[serde(default = "default_helo")]
    pub helo_name: String,
    /// The port MX hosts are contacted on (default 25).
    #[serde(default = "default_port")]
    pub port: u16,
    /// DNS servers (`"IP:port"`); empty means the system's resolver configuration.
    #[serde(default)]
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// Static routes, like Postfix transport maps: `"example.com" = "[10.0.0.5]:2525"` or
    /// `"[smarthost.example]"` (port 25 by default). No MX lookup for these domains.
    #[serde(default)]
    pub routes: std::collections::BTreeMap<String, String>,
    /// Seed for shuffling MX hosts of equal preference (tests; default: random).
    #[serde(default)]
    pub mx_shuffle_seed: Option<u64>,
    /// Per-stage timeouts in seconds (RFC 5321 §4.5.3.2 defaults).
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Keep a TLS connection open after a transaction for the next message to the same MX
    /// under the same requirement, up to 2 s idle and 300 s in all (default `true`; Postfix's
    /// connection cache). Plaintext connections are never reused.
    #[serde(default = "default_true")]
    pub connection_reuse: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            helo_name: default_helo(),
            port: default_port(),
            dns_servers: Vec::new(),
            routes: Default::default(),
            mx_shuffle_seed: None,
            timeouts: TimeoutsConfig::default(),
            connection_reuse: true,
        }
    }
}

impl DeliveryConfig {
    /// The static routes, parsed: domain → (host, port).
    pub fn parsed_routes(
        &self,
    ) -> Result<std::collections::HashMap<String, (String, u16)>, String> {
        let mut out = std::collections::HashMap::new();
        for (domain, target) in &self.routes {
            let parsed = parse_route(target, self.port).ok_or_else(|| {
                format!("delivery.routes.\"{domain}\": `{target}` is not `[host]` or `[host]:port`")
            })?;
            out.insert(domain.trim_end_matches('.').to_ascii_lowercase(), parsed);
        }
        Ok(out)
    }
}

fn parse_route(target: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = target.strip_prefix('[')?;
    let (host, port) = rest.split_once(']')?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    let port = match port {
        "" => default_port,
        p => p.strip_prefix(':')?.parse().ok()?,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// `[delivery.timeouts]`, in seconds.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP connect (default 30).
    #[serde(default = "t_connect")]
    pub connect: f64,
    /// Greeting (default 300).
    #[serde(default = "t_five_min")]
    pub greeting: f64,
    /// EHLO, STARTTLS, MAIL, RCPT replies (default 300).
    #[serde(default = "t_five_min")]
    pub command: f64,
    /// TLS handshake (default 60).
    #[serde(default = "t_minute")]
    pub tls_handshake: f64,
    /// Reply to DATA (default 120).
    #[serde(default = "t_two_min")]
    pub data_init: f64,
    /// Sending a block of the message (default 180).
    #[serde(default = "t_three_min")]
    pub data_block: f64,
    /// Reply after the final dot (default 600).
    #[serde(default = "t_ten_min")]
    pub final_dot: f64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: t_connect(),
            greeting: t_five_min(),
            command: t_five_min(),
            tls_handshake: t_minute(),
            data_init: t_two_min(),
            data_block: t_three_min(),
            final_dot: t_ten_min(),
        }
    }
}

/// The longest timeout accepted, in seconds (a day): far beyond any RFC 5321 value, and
/// small enough for any clock arithmetic.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;

impl TimeoutsConfig {
    /// Refuses what cannot become a `Duration`: `inf`, `nan` and numbers such as `1e300` are
    /// valid TOML floats, and turning them into one panicked (found by fuzzing, fuzz/config).
    fn validate(&self) -> Result<(), String> {
        let all = [
            ("connect", self.connect),
            ("greeting", self.greeting),
            ("command", self.command),
            ("tls_handshake", self.tls_handshake),
            ("data_init", self.data_init),
            ("data_block", self.data_block),
            ("final_dot", self.final_dot),
        ];
        for (key, secs) in all {
            if !secs.is_finite() || secs > MAX_TIMEOUT_SECS {
                return Err(format!(
                    "delivery.timeouts.{key}: must be a number of seconds up to {MAX_TIMEOUT_SECS}"
                ));
            }
        }
        Ok(())
    }

    /// As the delivery engine's type.
    pub fn to_timeouts(&self) -> crate::delivery::client::Timeouts {
        let d = |secs: f64| Duration::from_secs_f64(secs.max(0.001));
        crate::delivery::client::Timeouts {
            connect: d(self.connect),
            greeting: d(self.greeting),
            command: d(self.command),
            tls_handshake: d(self.tls_handshake),
            data_init: d(self.data_init),
            data_block: d(self.data_block),
            final_dot: d(self.final_dot),
        }
    }
}

/// `[tls]`: whom outbound TLS trusts for `verify` and `secure`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Trust the public web PKI roots (webpki-roots; default true).
    #[serde(default = "yes")]
    pub webpki_roots: bool,
    /// Extra CA certificates (PEM files), e.g. a private CA or the simulator's test CA.
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
    /// Client certificates the relay can present, by name, to destinations that require one
    /// (mutual TLS); a policy's requirement names one (`client-identity`).
    #[serde(default)]
    pub client_identities: std::collections::BTreeMap<String, ClientIdentityConfig>,
}

/// `[tls.client_identities.NAME]`: a client certificate chain and its key (PEM files).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIdentityConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            webpki_roots: true,
            ca_files: Vec::new(),
            client_identities: Default::default(),
        }
    }
}

impl TlsConfig {
    /// Builds the TLS context, reading the CA files.
    pub fn context(&self) -> Result<crate::delivery::tls::TlsContext, String> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        if self.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for (i, path) in self.ca_files.iter().enumerate() {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("tls.ca_files[{i}] ({}): {e}", path.display()))?;
            let mut added = 0;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("tls.ca_files[{i}] ({}): {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("tls.ca_files[{i}] ({}): {e}", path.display()))?;
                added += 1;
            }
            if added == 0 {
                return Err(format!(
                    "tls.ca_files[{i}] ({}): no certificate found",
                    path.display()
                ));
            }
        }
        let mut identities = std::collections::HashMap::new();
        for (name, identity) in &self.client_identities {
            let at = format!("tls.client_identities.{name}");
            if !crate::policy::types::is_identity_name(name) {
                return Err(format!(
                    "{at}: a name is 1 to 64 letters, digits, '.', '-' or '_' (policies use it)"
                ));
            }
            let chain = rustls_pki_types::CertificateDer::pem_file_iter(&identity.cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{at}.cert ({}): {e}", identity.cert.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "{at}.cert ({}): no certificate found",
                    identity.cert.display()
                ));
            }
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&identity.key)
                .map_err(|e| format!("{at}.key ({}): {e}", identity.key.display()))?;
            let identity = crate::delivery::tls::ClientIdentity::new(chain, key)
                .map_err(|e| format!("{at}: {e}"))?;
            identities.insert(name.clone(), identity);
        }
        Ok(crate::delivery::tls::TlsContext::new(roots).with_client_identities(identities))
    }
}

fn default_helo() -> String {
    "localhost".to_owned()
}

fn default_port() -> u16 {
    25
}

fn t_connect() -> f64 {
    30.0
}

fn t_minute() -> f64 {
    60.0
}

fn t_two_min() -> f64 {
    120.0
}

fn t_three_min() -> f64 {
    180.0
}

fn t_five_min() -> f64 {
    300.0
}

fn t_ten_min() -> f64 {
    600.0
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
    /// Whether a `TLS-Required: No` header (RFC 8689 §5) may relax a forced requirement to
    /// `may`: `"never"` (default: a domain forced by local agreement is a promise that nothing
    /// goes out in clear, whatever a message says), `"authenticated"` (only for messages whose
    /// submitter used SMTP AUTH) or `"any"` (every client allowed to relay). RFC 8689 meant the
    /// header to relax what a destination publishes (MTA-STS, DANE); the relay cannot tell
    /// those from local agreements, hence opt-in. Every relaxation is logged at warn, counted
    /// (`postwarden_tls_required_no_total{outcome="relaxed"}`) and credited to `tls-required-no(over
    /// POLICY)`, never to the forcing policy. REQUIRETLS always wins over the header.
    #[serde(default)]
    pub tls_required_no: crate::policy::TlsRequiredNo,
    /// Replaced by `tls_required_no`; present only to name the new key in the error.
    #[serde(default, skip_serializing)]
    pub honor_tls_required_no: Option<bool>,
    /// Instance slots of the policy engine's pooling allocator (default 128): memory is
    /// reserved for that many policy stores. It does not make calls run in parallel: calls run
    /// at most one per CPU (the call gate, `policy/gate.rs`) and queue before their store is
    /// created.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_calls: u32,
}

impl Default for PolicyEngineConfig {
    fn default() -> Self {
        PolicyEngineConfig {
            cache_dir: default_cache_dir(),
            state_dir: default_state_dir(),
            default_level: default_level(),
            tls_required_no: crate::policy::TlsRequiredNo::Never,
            honor_tls_required_no: None,
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
    /// Most host memory the policy's table (what `configure` keeps with `table-put`) may
    /// hold, in MiB (default 64; a 100,000-domain `forced-tls` needs 8.2). The table lives
    /// outside the guest's memory caps for as long as the policy is loaded; a `configure` that
    /// tries to keep more fails the load, naming the figure.
    #[serde(default = "default_table_limit_mib")]
    pub table_limit_mib: u64,
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
            table_bytes: mib(self.table_limit_mib),
        }
    }
}

/// What [`Config::check`] built from the files a configuration names: `run` starts from
/// these, so a file `check-config` accepts is a file `run` accepts.
pub struct Checked {
    /// The SMTP listener's options (certificate, key and credentials read).
    pub inbound: crate::inbound::InboundOptions,
    /// The outbound delivery engine (CA files read, routes and DNS servers parsed).
    pub deliverer: std::sync::Arc<crate::delivery::Deliverer>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked").finish_non_exhaustive()
    }
}

/// The keys a SIGHUP can change without a restart. Everything else must stay as it was, or the
/// whole reload is refused naming the keys that differ.
pub const RELOADABLE: &[&str] = &[
    "policy_engine.default_level",
    "policy_engine.tls_required_no",
    "policy (every [[policy]] table)",
    "inbound.relay_networks",
    "inbound.max_message_size",
    "inbound.max_recipients",
    "inbound.idle_timeout",
    "inbound.tls_cert",
    "inbound.tls_key",
    "inbound.tls_self_signed",
    "inbound.credentials_file",
    "delivery.port",
    "delivery.dns_servers",
    "delivery.mx_shuffle_seed",
    "delivery.routes",
    "delivery.timeouts",
    "tls (webpki_roots, ca_files)",
];

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
        for ca in &mut self.tls.ca_files {
            resolve(ca);
        }
        for identity in self.tls.client_identities.values_mut() {
            resolve(&mut identity.cert);
            resolve(&mut identity.key);
        }
        resolve(&mut self.queue.dir);
        if let Some(socket) = &mut self.queue.control_socket {
            resolve(socket);
        }
        for path in [
            &mut self.inbound.tls_cert,
            &mut self.inbound.tls_key,
            &mut self.inbound.credentials_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(path);
        }
    }

    /// The one validation path of `run`, `check-config` and SIGHUP: reads every file the
    /// configuration names (inbound certificate and key, credentials, CA files), builds the
    /// delivery engine (routes, DNS servers) and checks the spool directory. The policies are
    /// loaded separately ([`crate::policy::load_chain`]), by the same callers.
    pub fn check(&self) -> Result<Checked, String> {
        check_spool_dir(&self.queue.dir)?;
        let inbound = self.inbound.options(&self.delivery.helo_name)?;
        let deliverer = crate::delivery::Deliverer::from_config(self)?;
        Ok(Checked { inbound, deliverer })
    }

    /// The keys that differ between `self` (running) and `new` and cannot change without a
    /// restart, in file order; empty if `new` can be reloaded. Keys not in [`RELOADABLE`] are
    /// compared, so a key added later is restart-only until its reload is implemented.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let neutral = |c: &Config| {
            let mut c = c.clone();
            c.policy_engine.default_level = TlsLevel::May;
            c.policy_engine.tls_required_no = crate::policy::TlsRequiredNo::Never;
            c.policies.clear();
            let inbound = &mut c.inbound;
            inbound.relay_networks.clear();
            inbound.max_message_size = 0;
            inbound.max_recipients = 0;
            inbound.idle_timeout = 0;
            inbound.tls_cert = None;
            inbound.tls_key = None;
            inbound.tls_self_signed = false;
            inbound.credentials_file = None;
            // The inbound limits are read per connection and per event: reloadable.
            let limits = InboundConfig::default();
            inbound.max_connections_per_client = limits.max_connections_per_client;
            inbound.max_connection_rate_per_client = limits.max_connection_rate_per_client;
            inbound.limit_exempt_networks = limits.limit_exempt_networks;
            inbound.max_session_time = limits.max_session_time;
            inbound.min_data_rate = limits.min_data_rate;
            inbound.data_rate_grace = limits.data_rate_grace;
            inbound.auth_failure_limit = limits.auth_failure_limit;
            inbound.auth_failure_window = limits.auth_failure_window;
            inbound.auth_failure_delay_ms = limits.auth_failure_delay_ms;
            inbound.max_errors = limits.max_errors;
            inbound.bare_newline = limits.bare_newline;
            c.delivery.port = 0;
            c.delivery.dns_servers.clear();
            c.delivery.mx_shuffle_seed = None;
            c.delivery.routes.clear();
            c.delivery.timeouts = TimeoutsConfig::default();
            c.tls = TlsConfig::default();
            c
        };
        let (old, new) = (neutral(self), neutral(new));
        let mut changed = Vec::new();
        let sections: [(&str, String, String); 7] = [
            (
                "policy_engine",
                format!("{:#?}", old.policy_engine),
                format!("{:#?}", new.policy_engine),
            ),
            ("delivery", format!("{:#?}", old.delivery), format!("{:#?}", new.delivery)),
            ("tls", format!("{:#?}", old.tls), format!("{:#?}", new.tls)),
            ("queue", format!("{:#?}", old.queue), format!("{:#?}", new.queue)),
            ("inbound", format!("{:#?}", old.inbound), format!("{:#?}", new.inbound)),
            ("admin", format!("{:#?}", old.admin), format!("{:#?}", new.admin)),
            ("logging", format!("{:#?}", old.logging), format!("{:#?}", new.logging)),
        ];
        for (section, old, new) in sections {
            let (old, new) = (debug_fields(&old), debug_fields(&new));
            for (key, value) in &new {
                if old.iter().find(|(k, _)| k == key).map(|(_, v)| v) != Some(value) {
                    changed.push(format!("{section}.{key}"));
                }
            }
        }
        changed
    }

    fn validate(&self) -> Result<(), String> {
        if self.standards.sts_timeout == 0 || self.standards.sts_timeout > 60 {
            return Err("standards.sts_timeout: 1 to 60 seconds".to_owned());
        }
        if self.inbound.idle_timeout == 0 {
            return Err("inbound.idle_timeout: must be at least 1 second".to_owned());
        }
        let t = &self.delivery.timeouts;
        for (key, value) in [
            ("connect", t.connect),
            ("greeting", t.greeting),
            ("command", t.command),
            ("tls_handshake", t.tls_handshake),
            ("data_init", t.data_init),
            ("data_block", t.data_block),
            ("final_dot", t.final_dot),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "delivery.timeouts.{key}: must be a positive number of seconds"
                ));
            }
        }
        if self.policy_engine.honor_tls_required_no.is_some() {
            return Err("policy_engine.honor_tls_required_no: replaced by \
                        policy_engine.tls_required_no = \"never\" | \"authenticated\" | \"any\" \
                        (default \"never\": TLS-Required: No no longer relaxes forced TLS \
                        unless you opt in)"
                .to_owned());
        }
        self.delivery.parsed_routes()?;
        self.delivery.timeouts.validate()?;
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
            if !(1..=4096).contains(&policy.table_limit_mib) {
                return Err(format!("{}: must be between 1 and 4096", key("table_limit_mib")));
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

/// The spool directory must be a directory (or creatable: its nearest existing ancestor is a
/// directory), and so must its `tmp`, `msg` and `env` if they exist. Nothing is created here:
/// `check-config` changes nothing on disk.
fn check_spool_dir(dir: &Path) -> Result<(), String> {
    let key = || format!("queue.dir ({})", dir.display());
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            for sub in ["tmp", "msg", "env"] {
                let path = dir.join(sub);
                match std::fs::metadata(&path) {
                    Ok(meta) if !meta.is_dir() => {
                        return Err(format!("{}: {sub} is not a directory", key()));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {sub}: {e}", key())),
                }
            }
            if meta.permissions().readonly() {
                return Err(format!("{}: not writable", key()));
            }
            std::fs::read_dir(dir).map(drop).map_err(|e| format!("{}: {e}", key()))
        }
        Ok(_) => Err(format!("{}: not a directory", key())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ancestor = dir.ancestors().skip(1).find(|a| a.exists());
            match ancestor {
                Some(a) if a.is_dir() => Ok(()),
                Some(a) => {
                    Err(format!("{}: cannot be created: {} is not a directory", key(), a.display()))
                }
                None => Ok(()),
            }
        }
        Err(e) => Err(format!("{}: {e}", key())),
    }
}

/// The top-level fields of a `{:#?}` rendering: `(name, rendered value)`, in order.
fn debug_fields(pretty: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in pretty.lines().skip(1) {
        let field = line.strip_prefix("    ").filter(|l| !l.starts_with(' '));
        match field.and_then(|l| l.split_once(": ")) {
            Some((name, value)) => fields.push((name.to_owned(), value.to_owned())),
            None => {
                if let Some((_, value)) = fields.last_mut() {
                    value.push_str(line);
                }
            }
        }
    }
    fields
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

fn default_table_limit_mib() -> u64 {
    64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[tls.client_identities]` is checked when the config is turned into a TLS context: a
    /// name a policy could not write, a key that is not the certificate's, or a missing file is
    /// refused with the key's path; a matching pair loads.
    #[test]
    fn client_identities_are_checked_when_the_tls_context_is_built() {
        let dir = std::env::temp_dir().join(format!("pw-identities-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".to_owned()]).unwrap();
        std::fs::write(dir.join("a.pem"), a.cert.pem()).unwrap();
        std::fs::write(dir.join("a.key"), a.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("b.key"), b.signing_key.serialize_pem()).unwrap();
        let context = |name: &str, key: &str| {
            let text = format!(
                "[tls]\nwebpki_roots = false\n[tls.client_identities.\"{name}\"]\n\
                 cert = \"a.pem\"\nkey = \"{key}\"\n"
            );
            Config::parse(&text, &dir.join("relay.toml")).unwrap().tls.context().map(drop)
        };
        assert_eq!(context("partner", "a.key"), Ok(()));
        let err = context("partner", "b.key").unwrap_err();
        assert!(err.starts_with("tls.client_identities.partner: the key does not belong"), "{err}");
        let err = context("two words", "a.key").unwrap_err();
        assert!(err.contains("a name is 1 to 64 letters"), "{err}");
        let err = context("partner", "missing.key").unwrap_err();
        assert!(err.starts_with("tls.client_identities.partner.key ("), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What SIGHUP may change and what it must refuse, by key name.
    #[test]
    fn restart_only_changes_are_named_and_reloadable_ones_are_not() {
        let path = Path::new("/etc/postwarden/relay.toml");
        let running = Config::parse("[queue]\ndir = \"spool\"\n", path).unwrap();
        let reloadable = Config::parse(
            "[policy_engine]\ntls_required_no = \"authenticated\"\n\
             [delivery]\nport = 2525\n[delivery.routes]\n\"a.example\" = \"[10.0.0.1]\"\n\
             [delivery.timeouts]\nconnect = 5\n[tls]\nwebpki_roots = false\n\
             [queue]\ndir = \"spool\"\n\
             [inbound]\nrelay_networks = [\"10.0.0.0/8\"]\nmax_recipients = 5\nidle_timeout = 9\n\
             max_connections_per_client = 3\nmax_errors = 4\nbare_newline = \"reject\"\n",
            path,
        )
        .unwrap();
        assert_eq!(running.restart_only_changes(&reloadable), Vec::<String>::new());
        let restart = Config::parse(
            "[queue]\ndir = \"other\"\nconcurrency = 3\n[inbound]\nlisten = \"127.0.0.1:2526\"\n\
             [logging]\nformat = \"json\"\n",
            path,
        )
        .unwrap();
        assert_eq!(
            running.restart_only_changes(&restart),
            ["queue.dir", "queue.concurrency", "inbound.listen", "logging.format"]
        );
    }

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
    fn dev_mode_generates_a_self_signed_inbound_certificate() {
        let config =
            Config::parse("[inbound]\ntls_self_signed = true\n", Path::new("relay.toml")).unwrap();
        assert!(config.inbound.options("relay.example").unwrap().tls.is_some());
        let config = Config::parse("", Path::new("relay.toml")).unwrap();
        assert!(config.inbound.options("relay.example").unwrap().tls.is_none());
        let err = Config::parse("[inbound]\ntls_cert = \"c.pem\"\n", Path::new("relay.toml"))
            .unwrap()
            .inbound
            .options("x")
            .unwrap_err();
        assert!(err.contains("tls_cert and inbound.tls_key go together"), "{err}");
    }

    /// Fuzzing found `connect = inf` accepted, then a panic when the delivery engine was
    /// built from it (`Duration::from_secs_f64`). Regression test for fuzz/config.
    #[test]
    fn timeouts_that_are_not_durations_are_refused() {
        for value in ["inf", "-inf", "nan", "1e300", "86401"] {
            let text = format!("[delivery.timeouts]\nfinal_dot = {value}\n");
            let err = Config::parse(&text, Path::new("relay.toml")).unwrap_err().to_string();
            assert!(err.contains("delivery.timeouts.final_dot: must be"), "{value}: {err}");
        }
        let text = "[delivery.timeouts]\nconnect = 86400\ncommand = 0.5\n";
        let config = Config::parse(text, Path::new("relay.toml")).unwrap();
        assert_eq!(config.delivery.timeouts.to_timeouts().connect, Duration::from_secs(86_400));
    }

    #[test]
    fn routes_parse_like_transport_maps() {
        let text = "[delivery]\nport = 2525\n[delivery.routes]\n\"a.example\" = \"[10.0.0.5]:2526\"\n\"B.example.\" = \"[Smart.Example]\"\n";
        let config = Config::parse(text, Path::new("relay.toml")).unwrap();
        let routes = config.delivery.parsed_routes().unwrap();
        assert_eq!(routes["a.example"], ("10.0.0.5".to_owned(), 2526));
        assert_eq!(routes["b.example"], ("smart.example".to_owned(), 2525));
        let bad = "[delivery.routes]\n\"a.example\" = \"10.0.0.5:25\"\n";
        let err = Config::parse(bad, Path::new("relay.toml")).unwrap_err().to_string();
        assert!(err.contains("delivery.routes.\"a.example\": `10.0.0.5:25` is not"), "{err}");
    }

    /// The inbound limits of the example file reach the server's options; defaults match the
    /// server's own; `limit_exempt_networks = []` limits everyone.
    #[test]
    fn inbound_limits_parse() {
        let example = include_str!("../../examples/relay.toml");
        let config = Config::parse(example, Path::new("examples/relay.toml")).unwrap();
        let o = config.inbound.options("relay.example").unwrap();
        assert_eq!((o.max_connections_per_client, o.max_connection_rate_per_client), (10, 60));
        assert_eq!(o.max_session_time, Duration::from_secs(3600));
        assert_eq!((o.min_data_rate, o.data_rate_grace), (1024, Duration::from_secs(30)));
        assert_eq!((o.auth_failure_limit, o.max_errors), (10, 20));
        assert_eq!(o.auth_failure_delay, Duration::from_secs(1));
        assert_eq!(o.bare_newline, crate::inbound::BareNewline::Normalize);
        let defaults = Config::parse("", Path::new("relay.toml")).unwrap();
        let d = defaults.inbound.options("relay.example").unwrap();
        let server = crate::inbound::InboundOptions::default();
        assert_eq!(d.auth_failure_window, server.auth_failure_window);
        assert_eq!(d.limit_exempt_networks, None);
        let text = "[inbound]\nlimit_exempt_networks = []\nbare_newline = \"reject\"\n";
        let o = Config::parse(text, Path::new("relay.toml")).unwrap().inbound.options("x").unwrap();
        assert!(!o.limit_exempt("127.0.0.1".parse().unwrap()));
        assert_eq!(o.bare_newline, crate::inbound::BareNewline::Reject);
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
