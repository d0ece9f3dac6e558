//! The `postwarden` command.
//!
//! The relay's own subcommands live in the library (`postwarden::cli`); this binary adds the
//! two that need a runtime or the simulator: `run` (the service) and `demo` (simulator fleet +
//! relay + bundled policies). It sits above both the relay and the simulator, which never
//! depend on each other.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use postwarden::config::Config;

/// Postwarden: an SMTP relay whose TLS decisions are programmed in WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "postwarden", version)]
struct Cli {
    /// Log more (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Run the relay: SMTP listener, queue, deliveries. SIGTERM stops it (in-flight
    /// deliveries get `--grace` seconds), SIGHUP reloads the configuration (all of it, or
    /// nothing when a restart-only key changed or something fails to load).
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds in-flight deliveries get at shutdown.
        #[arg(long, default_value_t = 30)]
        grace: u64,
    },
    /// Check a destination before forcing TLS for it: STARTTLS, TLS version and cipher,
    /// certificate names, verification for the MX name and the domain, the chain's decision,
    /// and a verdict. Exit status 0 when forced TLS (verify) would succeed.
    Probe {
        /// The configuration file (DNS, routes, trust, policies).
        #[arg(long, short)]
        config: PathBuf,
        /// The recipient domain.
        domain: String,
    },
    /// The demo: the simulator's fleet, a relay with the bundled policies, one message per
    /// scenario over SMTP, and the outcome table.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Relay(postwarden::cli::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Top::Run { config, .. } => match Config::load(config) {
            Ok(c) => postwarden::cli::init_service_logging(&c.logging),
            Err(_) => postwarden::cli::init_logging(cli.verbose),
        },
        _ => postwarden::cli::init_logging(cli.verbose),
    }
    let result = match cli.command {
        Top::Relay(command) => {
            postwarden::cli::run(postwarden::cli::Cli { verbose: cli.verbose, command })
        }
        Top::Run { config, grace } => {
            runtime().and_then(|rt| rt.block_on(run(config, Duration::from_secs(grace))))
        }
        Top::Demo(args) => runtime().and_then(|rt| rt.block_on(demo::run(args))),
        Top::Probe { config, domain } => {
            runtime().and_then(|rt| rt.block_on(probe(config, domain)))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")
}

async fn probe(path: PathBuf, domain: String) -> anyhow::Result<ExitCode> {
    let config = Config::load(&path)?;
    let engine = postwarden::policy::engine_from_config(&config)?;
    let chain =
        postwarden::policy::load_chain(&engine, &config, postwarden::policy::StateMode::Snapshot)?;
    let (report, ok) = postwarden::probe::probe(&config, &chain, &domain).await?;
    print!("{report}");
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn run(path: PathBuf, grace: Duration) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = Config::load(&path)?;
    let listener =
        tokio::net::TcpListener::bind(config.inbound.listen).await.with_context(|| {
            format!("{}: inbound.listen: cannot bind {}", path.display(), config.inbound.listen)
        })?;
    let relay = postwarden::service::Relay::start(&config, listener).await?;
    tracing::info!(smtp = %relay.smtp_addr, admin = ?relay.admin_addr, "postwarden running");
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => match Config::load(&path).map_err(anyhow::Error::from).and_then(|c| relay.reload(&c).map_err(Into::into)) {
                Ok(reloaded) => tracing::info!(
                    policies = reloaded.policies,
                    "configuration reloaded: policies, relay networks, inbound limits and certificates, routes, CA files and timeouts in force"
                ),
                Err(e) => tracing::error!("reload refused, nothing changed: {e:#}"),
            },
        }
    }
    relay.shutdown(grace).await;
    Ok(ExitCode::SUCCESS)
}
