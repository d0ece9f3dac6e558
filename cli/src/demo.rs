//! `postwarden demo`: the simulator's fleet, a relay with the bundled policies, one message per
//! scenario domain submitted over SMTP, and the table of what happened.
//!
//! Some domains are forced: certificate scenarios at `verify`, STARTTLS, handshake and
//! injection scenarios at `encrypt`; the rest are opportunistic. The table shows, per domain,
//! which policy decided which requirement, the outcome, and whether it is what the catalogue
//! expects under that policy.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use postwarden::config::Config;
use postwarden::delivery::{Fallback, Status};
use postwarden::service::Relay;
use postwarden_sim::scenario::Policy;
use postwarden_sim::server::Timing;
use postwarden_sim::{Fleet, FleetOptions, Outcome, Scenario};

/// `postwarden demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Only these scenario ids (repeatable); all by default.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Directory with the bundled policies built to wasm (default: build them with cargo).
    #[arg(long)]
    policies: Option<PathBuf>,
}

/// The requirement the demo's forced-tls settings give a scenario, if any.
fn forced_level(scenario: &Scenario) -> Option<&'static str> {
    let id = scenario.id;
    if id.starts_with("CERT-") {
        Some("verify")
    } else if id.starts_with("HS-")
        || id.starts_with("STL-")
        || id.starts_with("INJ-")
        || matches!(id, "CAP-02" | "CAP-03")
    {
        Some("encrypt")
    } else {
        None
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let policies = match args.policies {
        Some(dir) => dir,
        None => build_policies()?,
    };
    let work = tempfile::tempdir()?;
    let fleet = Fleet::start(FleetOptions {
        scenarios: (!args.scenarios.is_empty()).then_some(args.scenarios),
        timing: Timing { tarpit: Duration::from_secs(6), ..Timing::default() },
        ca_dir: Some(work.path().to_owned()),
        ..FleetOptions::default()
    })
    .await
    .context("starting the simulator fleet")?;
    // A REQUIRETLS message can only be submitted over TLS (RFC 8689 §4.1) and the demo
    // submits in plaintext: those scenarios are left to the conformance runner, and named.
    let (scenarios, requiretls): (Vec<Scenario>, Vec<Scenario>) =
        fleet.scenarios().iter().cloned().partition(|s| !s.requiretls);

    let config = config(&fleet, &scenarios, &policies, work.path())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay = Relay::start(&config, listener).await?;

    // Submit one message per scenario domain over SMTP, as an application would.
    let mut expected_rcpts = Vec::new();
    for scenario in &scenarios {
        let domain = scenario.domain();
        let locals: Vec<&str> = match scenario.expected.outcome(column(scenario)) {
            Outcome::Split(parts) => parts.iter().map(|(l, _)| *l).collect(),
            _ => vec!["user"],
        };
        let rcpts: Vec<String> = locals.iter().map(|l| format!("{l}@{domain}")).collect();
        submit(relay.smtp_addr, &rcpts, scenario)
            .await
            .with_context(|| format!("submitting to {domain}"))?;
        expected_rcpts.extend(rcpts.into_iter().map(|r| (scenario.clone(), r)));
    }

    // Wait for every recipient's first attempt.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let recent = relay.queue.recent();
        let done = expected_rcpts.iter().all(|(_, rcpt)| recent.iter().any(|a| &a.rcpt == rcpt));
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let recent = relay.queue.recent();
    let mut table = String::new();
    let mut matches = 0;
    let _ = writeln!(
        table,
        "{:<24} {:<9} {:<26} {:<24} {:<16} description",
        "domain", "scenario", "policy: requirement", "outcome", "expected"
    );
    for (scenario, rcpt) in &expected_rcpts {
        let attempt = recent.iter().find(|a| &a.rcpt == rcpt);
        let (decided, outcome, observed) = match attempt.map(|a| &a.status) {
            Some(Status::Delivered { tls, fallback, decided_by, requirement, .. }) => {
                let (word, observed) = match (tls, fallback) {
                    (Some(t), _) => (
                        format!(
                            "TLS {}{}",
                            match t.version {
                                postwarden::policy::TlsVersion::Tls13 => "1.3",
                                postwarden::policy::TlsVersion::Tls12 => "1.2",
                            },
                            if t.verified { " verified" } else { "" }
                        ),
                        Outcome::Tls,
                    ),
                    (None, Fallback::Reconnect) => {
                        ("PLAIN* (reconnect)".to_owned(), Outcome::PlainReconnect)
                    }
                    (None, _) => ("PLAIN".to_owned(), Outcome::Plain),
                };
                (format!("{decided_by}: {requirement}"), word, Some(observed))
            }
            Some(Status::Deferred { code, .. }) => {
                (planned(&relay, scenario), format!("DEFERRED {code}"), None)
            }
            Some(Status::Bounced { code, .. }) => {
                (planned(&relay, scenario), format!("BOUNCED {code}"), None)
            }
            None => (planned(&relay, scenario), "no attempt yet".to_owned(), None),
        };
        let expected = match scenario.expected.outcome(column(scenario)) {
            Outcome::Split(parts) => {
                let local = rcpt.split('@').next().unwrap_or_default();
                parts.iter().find(|(l, _)| *l == local).map_or(Outcome::DEFER, |(_, o)| *o)
            }
            other => other,
        };
        let ok = match (&observed, attempt.map(|a| &a.status)) {
            (Some(o), _) => expected.accepts(o),
            (None, Some(Status::Deferred { code, .. })) => defer_matches(&expected, code),
            (None, Some(Status::Bounced { .. })) => expected.accepts(&Outcome::Bounce),
            _ => false,
        };
        matches += usize::from(ok);
        let _ = writeln!(
            table,
            "{:<24} {:<9} {:<26} {:<24} {:<16} {}",
            rcpt.split('@').nth(1).unwrap_or_default(),
            scenario.id,
            decided,
            outcome,
            format!("{}{}", expected, if ok { "" } else { " ✗" }),
            scenario.description
        );
    }
    print!("{table}");
    if !requiretls.is_empty() {
        let ids: Vec<&str> = requiretls.iter().map(|s| s.id).collect();
        println!(
            "\nnot run here ({}): a REQUIRETLS message needs a submission over TLS; the \
             conformance runner covers them",
            ids.join(", ")
        );
    }
    println!(
        "\n{matches} of {} outcomes as the catalogue expects; {} scenarios in {:.1} s (fleet CA: {})",
        expected_rcpts.len(),
        scenarios.len(),
        started.elapsed().as_secs_f64(),
        fleet.ca_file().map_or_else(String::new, |p| p.display().to_string())
    );
    relay.shutdown(Duration::from_secs(5)).await;
    fleet.shutdown().await;
    Ok(if matches == expected_rcpts.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Whether a deferral with `code` is what `expected` allows.
fn defer_matches(expected: &Outcome, code: &str) -> bool {
    match expected {
        Outcome::Defer { code: None } => true,
        Outcome::Defer { code: Some(want) } => *want == code,
        Outcome::AnyOf(options) => options.iter().any(|o| defer_matches(o, code)),
        _ => false,
    }
}

fn column(scenario: &Scenario) -> Policy {
    match forced_level(scenario) {
        Some("verify") => Policy::ForcedVerify,
        Some(_) => Policy::Forced,
        None => Policy::Opportunistic,
    }
}

fn planned(relay: &Relay, scenario: &Scenario) -> String {
    let mx = scenario
        .mx
        .iter()
        .min_by_key(|m| m.preference)
        .map(|m| scenario.mx_host(m))
        .unwrap_or_default();
    let plan =
        relay.chains.current().plan(&postwarden::policy::Context::new(&scenario.domain(), &mx));
    match plan.requirement() {
        Some(r) => format!("{}: {r}", plan.decider),
        None => format!("{}: defer", plan.decider),
    }
}

/// The demo's configuration: forced-tls for some domains, opportunistic for the rest; DNS, port
/// and trust pointed at the fleet.
fn config(
    fleet: &Fleet,
    scenarios: &[Scenario],
    policies: &Path,
    dir: &Path,
) -> anyhow::Result<Config> {
    let mut forced = String::new();
    for scenario in scenarios {
        if let Some(level) = forced_level(scenario) {
            let _ = writeln!(forced, "\"{}\" = \"{level}\"", scenario.domain());
        }
    }
    let ca = fleet.ca_file().context("the fleet wrote no CA file")?;
    let text = format!(
        r#"
[policy_engine]
cache_dir = "cache"
state_dir = "state"

[[policy]]
name = "forced-tls"
path = "{forced_tls}"
[policy.settings.domains]
{forced}
[[policy]]
name = "opportunistic"
path = "{opportunistic}"

[delivery]
helo_name = "demo.postwarden.test"
port = {port}
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
listen = "127.0.0.1:0"
"#,
        forced_tls = policies.join("forced_tls.wasm").display(),
        opportunistic = policies.join("opportunistic.wasm").display(),
        port = fleet.port(),
        dns = fleet.dns_addr(),
        ca = ca.display(),
    );
    let path = dir.join("demo.toml");
    std::fs::write(&path, text)?;
    Ok(Config::load(&path)?)
}

/// Submits a message over SMTP to the relay, as an application on loopback would: a client
/// of its own, not the relay's outbound one (whose plaintext transactions need a permit that
/// only the policy chain's verdict can mint).
async fn submit(
    addr: std::net::SocketAddr,
    rcpts: &[String],
    scenario: &Scenario,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufStream};
    async fn reply(io: &mut BufStream<tokio::net::TcpStream>) -> anyhow::Result<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), io.read_line(&mut line));
            anyhow::ensure!(read.await.context("reply timed out")?? > 0, "eof after {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
        }
    }
    async fn command(
        io: &mut BufStream<tokio::net::TcpStream>,
        line: &str,
        code: &str,
    ) -> anyhow::Result<()> {
        io.write_all(format!("{line}\r\n").as_bytes()).await?;
        io.flush().await?;
        let reply = reply(io).await?;
        anyhow::ensure!(reply.starts_with(code), "the relay answered {line:?} with {reply:?}");
        Ok(())
    }
    let mut io = BufStream::new(tokio::net::TcpStream::connect(addr).await?);
    anyhow::ensure!(reply(&mut io).await?.starts_with("220"), "the relay did not greet");
    command(&mut io, "EHLO demo-client.postwarden.test", "250").await?;
    command(&mut io, "MAIL FROM:<demo@postwarden.test>", "250").await?;
    for rcpt in rcpts {
        command(&mut io, &format!("RCPT TO:<{rcpt}>"), "250").await?;
    }
    command(&mut io, "DATA", "354").await?;
    // Scenario descriptions never start a line with a dot.
    let body = format!(
        "From: demo@postwarden.test\r\nTo: {}\r\nSubject: {}\r\n\r\n{}\r\n.",
        rcpts.join(", "),
        scenario.id,
        scenario.description
    );
    command(&mut io, &body, "250").await?;
    let _ = command(&mut io, "QUIT", "221").await;
    Ok(())
}

/// Builds the bundled policies with cargo (a no-op when up to date) and returns their
/// directory.
fn build_policies() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let _ = Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]).output();
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "--profile", "policy", "--target", "wasm32-unknown-unknown"])
        .args(["-p", "opportunistic", "-p", "forced-tls", "-p", "postfix-map", "-p", "tofu"])
        .status()
        .context("running cargo to build the bundled policies")?;
    anyhow::ensure!(status.success(), "building the bundled policies failed");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("wasm32-unknown-unknown/policy"))
}
