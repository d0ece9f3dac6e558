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

/// PEM text of one DER object.
fn pem(label: &str, der: &[u8]) -> String {
    let text = postwarden_tests::submit::base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}

/// Mutual TLS in the probe: a server that requires a client certificate (HS-09) passes the
/// probe when the chain's requirement names a configured identity (`[tls.client_identities]`
/// read from PEM files), and fails it, saying so, when it names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_presents_the_client_identity_the_policy_names() {
    let (fleet, _deliverer) = sim::fleet(&["HS-09"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), fleet.ca_pem()).unwrap();
    let client = fleet.ca().client_identity("relay.postwarden.test").unwrap();
    let chain_pem: String = client.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    std::fs::write(dir.path().join("client.pem"), chain_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), pem("PRIVATE KEY", client.key.secret_der()))
        .unwrap();
    let probe = |entry: &str| {
        let toml = format!(
            "[[policy]]\nname = \"forced\"\npath = \"{{wasm:forced-tls}}\"\n[policy.settings.domains]\n\"hs-09.sim.test\" = {entry}\n\
             [delivery]\nport = {}\ndns_servers = [\"{}\"]\n[delivery.timeouts]\nconnect = 2\ngreeting = 2\ncommand = 2\ntls_handshake = 2\n\
             [tls]\nwebpki_roots = false\nca_files = [\"ca.pem\"]\n\
             [tls.client_identities.partner]\ncert = \"client.pem\"\nkey = \"client.key\"\n",
            fleet.port(),
            fleet.dns_addr(),
        );
        let config = chains::config_in(&toml, dir.path()).unwrap();
        async move {
            let engine = policy::engine_from_config(&config).unwrap();
            let chain = policy::load_chain(&engine, &config, StateMode::Snapshot).unwrap();
            postwarden::probe::probe(&config, &chain, "hs-09.sim.test").await.unwrap()
        }
    };

    let (report, ok) = probe("{ level = \"verify\", client_identity = \"partner\" }").await;
    assert!(ok, "{report}");
    assert!(report.contains("client cert:  partner"), "{report}");
    assert!(report.contains("verify (MX name) ok"), "{report}");

    let (report, ok) = probe("\"verify\"").await;
    assert!(!ok, "{report}");
    assert!(!report.contains("client cert:"), "{report}");
    assert!(report.contains("CertificateRequired"), "{report}");
}
