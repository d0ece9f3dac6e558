//! The relay as a service: inbound SMTP → durable queue → policy-driven delivery.
//!
//! [`Relay::start`] builds every part from a [`Config`] and a bound listener (tests and the demo
//! pass `127.0.0.1:0`); [`Relay::reload`] puts a changed configuration in force as one
//! change (policies, relay networks, inbound limits and certificates, routes, CA files,
//! timeouts) only if all of it loads and no restart-only key changed, else nothing changes;
//! [`Relay::shutdown`] stops accepting, lets in-flight deliveries finish within a
//! bound, and leaves everything else queued.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::delivery::Deliverer;
use crate::inbound::{Spool, Submission};
use crate::policy::{self, ChainHandle, PolicyEngine};
use crate::queue::store::SpoolDir;
use crate::queue::{NewMessage, Queue};

/// A running relay.
pub struct Relay {
    /// The queue (status, tests).
    pub queue: Arc<Queue>,
    /// The policy chain in force.
    pub chains: Arc<ChainHandle>,
    /// The address the SMTP listener is bound to.
    pub smtp_addr: std::net::SocketAddr,
    /// The admin listener's address, if configured.
    pub admin_addr: Option<std::net::SocketAddr>,
    engine: PolicyEngine,
    /// The configuration in force (what a reload is compared with).
    config: std::sync::Mutex<Config>,
    inbound_options: watch::Sender<Arc<crate::inbound::InboundOptions>>,
    deliverer: Arc<Deliverer>,
    stop: watch::Sender<bool>,
    inbound: JoinHandle<()>,
    scheduler: JoinHandle<()>,
}

/// What a reload put in force.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Reloaded {
    /// Policies in the new chain.
    pub policies: usize,
}

/// Why a reload was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Keys that only take effect at start changed.
    #[error("these keys changed and need a restart: {}", .0.join(", "))]
    RestartOnly(Vec<String>),
    /// A file or value does not load (certificate, CA file, credentials, route, spool dir).
    #[error("{0}")]
    Invalid(String),
    /// A policy does not load or configure.
    #[error(transparent)]
    Policies(#[from] policy::LoadError),
}

/// Hands accepted messages to the queue; answers only once they are fsync'd. Messages are
/// written to the spool's `tmp/` as they arrive.
pub struct QueueSpool(pub Arc<Queue>);

impl Spool for QueueSpool {
    fn accept(
        &self,
        submission: Submission,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        let queue = self.0.clone();
        Box::pin(async move {
            let message = NewMessage {
                mail_from: submission.mail_from,
                rcpts: submission.rcpts,
                body: submission.body,
                staged: submission.staged.map(|staged| staged.path),
                requiretls: submission.requiretls,
                // RFC 8689 §5: with REQUIRETLS the header is ignored.
                tls_required_no: submission.tls_required_no && !submission.requiretls,
                authenticated: submission.authenticated_as.is_some(),
                smtputf8: submission.smtputf8,
            };
            queue.accept_durably(message).await.map_err(|e| e.to_string())
        })
    }

    /// Messages go to the spool's `tmp/` as they arrive.
    fn stage(&self) -> Option<Result<(std::path::PathBuf, std::fs::File), String>> {
        self.0.stage_body().map(|staged| staged.map_err(|e| e.to_string()))
    }
}

impl Relay {
    /// Starts the relay on `listener` with `config`.
    pub async fn start(config: &Config, listener: TcpListener) -> anyhow::Result<Relay> {
        // The same checks as `check-config` and SIGHUP, before anything starts.
        let checked = config.check().map_err(anyhow::Error::msg)?;
        let engine = policy::engine_from_config(config)?;
        let chain = policy::load_chain(&engine, config, policy::StateMode::Persistent)?;
        let chains = Arc::new(ChainHandle::new(chain));
        let deliverer = checked.deliverer;
        let store = Arc::new(SpoolDir::open(&config.queue.dir)?);
        let queue = Queue::new(store, config.queue.options(&config.delivery.helo_name));
        let smtp_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let spool: Arc<dyn Spool> = Arc::new(QueueSpool(queue.clone()));
        let anvil = Arc::new(crate::inbound::Anvil::default());
        let (inbound_options, options) = watch::channel(Arc::new(checked.inbound));
        let inbound = tokio::spawn(crate::inbound::serve_reloadable(
            listener,
            options,
            spool,
            anvil.clone(),
            stopped.clone(),
        ));
        let admin_addr = match config.admin.listen {
            Some(addr) => {
                let admin = TcpListener::bind(addr).await?;
                let bound = admin.local_addr()?;
                let state = crate::admin::AdminState {
                    queue: queue.clone(),
                    chains: chains.clone(),
                    deliverer: deliverer.clone(),
                    inbound: anvil.clone(),
                };
                tokio::spawn(crate::admin::serve(admin, state, stopped.clone()));
                Some(bound)
            }
            None => None,
        };
        // Holding the spool's lock (taken by `SpoolDir::open` above), the socket is ours to
        // (re)create: queue commands reach this relay through it from now on.
        let control_path = config.queue.control_socket_path();
        let control = crate::control::bind(&control_path).map_err(|e| {
            anyhow::anyhow!("queue.control_socket: cannot bind {}: {e}", control_path.display())
        })?;
        tokio::spawn(crate::control::serve(control, control_path, queue.clone(), stopped.clone()));
        let scheduler = tokio::spawn(queue.clone().run(deliverer.clone(), chains.clone(), stopped));
        tracing::info!(%smtp_addr, policies = chains.current().policies().len(), "relay started");
        Ok(Relay {
            queue,
            chains,
            smtp_addr,
            admin_addr,
            engine,
            config: std::sync::Mutex::new(config.clone()),
            inbound_options,
            deliverer,
            stop,
            inbound,
            scheduler,
        })
    }

    /// Puts `config` in force (SIGHUP), all of it or nothing: refused if a key that needs a
    /// restart changed ([`ReloadError::RestartOnly`] names them), or if anything fails to
    /// load (a certificate, a CA file, the credentials, a route, a policy). Otherwise the
    /// policies, the inbound options (relay networks, limits, certificate, credentials) and the
    /// delivery settings (routes, DNS, CA files, timeouts) are replaced back to back, after
    /// everything was built: connections and deliveries in flight finish with what they
    /// started with.
    pub fn reload(&self, config: &Config) -> Result<Reloaded, ReloadError> {
        let mut running = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let restart_only = running.restart_only_changes(config);
        if !restart_only.is_empty() {
            return Err(ReloadError::RestartOnly(restart_only));
        }
        let checked = config.check().map_err(ReloadError::Invalid)?;
        let chain = policy::load_chain(&self.engine, config, policy::StateMode::Persistent)?;
        let policies = chain.policies().len();
        self.inbound_options.send_replace(Arc::new(checked.inbound));
        self.deliverer.replace_settings(&checked.deliverer);
        self.chains.replace(chain);
        *running = config.clone();
        Ok(Reloaded { policies })
    }

    /// Stops accepting, waits up to `grace` for in-flight deliveries, and returns. Whatever is
    /// not delivered stays queued for the next start.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let both = async {
            let _ = self.inbound.await;
            let _ = self.scheduler.await;
        };
        if tokio::time::timeout(grace, both).await.is_err() {
            tracing::warn!(?grace, "shutdown grace period over; undelivered messages stay queued");
        }
    }
}
