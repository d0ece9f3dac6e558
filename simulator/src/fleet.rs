//! The fleet: every scenario's MX hosts, each on its own loopback address, all on one common
//! port, plus the DNS that points at them.
//!
//! The relay is configured with the DNS address, the port and the CA file; it then delivers to
//! `<label>.sim.test` like to any domain. Addresses are 127.0.0.N from
//! [`FleetOptions::first_address`] upward (Linux routes all of 127.0.0.0/8 to loopback), so
//! several fleets share addresses: what keeps them apart is the port. It is found by binding the
//! first host's socket to port 0 and reusing its number on the other addresses, starting over
//! when one of them is taken; a host that refuses connections holds its address and port with
//! a bound socket that never listens, so no other fleet can serve there.
//!
//! MTA-STS: one HTTPS listener on 127.0.0.1 (a free port, [`Fleet::sts_https_port`]) serves
//! the policy host `mta-sts.<domain>` of every domain with an [`StsKnobs`], from
//! [`Scenario::sts`], [`FleetOptions::sts`] (which wins) or [`Fleet::set_sts`] at run time.
//! The relay reaches it through a test-only override of port 443.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certs::{TestCa, TlsKnobs};
use crate::dns::{self, DomainRecords, MxRecord};
use crate::error::Error;
use crate::https;
use crate::scenario::{Scenario, Upgrade, catalogue};
use crate::server::{self, MxPlan, Timing};
use crate::sts::{StsEntry, StsKnobs, StsTable, policy_host};
use crate::transcript::{Transcript, Transcripts};

/// How many times a common port is looked for before giving up.
const PORT_ATTEMPTS: usize = 50;

/// How to start a [`Fleet`].
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// The common MX port; 0 picks a free one.
    pub port: u16,
    /// The first MX address; later ones count up from it.
    pub first_address: Ipv4Addr,
    /// Where the DNS listens.
    pub dns_address: IpAddr,
    /// The DNS port (UDP and TCP); 0 picks a free one.
    pub dns_port: u16,
    /// Scenario ids to serve; `None` serves the whole catalogue.
    pub scenarios: Option<Vec<String>>,
    /// Tarpit and pause durations.
    pub timing: Timing,
    /// If set, the CA certificate is written to `<dir>/ca.pem`.
    pub ca_dir: Option<PathBuf>,
    /// A CA to reuse (tests share one per process); `None` creates a new one.
    pub ca: Option<Arc<TestCa>>,
    /// MTA-STS set-ups by domain (`cap-01.sim.test`, or any other name: a domain without a
    /// scenario gets its STS names only). They replace a served scenario's [`Scenario::sts`].
    pub sts: BTreeMap<String, StsKnobs>,
    /// The port of the MTA-STS HTTPS responder on 127.0.0.1; 0 picks a free one.
    pub sts_https_port: u16,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            port: 0,
            first_address: Ipv4Addr::new(127, 0, 0, 2),
            dns_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dns_port: 0,
            scenarios: None,
            timing: Timing::default(),
            ca_dir: None,
            ca: None,
            sts: BTreeMap::new(),
            sts_https_port: 0,
        }
    }
}

/// One MX host in the route table.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RouteMx {
    /// Host name, e.g. `mx1.cap-01.sim.test`.
    pub host: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The common port.
    pub port: u16,
    /// MX preference.
    pub preference: u16,
    /// Whether something listens (false for hosts that refuse connections).
    pub listening: bool,
}

impl RouteMx {
    /// The socket address to dial.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), self.port)
    }
}

/// Where a scenario domain's mail goes.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Route {
    /// The scenario id.
    pub scenario: &'static str,
    /// The domain, e.g. `cap-01.sim.test`.
    pub domain: String,
    /// Its MX hosts, by ascending preference.
    pub mx: Vec<RouteMx>,
}

/// A running fleet of fake MX servers and their DNS. Dropping it stops everything.
#[derive(Debug)]
pub struct Fleet {
    dns: SocketAddr,
    port: u16,
    sts_https: SocketAddr,
    sts: StsTable,
    ca: Arc<TestCa>,
    ca_file: Option<PathBuf>,
    routes: Vec<Route>,
    scenarios: Vec<Scenario>,
    transcripts: Transcripts,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Bound, never listening: the addresses of hosts that refuse connections (see
    /// `bind_common_port`).
    _refusing: Vec<tokio::net::TcpSocket>,
}

impl Fleet {
    /// Issues certificates, binds every listener and the DNS, and starts serving.
    pub async fn start(options: FleetOptions) -> Result<Self, Error> {
        let scenarios = select(options.scenarios.as_deref())?;
        let ca = match &options.ca {
            Some(ca) => ca.clone(),
            None => Arc::new(run_blocking(TestCa::new).await??),
        };
        let layout = assign_addresses(&scenarios, options.first_address)?;
        let plans = {
            let (ca, scenarios, layout, timing) =
                (ca.clone(), scenarios.clone(), layout.clone(), options.timing);
            run_blocking(move || build_plans(&ca, &scenarios, &layout, timing)).await??
        };
        let listen: Vec<Ipv4Addr> = plans.iter().map(|(ip, _)| *ip).collect();
        let refuse: Vec<Ipv4Addr> =
            layout.iter().map(|slot| slot.ip).filter(|ip| !listen.contains(ip)).collect();
        let fallback = layout.first().map_or(options.first_address, |slot| slot.ip);
        let (port, listeners, refusing) =
            bind_common_port(&listen, &refuse, options.port, fallback).await?;

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let transcripts = Transcripts::new();
        for (listener, (_, plan)) in listeners.into_iter().zip(plans) {
            tracker.spawn(server::run(
                listener,
                plan,
                transcripts.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }

        let sts = StsTable::default();
        let mut setups: BTreeMap<String, StsKnobs> =
            scenarios.iter().map(|s| (s.domain(), s.sts.clone())).collect();
        setups.extend(options.sts.clone());
        for (domain, knobs) in setups {
            set_sts(&sts, &ca, &domain, knobs).await?;
        }
        let sts_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), options.sts_https_port);
        let sts_listener = TcpListener::bind(sts_addr)
            .await
            .map_err(|source| Error::Bind { addr: sts_addr, source })?;
        let sts_https =
            sts_listener.local_addr().map_err(|source| Error::Bind { addr: sts_addr, source })?;
        tracker.spawn(https::run(
            sts_listener,
            sts.clone(),
            transcripts.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));

        let routes = routes(&scenarios, &layout, port);
        let records: Vec<DomainRecords> = routes
            .iter()
            .map(|route| DomainRecords {
                domain: route.domain.clone(),
                mx: route
                    .mx
                    .iter()
                    .map(|mx| MxRecord {
                        host: mx.host.clone(),
                        preference: mx.preference,
                        ip: mx.ip,
                    })
                    .collect(),
            })
            .collect();
        let dns = dns::serve(
            options.dns_address,
            options.dns_port,
            &records,
            sts.clone(),
            shutdown.clone(),
            &tracker,
        )
        .await?;

        let ca_file = match &options.ca_dir {
            Some(dir) => Some(write_ca(dir, ca.root_pem())?),
            None => None,
        };
        tracing::info!(%dns, port, %sts_https, scenarios = scenarios.len(), "fleet started");
        Ok(Self {
            dns,
            port,
            sts_https,
            sts,
            ca,
            ca_file,
            routes,
            scenarios,
            transcripts,
            shutdown,
            tracker,
            _refusing: refusing,
        })
    }

    /// The DNS server's address (UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns
    }

    /// The port every MX host listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address of the MTA-STS HTTPS responder (127.0.0.1), where every `mta-sts.<domain>`
    /// resolves.
    pub fn sts_https_addr(&self) -> SocketAddr {
        self.sts_https
    }

    /// The port of the MTA-STS HTTPS responder: what a relay under test uses instead of 443.
    pub fn sts_https_port(&self) -> u16 {
        self.sts_https.port()
    }

    /// The MTA-STS set-up of `domain`, if it publishes anything.
    pub fn sts(&self, domain: &str) -> Option<StsKnobs> {
        self.sts.knobs(domain)
    }

    /// Replaces the MTA-STS set-up of `domain` while the fleet runs ([`StsKnobs::none`]
    /// removes it). The next DNS query and the next HTTPS connection see it; a connection
    /// already past its handshake keeps its certificate but answers with the new knobs.
    pub async fn set_sts(&self, domain: &str, knobs: StsKnobs) -> Result<(), Error> {
        set_sts(&self.sts, &self.ca, domain, knobs).await
    }

    /// The test CA.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The CA certificate (PEM) a relay must trust.
    pub fn ca_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// Where the CA certificate was written, if a directory was given.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The route table, in catalogue order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route of one domain.
    pub fn route(&self, domain: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.domain.eq_ignore_ascii_case(domain))
    }

    /// The scenarios served.
    pub fn scenarios(&self) -> &[Scenario] {
        &self.scenarios
    }

    /// The shared transcript store.
    pub fn transcripts(&self) -> &Transcripts {
        &self.transcripts
    }

    /// A snapshot of one domain's transcript.
    pub fn transcript(&self, domain: &str) -> Transcript {
        self.transcripts.get(domain)
    }

    /// A token that stops the fleet when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes every connection and waits for the tasks to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Issues the policy host's certificate (off the runtime: the RSA key costs seconds) and
/// stores the set-up.
async fn set_sts(
    table: &StsTable,
    ca: &Arc<TestCa>,
    domain: &str,
    knobs: StsKnobs,
) -> Result<(), Error> {
    let tls = match &knobs.https {
        Some(https) => {
            let (ca, host, cert) = (ca.clone(), policy_host(domain), https.cert);
            let config = run_blocking(move || {
                let identity = ca.issue(cert, &host)?;
                ca.server_config(&identity, &host, &TlsKnobs::default())
            })
            .await??;
            Some(config)
        }
        None => None,
    };
    table.set(domain, StsEntry { knobs, tls });
    Ok(())
}

/// One MX host's place in the fleet.
#[derive(Clone, Debug)]
struct Slot {
    scenario: usize,
    mx: usize,
    ip: Ipv4Addr,
}

fn select(ids: Option<&[String]>) -> Result<Vec<Scenario>, Error> {
    let all = catalogue();
    let Some(ids) = ids else {
        return Ok(all);
    };
    ids.iter()
        .map(|id| {
            all.iter()
                .find(|s| s.id.eq_ignore_ascii_case(id))
                .cloned()
                .ok_or_else(|| Error::UnknownScenario(id.clone()))
        })
        .collect()
}

fn assign_addresses(scenarios: &[Scenario], first: Ipv4Addr) -> Result<Vec<Slot>, Error> {
    let mut next = u32::from(first);
    let mut slots = Vec::new();
    for (scenario, s) in scenarios.iter().enumerate() {
        for mx in 0..s.mx.len() {
            let ip = Ipv4Addr::from(next);
            if ip.octets()[0] != 127 || ip.is_broadcast() || ip.octets()[1..] == [255, 255, 255] {
                return Err(Error::AddressesExhausted);
            }
            slots.push(Slot { scenario, mx, ip });
            next += 1;
        }
    }
    Ok(slots)
}

/// The plan of every listening MX host, with its address.
fn build_plans(
    ca: &TestCa,
    scenarios: &[Scenario],
    layout: &[Slot],
    timing: Timing,
) -> Result<Vec<(Ipv4Addr, Arc<MxPlan>)>, Error> {
    let mut plans = Vec::new();
    for slot in layout {
        let scenario = &scenarios[slot.scenario];
        let spec = &scenario.mx[slot.mx];
        let Some(behaviour) = scenario.behaviour_of(spec) else {
            continue;
        };
        let host = scenario.mx_host(spec);
        let tls = match &behaviour.upgrade {
            Upgrade::Tls { cert, knobs } => {
                let identity = ca.issue(*cert, &host)?;
                Some(ca.server_config(&identity, &host, knobs)?)
            }
            Upgrade::Stay | Upgrade::Raw(_) => None,
        };
        let plan =
            MxPlan { domain: scenario.domain(), host, behaviour: behaviour.clone(), tls, timing };
        plans.push((slot.ip, Arc::new(plan)));
    }
    Ok(plans)
}

fn routes(scenarios: &[Scenario], layout: &[Slot], port: u16) -> Vec<Route> {
    scenarios
        .iter()
        .enumerate()
        .map(|(index, scenario)| {
            let mut mx: Vec<RouteMx> = layout
                .iter()
                .filter(|slot| slot.scenario == index)
                .map(|slot| {
                    let spec = &scenario.mx[slot.mx];
                    RouteMx {
                        host: scenario.mx_host(spec),
                        ip: slot.ip,
                        port,
                        preference: spec.preference,
                        listening: scenario.behaviour_of(spec).is_some(),
                    }
                })
                .collect();
            mx.sort_by_key(|m| m.preference);
            Route { scenario: scenario.id, domain: scenario.domain(), mx }
        })
        .collect()
}

/// Binds `port` (or one free port, when 0) on every address in `ips`, and reserves it on every
/// address in `refuse` with a socket that is bound but never listens, so that connections
/// there are refused. When both are empty (a fleet without MX hosts), the port is reserved on
/// `fallback` so that [`Fleet::port`] still names a port nobody else holds.
///
/// Without the reservation, a host that "refuses TCP" was only an address nobody listened on,
/// and another fleet (the conformance runner starts one per scenario, all on 127.0.0.2
/// upward, and other test processes do the same) could pick the same port on that address:
/// the relay then reached the other fleet's server and counted a delivery the scenario never
/// saw (seen as MX-09 delivered via mx1, and as GRT-01 delivered: a fleet whose only host
/// refuses used to probe a port and release it). The first address bound chooses the port,
/// whether it listens or only reserves. The reservation has no `SO_REUSEADDR`, so the kernel
/// refuses any other bind of that address and port, in this process or another, and never
/// hands the port out for a `bind(0)` there.
async fn bind_common_port(
    ips: &[Ipv4Addr],
    refuse: &[Ipv4Addr],
    port: u16,
    fallback: Ipv4Addr,
) -> Result<(u16, Vec<TcpListener>, Vec<tokio::net::TcpSocket>), Error> {
    let fallback = [fallback];
    let refuse = if ips.is_empty() && refuse.is_empty() { &fallback[..] } else { refuse };
    'attempt: for _ in 0..PORT_ATTEMPTS {
        // 0 until the first bind has chosen the port.
        let mut chosen = port;
        let mut listeners = Vec::new();
        for ip in ips {
            let addr = SocketAddr::new(IpAddr::V4(*ip), chosen);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    if chosen == 0 {
                        chosen = listener
                            .local_addr()
                            .map_err(|source| Error::Bind { addr, source })?
                            .port();
                    }
                    listeners.push(listener);
                }
                Err(error)
                    if port == 0
                        && chosen != 0
                        && error.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    continue 'attempt;
                }
                Err(source) => return Err(Error::Bind { addr, source }),
            }
        }
        let mut refusing = Vec::new();
        for ip in refuse {
            let addr = SocketAddr::new(IpAddr::V4(*ip), chosen);
            match reserve(addr) {
                Ok(socket) => {
                    if chosen == 0 {
                        chosen = socket
                            .local_addr()
                            .map_err(|source| Error::Bind { addr, source })?
                            .port();
                    }
                    refusing.push(socket);
                }
                Err(error)
                    if port == 0
                        && chosen != 0
                        && error.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    continue 'attempt;
                }
                Err(source) => return Err(Error::Bind { addr, source }),
            }
        }
        return Ok((chosen, listeners, refusing));
    }
    Err(Error::NoFreePort { attempts: PORT_ATTEMPTS })
}

/// A socket bound to `addr` that never listens: connections there are refused, and no other
/// socket can bind it (no `SO_REUSEADDR`, which `TcpSocket::new_v4` leaves off).
fn reserve(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(addr)?;
    Ok(socket)
}

fn write_ca(dir: &Path, pem: &str) -> Result<PathBuf, Error> {
    let path = dir.join("ca.pem");
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
    std::fs::write(&path, pem).map_err(|source| Error::Io { path: path.clone(), source })?;
    Ok(path)
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Join(e.to_string()))
}
