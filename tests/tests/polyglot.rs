//! One policy, four languages: the Rust, Python, JavaScript and WAT editions of `partner`
//! (policies/partner/README.md) make the same decisions and reject the same bad settings, with
//! the relay's default limits; and a Python guest that reaches for files, sockets and the
//! environment gets errors, not access. The 0.1 editions (tests/fixtures/policy-0.1) still load,
//! adapted, and decide as the current ones do.
//!
//! The catalogue run for every edition is in `conformance/tests/polyglot.rs`.

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use postwarden::policy::{
    Action, Chain, Context, DeliveryReport, Failure, LoadError, PolicyEngine, PolicyFault,
    Requirement, TlsBasis, TlsLevel, TlsVersion, Verdict,
};
use postwarden_tests::chains;
use postwarden_tests::polyglot::{self, Lang};
use postwarden_tests::wasm::{self, target_dir, workspace_root};

/// A chain of one policy with default limits. The compile cache is shared between test runs
/// (it is keyed by content and engine), so the Python and JavaScript editions are compiled
/// once, not once per test.
fn load(
    name: &str,
    path: &std::path::Path,
    settings: &str,
) -> Result<(Chain, PolicyEngine), anyhow::Error> {
    let dir = tempfile::tempdir()?;
    let cache = target_dir().join("polyglot/cache");
    let toml = format!(
        "[policy_engine]\ncache_dir = \"{}\"\nstate_dir = \"{}\"\n\n[[policy]]\nname = \"{name}\"\npath = \"{}\"\n[policy.settings]\n{settings}\n",
        cache.display(),
        dir.path().join("state").display(),
        path.display(),
    );
    chains::load_in(&toml, dir.path())
}

const SETTINGS: &str = r#"verify = ["Bank.Example.", ".bank.example"]
encrypt = ["partner.example"]"#;

fn ctx(domain: &str, mx_index: u32, mx_count: u32) -> Context {
    let mut ctx = Context::new(domain, &format!("mx{mx_index}.{domain}"));
    ctx.mx_index = mx_index;
    ctx.mx_count = mx_count;
    ctx
}

fn failures() -> Vec<Failure> {
    vec![
        Failure::StarttlsNotOffered,
        Failure::StarttlsRefused { code: 454, text: "TLS not available".into() },
        Failure::HandshakeFailed("alert".into()),
        Failure::CertificateUntrusted("self-signed".into()),
        Failure::CertificateExpired("expired".into()),
        Failure::CertificateNameMismatch("mx.other".into()),
        Failure::ConnectionLost("reset".into()),
        Failure::Timeout("10s".into()),
    ]
}

/// What the specification says `partner` answers, independently of any edition.
fn spec_plan(domain: &str) -> TlsLevel {
    match domain {
        "bank.example" | "mx.bank.example" | "a.b.bank.example" => TlsLevel::Verify,
        "partner.example" => TlsLevel::Encrypt,
        _ => TlsLevel::May,
    }
}

fn spec_on_failure(domain: &str, mx_index: u32, mx_count: u32, failure: &Failure) -> String {
    if spec_plan(domain) != TlsLevel::May {
        if mx_index + 1 < mx_count {
            return "next-mx".into();
        }
        return format!("defer (partner: TLS required for {domain})");
    }
    match failure {
        Failure::StarttlsNotOffered | Failure::StarttlsRefused { .. } => {
            "continue-plaintext".into()
        }
        _ => "reconnect-plaintext".into(),
    }
}

fn describe(action: &Action) -> String {
    match action {
        Action::NextMx => "next-mx".into(),
        Action::ContinuePlaintext => "continue-plaintext".into(),
        Action::ReconnectPlaintext => "reconnect-plaintext".into(),
        Action::Defer { reason, .. } => format!("defer ({reason})"),
        other => format!("{other:?}"),
    }
}

const DOMAINS: [&str; 7] = [
    "bank.example",
    "mx.bank.example",
    "a.b.bank.example",
    "partner.example",
    "mx.partner.example",
    "example.org",
    "bank.example.org",
];

#[test]
fn every_language_makes_the_same_decisions() {
    for lang in Lang::ALL {
        let path = polyglot::partner(lang);
        let (chain, _engine) =
            load("partner", &path, SETTINGS).unwrap_or_else(|e| panic!("{}: {e:#}", lang.name()));
        for domain in DOMAINS {
            let plan = chain.plan(&ctx(domain, 0, 2));
            assert_eq!(
                plan.verdict,
                Verdict::Require(Requirement::new(spec_plan(domain))),
                "{}: plan({domain}), trace {:?}",
                lang.name(),
                plan.trace
            );
            for (mx_index, mx_count) in [(0, 2), (1, 2), (0, 1)] {
                let ctx = ctx(domain, mx_index, mx_count);
                for failure in failures() {
                    let got = describe(&chain.on_failure(&plan, &ctx, &failure).action);
                    let want = spec_on_failure(domain, mx_index, mx_count, &failure);
                    assert_eq!(
                        got,
                        want,
                        "{}: on-failure({domain}, mx {mx_index}/{mx_count}, {failure:?})",
                        lang.name()
                    );
                }
            }
        }
        let faults = chain.policies()[0].stats();
        eprintln!("{}: ok ({faults:?})", lang.name());
    }
}

#[test]
fn every_language_rejects_bad_settings_with_the_same_words() {
    let cases = [
        ("verfy = []", "unknown setting `verfy` (expected verify, encrypt)"),
        ("verify = \"a.example\"", "`verify` must be a list of domain names"),
        ("verify = [1]", "`verify` must be a list of domain names"),
        ("encrypt = [\"a b\"]", "encrypt: `a b` is not a domain name"),
        ("encrypt = [\"\"]", "encrypt: `` is not a domain name"),
        (
            "verify = [\"a.example\"]\nencrypt = [\"A.example.\"]",
            "`a.example` is listed in both verify and encrypt",
        ),
    ];
    for lang in Lang::ALL {
        let path = polyglot::partner(lang);
        for (settings, want) in cases {
            let err = load("partner", &path, settings).map(|_| ()).unwrap_err();
            let fault = err.downcast_ref::<LoadError>().and_then(|e| match e {
                LoadError::Configure { fault: PolicyFault::Configure(text), .. } => Some(text),
                _ => None,
            });
            assert_eq!(
                fault.map(String::as_str),
                Some(want),
                "{}: settings {settings:?} gave {err:#}",
                lang.name()
            );
        }
    }
}

/// The Python guest imports WASI filesystem, sockets, environment and clock interfaces; the
/// relay links them deny-by-default, and polls never block. The probe tries each and reports
/// what happened in its `configure` error.
#[test]
fn a_python_guest_cannot_reach_files_sockets_or_the_environment_nor_wait() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "the-secret-value").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let settings = format!("file = \"{}\"\nport = {port}", secret.display());

    let err = load("probe", &polyglot::sandbox_probe(), &settings).map(|_| ()).unwrap_err();
    let report = format!("{err:#}");
    assert!(report.contains("probe: file=denied"), "{report}");
    assert!(report.contains("socket=denied"), "{report}");
    assert!(report.contains("env=0 keys"), "{report}");
    assert!(report.contains("listdir=denied"), "{report}");
    assert!(!report.contains("the-secret-value"), "{report}");
    // The guest asked to sleep 5 s; in a policy, sleeps return at once (no deadline can reach
    // a guest that waits in the host).
    let slept: u64 = report
        .split("sleep=")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no sleep report: {report}"));
    assert!(slept < 1_000, "the guest slept {slept} ms: {report}");
    // Nothing reached the listener, not even a connection attempt.
    std::thread::sleep(Duration::from_millis(50));
    match listener.accept() {
        Ok((mut stream, peer)) => {
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf);
            panic!("the guest connected from {peer} and sent {buf:?}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
}

/// An exception that escapes a Python method traps the instance; the fault carries the last
/// line the guest wrote to stderr, so `postwarden policy check` and the log say why.
#[test]
fn a_python_exception_is_named_in_the_fault() {
    let err = load("probe", &polyglot::sandbox_probe(), "raise = \"settings look odd\"")
        .map(|_| ())
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("trapped"), "{text}");
    assert!(text.contains("RuntimeError: settings look odd"), "{text}");
}

/// The `partner` editions built against `postwarden:policy@0.1.0`: the hand-written WAT as it
/// was, and a committed Rust build.
const CONTRACT_0_1: [&str; 2] = ["partner.wat", "partner.wasm"];

fn contract_0_1(file: &str) -> std::path::PathBuf {
    workspace_root().join("tests/fixtures/policy-0.1").join(file)
}

/// One failure of every class the host knows, those only 0.2 names included (they reach a 0.1
/// guest as the nearest 0.1 class).
fn every_failure() -> Vec<Failure> {
    let failures = vec![
        Failure::StarttlsNotOffered,
        Failure::StarttlsRefused { code: 454, text: "TLS not available".into() },
        Failure::HandshakeFailed("alert".into()),
        Failure::CertificateUntrusted("self-signed".into()),
        Failure::CertificateExpired("expired".into()),
        Failure::CertificateNotYetValid("not yet".into()),
        Failure::CertificateNameMismatch("mx.other".into()),
        Failure::TlsVersionTooOld("TLS 1.1".into()),
        Failure::ConnectionLost("reset".into()),
        Failure::Timeout("10s".into()),
        Failure::DnssecBogus("MX RRSIG expired".into()),
        Failure::TlsaLookupFailed("SERVFAIL".into()),
        Failure::DaneRequired("no TLSA records".into()),
        Failure::StsPolicyUnavailable("fetch failed".into()),
        Failure::StsMxMismatch("mx not listed".into()),
        Failure::TlsaMismatch("no record matches".into()),
    ];
    assert_eq!(failures.len(), Failure::CLASSES.len(), "a failure class is missing here");
    failures
}

/// The relay adapts components built against 0.1.0: both 0.1 editions of `partner` load and
/// say so, answer every plan, failure (of every class) and delivery exactly as the 0.2 Rust and
/// WAT editions do, and pass the partner conformance run over the whole catalogue.
#[test]
fn contract_0_1_editions_load_adapted_and_decide_as_the_0_2_editions() {
    let engine = PolicyEngine::new(&Default::default()).unwrap();
    let current: Vec<(&str, Chain, PolicyEngine)> = [Lang::Rust, Lang::Wat]
        .into_iter()
        .map(|lang| {
            let path = polyglot::partner(lang);
            let info = engine.check(lang.name(), &std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(info.contract_version, "0.2.0", "{}", lang.name());
            let (chain, engine) = load("partner", &path, SETTINGS).unwrap();
            (lang.name(), chain, engine)
        })
        .collect();
    let report = DeliveryReport {
        requirement: Requirement {
            basis: TlsBasis::Sts,
            client_identity: Some("partner-client".into()),
            ..Requirement::new(TlsLevel::Verify)
        },
        tls_version: Some(TlsVersion::Tls13),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        certificate_verified: true,
    };
    let sim = wasm::binary("postwarden-conformance", "postwarden-sim");
    let dir = polyglot::partner_dir();

    for file in CONTRACT_0_1 {
        let path = contract_0_1(file);
        let info = engine.check(file, &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(info.contract_version, "0.1.0", "{file}");
        assert!(
            info.imports.iter().all(|name| name.ends_with("@0.1.0")),
            "{file}: {:?}",
            info.imports
        );
        let (old, _engine) =
            load("partner", &path, SETTINGS).unwrap_or_else(|e| panic!("{file}: {e:#}"));

        for (edition, chain, _) in &current {
            for domain in DOMAINS {
                let want = chain.plan(&ctx(domain, 0, 2));
                let got = old.plan(&ctx(domain, 0, 2));
                assert_eq!(got.verdict, want.verdict, "{file} vs {edition}: plan({domain})");
                assert_eq!(got.verdict, Verdict::Require(Requirement::new(spec_plan(domain))));
                for (mx_index, mx_count) in [(0, 2), (1, 2), (0, 1)] {
                    let ctx = ctx(domain, mx_index, mx_count);
                    for failure in every_failure() {
                        assert_eq!(
                            describe(&old.on_failure(&got, &ctx, &failure).action),
                            describe(&chain.on_failure(&want, &ctx, &failure).action),
                            "{file} vs {edition}: on-failure({domain}, mx {mx_index}/{mx_count}, \
                             {failure:?})"
                        );
                    }
                }
                // A report under a requirement 0.1 cannot express (basis, client identity)
                // reaches both; neither learns from it, neither faults.
                let ctx = ctx(domain, 0, 2);
                old.policies()[0].on_delivered(&ctx, &report).unwrap();
                chain.policies()[0].on_delivered(&ctx, &report).unwrap();
            }
        }
        let stats = old.policies()[0].stats();
        assert_eq!(stats.faults.load(std::sync::atomic::Ordering::Relaxed), 0, "{file}");

        let output = Command::new(&sim)
            .arg("conformance")
            .arg("--policy")
            .arg(&path)
            .arg("--settings")
            .arg(dir.join("settings.json"))
            .arg("--expect")
            .arg(dir.join("expect.toml"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = stdout.lines().last().unwrap_or_default();
        let passed: usize =
            summary.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or_default();
        assert!(
            output.status.success() && summary.contains(", 0 failed") && passed >= 100,
            "{file}: conformance {}: {summary}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("{file} (0.1.0): {summary}");
    }
}

/// A component built against a contract version the relay does not load (here the 0.1 WAT
/// edition renamed to 0.3.0) is refused at load, naming the version it found and the versions
/// the relay loads.
#[test]
fn a_component_built_against_an_unknown_contract_version_is_refused() {
    let text = std::fs::read_to_string(contract_0_1("partner.wat")).unwrap();
    assert!(text.contains("postwarden:policy/host@0.1.0"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partner-0.3.wat");
    std::fs::write(&path, text.replace("@0.1.0", "@0.3.0")).unwrap();

    let err = load("partner", &path, SETTINGS).map(|_| ()).unwrap_err();
    let reason = match err.downcast_ref::<LoadError>() {
        Some(LoadError::Contract { name, reason }) if name == "partner" => reason,
        _ => panic!("not a contract error: {err:#}"),
    };
    assert!(reason.contains("built against postwarden:policy@0.3.0"), "{reason}");
    assert!(reason.contains("this relay loads 0.1.x and 0.2.x"), "{reason}");
}
