//! The `postwarden` command line: what operators and policy authors run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::policy::KvStore as _;
use crate::policy::{
    self, Chain, Context, EngineOptions, Failure, PolicyEngine, StateMode, Verdict,
};

/// Postwarden: an SMTP relay whose TLS decisions are programmed in WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "postwarden", version)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and validate a configuration file, loading its policies.
    CheckConfig {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Work with policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Inspect and manage the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
}

/// `postwarden queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// One line per queued message.
    List {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A message's envelope, recipients and last errors.
    Show {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Queue id.
        id: String,
    },
    /// Make messages due now (all, or one).
    Retry {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Queue id (default: every message).
        id: Option<String>,
    },
    /// Remove a message without delivering it.
    Delete {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Queue id.
        id: String,
    },
}

/// `postwarden policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check that a component implements the policy contract and can decide under the default
    /// limits: it is instantiated as a decision would be, configured (with --settings, or `{}`),
    /// and asked a sample `plan` and `on-failure`.
    Check {
        /// The component (`.wasm`, or component text `.wat`).
        file: PathBuf,
        /// Settings to configure it with, as JSON.
        #[arg(long)]
        settings: Option<String>,
    },
    /// Show which policy of the configured chain decides what for a domain, and why.
    Explain {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The recipient domain.
        domain: String,
        /// The MX host (default: the domain itself).
        #[arg(long)]
        mx: Option<String>,
        /// Position of the MX host in the MX list, from 0.
        #[arg(long, default_value_t = 0)]
        mx_index: u32,
        /// Number of MX hosts.
        #[arg(long, default_value_t = 1)]
        mx_count: u32,
        /// Delivery attempt number.
        #[arg(long, default_value_t = 1)]
        attempt: u32,
        /// Show the reaction to this failure class only (default: every class).
        #[arg(long)]
        failure: Option<String>,
        /// The message carries REQUIRETLS.
        #[arg(long)]
        requiretls: bool,
        /// The message carries `TLS-Required: No`.
        #[arg(long)]
        tls_required_no: bool,
        /// The message's submitter logged in with SMTP AUTH.
        #[arg(long)]
        authenticated: bool,
    },
    /// Create a policy project (Rust, Python or JavaScript) that builds and passes its own
    /// conformance test out of the box: `make build`, `make test`.
    New {
        /// The language.
        #[arg(long, value_enum)]
        lang: crate::scaffold::Lang,
        /// The project directory (created; must not exist or be empty).
        dir: PathBuf,
        /// The policy's name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Rust: the `policy-sdk` directory to depend on (default: the one of the checkout this
        /// binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Inspect or clear what policies remember (their persistent key-value stores).
    #[command(subcommand)]
    State(StateCommand),
}

/// `postwarden policy state ...`
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// List every remembered entry.
    List {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this policy.
        #[arg(long)]
        policy: Option<String>,
    },
    /// Forget what policies remember about a domain (keys `DOMAIN` and `DOMAIN/...`).
    Reset {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The domain.
        domain: String,
        /// Only this policy.
        #[arg(long)]
        policy: Option<String>,
    },
}

/// Installs the log subscriber for `postwarden run`, as `[logging]` says (`RUST_LOG` wins).
pub fn init_service_logging(logging: &crate::config::LoggingConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&logging.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour());
    let _ = match logging.format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Text => builder.try_init(),
    };
}

/// Installs the log subscriber (stderr, `RUST_LOG` overrides the verbosity).
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .try_init();
}

/// Colour codes only for a person at a terminal: a log file or a pipe gets plain text, and
/// `NO_COLOR` (no-color.org) turns colour off everywhere.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Runs a parsed command line, printing to stdout.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut out = String::new();
    let code = match cli.command {
        Command::CheckConfig { config } => check_config(&config, &mut out)?,
        Command::Policy(PolicyCommand::Check { file, settings }) => {
            policy_check(&file, settings.as_deref(), &mut out)?
        }
        Command::Policy(PolicyCommand::Explain {
            config,
            domain,
            mx,
            mx_index,
            mx_count,
            attempt,
            failure,
            requiretls,
            tls_required_no,
            authenticated,
        }) => {
            let mut ctx = Context::new(&domain, mx.as_deref().unwrap_or(&domain));
            ctx.mx_index = mx_index;
            ctx.mx_count = mx_count.max(mx_index.saturating_add(1));
            ctx.attempt = attempt;
            ctx.requiretls = requiretls;
            ctx.tls_required_no = tls_required_no;
            ctx.authenticated = authenticated;
            explain(&config, &ctx, failure.as_deref(), &mut out)?
        }
        Command::Policy(PolicyCommand::State(cmd)) => state(cmd, &mut out)?,
        Command::Policy(PolicyCommand::New { lang, dir, name, sdk }) => {
            let new = crate::scaffold::NewPolicy { lang, dir, name, sdk };
            let files = crate::scaffold::create(&new)?;
            let _ = writeln!(out, "created a {lang} policy in {}:", new.dir.display());
            for file in files {
                let _ = writeln!(out, "  {file}");
            }
            let _ = writeln!(out, "next: cd {} && make test (see README.md)", new.dir.display());
            ExitCode::SUCCESS
        }
        Command::Queue(cmd) => queue(cmd, &mut out)?,
    };
    print!("{out}");
    Ok(code)
}

/// `check-config`.
///
/// The same checks as `run` ([`Config::check`] and the policy chain), so a file that passes
/// here does not fail at start.
pub fn check_config(path: &Path, out: &mut String) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    config.check().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let engine = policy::engine_from_config(&config)?;
    let chain = policy::load_chain(&engine, &config, StateMode::Snapshot)?;
    writeln!(out, "{}: ok ({} policies)", path.display(), chain.policies().len())?;
    Ok(ExitCode::SUCCESS)
}

/// `policy check FILE`.
pub fn policy_check(
    file: &Path,
    settings: Option<&str>,
    out: &mut String,
) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let engine = PolicyEngine::new(&EngineOptions::default())?;
    let name =
        file.file_stem().map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
    let info = engine.check(&name, &bytes)?;
    let adapted = match info.contract_version.starts_with("0.1.") {
        true => {
            " (an earlier contract: the relay adapts it; rebuild against 0.2 for facts, dane and client certificates)"
        }
        false => "",
    };
    writeln!(
        out,
        "{}: implements postwarden:policy@{}{adapted}",
        file.display(),
        info.contract_version
    )?;
    writeln!(out, "  sha256:   {}", info.sha256)?;
    writeln!(out, "  size:     {} bytes", bytes.len())?;
    writeln!(out, "  compile:  {:.1} ms", info.load_time.as_secs_f64() * 1000.0)?;
    writeln!(
        out,
        "  wasi:     {}",
        if info.imports_wasi {
            "imported (deny-by-default WASI is linked)"
        } else {
            "not imported"
        }
    )?;
    for import in &info.imports {
        writeln!(out, "  import:   {import}")?;
    }
    // A component can implement the contract and still never decide: a data segment larger
    // than the decision memory cap makes every instance fault. Run what the relay will run,
    // under the limits it will run it with.
    let limits = policy::Limits::default();
    engine.check_decision_instance(&name, &bytes, limits)?;
    writeln!(
        out,
        "  instance: fits the decision limits ({} MiB, {} ms)",
        limits.memory >> 20,
        limits.deadline.as_millis()
    )?;
    let source = policy::PolicySource {
        name: name.clone(),
        bytes,
        settings: settings.unwrap_or("{}").to_owned(),
        limits,
    };
    let loaded = match engine.load(&source, std::sync::Arc::new(policy::MemoryKv::default())) {
        Ok((loaded, _)) => loaded,
        Err(policy::LoadError::Configure {
            fault: policy::PolicyFault::Configure(reason), ..
        }) if settings.is_none() => {
            writeln!(out, "  settings: `{{}}` rejected ({reason})")?;
            writeln!(
                out,
                "  sample:   skipped; pass --settings to configure it and try a decision"
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    writeln!(out, "  settings: accepted{}", if settings.is_none() { " (`{}`)" } else { "" })?;
    let ctx = Context::new("example.com", "mx.example.com");
    let fault = |call: &str, fault: policy::PolicyFault| {
        anyhow::anyhow!("policy `{name}`: sample `{call}` for example.com {fault}")
    };
    let decision = loaded.plan(&ctx).0.map_err(|e| fault("plan", e))?;
    match &decision {
        policy::Decision::Abstain => write!(out, "  sample:   plan -> abstain")?,
        policy::Decision::Require(requirement) => write!(out, "  sample:   plan -> {requirement}")?,
    }
    if matches!(decision, policy::Decision::Require(_)) {
        let failure = Failure::HandshakeFailed("sample".to_owned());
        let action = loaded.on_failure(&ctx, &failure).0.map_err(|e| fault("on-failure", e))?;
        write!(out, "; on-failure(handshake-failed) -> {action}")?;
    }
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// `policy explain`.
pub fn explain(
    config_path: &Path,
    ctx: &Context,
    failure: Option<&str>,
    out: &mut String,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let engine = policy::engine_from_config(&config)?;
    let chain = policy::load_chain(&engine, &config, StateMode::Snapshot)?;
    let failures: Vec<Failure> = match failure {
        Some(class) => match Failure::from_class(class) {
            Some(f) => vec![f],
            None => {
                bail!("unknown failure class `{class}` (one of: {})", Failure::CLASSES.join(", "))
            }
        },
        None => Failure::CLASSES.iter().filter_map(|c| Failure::from_class(c)).collect(),
    };
    explain_chain(&chain, ctx, &failures, out)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the explanation of `chain`'s answers for `ctx`.
pub fn explain_chain(
    chain: &Chain,
    ctx: &Context,
    failures: &[Failure],
    out: &mut String,
) -> std::fmt::Result {
    writeln!(
        out,
        "domain {} via MX {} ({} of {}), attempt {}{}{}",
        ctx.domain,
        ctx.mx_host,
        ctx.mx_index + 1,
        ctx.mx_count,
        ctx.attempt,
        if ctx.requiretls { ", REQUIRETLS" } else { "" },
        if ctx.tls_required_no { ", TLS-Required: No" } else { "" },
    )?;
    if ctx.authenticated {
        writeln!(out, "submitted with AUTH")?;
    }
    let plan = chain.plan(ctx);
    writeln!(out, "chain:")?;
    if plan.trace.is_empty() {
        writeln!(out, "  (no policies configured)")?;
    }
    for (i, line) in plan.trace.iter().enumerate() {
        writeln!(out, "  {}. {line}", i + 1)?;
    }
    for adjustment in &plan.adjustments {
        writeln!(out, "host rule: {adjustment}")?;
    }
    match &plan.verdict {
        Verdict::Require(requirement) => {
            writeln!(out, "decision: {requirement} (decided by {})", plan.decider)?;
        }
        Verdict::Defer { code, reason } => {
            writeln!(out, "decision: defer {code} {reason}")?;
            return Ok(());
        }
    }
    writeln!(out, "on failure:")?;
    for failure in failures {
        let response = chain.on_failure(&plan, ctx, failure);
        write!(out, "  {:<26} -> {}", failure.class(), response.action)?;
        for adjustment in &response.adjustments {
            write!(out, " [host rule: {adjustment}]")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn state(cmd: StateCommand, out: &mut String) -> anyhow::Result<ExitCode> {
    let (config_path, only, domain) = match &cmd {
        StateCommand::List { config, policy } => (config, policy, None),
        StateCommand::Reset { config, domain, policy } => (config, policy, Some(domain.as_str())),
    };
    let config = Config::load(config_path)?;
    if let Some(name) = only
        && !config.policies.iter().any(|p| &p.name == name)
    {
        bail!("{}: no policy named `{name}`", config_path.display());
    }
    for policy in config.policies.iter().filter(|p| only.as_ref().is_none_or(|n| *n == p.name)) {
        let path = policy::state_path(&config.policy_engine.state_dir, &policy.name);
        let store = policy::FileKv::open(&path)?;
        match domain {
            None => {
                for (key, value) in store.entries() {
                    writeln!(out, "{}\t{key}\t{value}", policy.name)?;
                }
            }
            Some(domain) => {
                let domain = domain.trim_end_matches('.').to_ascii_lowercase();
                for key in policy::kv::reset_domain(&store, &domain)? {
                    writeln!(out, "{}: forgot {key}", policy.name)?;
                }
            }
        }
    }
    if domain.is_some() && out.is_empty() {
        writeln!(out, "nothing remembered about {}", domain.unwrap_or_default())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `queue ...`: through the running relay's control socket when a relay holds the spool, else
/// on the spool directly, holding its lock (see [`crate::control`]). Either way the same code
/// answers; the spool is never recovered from here.
pub fn queue(cmd: QueueCommand, out: &mut String) -> anyhow::Result<ExitCode> {
    use crate::control::{self, Request};
    use crate::queue::store::{SpoolDir, StoreError};
    let (config_path, request) = match cmd {
        QueueCommand::List { config } => (config, Request::List),
        QueueCommand::Show { config, id } => (config, Request::Show { id }),
        QueueCommand::Retry { config, id } => (config, Request::Retry { id }),
        QueueCommand::Delete { config, id } => (config, Request::Delete { id }),
    };
    let config = Config::load(&config_path)?;
    let response = match SpoolDir::open_offline(&config.queue.dir) {
        Ok(spool) => {
            let queue = crate::queue::Queue::new(
                std::sync::Arc::new(spool),
                config.queue.options(&config.delivery.helo_name),
            );
            control::execute(&queue, &request)
        }
        Err(StoreError::Locked { .. }) => {
            let socket = config.queue.control_socket_path();
            control::call(&socket, &request).with_context(|| {
                format!(
                    "a relay holds the spool {}, but its control socket {} does not answer",
                    config.queue.dir.display(),
                    socket.display()
                )
            })?
        }
        Err(e) => return Err(e.into()),
    };
    if response.ok {
        out.push_str(&response.output);
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{}", response.output.trim_end())
    }
}
