//! One policy, four languages: the Rust, Python, JavaScript and WAT editions of `partner`
//! (policies/partner/README.md) make the same decisions and reject the same bad settings, with
//! the relay's default limits; and a Python guest that reaches for files, sockets and the
//! environment gets errors, not access.
//!
//! The catalogue run for every edition is in `conformance/tests/polyglot.rs`.

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::net::TcpListener;
use std::time::Duration;

use postwarden::policy::{
    Action, Chain, Context, Failure, LoadError, PolicyEngine, PolicyFault, Requirement, TlsLevel,
    Verdict,
};
use postwarden_tests::chains;
use postwarden_tests::polyglot::{self, Lang};
use postwarden_tests::wasm::target_dir;

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
