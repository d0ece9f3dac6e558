//! The authoritative DNS for `sim.test`: MX and A records for every scenario domain, and the
//! MTA-STS names of domains that publish them.
//!
//! A hickory-server [`Catalog`] with one in-memory zone, served over UDP and TCP on the same
//! port. Names under `sim.test` that no scenario uses get NXDOMAIN; names outside the zone get
//! REFUSED (the server is authoritative only).
//!
//! In front of the catalog, [`Handler`] answers `_mta-sts.<domain>` (TXT) and
//! `mta-sts.<domain>` (A, 127.0.0.1) from the fleet's live [`StsTable`], so a set-up changed
//! while the fleet runs is answered at once, and a lookup can fail on purpose ([`TxtFault`]),
//! which a static zone cannot do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::ServerFuture;
use hickory_server::authority::{Catalog, MessageResponseBuilder, ZoneType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryAuthority;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::scenario::ZONE;
use crate::sts::{StsKnobs, StsTable, TxtFault};

/// TTL of every record: short, so a resolver cache never outlives a test fleet for long.
const TTL: u32 = 5;

/// TTL of the `_mta-sts` TXT records: zero, so a resolver sees a record changed mid-test
/// (RFC 8461 §3.3, a new `id`) on its next lookup rather than after a cached one expires.
const STS_TTL: u32 = 0;

/// Where every `mta-sts.<domain>` points: the fleet's HTTPS responder.
pub const STS_HTTPS_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;

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
    let records = [
        soa_record()?,
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

/// Serves `domains` and the MTA-STS names in `sts` on `ip` (UDP and TCP, same port; port 0
/// picks a free one) until `shutdown`, and returns the bound address.
pub async fn serve(
    ip: IpAddr,
    port: u16,
    domains: &[DomainRecords],
    sts: StsTable,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, Error> {
    let ns_ip = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    let handler = Handler { catalog: catalog(domains, ns_ip)?, sts, soa: soa_record()? };
    let (udp, tcp) = bind_pair(ip, port).await?;
    let addr = udp
        .local_addr()
        .map_err(|source| Error::Bind { addr: SocketAddr::new(ip, port), source })?;
    let mut server = ServerFuture::new(handler);
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

/// The catalog, with the MTA-STS names of a live [`StsTable`] answered in front of it.
pub struct Handler {
    catalog: Catalog,
    sts: StsTable,
    /// The zone's SOA, for the authority section of an empty answer.
    soa: Record,
}

/// What the STS table says about a query name.
enum StsAnswer {
    /// Not an STS name the table knows: ask the catalog.
    Pass,
    /// The name exists: these records of the asked type (maybe none).
    Records(Vec<Record>),
    /// Fail on purpose.
    Fault(TxtFault),
}

impl Handler {
    fn sts_answer(&self, qname: &Name, qtype: RecordType) -> StsAnswer {
        let text = qname.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        if let Some(domain) = text.strip_prefix("_mta-sts.") {
            let Some(knobs) = self.sts.knobs(domain) else { return StsAnswer::Pass };
            if let Some(fault) = knobs.txt_fault {
                return StsAnswer::Fault(fault);
            }
            if knobs.txt.is_empty() {
                return StsAnswer::Pass;
            }
            return StsAnswer::Records(txt_records(qname, qtype, &knobs));
        }
        if let Some(domain) = text.strip_prefix("mta-sts.") {
            let Some(StsKnobs { https: Some(_), .. }) = self.sts.knobs(domain) else {
                return StsAnswer::Pass;
            };
            let records = if matches!(qtype, RecordType::A | RecordType::ANY) {
                vec![Record::from_rdata(qname.clone(), TTL, RData::A(A(STS_HTTPS_IP)))]
            } else {
                Vec::new()
            };
            return StsAnswer::Records(records);
        }
        StsAnswer::Pass
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let answer = match request.request_info() {
            Ok(info) => self.sts_answer(&Name::from(info.query.name()), info.query.query_type()),
            Err(_) => StsAnswer::Pass,
        };
        let mut header = Header::response_from_request(request.header());
        header.set_authoritative(true);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = request.edns() {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(512));
            builder.edns(ours);
        }
        let sent = match answer {
            StsAnswer::Pass => return self.catalog.handle_request(request, response_handle).await,
            StsAnswer::Fault(TxtFault::Timeout) => {
                tracing::debug!(id = request.id(), "sts txt lookup left unanswered");
                header.set_response_code(ResponseCode::ServFail);
                return header.into();
            }
            StsAnswer::Fault(TxtFault::ServFail) => {
                header.set_authoritative(false);
                header.set_response_code(ResponseCode::ServFail);
                response_handle.send_response(builder.build_no_records(header)).await
            }
            StsAnswer::Records(records) => {
                let soa: &[Record] =
                    if records.is_empty() { std::slice::from_ref(&self.soa) } else { &[] };
                let message = builder.build(header, records.iter(), [], soa.iter(), []);
                response_handle.send_response(message).await
            }
        };
        sent.unwrap_or_else(|error| {
            tracing::debug!(%error, "dns response not sent");
            let mut failed = Header::response_from_request(request.header());
            failed.set_response_code(ResponseCode::ServFail);
            failed.into()
        })
    }
}

fn txt_records(qname: &Name, qtype: RecordType, knobs: &StsKnobs) -> Vec<Record> {
    if !matches!(qtype, RecordType::TXT | RecordType::ANY) {
        return Vec::new();
    }
    knobs
        .txt
        .iter()
        .map(|txt| {
            let rdata = RData::TXT(TXT::new(txt.strings.clone()));
            Record::from_rdata(qname.clone(), STS_TTL, rdata)
        })
        .collect()
}

fn soa_record() -> Result<Record, Error> {
    let origin = name(ZONE)?;
    let ns = name(&format!("ns.{ZONE}"))?;
    let soa = SOA::new(ns, name(&format!("hostmaster.{ZONE}"))?, 1, 60, 60, 600, TTL);
    Ok(Record::from_rdata(origin, TTL, RData::SOA(soa)))
}

fn name(text: &str) -> Result<Name, Error> {
    let mut name = Name::from_ascii(text).map_err(|e| Error::Dns(format!("{text}: {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}
