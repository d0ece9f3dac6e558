//! The `partner` policy in Rust, Python, JavaScript and WAT: component size, compile time cold
//! and from the cache, a restart (load from the cache + `configure`), and decision latency
//! (fresh instance + call, the relay's execution model) with the relay's default limits.
//!
//! Run: `./scripts/polyglot-tools.sh && cargo bench -p postwarden-tests --bench polyglot`.
//! `PW_SAMPLES` sets the number of decisions per case (default 20,000 for compiled guests and
//! 2,000 for interpreted ones); `PW_LANGS=python,js` runs only those.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postwarden::policy::{
    self, CompileSource, Context, EngineOptions, Failure, MemoryKv, PolicyEngine, PolicySource,
};
use postwarden_tests::polyglot::{self, Lang};

mod common;
use common::{fmt, per_call, quantile};

const SETTINGS: &str =
    r#"{"verify": ["bank.example", ".bank.example"], "encrypt": ["partner.example"]}"#;

fn main() {
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}",
        "lang", "size", "cold", "cached", "restart", "plan p50", "plan p99", "fail p50", "fail p99"
    );
    let only = std::env::var("PW_LANGS").unwrap_or_default();
    for lang in Lang::ALL {
        if !only.is_empty() && !only.split(',').any(|l| l == lang.name()) {
            continue;
        }
        let path = polyglot::partner(lang);
        let bytes = std::fs::read(&path).unwrap();
        let interpreted = matches!(lang, Lang::Python | Lang::Js);
        let (cold, cached, cache) = compile_times(lang, &bytes, if interpreted { 3 } else { 5 });

        // A relay restart: the compiled code comes from the cache, then `configure` runs.
        let options =
            EngineOptions { cache_dir: Some(cache.path().to_owned()), ..Default::default() };
        let engine = PolicyEngine::new(&options).unwrap();
        let source = PolicySource {
            name: "partner".into(),
            bytes: bytes.clone(),
            settings: SETTINGS.into(),
            limits: policy::Limits::default(),
        };
        let started = Instant::now();
        let (loaded, _) = engine.load(&source, Arc::new(MemoryKv::default())).unwrap();
        let configure = started.elapsed();

        let samples = std::env::var("PW_SAMPLES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if interpreted { 2_000 } else { 20_000 });
        let listed = Context::new("mx.bank.example", "mx1.bank.example");
        let plan = per_call(samples, || {
            let (decision, _) = loaded.plan(&listed);
            black_box(decision.unwrap());
        });
        let unlisted = Context::new("example.org", "mx.example.org");
        let failure = Failure::HandshakeFailed("alert".into());
        let on_failure = per_call(samples, || {
            let (action, _) = loaded.on_failure(&unlisted, &failure);
            black_box(action.unwrap());
        });
        println!(
            "{:<8} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}",
            lang.name(),
            size(bytes.len()),
            fmt(cold),
            fmt(cached),
            fmt(configure),
            fmt(quantile(&plan, 0.50)),
            fmt(quantile(&plan, 0.99)),
            fmt(quantile(&on_failure, 0.50)),
            fmt(quantile(&on_failure, 0.99)),
        );
    }
}

/// Median compile time into an empty cache, median load from that cache, and the last cache.
fn compile_times(lang: Lang, bytes: &[u8], runs: usize) -> (Duration, Duration, tempfile::TempDir) {
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let options =
            EngineOptions { cache_dir: Some(dir.path().to_owned()), ..Default::default() };
        let info = PolicyEngine::new(&options).unwrap().check(lang.name(), bytes).unwrap();
        assert_eq!(info.source, CompileSource::Compiled);
        cold.push(info.load_time);
        let info = PolicyEngine::new(&options).unwrap().check(lang.name(), bytes).unwrap();
        assert_eq!(info.source, CompileSource::Cache);
        cached.push(info.load_time);
        last = Some(dir);
    }
    (quantile(&cold, 0.5), quantile(&cached, 0.5), last.unwrap())
}

fn size(bytes: usize) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}
