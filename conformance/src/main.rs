//! `postwarden-sim`: the destination simulator and the conformance runner.
//!
//! - `postwarden-sim serve` starts every scenario's fake MX hosts and the DNS for `sim.test`,
//!   prints what a relay needs (DNS address, port, CA file, the route table) and runs until
//!   Ctrl-C: point any MTA at it (black-box mode).
//! - `postwarden-sim conformance --policy P.wasm --expect E.toml` runs our relay's delivery
//!   engine in process against every scenario and judges outcomes and wire invariants.
//!
//! The binary lives above both the relay and the simulator library; the library itself never
//! depends on the relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use postwarden_sim::scenario::Policy;
use postwarden_sim::server::Timing;
use postwarden_sim::{Fleet, FleetOptions};

/// Fake destination MX servers for testing a relay's STARTTLS behaviour.
#[derive(Debug, Parser)]
#[command(name = "postwarden-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every scenario and its DNS until Ctrl-C.
    Serve(ServeArgs),
    /// Run the relay (in process) with a policy against the catalogue and judge it.
    Conformance(ConformanceArgs),
}

#[derive(Debug, clap::Args)]
struct ConformanceArgs {
    /// The policy component (in-process mode).
    #[arg(long, required_unless_present = "external")]
    policy: Option<PathBuf>,
    /// Black-box mode: submit over SMTP to the relay at HOST:PORT (configured to use this
    /// fleet's DNS, port and CA) and judge from what reaches the fake servers.
    #[arg(long, conflicts_with = "policy")]
    external: Option<SocketAddr>,
    /// Black-box mode: the fleet's common MX port (0: pick one and print it).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Black-box mode: the fleet's DNS port (0: pick one and print it).
    #[arg(long, default_value_t = 0)]
    dns_port: u16,
    /// Black-box mode: where the CA is written (`ca.pem`).
    #[arg(long, default_value = "postwarden-sim")]
    dir: PathBuf,
    /// Black-box mode: the relay's Prometheus endpoint (HOST:PORT serving `/metrics`); with
    /// it, the relay's count of delivered recipients is checked against what the fleet
    /// accepted (invariant I9).
    #[arg(long, conflicts_with = "policy")]
    metrics: Option<SocketAddr>,
    /// Black-box mode: seconds to wait for outcomes; nothing by then counts as deferred.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// The policy's settings: a JSON file (default: `{}`).
    #[arg(long)]
    settings: Option<PathBuf>,
    /// The expectation file (format: conformance/src/expect.rs, examples in
    /// conformance/expectations/).
    #[arg(long)]
    expect: PathBuf,
    /// Write JUnit XML here.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Only these scenario ids (repeatable).
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// The relay's per-stage timeout, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Cache compiled policies here (Python and JavaScript components take seconds to compile;
    /// entries are keyed by content and engine, so a shared directory is safe).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The common port of every MX host (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Directory the CA certificate is written to (as `ca.pem`).
    #[arg(long, default_value = "postwarden-sim")]
    dir: PathBuf,
    /// The DNS port, UDP and TCP (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    dns_port: u16,
    /// How long tarpits hold a connection, in seconds.
    #[arg(long, default_value_t = 5)]
    tarpit_secs: u64,
    /// Serve only these scenario ids (repeatable); all by default.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Conformance(args) => {
            let failed = conformance(args).await?;
            std::process::exit(i32::from(failed));
        }
    }
}

/// Runs the catalogue; returns whether anything failed.
async fn conformance(args: ConformanceArgs) -> anyhow::Result<bool> {
    let settings = match &args.settings {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?,
        None => "{}".to_owned(),
    };
    let expectations = postwarden_conformance::expect::Expectations::load(&args.expect)?;
    let only = (!args.scenarios.is_empty()).then_some(args.scenarios);
    let report = match (&args.policy, args.external) {
        (Some(policy), _) => {
            let name = policy
                .file_stem()
                .map_or_else(|| "policy".to_owned(), |s| s.to_string_lossy().into_owned());
            let mut options = postwarden_conformance::RunOptions::new(
                &name,
                policy.clone(),
                &settings,
                expectations,
            );
            options.only = only;
            options.timeout = Duration::from_millis(args.timeout_ms);
            options.cache_dir = args.cache_dir.clone();
            postwarden_conformance::run(&options).await?
        }
        (None, Some(relay)) => {
            let fleet = Fleet::start(FleetOptions {
                port: args.port,
                dns_port: args.dns_port,
                ca_dir: Some(args.dir.clone()),
                scenarios: only,
                ..FleetOptions::default()
            })
            .await
            .context("starting the fleet")?;
            eprintln!(
                "fleet: dns {} port {} ca {}; waiting for the relay at {relay}",
                fleet.dns_addr(),
                fleet.port(),
                fleet.ca_file().map_or_else(String::new, |p| p.display().to_string())
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while tokio::net::TcpStream::connect(relay).await.is_err() {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the relay at {relay} never answered"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let window = Duration::from_secs(args.window_secs);
            let name = relay.to_string();
            let report = postwarden_conformance::external::run_external(
                &fleet,
                relay,
                &expectations,
                window,
                &name,
                args.metrics,
            )
            .await?;
            fleet.shutdown().await;
            report
        }
        (None, None) => anyhow::bail!("--policy or --external is required"),
    };
    print!("{}", postwarden_conformance::report::table(&report));
    if let Some(path) = &args.junit {
        std::fs::write(path, postwarden_conformance::report::junit(std::slice::from_ref(&report)))
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(report.failures() > 0)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let options = FleetOptions {
        port: args.port,
        dns_port: args.dns_port,
        ca_dir: Some(args.dir.clone()),
        scenarios: (!args.scenarios.is_empty()).then_some(args.scenarios),
        timing: Timing { tarpit: Duration::from_secs(args.tarpit_secs), ..Timing::default() },
        ..FleetOptions::default()
    };
    let fleet = Fleet::start(options).await.context("starting the fleet")?;
    println!("dns      {}", fleet.dns_addr());
    println!("port     {}", fleet.port());
    if let Some(path) = fleet.ca_file() {
        println!("ca       {}", path.display());
    }
    println!();
    for (scenario, route) in fleet.scenarios().iter().zip(fleet.routes()) {
        let outcomes: Vec<String> = Policy::ALL
            .iter()
            .map(|p| format!("{}={}", p.code(), scenario.expected.outcome(*p)))
            .collect();
        println!(
            "{:<9} {:<22} {}  {}",
            scenario.id,
            route.domain,
            outcomes.join(" "),
            scenario.description
        );
        for mx in &route.mx {
            let state = if mx.listening { "" } else { " (refuses connections)" };
            println!("          MX {:>3} {} {}{}", mx.preference, mx.host, mx.addr(), state);
        }
    }
    println!();
    println!("serving {} scenarios; Ctrl-C stops", fleet.scenarios().len());
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    fleet.shutdown().await;
    Ok(())
}
