//! The relay as a service: inbound SMTP → durable queue → policy-driven delivery.
//!
//! [`Relay::start`] builds every part from a [`Config`] and a bound listener (tests and the demo
//! pass `127.0.0.1:0`); [`Relay::reload`] swaps in a new policy chain only if it loads
//! completely; [`Relay::shutdown`] stops accepting, lets in-flight deliveries finish within a
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
    stop: watch::Sender<bool>,
    inbound: JoinHandle<()>,
    scheduler: JoinHandle<()>,
}

/// Hands accepted messages to the queue; answers only once they are fsync'd.
struct QueueSpool(Arc<Queue>);

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
                requiretls: submission.requiretls,
                // RFC 8689 §5: with REQUIRETLS the header is ignored.
                tls_required_no: submission.tls_required_no && !submission.requiretls,
            };
            queue.accept_durably(message).await.map_err(|e| e.to_string())
        })
    }
}

impl Relay {
    /// Starts the relay on `listener` with `config`.
    pub async fn start(config: &Config, listener: TcpListener) -> anyhow::Result<Relay> {
        let engine = policy::engine_from_config(config)?;
        let chain = policy::load_chain(&engine, config, policy::StateMode::Persistent)?;
        let chains = Arc::new(ChainHandle::new(chain));
        let deliverer: Arc<Deliverer> =
            Deliverer::from_config(config).map_err(anyhow::Error::msg)?;
        let store = Arc::new(SpoolDir::open(&config.queue.dir)?);
        let queue = Queue::new(store, config.queue.options(&config.delivery.helo_name));
        let options =
            config.inbound.options(&config.delivery.helo_name).map_err(anyhow::Error::msg)?;
        let smtp_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let spool: Arc<dyn Spool> = Arc::new(QueueSpool(queue.clone()));
        let inbound = tokio::spawn(crate::inbound::serve(
            listener,
            Arc::new(options),
            spool,
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
        let scheduler = tokio::spawn(queue.clone().run(deliverer, chains.clone(), stopped));
        tracing::info!(%smtp_addr, policies = chains.current().policies().len(), "relay started");
        Ok(Relay { queue, chains, smtp_addr, admin_addr, engine, stop, inbound, scheduler })
    }

    /// Loads the policies of `config` and puts them in force; on any error the running chain
    /// stays and the error is returned (SIGHUP).
    pub fn reload(&self, config: &Config) -> Result<(), policy::LoadError> {
        self.chains.reload(&self.engine, config)
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
