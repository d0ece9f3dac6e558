//! Policy decision latency: fresh instance + call through the real engine, against the same
//! logic compiled natively; and policy load time, cold and from the cache.
//!
//! Run: `cargo bench -p postwarden-tests --bench policy_decision`. Prints p50/p99 per case.
//! Targets (issue 2): opportunistic p50 ≤ 5 µs; forced-tls with 100,000 domains p50 ≤ 10 µs.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use postwarden::policy::{
    self, Context, Decision, EngineOptions, LoadedPolicy, MemoryKv, PolicyEngine, PolicySource,
    Verdict,
};
use postwarden_policy_sdk::Policy as _;
use postwarden_policy_sdk::testing::{FakeHost, context};
use postwarden_tests::{chains, wasm};

mod common;
use common::{fmt, per_call, quantile};

fn samples() -> usize {
    std::env::var("PW_SAMPLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

fn main() {
    println!("{:<58} {:>10} {:>10}", "case", "p50", "p99");
    decisions();
    if std::env::var("PW_QUICK").is_ok() {
        return;
    }
    chain_with_100k_domains();
    load_times();
}

/// One `plan` call, checked: a fault (deadline, trap) must not pass for a fast decision.
fn checked_plan(policy: &LoadedPolicy, ctx: &Context, abstains: bool) -> Decision {
    match policy.plan(ctx).0 {
        Ok(decision) => {
            assert_eq!(matches!(decision, Decision::Abstain), abstains, "{decision:?}");
            decision
        }
        Err(fault) => panic!("plan faulted: {fault}"),
    }
}

fn decisions() {
    let engine = PolicyEngine::new(&EngineOptions::default()).unwrap();
    let source = |name: &str, settings: &str| PolicySource {
        name: name.to_owned(),
        bytes: std::fs::read(wasm::policy(name)).unwrap(),
        settings: settings.to_owned(),
        limits: policy::Limits::default(),
    };
    let kv = || std::sync::Arc::new(MemoryKv::default());
    let (opportunistic, _) = engine.load(&source("opportunistic", "{}"), kv()).unwrap();
    let ctx = Context::new("example.org", "mx.example.org");
    report(
        "opportunistic: wasm, fresh instance + plan",
        per_call(samples(), || black_box(checked_plan(&opportunistic, &ctx, false))),
    );
    report(
        "opportunistic: wasm, fresh instance, no call",
        per_call(samples(), || black_box(opportunistic.instantiate_only())),
    );

    let host = FakeHost::default();
    let native_ctx = context("example.org");
    report(
        "opportunistic: native Rust plan",
        batched(|| black_box(opportunistic::Opportunistic::plan(black_box(&native_ctx), &host))),
    );
}

fn chain_with_100k_domains() {
    let mut domains = String::new();
    for i in 0..100_000 {
        domains.push_str(&format!("\"d{i}.example\" = \"verify\"\n"));
    }
    let toml = format!(
        "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n{domains}"
    );
    let started = Instant::now();
    let (chain, _engine, _dir) = chains::load(&toml).unwrap();
    println!("{:<58} {:>10}", "forced-tls 100k: load + configure (once)", fmt(started.elapsed()));

    let hit = Context::new("d54321.example", "mx.d54321.example");
    let miss = Context::new("mx.sub.other.example", "mx.other.example");
    let policy = &chain.policies()[0];
    report(
        "forced-tls 100k: wasm, fresh instance + plan (listed)",
        per_call(samples(), || black_box(checked_plan(policy, &hit, false))),
    );
    report(
        "forced-tls 100k: wasm, fresh instance + plan (unlisted)",
        per_call(samples(), || black_box(checked_plan(policy, &miss, true))),
    );
    report(
        "forced-tls 100k: whole chain plan (listed)",
        per_call(samples(), || {
            let plan = chain.plan(&hit);
            assert!(matches!(plan.verdict, Verdict::Require(_)), "{:?}", plan.verdict);
            black_box(plan)
        }),
    );

    let settings = format!(
        "{{\"domains\": {{{}}}}}",
        (0..100_000).map(|i| format!("\"d{i}.example\": \"verify\"")).collect::<Vec<_>>().join(",")
    );
    let host = FakeHost::configured::<forced_tls::ForcedTls>(&settings).unwrap();
    let native_hit = context("d54321.example");
    report(
        "forced-tls 100k: native Rust plan (listed)",
        batched(|| black_box(forced_tls::ForcedTls::plan(black_box(&native_hit), &host))),
    );
}

fn load_times() {
    for name in ["opportunistic", "forced-tls", "postfix-map", "tofu"] {
        let bytes = std::fs::read(wasm::policy(name)).unwrap();
        let mut cold = Vec::new();
        let mut cached = Vec::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let options =
                EngineOptions { cache_dir: Some(dir.path().to_owned()), ..Default::default() };
            let info = PolicyEngine::new(&options).unwrap().check(name, &bytes).unwrap();
            cold.push(info.load_time);
            let info = PolicyEngine::new(&options).unwrap().check(name, &bytes).unwrap();
            assert_eq!(info.source, policy::CompileSource::Cache);
            cached.push(info.load_time);
        }
        cold.sort();
        cached.sort();
        println!(
            "{:<58} {:>10} {:>10}",
            format!("{name}: compile cold / from cache ({} bytes)", bytes.len()),
            fmt(cold[2]),
            fmt(cached[2])
        );
    }
}

/// For nanosecond-scale calls: the mean of batches of 1,000, one sample per batch.
fn batched<R>(mut f: impl FnMut() -> R) -> Vec<Duration> {
    (0..2_000)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..1_000 {
                f();
            }
            t.elapsed() / 1_000
        })
        .collect()
}

fn report(name: &str, samples: Vec<Duration>) {
    println!(
        "{name:<58} {:>10} {:>10}",
        fmt(quantile(&samples, 0.50)),
        fmt(quantile(&samples, 0.99))
    );
}
