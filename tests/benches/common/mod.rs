//! What both benchmark binaries measure with: per-call latency samples, quantiles, and
//! human-readable durations.

use std::time::{Duration, Instant};

/// Latency of each of `samples` calls, after a warm-up of a tenth as many.
pub fn per_call<R>(samples: usize, mut f: impl FnMut() -> R) -> Vec<Duration> {
    for _ in 0..samples / 10 {
        f();
    }
    (0..samples)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

/// The `q` quantile (0.5 = median) of `samples`.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// A duration in ns, µs or ms, whichever reads best.
pub fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{:.1} ms", ns as f64 / 1e6)
    }
}
