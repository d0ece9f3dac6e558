#![allow(clippy::unwrap_used)]

//! The policy engine through real wasm: bundled policies, the chain rule, the host's overriding
//! rules, caching, persistence, and fail-closed behaviour with deliberately broken policies.

use postwarden::policy::{
    Action, CompileSource, Context, Decider, DeliveryReport, Failure, LoadError, PolicyEngine,
    PolicyFault, Requirement, TlsLevel, TlsVersion, Verdict,
};
use postwarden_tests::{chains, wasm};

fn ctx(domain: &str) -> Context {
    Context::new(domain, &format!("mx.{domain}"))
}

fn level(verdict: &Verdict) -> TlsLevel {
    match verdict {
        Verdict::Require(r) => r.level,
        Verdict::Defer { code, reason } => {
            panic!("expected a requirement, got defer {code} {reason}")
        }
    }
}

const FORCED_THEN_OPPORTUNISTIC: &str = r#"
[[policy]]
name = "forced"
path = "{wasm:forced-tls}"
[policy.settings.domains]
"bank.example" = "verify"
".bank.example" = { level = "secure", match = [".bank.example"] }

[[policy]]
name = "opportunistic"
path = "{wasm:opportunistic}"
"#;

#[test]
fn first_non_abstaining_policy_decides_and_handles_failures() {
    let (chain, _engine, _dir) = chains::load(FORCED_THEN_OPPORTUNISTIC).unwrap();

    let plan = chain.plan(&ctx("bank.example"));
    assert_eq!(plan.verdict, Verdict::Require(Requirement::new(TlsLevel::Verify)));
    assert_eq!(plan.decider, Decider::Policy("forced".into()));
    let response = chain.on_failure(&plan, &ctx("bank.example"), &Failure::StarttlsNotOffered);
    assert_eq!(
        response.action,
        Action::defer("4.7.4", "TLS is required, but was not offered by mx.bank.example")
    );

    let plan = chain.plan(&ctx("mx1.bank.example"));
    let Verdict::Require(r) = &plan.verdict else { panic!() };
    assert_eq!(
        (r.level, r.match_names.as_slice()),
        (TlsLevel::Secure, &[".bank.example".to_owned()][..])
    );

    let plan = chain.plan(&ctx("example.org"));
    assert_eq!(level(&plan.verdict), TlsLevel::May);
    assert_eq!(plan.decider, Decider::Policy("opportunistic".into()));
    assert_eq!(plan.trace, ["forced: abstain", "opportunistic: may"]);
    let response = chain.on_failure(&plan, &ctx("example.org"), &Failure::StarttlsNotOffered);
    assert_eq!(response.action, Action::ContinuePlaintext);
    let response =
        chain.on_failure(&plan, &ctx("example.org"), &Failure::HandshakeFailed("x".into()));
    assert_eq!(response.action, Action::ReconnectPlaintext);
}

#[test]
fn forced_tls_tries_next_mx_then_defers_with_475() {
    let (chain, _engine, _dir) = chains::load(FORCED_THEN_OPPORTUNISTIC).unwrap();
    let mut ctx = ctx("bank.example");
    ctx.mx_count = 2;
    let plan = chain.plan(&ctx);
    let failure = Failure::CertificateExpired("expired".into());
    assert_eq!(chain.on_failure(&plan, &ctx, &failure).action, Action::NextMx);
    ctx.mx_index = 1;
    match chain.on_failure(&plan, &ctx, &failure).action {
        Action::Defer { code, reason } => {
            assert_eq!(code, "4.7.5");
            assert!(reason.contains("certificate-expired"), "{reason}");
        }
        other => panic!("expected defer, got {other}"),
    }
}

#[test]
fn all_abstain_gives_the_configured_default() {
    let toml = r#"
[policy_engine]
cache_dir = "cache"
state_dir = "state"
default_level = "encrypt"

[[policy]]
name = "forced"
path = "{wasm:forced-tls}"
settings = { domains = { "bank.example" = "verify" } }
"#;
    let (chain, _engine, _dir) = chains::load(toml).unwrap();
    let plan = chain.plan(&ctx("example.org"));
    assert_eq!((plan.decider.clone(), level(&plan.verdict)), (Decider::Default, TlsLevel::Encrypt));
    let response = chain.on_failure(&plan, &ctx("example.org"), &Failure::StarttlsNotOffered);
    assert!(
        matches!(response.action, Action::Defer { ref code, .. } if code == "4.7.4"),
        "{}",
        response.action
    );
}

#[test]
fn postfix_map_pasted_table_decides_like_postfix() {
    let toml = r#"
[[policy]]
name = "postfix"
path = "{wasm:postfix-map}"
[policy.settings]
map = """
example.com      encrypt
.example.net     verify match=hostname:nexthop
[mx.legacy.example] none
"""
"#;
    let (chain, _engine, _dir) = chains::load(toml).unwrap();
    assert_eq!(level(&chain.plan(&ctx("example.com")).verdict), TlsLevel::Encrypt);
    let plan = chain.plan(&ctx("a.example.net"));
    let Verdict::Require(r) = &plan.verdict else { panic!() };
    assert_eq!(r.match_names, ["mx.a.example.net", "a.example.net"]);
    assert_eq!(
        level(&chain.plan(&Context::new("legacy.example", "mx.legacy.example")).verdict),
        TlsLevel::None
    );
    assert_eq!(chain.plan(&ctx("other.example")).decider, Decider::Default);

    let bad = r#"
[[policy]]
name = "postfix"
path = "{wasm:postfix-map}"
settings = { map = "example.com encrypt ciphers=high" }
"#;
    let err = chains::load(bad).err().unwrap().to_string();
    assert!(
        err.contains("policy `postfix`") && err.contains("attribute `ciphers` is not supported"),
        "{err}"
    );
}

#[test]
fn tofu_learns_from_any_delivery_and_remembers_across_restarts() {
    let toml = r#"
[[policy]]
name = "tofu"
path = "{wasm:tofu}"

[[policy]]
name = "opportunistic"
path = "{wasm:opportunistic}"
"#;
    let dir = tempfile::tempdir().unwrap();
    let (chain, _engine) = chains::load_in(toml, dir.path()).unwrap();
    let ctx = ctx("example.org");
    let plan = chain.plan(&ctx);
    assert_eq!(plan.decider, Decider::Policy("opportunistic".into()));
    chain.on_delivered(
        &ctx,
        &DeliveryReport {
            requirement: Requirement::new(TlsLevel::May),
            tls_version: Some(TlsVersion::Tls13),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            certificate_verified: true,
        },
    );
    let plan = chain.plan(&ctx);
    assert_eq!(
        (plan.decider.clone(), level(&plan.verdict)),
        (Decider::Policy("tofu".into()), TlsLevel::Verify)
    );
    drop(chain);

    let (chain, _engine) = chains::load_in(toml, dir.path()).unwrap();
    let plan = chain.plan(&ctx);
    assert_eq!(level(&plan.verdict), TlsLevel::Verify, "forgotten after restart");
    let response = chain.on_failure(&plan, &ctx, &Failure::StarttlsNotOffered);
    assert!(
        matches!(response.action, Action::Defer { .. }),
        "downgrade allowed: {}",
        response.action
    );

    let removed =
        postwarden::policy::kv::reset_domain(chain.policies()[0].kv().as_ref(), "example.org")
            .unwrap();
    assert_eq!(removed, ["example.org"]);
    assert_eq!(chain.plan(&ctx).decider, Decider::Policy("opportunistic".into()));
}

#[test]
fn requiretls_is_enforced_whatever_the_policy_says() {
    let (chain, _engine, _dir) = chains::load(FORCED_THEN_OPPORTUNISTIC).unwrap();
    let mut ctx = ctx("example.org");
    ctx.requiretls = true;
    let plan = chain.plan(&ctx);
    assert_eq!(level(&plan.verdict), TlsLevel::Verify);
    assert_eq!(plan.adjustments, ["REQUIRETLS raised may to verify"]);
    // The opportunistic policy answers plaintext; the host refuses it.
    let response = chain.on_failure(&plan, &ctx, &Failure::StarttlsNotOffered);
    assert!(
        matches!(response.action, Action::Bounce { ref code, .. } if code == "5.7.30"),
        "{}",
        response.action
    );
    ctx.mx_count = 2;
    assert_eq!(chain.on_failure(&plan, &ctx, &Failure::StarttlsNotOffered).action, Action::NextMx);
}

/// By default `TLS-Required: No` never relaxes locally forced TLS, even from an authenticated
/// submitter: the forcing policy decides and its failure handling applies.
#[test]
fn tls_required_no_never_relaxes_forced_tls_by_default() {
    let (chain, _engine, _dir) = chains::load(FORCED_THEN_OPPORTUNISTIC).unwrap();
    for authenticated in [false, true] {
        let mut ctx = ctx("bank.example");
        ctx.tls_required_no = true;
        ctx.authenticated = authenticated;
        let plan = chain.plan(&ctx);
        assert_eq!(level(&plan.verdict), TlsLevel::Verify);
        assert_eq!(plan.decider, Decider::Policy("forced".into()));
        assert!(plan.adjustments[0].starts_with("TLS-Required: No ignored: forced verify kept"));
        let response = chain.on_failure(&plan, &ctx, &Failure::StarttlsNotOffered);
        assert!(
            !matches!(response.action, Action::ContinuePlaintext | Action::ReconnectPlaintext),
            "{}",
            response.action
        );
    }
    let counters = chain.counters();
    assert_eq!(counters.tls_required_no_relaxed.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(counters.tls_required_no_ignored.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// `tls_required_no = "authenticated"`: only a submitter that used AUTH relaxes forced TLS,
/// and the plan then credits the header, not the forcing policy; `"any"` relaxes for all.
#[test]
fn tls_required_no_opt_in_can_be_limited_to_authenticated_submitters() {
    use std::sync::atomic::Ordering::Relaxed;
    let toml = format!(
        "[policy_engine]\ntls_required_no = \"authenticated\"\n{FORCED_THEN_OPPORTUNISTIC}"
    );
    let (chain, _engine, _dir) = chains::load(&toml).unwrap();
    let mut any = ctx("bank.example");
    any.tls_required_no = true;
    let mut ctx = any.clone();
    let plan = chain.plan(&ctx);
    assert_eq!(level(&plan.verdict), TlsLevel::Verify, "unauthenticated: still forced");
    assert_eq!(plan.decider, Decider::Policy("forced".into()));
    ctx.authenticated = true;
    let plan = chain.plan(&ctx);
    assert_eq!(level(&plan.verdict), TlsLevel::May);
    assert_eq!(plan.decider, Decider::TlsRequiredNo(Box::new(Decider::Policy("forced".into()))));
    assert_eq!(plan.decider.to_string(), "tls-required-no(over forced)");
    let response = chain.on_failure(&plan, &ctx, &Failure::StarttlsNotOffered);
    assert_eq!(response.action, Action::ContinuePlaintext);
    assert_eq!(chain.counters().tls_required_no_relaxed.load(Relaxed), 1);
    assert_eq!(chain.counters().tls_required_no_ignored.load(Relaxed), 1);
    // REQUIRETLS wins over the header.
    ctx.requiretls = true;
    assert_eq!(level(&chain.plan(&ctx).verdict), TlsLevel::Verify);

    let toml = format!("[policy_engine]\ntls_required_no = \"any\"\n{FORCED_THEN_OPPORTUNISTIC}");
    let (chain, _engine, _dir) = chains::load(&toml).unwrap();
    assert_eq!(level(&chain.plan(&any).verdict), TlsLevel::May);
}

/// The old boolean key is refused with the name of the new one (silently mapping `true` would
/// keep the hole open on upgrade).
#[test]
fn the_old_honor_tls_required_no_key_names_its_replacement() {
    let toml =
        format!("[policy_engine]\nhonor_tls_required_no = true\n{FORCED_THEN_OPPORTUNISTIC}");
    let error = chains::load(&toml).unwrap_err().to_string();
    assert!(error.contains("policy_engine.tls_required_no"), "{error}");
}

fn broken(mode: &str) -> String {
    format!(
        r#"
[[policy]]
name = "broken"
path = "{{wasm:broken-policy}}"
deadline_ms = 20
memory_limit_mib = 16
settings = {{ mode = "{mode}" }}

[[policy]]
name = "opportunistic"
path = "{{wasm:opportunistic}}"
"#
    )
}

/// Each fault must defer with 4.7.0 naming the policy, never fall through to the next
/// (opportunistic) policy, and leave the engine usable.
#[test]
fn faulty_policies_fail_closed_and_the_relay_keeps_working() {
    let cases = [
        ("trap", "trapped"),
        ("loop", "exceeded its deadline of 20ms"),
        ("memory", "exceeded its memory limit of 16777216 bytes"),
        ("bad-name", "returned an invalid answer: match name \"not a name!\""),
    ];
    for (mode, expected) in cases {
        let (chain, _engine, _dir) = chains::load(&broken(mode)).unwrap();
        for attempt in 0..2 {
            let plan = chain.plan(&ctx("example.org"));
            match &plan.verdict {
                Verdict::Defer { code, reason } => {
                    assert_eq!(code, "4.7.0", "{mode}");
                    assert!(
                        reason.starts_with("policy `broken` ") && reason.contains(expected),
                        "{mode}: {reason}"
                    );
                }
                other => panic!("{mode} attempt {attempt}: expected defer, got {other:?}"),
            }
        }
        let broken = &chain.policies()[0];
        assert_eq!(broken.stats().faults.load(std::sync::atomic::Ordering::Relaxed), 2, "{mode}");
        assert_eq!(chain.counters().faults.load(std::sync::atomic::Ordering::Relaxed), 2, "{mode}");
        // The other policy, on the same engine, still answers.
        let (result, _) = chain.policies()[1].plan(&ctx("example.org"));
        assert_eq!(
            result,
            Ok(postwarden::policy::Decision::Require(Requirement::new(TlsLevel::May))),
            "{mode}"
        );
    }
}

#[test]
fn invalid_failure_actions_defer() {
    let (chain, _engine, _dir) = chains::load(&broken("forced-plaintext")).unwrap();
    let plan = chain.plan(&ctx("example.org"));
    assert_eq!(level(&plan.verdict), TlsLevel::Encrypt);
    let response = chain.on_failure(&plan, &ctx("example.org"), &Failure::StarttlsNotOffered);
    match response.action {
        Action::Defer { code, reason } => {
            assert_eq!(code, "4.7.0");
            assert!(
                reason.contains("reconnect-plaintext under a forced requirement (encrypt)"),
                "{reason}"
            );
        }
        other => panic!("forced policy fell back to plaintext: {other}"),
    }

    let (chain, _engine, _dir) = chains::load(&broken("continue-after-handshake")).unwrap();
    let plan = chain.plan(&ctx("example.org"));
    assert_eq!(
        chain.on_failure(&plan, &ctx("example.org"), &Failure::StarttlsNotOffered).action,
        Action::ContinuePlaintext
    );
    let response =
        chain.on_failure(&plan, &ctx("example.org"), &Failure::HandshakeFailed("x".into()));
    assert!(
        matches!(&response.action, Action::Defer { reason, .. } if reason.contains("continue-plaintext after handshake-failed")),
        "{}",
        response.action
    );
}

#[test]
fn configure_error_stops_loading_with_the_policy_named() {
    let err = chains::load(&broken("configure-error")).err().unwrap();
    let err = err.downcast::<LoadError>().unwrap();
    assert!(
        matches!(&err, LoadError::Configure { name, fault: PolicyFault::Configure(_) } if name == "broken"),
        "{err}"
    );
    assert!(
        err.to_string().contains("mode `configure-error` refuses every configuration"),
        "{err}"
    );

    let looping =
        broken("configure-loop").replace("deadline_ms = 20", "configure_deadline_ms = 50");
    let err = chains::load(&looping).err().unwrap().to_string();
    assert!(err.contains("policy `broken`: exceeded its deadline of 50ms"), "{err}");

    let bad_settings = r#"
[[policy]]
name = "forced"
path = "{wasm:forced-tls}"
settings = { domain = { "a.example" = "verify" } }
"#;
    let err = chains::load(bad_settings).err().unwrap().to_string();
    assert!(err.contains("policy `forced`") && err.contains("unknown field `domain`"), "{err}");
}

/// Issue 10 item 6: the host table lives outside the guest's memory caps, so it has a cap of its
/// own. A `configure` inside its 256 MiB cap that `table-put`s 7 × 100 MiB used to leave the
/// relay at 723 MiB RSS; now the load fails, naming the figures, and nothing is kept.
#[test]
fn a_policy_cannot_keep_more_than_its_table_limit_in_the_host() {
    // Debug builds copy 700 MiB slowly; the deadline is not what this test is about.
    let flood = broken("table-flood").replace("deadline_ms = 20", "configure_deadline_ms = 60000");
    let err = chains::load(&flood).err().unwrap();
    let err = err.downcast::<LoadError>().unwrap();
    let LoadError::Configure { name, fault: PolicyFault::TableLimit { wanted, limit } } = &err
    else {
        panic!("expected a table-limit fault, got {err}");
    };
    assert_eq!((name.as_str(), *limit), ("broken", 64 << 20));
    assert!(*wanted >= 7 * (100 << 20), "{wanted}");
    let text = err.to_string();
    assert!(
        text.contains("policy `broken`")
            && text.contains(&format!("tried to keep {wanted} bytes"))
            && text.contains("more than its limit of 67108864 bytes (table_limit_mib)"),
        "{text}"
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned));
    eprintln!("after the refused load: {}", rss.unwrap_or_default());

    // The limit is a setting; the same policy within it loads (and the default fits a
    // well-behaved policy).
    let (chain, _engine, _dir) = chains::load(&broken("fine")).unwrap();
    assert_eq!(chain.policies().len(), 2);
    let tight = broken("table-flood")
        .replace("deadline_ms = 20", "configure_deadline_ms = 60000\ntable_limit_mib = 1");
    let err = chains::load(&tight).err().unwrap().to_string();
    assert!(err.contains("more than its limit of 1048576 bytes"), "{err}");

    // What a large legitimate table costs: 100,000 forced-tls domains, well within the default.
    let domains: Vec<String> =
        (0..100_000).map(|i| format!("\"d{i}.example\" = \"verify\"")).collect();
    let large = format!(
        "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\nconfigure_deadline_ms = 60000\n\
         table_limit_mib = 1\n[policy.settings.domains]\n{}\n",
        domains.join("\n")
    );
    let err = chains::load(&large).err().unwrap().downcast::<LoadError>().unwrap();
    let LoadError::Configure { fault: PolicyFault::TableLimit { wanted, .. }, .. } = &err else {
        panic!("expected a table-limit fault, got {err}");
    };
    eprintln!("100,000 forced-tls domains: {wanted} bytes of table");
    assert!(*wanted < 10 << 20, "{wanted}");
    assert!(chains::load(&large.replace("table_limit_mib = 1\n", "")).is_ok());
}

#[test]
fn wasi_is_denied_by_default() {
    let (chain, _engine, _dir) = chains::load(&broken("escape")).unwrap();
    let (decision, logs) = chain.policies()[0].plan(&ctx("example.org"));
    assert_eq!(
        decision,
        Ok(postwarden::policy::Decision::Require(Requirement::new(TlsLevel::Encrypt))),
        "the guest reached something: {logs:?}"
    );
    let logs = logs.join("\n");
    for expected in [
        "file read denied",
        "directory listing denied",
        "socket denied",
        "stdio: stdout is captured",
    ] {
        assert!(logs.contains(expected), "missing `{expected}` in:\n{logs}");
    }
}

#[test]
fn wrong_world_is_rejected_naming_the_missing_export() {
    let engine = PolicyEngine::new(&Default::default()).unwrap();
    let wrong = br#"(component
        (core module $m (func (export "f") (result i32) i32.const 1))
        (core instance $i (instantiate $m))
        (func (export "plan") (result u32) (canon lift (core func $i "f")))
    )"#;
    let err = engine.check("wrong", wrong).unwrap_err().to_string();
    assert!(err.contains("policy `wrong`") && err.contains("missing export `configure`"), "{err}");
    assert!(err.contains("the component exports: plan"), "{err}");

    let core = b"\0asm\x01\0\0\0";
    let err = engine.check("core", core).unwrap_err().to_string();
    assert!(err.contains("missing export `configure` (the component exports: nothing)"), "{err}");

    let garbage = b"definitely not wasm";
    let err = engine.check("garbage", garbage).unwrap_err().to_string();
    assert!(err.contains("policy `garbage`: not a valid WebAssembly component"), "{err}");
}

#[test]
fn a_second_start_loads_compiled_code_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(wasm::policy("forced-tls")).unwrap();
    let options = postwarden::policy::EngineOptions {
        cache_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let first = PolicyEngine::new(&options).unwrap().check("forced", &bytes).unwrap();
    assert_eq!(first.source, CompileSource::Compiled);
    let second = PolicyEngine::new(&options).unwrap().check("forced", &bytes).unwrap();
    assert_eq!(second.source, CompileSource::Cache);
    assert!(second.load_time < first.load_time);

    // A corrupt cache entry is ignored and replaced, never trusted.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let third = PolicyEngine::new(&options).unwrap().check("forced", &bytes).unwrap();
    assert_eq!(third.source, CompileSource::Compiled);
}

#[test]
fn sha256_pin_mismatch_is_refused() {
    let toml = r#"
[[policy]]
name = "forced"
path = "{wasm:forced-tls}"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;
    let err = chains::load(toml).err().unwrap().to_string();
    assert!(err.contains("policy `forced`") && err.contains("but the config pins 0000"), "{err}");
}

/// The relay calls policies from its Tokio tasks; a guest that imports WASI must work there too
/// (wasmtime-wasi's synchronous bindings would otherwise try to start a runtime inside one).
#[tokio::test(flavor = "current_thread")]
async fn wasi_guests_work_inside_the_relays_runtime() {
    let (chain, _engine, _dir) = chains::load(&broken("escape")).unwrap();
    let (decision, logs) = chain.policies()[0].plan(&ctx("example.org"));
    assert_eq!(
        decision,
        Ok(postwarden::policy::Decision::Require(Requirement::new(TlsLevel::Encrypt))),
        "{logs:?}"
    );
    let (chain, _engine, _dir) = chains::load(&broken("trap")).unwrap();
    let plan = chain.plan(&ctx("example.org"));
    assert!(matches!(plan.verdict, Verdict::Defer { .. }), "{plan:?}");
}

/// SIGHUP semantics: a reload that fails (here: `configure` rejects the settings) keeps the
/// running chain; a good one replaces it.
#[test]
fn a_failed_reload_keeps_the_running_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, engine) = chains::load_in(FORCED_THEN_OPPORTUNISTIC, dir.path()).unwrap();
    let handle = postwarden::policy::ChainHandle::new(chain);
    let bad = chains::config_in(
        "[[policy]]\nname = \"forced\"\npath = \"{wasm:forced-tls}\"\nsettings = { domains = { \"a.example\" = \"may\" } }\n",
        dir.path(),
    )
    .unwrap();
    let err = handle.reload(&engine, &bad).unwrap_err().to_string();
    assert!(err.contains("policy `forced`") && err.contains("level `may`"), "{err}");
    assert_eq!(
        level(&handle.current().plan(&ctx("bank.example")).verdict),
        TlsLevel::Verify,
        "old chain kept"
    );

    let good = chains::config_in(
        "[[policy]]\nname = \"forced\"\npath = \"{wasm:forced-tls}\"\nsettings = { domains = { \"bank.example\" = \"encrypt\" } }\n",
        dir.path(),
    )
    .unwrap();
    handle.reload(&engine, &good).unwrap();
    assert_eq!(level(&handle.current().plan(&ctx("bank.example")).verdict), TlsLevel::Encrypt);
}

/// The `facts` imports reach a 0.2 guest with the values of the attempt being decided, and a
/// precondition failure found from them (here `dane-required`) reaches its `on-failure` as its
/// own class. The `facts` mode of the fixture decides from them.
#[test]
fn facts_reach_the_guest_for_the_attempt_being_decided() {
    use std::sync::Arc;

    use postwarden::policy::TlsBasis;
    use postwarden::policy::facts::{
        DaneStatus, DnssecStatus, Facts, StsMode, StsPolicy, StsStatus, TlsaRecord,
    };

    let (chain, _engine, _dir) = chains::load(&broken("facts")).unwrap();
    let requirement = |facts: Facts| {
        let mut c = ctx("facts.example");
        c.facts = Arc::new(facts);
        match chain.plan(&c).verdict {
            Verdict::Require(r) => (r.level, r.basis),
            Verdict::Defer { code, reason } => panic!("defer {code} {reason}"),
        }
    };
    // Not looked up: what the relay answers today.
    assert_eq!(requirement(Facts::default()), (TlsLevel::Encrypt, TlsBasis::Local));
    let dane_ee = TlsaRecord { usage: 3, selector: 1, matching: 1, data: vec![7; 32] };
    let secure = Facts {
        mx_dnssec: DnssecStatus::Secure,
        host_dnssec: DnssecStatus::Secure,
        dane: DaneStatus::Usable(vec![dane_ee]),
        ..Facts::default()
    };
    assert_eq!(requirement(secure), (TlsLevel::Dane, TlsBasis::Dane));
    let sts = |mx_matches| Facts {
        sts: StsStatus::Policy(StsPolicy {
            id: "20261203".into(),
            mode: StsMode::Enforce,
            mx: vec!["mx.facts.example".into()],
            max_age: 604_800,
            fetched_at: 0,
            mx_matches,
            refresh_error: None,
        }),
        ..Facts::default()
    };
    assert_eq!(requirement(sts(true)), (TlsLevel::Verify, TlsBasis::Sts));
    assert_eq!(requirement(sts(false)), (TlsLevel::Verify, TlsBasis::Sts));

    // `dane` without usable records: the host's precondition names the class, and the
    // policy's `on-failure` sees that very class.
    let c = ctx("facts.example");
    let dane = Requirement { basis: TlsBasis::Dane, ..Requirement::new(TlsLevel::Dane) };
    let failure = c.facts.precondition(&dane).unwrap();
    assert_eq!(failure.class(), "dane-required");
    let mut with_facts = c.clone();
    with_facts.facts = Arc::new(Facts {
        dane: DaneStatus::Usable(vec![TlsaRecord {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![7; 32],
        }]),
        ..Facts::default()
    });
    let plan = chain.plan(&with_facts);
    let response = chain.on_failure(&plan, &with_facts, &failure);
    match response.action {
        Action::Defer { code, reason } => {
            assert_eq!(code, "4.7.5");
            assert_eq!(reason, "facts policy saw dane-required");
        }
        other => panic!("expected the policy's deferral, got {other}"),
    }
}
