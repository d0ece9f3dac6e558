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
# Fewer slots than EOD-07's backlog of 20: a relay whose stuck deliveries held their slots
# would make the healthy CAP-01 wait for them, and fail EOD-07's fairness row.
concurrency = 16

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
        .stderr(std::fs::File::create(dir.path().join("relay.log")).unwrap())
        .env_remove("NO_COLOR")
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

    // The log, written to a file: no colour codes (those are for a terminal), and the delivery
    // line names the cipher of the session that took the message (issue 17 item 6).
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap();
    assert!(!log.contains('\x1b'), "colour codes in a log file");
    let delivered = log.lines().find(|l| {
        l.contains("delivery attempt") && l.contains("cap-01.sim.test") && l.contains("tls1.3")
    });
    let delivered = delivered.unwrap_or_else(|| panic!("no TLS delivery line in:\n{log}"));
    assert!(delivered.contains("cipher=TLS13_"), "{delivered}");
}

/// A "relay" that answers 250 to everything and delivers nothing.
async fn black_hole() -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 black hole\r\n").await?;
                let mut in_data = false;
                while let Some(line) = lines.next_line().await? {
                    let reply: &[u8] = match (in_data, line.to_ascii_uppercase().as_str()) {
                        (true, ".") => {
                            in_data = false;
                            b"250 queued\r\n"
                        }
                        (true, _) => continue,
                        (false, "DATA") => {
                            in_data = true;
                            b"354 go on\r\n"
                        }
                        (false, "QUIT") => b"221 bye\r\n",
                        _ => b"250 ok\r\n",
                    };
                    write.write_all(reply).await?;
                }
                std::io::Result::Ok(())
            });
        }
    });
    addr
}

/// A relay that accepts mail and never connects anywhere no longer passes the deferral rows:
/// "nothing arrived" counts as DEFER only when the relay was seen connecting to the MX hosts
/// (or none listens, GRT-01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_never_connects_fails_the_deferral_rows() {
    let fleet = Fleet::start(FleetOptions {
        scenarios: Some(["CAP-01", "CAP-02", "GRT-01", "GRT-02"].map(str::to_owned).to_vec()),
        ca: Some(postwarden_tests::sim::ca().unwrap()),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let relay = black_hole().await;
    let expectations = Expectations::parse("default = \"forced\"\n").unwrap();
    let report =
        run_external(&fleet, relay, &expectations, Duration::from_millis(500), "black hole", None)
            .await
            .unwrap();
    let problems = |id: &str| {
        report.results.iter().find(|r| r.id == id).map(|r| r.problems.join("; ")).unwrap()
    };
    for id in ["CAP-02", "GRT-02"] {
        assert!(problems(id).contains("no evidence of a deferral"), "{id}: {}", problems(id));
    }
    assert_eq!(problems("GRT-01"), "", "nothing listens there: nothing to connect to");
}

/// The black box checks which MX host accepted: a relay that does not verify certificates
/// (here ours at `encrypt`) delivers MX-03 to its self-signed mx1, which fails the verify
/// column (mx2, the valid one, must get it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_to_the_wrong_mx_fails_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(FleetOptions {
        scenarios: Some(["CAP-01", "MX-03"].map(str::to_owned).to_vec()),
        ca_dir: Some(dir.path().to_owned()),
        ca: Some(postwarden_tests::sim::ca().unwrap()),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let toml = format!(
        "[policy_engine]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n\
         [[policy]]\nname = \"forced\"\npath = \"{forced}\"\n[policy.settings.domains]\n\".sim.test\" = \"encrypt\"\n\
         [delivery]\nport = {port}\ndns_servers = [\"{dns}\"]\n\
         [tls]\nwebpki_roots = false\nca_files = [\"{ca}\"]\n\
         [queue]\ndir = \"spool\"\nmin_backoff = 3600\n[inbound]\nlisten = \"127.0.0.1:0\"\n",
        forced = wasm::policy("forced-tls").display(),
        port = fleet.port(),
        dns = fleet.dns_addr(),
        ca = fleet.ca_file().unwrap().display(),
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).unwrap();
    let config = postwarden::config::Config::load(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = postwarden::service::Relay::start(&config, listener).await.unwrap();
    let expectations = Expectations::parse("default = \"forced-verify\"\n").unwrap();
    let report = run_external(
        &fleet,
        relay.smtp_addr,
        &expectations,
        Duration::from_secs(10),
        "encrypt",
        None,
    )
    .await
    .unwrap();
    relay.shutdown(Duration::from_secs(5)).await;
    let mx03 = report.results.iter().find(|r| r.id == "MX-03").unwrap();
    assert!(
        mx03.problems.iter().any(|p| p.contains("expected delivery via mx2, got mx1.")),
        "{mx03:?}"
    );
}
