//! Connection reuse: a TLS connection that has just carried a transaction is kept open for the
//! next message to the same destination under the same requirement.
//!
//! Why: opening a connection costs a TCP handshake, a greeting, EHLO, STARTTLS, a TLS
//! handshake and EHLO again — more than the transaction itself for a typical message. Postfix
//! relays ≈430 msg/s over STARTTLS with its defaults and ≈800 with its connection cache
//! (`smtp_connection_cache_on_demand`); we keep the same limits it does: a parked connection
//! waits at most [`ReuseLimits::idle`] (Postfix's `smtp_connection_cache_time_limit`, 2 s) and
//! serves for at most [`ReuseLimits::max_age`] (`smtp_connection_reuse_time_limit`, 300 s).
//!
//! Why it is safe under forced TLS: only connections that completed STARTTLS and a transaction
//! are parked (plaintext never is), and a connection is filed under the recipient domain, the
//! MX host, the address *and the exact requirement* the chain decided. A later message gets it
//! only when the chain decides the same requirement for the same host, so its certificate was
//! judged by the same rules; a message under a different requirement opens its own
//! connection. Before a reused connection carries anything, `RSET` must get `250` over TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::client::{Client, TlsInfo};
use crate::policy::Requirement;

/// How long and how much a connection may be reused.
#[derive(Clone, Copy, Debug)]
pub struct ReuseLimits {
    /// Longest wait for the next message; `Duration::ZERO` turns reuse off.
    pub idle: Duration,
    /// Longest life of a connection that is being reused.
    pub max_age: Duration,
    /// Most transactions per connection.
    pub max_uses: u32,
    /// Most connections parked at once, all destinations together.
    pub max_parked: usize,
}

impl Default for ReuseLimits {
    fn default() -> Self {
        ReuseLimits {
            idle: Duration::from_secs(2),
            max_age: Duration::from_secs(300),
            max_uses: 100,
            max_parked: 100,
        }
    }
}

/// Where a parked connection may be used again.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Key {
    /// Recipient domain (lower case).
    pub domain: String,
    /// MX host name (lower case).
    pub mx: String,
    /// The address connected to.
    pub addr: SocketAddr,
    /// The requirement the TLS session was established and checked under.
    pub requirement: Requirement,
}

/// A connection waiting for its next transaction.
pub struct Parked {
    /// The connection, in TLS, after a completed transaction.
    pub client: Client<TlsStream<TcpStream>>,
    /// Its TLS session, as reported for the first transaction.
    pub info: TlsInfo,
    /// When it was opened.
    pub opened: Instant,
    /// Transactions carried so far.
    pub uses: u32,
    parked_at: Instant,
}

impl Parked {
    /// A connection that has carried its first transaction.
    pub fn new(client: Client<TlsStream<TcpStream>>, info: TlsInfo) -> Self {
        let now = Instant::now();
        Parked { client, info, opened: now, uses: 1, parked_at: now }
    }
}

/// The parked connections.
pub struct ConnectionCache {
    limits: ReuseLimits,
    parked: Mutex<HashMap<Key, Vec<Parked>>>,
    sweeper_started: AtomicBool,
}

impl ConnectionCache {
    /// An empty cache with `limits`.
    pub fn new(limits: ReuseLimits) -> Arc<Self> {
        Arc::new(ConnectionCache {
            limits,
            parked: Mutex::default(),
            sweeper_started: AtomicBool::new(false),
        })
    }

    /// The most recently parked live connection for `key`, if any.
    pub fn take(&self, key: &Key) -> Option<Parked> {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        let list = parked.get_mut(key)?;
        let now = Instant::now();
        let mut found = None;
        while let Some(p) = list.pop() {
            if self.fresh(&p, now) {
                found = Some(p);
                break;
            }
            retire(p);
        }
        if list.is_empty() {
            parked.remove(key);
        }
        found
    }

    /// Parks `connection` for the next message under `key`, or closes it when it has served
    /// its limits or the cache is full.
    pub fn park(self: &Arc<Self>, key: Key, mut connection: Parked) {
        let now = Instant::now();
        connection.parked_at = now;
        if self.limits.idle.is_zero()
            || connection.uses >= self.limits.max_uses
            || now.duration_since(connection.opened) >= self.limits.max_age
        {
            retire(connection);
            return;
        }
        {
            let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
            if parked.values().map(Vec::len).sum::<usize>() >= self.limits.max_parked {
                drop(parked);
                retire(connection);
                return;
            }
            parked.entry(key).or_default().push(connection);
        }
        self.start_sweeper();
    }

    /// Closes every parked connection (a reload changed the trust anchors they were checked
    /// against).
    pub fn clear(&self) {
        let all: Vec<Parked> = {
            let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
            parked.drain().flat_map(|(_, list)| list).collect()
        };
        all.into_iter().for_each(retire);
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner).values().map(Vec::len).sum()
    }

    /// Whether none is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fresh(&self, p: &Parked, now: Instant) -> bool {
        now.duration_since(p.parked_at) < self.limits.idle
            && now.duration_since(p.opened) < self.limits.max_age
    }

    /// Closes idle connections (QUIT) once they have waited their limit, so that a server is
    /// not left holding connections nobody will use.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = (self.limits.idle / 2).max(Duration::from_millis(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(cache) = weak.upgrade() else { return };
                let now = Instant::now();
                let mut stale = Vec::new();
                {
                    let mut parked = cache.parked.lock().unwrap_or_else(PoisonError::into_inner);
                    for list in parked.values_mut() {
                        let (keep, old): (Vec<_>, Vec<_>) =
                            list.drain(..).partition(|p| cache.fresh(p, now));
                        *list = keep;
                        stale.extend(old);
                    }
                    parked.retain(|_, list| !list.is_empty());
                }
                stale.into_iter().for_each(retire);
            }
        });
    }
}

/// Says QUIT on a connection that will not be used again, without holding anyone up.
fn retire(p: Parked) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(p.client.quit());
    }
}
