//! Real SMTP peers for the interoperability tests: private Postfix instances and aiosmtpd.
//!
//! - [`Pki`]: a root, an intermediate and leaf certificates (RSA or ECDSA) made in process,
//!   valid for `mx.peer.test` and `127.0.0.1`, with fixed dates, written as PEM files.
//! - [`Postfix`]: `scripts/postfix-peer.sh start DIR ...` on a free port, in its own directory
//!   (never the system instance, never `/etc/postfix`), stopped when dropped.
//! - [`Aiosmtpd`]: `tests/fixtures/aiosmtpd-peer.py` in the venv `scripts/test.sh` installs.
//!
//! A missing peer is a failure that says how to install it, never a skipped test.
//! Waiting is on what the peer writes (a Maildir file, a log line), under a deadline.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;

use crate::wasm::{target_dir, workspace_root};

/// The host name every peer certificate names (besides `127.0.0.1`).
pub const PEER_HOST: &str = "mx.peer.test";

/// How long a peer may take to start, or a message to arrive: generous, the tests share two
/// busy cores with builds and fuzzers.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The key type of a leaf certificate.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum KeyKind {
    /// RSA 2048 (the simulator's per-process key), signed with SHA-256.
    Rsa2048,
    /// ECDSA P-256.
    EcdsaP256,
}

/// Who signs a leaf, and so what chain the server must send.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Signer {
    /// The root itself: the chain is the leaf alone.
    Root,
    /// The intermediate: the chain is leaf + intermediate.
    Intermediate,
    /// The intermediate, but the chain file holds the leaf only (an incomplete chain).
    IntermediateLeafOnly,
}

/// A test CA: a root (the only trust anchor relays are given) and an intermediate, valid
/// 2020-01-01 to 4000-01-01.
pub struct Pki {
    root: Issuer<'static, KeyPair>,
    root_pem: String,
    root_der: CertificateDer<'static>,
    intermediate: Issuer<'static, KeyPair>,
    intermediate_pem: String,
}

/// A leaf certificate chain and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8).
    pub key: PathBuf,
}

impl Pki {
    /// A new root and intermediate (ECDSA P-256).
    pub fn new() -> Pki {
        let root_key = KeyPair::generate().expect("root key");
        let root_params = ca_params("Postwarden Peer Test Root", BasicConstraints::Unconstrained);
        let root_cert = root_params.self_signed(&root_key).expect("root certificate");
        let (root_pem, root_der) = (root_cert.pem(), root_cert.der().clone());
        let root = Issuer::new(root_params, root_key);
        let key = KeyPair::generate().expect("intermediate key");
        let params =
            ca_params("Postwarden Peer Test Intermediate", BasicConstraints::Constrained(0));
        let intermediate_pem = params.signed_by(&key, &root).expect("intermediate").pem();
        let intermediate = Issuer::new(params, key);
        Pki { root, root_pem, root_der, intermediate, intermediate_pem }
    }

    /// The root in DER, for a rustls root store.
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// Writes the root to `DIR/ca.pem` and returns its path.
    pub fn write_root(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.root_pem).expect("write ca.pem");
        path
    }

    /// Issues a leaf for [`PEER_HOST`] and `127.0.0.1` (server and client auth) and writes it to
    /// `DIR/NAME.pem` and `DIR/NAME.key`.
    pub fn leaf(&self, dir: &Path, name: &str, kind: KeyKind, signer: Signer) -> Leaf {
        let key = match kind {
            KeyKind::EcdsaP256 => KeyPair::generate().expect("leaf key"),
            KeyKind::Rsa2048 => {
                // The simulator keeps one RSA key per process (generation takes seconds in a
                // debug build); any RSA key does here.
                let ca = crate::sim::ca().expect("the simulator's test CA");
                let rsa = ca.issue(postwarden_sim::CertKind::Rsa2048, PEER_HOST).expect("rsa");
                let der =
                    rustls::pki_types::PrivatePkcs8KeyDer::from(rsa.key.secret_der().to_vec());
                KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
                    .expect("rsa key pair")
            }
        };
        let mut params = CertificateParams::default();
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(3999, 12, 31);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, PEER_HOST);
        params.subject_alt_names = vec![
            SanType::DnsName(PEER_HOST.try_into().expect("a DNS name")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if kind == KeyKind::Rsa2048 {
            // TLS 1.2 RSA key exchange is not offered by rustls, but OpenSSL checks the usage.
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let issuer = match signer {
            Signer::Root => &self.root,
            Signer::Intermediate | Signer::IntermediateLeafOnly => &self.intermediate,
        };
        let mut chain = params.signed_by(&key, issuer).expect("leaf certificate").pem();
        if signer == Signer::Intermediate {
            chain.push_str(&self.intermediate_pem);
        }
        let leaf =
            Leaf { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&leaf.cert, chain).expect("write the chain");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write the key");
        leaf
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

fn ca_params(name: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(4000, 1, 1);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A fresh directory that user `postfix` can enter (Postfix's `virtual` delivers as that user,
/// and a temporary directory is created `0700`).
pub fn instance_dir() -> TempDir {
    let dir = tempfile::Builder::new().prefix("postwarden-peer-").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the instance directory");
    dir
}

/// A port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A private Postfix instance run by `scripts/postfix-peer.sh`, stopped when dropped.
pub struct Postfix {
    /// Its directory: `etc/`, `queue/`, `mail/new/` (server), `log/maillog`.
    pub dir: TempDir,
    /// Its smtpd port on 127.0.0.1.
    pub port: u16,
}

impl Postfix {
    /// Starts an instance in `dir` with the script's `key=value` arguments (without `port=`,
    /// chosen here). Panics, saying how to install Postfix, when it is missing.
    pub fn start(dir: TempDir, args: &[String]) -> Postfix {
        assert_installed();
        let mut last = String::new();
        // A free port can be taken by another test between our check and Postfix's bind.
        for _ in 0..5 {
            let port = free_port();
            let output = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(dir.path())
                .arg(format!("port={port}"))
                .args(args)
                .output()
                .expect("run scripts/postfix-peer.sh");
            if output.status.success() {
                return Postfix { dir, port };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            if !last.contains("already in use") {
                break;
            }
        }
        panic!("postfix-peer.sh start {args:?} failed:\n{last}");
    }

    /// `DIR/mail/new`: one file per delivered recipient.
    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail/new")
    }

    /// The instance's log so far.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/maillog")).unwrap_or_default()
    }

    /// Waits until `n` lines of the log contain `needle` and returns those lines, or panics with
    /// the log.
    pub fn wait_log(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let log = self.maillog();
            let lines: Vec<String> =
                log.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(Instant::now() < deadline, "not {n} {needle:?} in the Postfix log:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `n` messages are in the Maildir and returns them (sorted by file name), or
    /// panics with the log.
    pub fn wait_mail(&self, n: usize) -> Vec<String> {
        wait_files(&self.maildir(), n, || self.maillog())
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let output = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).output();
        if let Ok(o) = output
            && !o.status.success()
        {
            eprintln!("postfix-peer.sh stop failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

fn script() -> PathBuf {
    workspace_root().join("scripts/postfix-peer.sh")
}

fn assert_installed() {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    assert!(root, "the Postfix peer tests run a private Postfix instance and must run as root");
    assert!(
        Path::new("/usr/lib/postfix/sbin/master").exists()
            && Path::new("/usr/sbin/saslpasswd2").exists(),
        "Postfix is not installed: run `scripts/postfix-peer.sh install` (Debian's postfix, \
         \"No configuration\", system instance off; scripts/test.sh does it)"
    );
}

/// aiosmtpd (`tests/fixtures/aiosmtpd-peer.py`) on a free port, killed when dropped.
pub struct Aiosmtpd {
    /// Where it writes each message (`N.eml`), and its certificate files.
    pub dir: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
}

impl Aiosmtpd {
    /// Starts it with `leaf` as its STARTTLS certificate. Panics, saying how to install
    /// aiosmtpd, when the venv is missing.
    pub fn start(dir: TempDir, leaf: &Leaf) -> Aiosmtpd {
        let python = aiosmtpd_python();
        let out = dir.path().join("mail");
        std::fs::create_dir_all(&out).expect("create the mail directory");
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&python)
                .arg(workspace_root().join("tests/fixtures/aiosmtpd-peer.py"))
                .arg(port.to_string())
                .args([&leaf.cert, &leaf.key, &out])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
            let mut line = String::new();
            let stdout = child.stdout.take().expect("piped stdout");
            // "ready" or EOF (it exited): the script prints nothing else.
            let _ = BufReader::new(stdout).read_line(&mut line);
            if line.trim() == "ready" {
                return Aiosmtpd { dir, port, child };
            }
            let _ = child.kill();
            let output = child.wait_with_output().expect("aiosmtpd's output");
            last = String::from_utf8_lossy(&output.stderr).into_owned();
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("aiosmtpd-peer.py did not start:\n{last}");
    }

    /// Waits until `n` messages arrived and returns them, or panics.
    pub fn wait_mail(&self, n: usize) -> Vec<String> {
        wait_files(&self.dir.path().join("mail"), n, String::new)
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        // Closing stdin stops it; kill in case it hangs.
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python of the venv with aiosmtpd (`$POSTWARDEN_PEERS_PYTHON` overrides it).
pub fn aiosmtpd_python() -> PathBuf {
    let python = std::env::var_os("POSTWARDEN_PEERS_PYTHON")
        .map_or_else(|| target_dir().join("peers/venv/bin/python"), PathBuf::from);
    let found = Command::new(&python)
        .args(["-c", "import aiosmtpd"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "aiosmtpd is not installed in {}: run `python3 -m venv target/peers/venv && \
         target/peers/venv/bin/pip install -r tools/peers/requirements.txt` (scripts/test.sh \
         does it), or set POSTWARDEN_PEERS_PYTHON",
        python.display()
    );
    python
}

/// Waits until `dir` holds `n` visible files; returns their contents sorted by name. On timeout,
/// panics with what `context` says (a log).
fn wait_files(dir: &Path, n: usize, context: impl Fn() -> String) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if names.len() >= n {
            names.sort();
            return names
                .iter()
                .map(|p| std::fs::read_to_string(p).expect("read a delivered message"))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages in {} after {DEADLINE:?}:\n{}",
            names.len(),
            dir.display(),
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
