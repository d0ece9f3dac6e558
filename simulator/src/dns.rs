//! The authoritative DNS for `sim.test`: MX and A records for every scenario domain.
//!
//! A hickory-server [`Catalog`] with one in-memory zone, served over UDP and TCP on the same
//! port. Names under `sim.test` that no scenario uses get NXDOMAIN; names outside the zone get
//! REFUSED (the server is authoritative only).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, MX, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::ServerFuture;
use hickory_server::authority::{Catalog, ZoneType};
use hickory_server::store::in_memory::InMemoryAuthority;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::scenario::ZONE;

/// TTL of every record: short, so a resolver cache never outlives a test fleet for long.
const TTL: u32 = 5;

/// One MX record and the address of its host.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MxRecord {
    /// Host name, e.g. `mx1.cap-01.sim.test`.
    pub host: String,
    /// MX preference.
    pub preference: u16,
    /// The host's IPv4 address.
    pub ip: Ipv4Addr,
}

/// The records of one domain.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DomainRecords {
    /// The domain, e.g. `cap-01.sim.test`.
    pub domain: String,
    /// Its MX hosts.
    pub mx: Vec<MxRecord>,
}

/// Builds the catalog for `domains`.
pub fn catalog(domains: &[DomainRecords], ns_ip: Ipv4Addr) -> Result<Catalog, Error> {
    let origin = name(ZONE)?;
    let ns = name(&format!("ns.{ZONE}"))?;
    let mut zone = InMemoryAuthority::empty(origin.clone(), ZoneType::Primary, false);
    let serial = 1;
    let soa = SOA::new(ns.clone(), name(&format!("hostmaster.{ZONE}"))?, serial, 60, 60, 600, TTL);
    let records = [
        Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)),
        Record::from_rdata(origin.clone(), TTL, RData::NS(NS(ns.clone()))),
        Record::from_rdata(ns, TTL, RData::A(A(ns_ip))),
    ];
    for record in records {
        zone.upsert_mut(record, serial);
    }
    for domain in domains {
        let owner = name(&domain.domain)?;
        for mx in &domain.mx {
            let host = name(&mx.host)?;
            let rdata = RData::MX(MX::new(mx.preference, host.clone()));
            zone.upsert_mut(Record::from_rdata(owner.clone(), TTL, rdata), serial);
            zone.upsert_mut(Record::from_rdata(host, TTL, RData::A(A(mx.ip))), serial);
        }
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
    Ok(catalog)
}

/// Serves `domains` on `ip` (UDP and TCP, same port; port 0 picks a free one) until
/// `shutdown`, and returns the bound address.
pub async fn serve(
    ip: IpAddr,
    port: u16,
    domains: &[DomainRecords],
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, Error> {
    let ns_ip = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    let catalog = catalog(domains, ns_ip)?;
    let (udp, tcp) = bind_pair(ip, port).await?;
    let addr = udp
        .local_addr()
        .map_err(|source| Error::Bind { addr: SocketAddr::new(ip, port), source })?;
    let mut server = ServerFuture::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5));
    let server_token = server.shutdown_token().clone();
    tracker.spawn(async move {
        shutdown.cancelled().await;
        server_token.cancel();
    });
    tracker.spawn(async move {
        if let Err(error) = server.block_until_done().await {
            tracing::debug!(%error, "dns server stopped with an error");
        }
    });
    Ok(addr)
}

/// Binds UDP first (on `port`, or a free one), then TCP on the same port; retries with a new
/// port when TCP finds it taken.
async fn bind_pair(ip: IpAddr, port: u16) -> Result<(UdpSocket, TcpListener), Error> {
    let mut last = None;
    for _ in 0..20 {
        let want = SocketAddr::new(ip, port);
        let udp =
            UdpSocket::bind(want).await.map_err(|source| Error::Bind { addr: want, source })?;
        let addr = udp.local_addr().map_err(|source| Error::Bind { addr: want, source })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if port == 0 => last = Some(Error::Bind { addr, source }),
            Err(source) => return Err(Error::Bind { addr, source }),
        }
    }
    Err(last.unwrap_or(Error::NoFreePort { attempts: 20 }))
}

fn name(text: &str) -> Result<Name, Error> {
    let mut name = Name::from_ascii(text).map_err(|e| Error::Dns(format!("{text}: {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}
