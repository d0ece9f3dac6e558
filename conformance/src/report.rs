//! Reports: a table for people, JUnit XML for CI systems.

use std::fmt::Write as _;

use crate::{Report, ScenarioResult};

/// The table: one line per scenario, then the failures in full and a summary line.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "policy: {}", report.name);
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<26} {:<14} {:<22} result",
        "scenario", "domain", "decision", "expected", "observed"
    );
    for r in &report.results {
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:<26} {:<14} {:<22} {}",
            r.id,
            r.domain,
            truncate(&r.decision, 26),
            truncate(&r.expected, 14),
            truncate(&observed(r), 22),
            if r.passed() { "ok" } else { "FAIL" }
        );
    }
    for r in report.results.iter().filter(|r| !r.passed()) {
        let _ = writeln!(out, "\nFAIL {} ({}): {}", r.id, r.domain, r.description);
        let _ = writeln!(out, "  decision: {}   tls log: {}", r.decision, r.tls_log);
        for problem in &r.problems {
            let _ = writeln!(out, "  - {problem}");
        }
    }
    let passed = report.results.len() - report.failures();
    let _ = writeln!(
        out,
        "\n{}: {passed} passed, {} failed ({:.1} s)",
        report.name,
        report.failures(),
        report.elapsed.as_secs_f64()
    );
    out
}

/// JUnit XML, one test case per scenario.
pub fn junit(reports: &[Report]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for report in reports {
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{:.3}\">",
            xml(&report.name),
            report.results.len(),
            report.failures(),
            report.elapsed.as_secs_f64()
        );
        for r in &report.results {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{} {}\" time=\"{:.3}\"",
                xml(&report.name),
                xml(&r.id),
                xml(&r.description),
                r.elapsed.as_secs_f64()
            );
            if r.passed() {
                out.push_str("/>\n");
            } else {
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                    xml(r.problems.first().map_or("", String::as_str)),
                    xml(&r.problems.join("\n"))
                );
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

fn observed(r: &ScenarioResult) -> String {
    let mut words: Vec<String> = r.observed.iter().map(|(_, o)| o.to_string()).collect();
    words.dedup();
    words.join(",")
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
