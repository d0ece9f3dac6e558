//! The fleet's DNS: MX and A records for single- and multi-MX scenarios, NXDOMAIN for unknown
//! names, and a full fleet that binds every scenario on one common port.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use postwarden_sim::{Fleet, FleetOptions, Timing, catalogue};

fn resolver(fleet: &Fleet) -> Resolver<TokioConnectionProvider> {
    let dns = fleet.dns_addr();
    let servers = NameServerConfigGroup::from_ips_clear(&[dns.ip()], dns.port(), true);
    let mut options = ResolverOpts::default();
    options.cache_size = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], servers),
        TokioConnectionProvider::default(),
    )
    .with_options(options)
    .build()
}

#[tokio::test]
async fn single_mx_domain_resolves_to_its_loopback_address() {
    let fleet = support::fleet(&["CAP-01", "STL-01"]).await;
    let resolver = resolver(&fleet);
    let route = fleet.route("cap-01.sim.test").unwrap();
    let mx = resolver.mx_lookup("cap-01.sim.test.").await.unwrap();
    let records: Vec<_> = mx.iter().map(|r| (r.preference(), r.exchange().to_ascii())).collect();
    assert_eq!(records, vec![(10, "mx1.cap-01.sim.test.".to_owned())]);
    let a = resolver.ipv4_lookup("mx1.cap-01.sim.test.").await.unwrap();
    let ips: Vec<IpAddr> = a.iter().map(|a| IpAddr::V4(a.0)).collect();
    assert_eq!(ips, vec![IpAddr::V4(route.mx[0].ip)]);
    assert_ne!(route.mx[0].ip, fleet.route("stl-01.sim.test").unwrap().mx[0].ip);
}

#[tokio::test]
async fn multi_mx_domain_has_both_preferences_and_addresses() {
    let fleet = support::fleet(&["MX-01", "MX-09"]).await;
    let resolver = resolver(&fleet);
    for domain in ["mx-01.sim.test", "mx-09.sim.test"] {
        let route = fleet.route(domain).unwrap();
        let mx = resolver.mx_lookup(format!("{domain}.")).await.unwrap();
        let mut records: Vec<_> =
            mx.iter().map(|r| (r.preference(), r.exchange().to_ascii())).collect();
        records.sort();
        assert_eq!(records, vec![(10, format!("mx1.{domain}.")), (20, format!("mx2.{domain}."))]);
        for entry in &route.mx {
            let a = resolver.ipv4_lookup(format!("{}.", entry.host)).await.unwrap();
            assert_eq!(a.iter().map(|a| a.0).collect::<Vec<_>>(), vec![entry.ip]);
            assert_eq!(entry.port, fleet.port());
        }
    }
    // MX-09's first host resolves but refuses connections.
    let refused = &fleet.route("mx-09.sim.test").unwrap().mx[0];
    assert!(!refused.listening);
    let error = tokio::net::TcpStream::connect(refused.addr()).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn unknown_names_get_nxdomain() {
    let fleet = support::fleet(&["CAP-01"]).await;
    let resolver = resolver(&fleet);
    let error = resolver.mx_lookup("no-such-scenario.sim.test.").await.unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
    let error = resolver.ipv4_lookup("mx9.cap-01.sim.test.").await.unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
}

#[tokio::test]
async fn whole_catalogue_serves_on_one_port_and_writes_the_ca() {
    let dir = std::env::temp_dir().join(format!("postwarden-sim-test-{}", std::process::id()));
    let fleet = Fleet::start(FleetOptions {
        timing: Timing::fast(),
        ca: Some(support::ca()),
        ca_dir: Some(dir.clone()),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(fleet.routes().len(), catalogue().len());
    let pem = std::fs::read_to_string(fleet.ca_file().unwrap()).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(pem, fleet.ca_pem());
    let mut ips = std::collections::HashSet::new();
    for route in fleet.routes() {
        for mx in &route.mx {
            assert_eq!(mx.port, fleet.port());
            assert!(ips.insert(mx.ip), "{} shares an address", mx.host);
        }
    }
    let resolver = resolver(&fleet);
    let mx = resolver.mx_lookup("cert-21.sim.test.").await.unwrap();
    assert_eq!(mx.iter().count(), 1);
    fleet.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A host that refuses TCP holds its address and port: no other fleet, in this process or
/// another, can listen there, so a connection to it is refused rather than answered by another
/// scenario's server. Every catalogue scenario with a refusing host is checked on its own fleet,
/// as the conformance runner starts them: GRT-01, whose only host refuses, used to release its
/// port (GRT-01 "delivered" in conformance runs).
#[tokio::test]
async fn a_refusing_host_reserves_its_address() {
    let ids: Vec<&str> = catalogue()
        .into_iter()
        .filter(|s| s.mx.iter().any(|mx| s.behaviour_of(mx).is_none()))
        .map(|s| s.id)
        .collect();
    assert!(ids.contains(&"GRT-01") && ids.contains(&"MX-09"), "{ids:?}");
    for id in ids {
        let fleet = support::fleet(&[id]).await;
        let route = &fleet.routes()[0];
        let mut refusing_hosts = 0;
        for mx in &route.mx {
            if mx.listening {
                // The good host still answers.
                assert!(tokio::net::TcpStream::connect(mx.addr()).await.is_ok(), "{id}");
                continue;
            }
            refusing_hosts += 1;
            // Both kinds of bind another fleet could try: with SO_REUSEADDR (tokio's
            // listeners) and without (std's).
            let taken = tokio::net::TcpListener::bind(mx.addr()).await;
            assert_eq!(taken.unwrap_err().kind(), std::io::ErrorKind::AddrInUse, "{id}");
            let taken = std::net::TcpListener::bind(mx.addr());
            assert_eq!(taken.unwrap_err().kind(), std::io::ErrorKind::AddrInUse, "{id}");
            let refused = tokio::net::TcpStream::connect(mx.addr()).await;
            assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused, "{id}");
        }
        assert!(refusing_hosts > 0, "{id}");
        fleet.shutdown().await;
    }
}
