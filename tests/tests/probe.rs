//! `postwarden probe`: the pre-flight check before forcing TLS, against the simulator.

#![allow(clippy::unwrap_used)]

use postwarden::policy::{self, StateMode};
use postwarden_tests::{chains, sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_each_mx_and_a_verdict() {
    let (fleet, _deliverer) = sim::fleet(&["CAP-01", "CAP-02", "CERT-03"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, fleet.ca_pem()).unwrap();
    let toml = format!(
        "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n\".sim.test\" = \"verify\"\n\
         [delivery]\nport = {}\ndns_servers = [\"{}\"]\n[delivery.timeouts]\nconnect = 2\ngreeting = 2\ncommand = 2\ntls_handshake = 2\n\
         [tls]\nwebpki_roots = false\nca_files = [\"{}\"]\n",
        fleet.port(),
        fleet.dns_addr(),
        ca.display()
    );
    let config = chains::config_in(&toml, dir.path()).unwrap();
    let engine = policy::engine_from_config(&config).unwrap();
    let chain = policy::load_chain(&engine, &config, StateMode::Snapshot).unwrap();

    let (report, ok) = postwarden::probe::probe(&config, &chain, "cap-01.sim.test").await.unwrap();
    assert!(ok, "{report}");
    assert!(report.contains("STARTTLS:     offered") && report.contains("TLSv1.3"), "{report}");
    assert!(report.contains("names: mx1.cap-01.sim.test"), "{report}");
    assert!(report.contains("policy:       forced decides verify"), "{report}");
    assert!(report.contains("forced TLS (verify) would succeed: yes"), "{report}");

    let (report, ok) = postwarden::probe::probe(&config, &chain, "cert-03.sim.test").await.unwrap();
    assert!(!ok, "{report}");
    assert!(
        report.contains("would succeed: no, because mx1.cert-03.sim.test: certificate-untrusted"),
        "{report}"
    );

    let (report, ok) = postwarden::probe::probe(&config, &chain, "cap-02.sim.test").await.unwrap();
    assert!(!ok, "{report}");
    assert!(
        report.contains("STARTTLS:     NOT offered") && report.contains("STARTTLS refused: 502"),
        "{report}"
    );
}
