//! What the server remembers about each client address across connections, after Postfix's
//! anvil(8): connections open now, connections opened in the current minute, and recent AUTH
//! failures.
//!
//! Why per address: a global connection cap alone lets one address hold every slot (100 idle
//! sockets shut out every other client), and a per-connection AUTH limit lets a client guess
//! as fast as it can open connections. The limits come from [`InboundOptions`] at each call,
//! so a reload of the options applies to the next event. Addresses are counted as IPv4 or as
//! their IPv6 /64 (one host or site usually holds a whole /64). Entries are dropped once
//! nothing about them is current, so memory follows the clients of the last few minutes.
//!
//! Time is passed in (`now`), so the rules are tested without a clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::InboundOptions;

/// The window of [`InboundOptions::max_connection_rate_per_client`].
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Entries the map may hold before the first sweep of expired ones.
const FIRST_SWEEP: usize = 1024;

/// Per-address state shared by every connection of one server, and its counters.
#[derive(Debug, Default)]
pub struct Anvil {
    clients: Mutex<Clients>,
    /// Counters for `/metrics`.
    pub stats: InboundStats,
}

#[derive(Debug, Default)]
struct Clients {
    map: HashMap<IpAddr, Entry>,
    sweep_at: usize,
}

#[derive(Debug)]
struct Entry {
    open: u32,
    rate_start: Instant,
    rate_count: u32,
    auth_start: Instant,
    auth_failures: u32,
}

/// Counters of the inbound server's limits, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Connections refused because the server was full (`max_connections`).
    pub refused_global: AtomicU64,
    /// Connections refused because their address had too many open.
    pub refused_per_client: AtomicU64,
    /// Connections refused because their address opened too many in the last minute.
    pub refused_rate: AtomicU64,
    /// Failed AUTH attempts (wrong user name or password).
    pub auth_failures: AtomicU64,
    /// AUTH commands refused because their address failed too often recently.
    pub auth_refused: AtomicU64,
    /// Sessions closed because they lasted longer than `max_session_time`.
    pub session_time_exceeded: AtomicU64,
    /// Sessions closed because DATA arrived slower than `min_data_rate`.
    pub data_too_slow: AtomicU64,
    /// Sessions closed after too many errors (`max_errors`, denied recipients included).
    pub too_many_errors: AtomicU64,
}

impl InboundStats {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Refusal {
    /// The address has `max_connections_per_client` connections open.
    TooManyConnections,
    /// The address opened `max_connection_rate_per_client` connections in the last minute.
    TooFast,
}

impl Refusal {
    /// The text after `421 4.7.0 <hostname>`.
    pub fn text(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too many connections from your address",
            Refusal::TooFast => "too many connections from your address in the last minute",
        }
    }
}

/// One counted connection; dropping it frees the address's slot.
#[derive(Debug)]
pub struct ClientSlot {
    anvil: Arc<Anvil>,
    /// `None` for an exempt address, which is not counted.
    key: Option<IpAddr>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key
            && let Some(entry) = self.anvil.lock().map.get_mut(&key)
        {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

impl Anvil {
    /// A connection from `ip` is starting: counts it, or says why it must be refused.
    pub fn connect(
        self: &Arc<Self>,
        ip: IpAddr,
        options: &InboundOptions,
        now: Instant,
    ) -> Result<ClientSlot, Refusal> {
        if options.limit_exempt(ip) {
            return Ok(ClientSlot { anvil: self.clone(), key: None });
        }
        let key = key(ip);
        let mut clients = self.lock();
        clients.sweep(options, now);
        let entry = clients.map.entry(key).or_insert_with(|| Entry::new(now));
        let count_limit = options.max_connections_per_client;
        if count_limit > 0 && entry.open >= count_limit {
            return Err(Refusal::TooManyConnections);
        }
        if now.saturating_duration_since(entry.rate_start) >= RATE_WINDOW {
            entry.rate_start = now;
            entry.rate_count = 0;
        }
        let rate_limit = options.max_connection_rate_per_client;
        if rate_limit > 0 && entry.rate_count >= rate_limit {
            return Err(Refusal::TooFast);
        }
        entry.rate_count += 1;
        entry.open += 1;
        Ok(ClientSlot { anvil: self.clone(), key: Some(key) })
    }

    /// Whether AUTH from `ip` is refused now because it failed too often within
    /// `auth_failure_window`.
    pub fn auth_refused(&self, ip: IpAddr, options: &InboundOptions, now: Instant) -> bool {
        let limit = options.auth_failure_limit;
        if limit == 0 {
            return false;
        }
        let mut clients = self.lock();
        let Some(entry) = clients.map.get_mut(&key(ip)) else {
            return false;
        };
        entry.expire_auth(options, now);
        entry.auth_failures >= limit
    }

    /// Records a failed AUTH attempt from `ip`.
    pub fn auth_failed(&self, ip: IpAddr, options: &InboundOptions, now: Instant) {
        InboundStats::count(&self.stats.auth_failures);
        let mut clients = self.lock();
        clients.sweep(options, now);
        let entry = clients.map.entry(key(ip)).or_insert_with(|| Entry::new(now));
        entry.expire_auth(options, now);
        if entry.auth_failures == 0 {
            entry.auth_start = now;
        }
        entry.auth_failures = entry.auth_failures.saturating_add(1);
    }

    /// Addresses with an entry (tests: memory stays bounded).
    pub fn tracked(&self) -> usize {
        self.lock().map.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Clients {
    /// Drops entries that hold nothing current, once the map has doubled since the last sweep:
    /// amortised constant time per call.
    fn sweep(&mut self, options: &InboundOptions, now: Instant) {
        if self.map.len() < self.sweep_at.max(FIRST_SWEEP) {
            return;
        }
        self.map.retain(|_, entry| !entry.is_stale(options, now));
        self.sweep_at = self.map.len() * 2;
    }
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry { open: 0, rate_start: now, rate_count: 0, auth_start: now, auth_failures: 0 }
    }

    fn expire_auth(&mut self, options: &InboundOptions, now: Instant) {
        if now.saturating_duration_since(self.auth_start) >= options.auth_failure_window {
            self.auth_failures = 0;
            self.auth_start = now;
        }
    }

    fn is_stale(&self, options: &InboundOptions, now: Instant) -> bool {
        self.open == 0
            && now.saturating_duration_since(self.rate_start) >= RATE_WINDOW
            && (self.auth_failures == 0
                || now.saturating_duration_since(self.auth_start) >= options.auth_failure_window)
    }
}

/// The address as counted: IPv4 (mapped IPv6 included) whole, other IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> InboundOptions {
        InboundOptions {
            max_connections_per_client: 2,
            max_connection_rate_per_client: 3,
            limit_exempt_networks: Some(Vec::new()),
            auth_failure_limit: 2,
            auth_failure_window: Duration::from_secs(600),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_open_connections_and_the_rate_per_address() {
        let anvil = Arc::new(Anvil::default());
        let o = options();
        let t0 = Instant::now();
        let a = anvil.connect(ip("192.0.2.1"), &o, t0).unwrap();
        let _b = anvil.connect(ip("::ffff:192.0.2.1"), &o, t0).unwrap();
        assert_eq!(
            anvil.connect(ip("192.0.2.1"), &o, t0).unwrap_err(),
            Refusal::TooManyConnections
        );
        // Another address is not affected.
        let _c = anvil.connect(ip("192.0.2.2"), &o, t0).unwrap();
        drop(a);
        let _d = anvil.connect(ip("192.0.2.1"), &o, t0).unwrap();
        drop(_d);
        // Three opened within the minute: the fourth is refused even with a free slot.
        assert_eq!(anvil.connect(ip("192.0.2.1"), &o, t0).unwrap_err(), Refusal::TooFast);
        let later = t0 + RATE_WINDOW;
        let _e = anvil.connect(ip("192.0.2.1"), &o, later).unwrap();
    }

    #[test]
    fn ipv6_counts_by_64_and_exempt_networks_are_not_counted() {
        let anvil = Arc::new(Anvil::default());
        let o = options();
        let t0 = Instant::now();
        let _a = anvil.connect(ip("2001:db8::1"), &o, t0).unwrap();
        let _b = anvil.connect(ip("2001:db8::ffff:2"), &o, t0).unwrap();
        assert!(anvil.connect(ip("2001:db8::3"), &o, t0).is_err());
        assert!(anvil.connect(ip("2001:db8:0:1::3"), &o, t0).is_ok());

        let exempt = InboundOptions { limit_exempt_networks: None, ..options() };
        // Default: the relay networks (loopback) are exempt.
        let slots: Vec<_> =
            (0..10).map(|_| anvil.connect(ip("127.0.0.1"), &exempt, t0).unwrap()).collect();
        assert_eq!(slots.len(), 10);
    }

    #[test]
    fn auth_failures_refuse_the_address_for_the_window() {
        let anvil = Arc::new(Anvil::default());
        let o = options();
        let t0 = Instant::now();
        let client = ip("192.0.2.9");
        assert!(!anvil.auth_refused(client, &o, t0));
        anvil.auth_failed(client, &o, t0);
        assert!(!anvil.auth_refused(client, &o, t0));
        anvil.auth_failed(client, &o, t0 + Duration::from_secs(1));
        assert!(anvil.auth_refused(client, &o, t0 + Duration::from_secs(2)));
        assert!(!anvil.auth_refused(ip("192.0.2.10"), &o, t0));
        assert!(!anvil.auth_refused(client, &o, t0 + Duration::from_secs(600)));
        assert_eq!(anvil.stats.auth_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn stale_entries_are_swept() {
        let anvil = Arc::new(Anvil::default());
        let o = InboundOptions { max_connection_rate_per_client: 0, ..options() };
        let t0 = Instant::now();
        for n in 0..5000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            drop(anvil.connect(addr, &o, t0 + Duration::from_millis(u64::from(n) * 100)));
        }
        // Only the addresses of the last minute or so remain.
        assert!(anvil.tracked() < 2 * 600 + FIRST_SWEEP, "{}", anvil.tracked());
    }
}
