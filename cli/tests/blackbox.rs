//! Black-box conformance: the `postwarden` binary, configured like any MTA to use the
//! simulator's DNS, port and CA, judged only from what reaches the fake servers over SMTP.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postwarden_conformance::expect::Expectations;
use postwarden_conformance::external::run_external;
use postwarden_conformance::report;
use postwarden_sim::{Fleet, FleetOptions};
use postwarden_tests::wasm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_binary_passes_the_catalogue_over_smtp() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(FleetOptions {
        ca_dir: Some(dir.path().to_owned()),
        ca: Some(postwarden_tests::sim::ca().unwrap()),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let relay_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = format!(
        r#"
[policy_engine]
cache_dir = "cache"
state_dir = "state"

[[policy]]
name = "forced"
path = "{forced}"
[policy.settings.domains]
".sim.test" = "encrypt"

[delivery]
port = {mx_port}
dns_servers = ["{dns}"]
mx_shuffle_seed = 1
[delivery.timeouts]
connect = 2
greeting = 2
command = 2
tls_handshake = 2
data_init = 2
data_block = 2
final_dot = 2

[tls]
webpki_roots = false
ca_files = ["{ca}"]

[queue]
dir = "spool"
min_backoff = 3600
concurrency = 64

[inbound]
listen = "{relay_addr}"

[admin]
listen = "{admin_addr}"
"#,
        forced = wasm::policy("forced-tls").display(),
        mx_port = fleet.port(),
        dns = fleet.dns_addr(),
        ca = fleet.ca_file().unwrap().display(),
    );
    let config_path = dir.path().join("relay.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut relay = Command::new(env!("CARGO_BIN_EXE_postwarden"))
        .args(["run", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(relay_addr).await.is_err() {
        assert!(Instant::now() < deadline, "the relay did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let expectations = Expectations::parse("default = \"forced\"\n").unwrap();
    let outcome = run_external(
        &fleet,
        relay_addr,
        &expectations,
        Duration::from_secs(15),
        "postwarden (black box)",
        Some(admin_addr),
    )
    .await;
    relay.kill().unwrap();
    let _ = relay.wait();
    let report = outcome.unwrap();
    let table = report::table(&report);
    eprintln!("{}", table.lines().last().unwrap_or_default());
    assert!(report.results.len() >= 100);
    assert_eq!(report.failures(), 0, "{table}");
    // The black box saw real TLS deliveries and real bounces (DSNs back at the sender).
    let tls = table.lines().filter(|l| l.contains(" TLS ") && l.ends_with("ok")).count();
    let bounced = table.lines().filter(|l| l.contains("BOUNCE") && l.ends_with("ok")).count();
    assert!(tls > 30 && bounced >= 4, "tls {tls}, bounced {bounced}:\n{table}");
    // I9 from outside: the relay's delivered count was read and compared.
    assert!(table.lines().any(|l| l.starts_with("I9 ") && l.ends_with("ok")), "{table}");
}
