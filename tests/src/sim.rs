//! A simulator fleet and a relay delivery engine pointed at it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use postwarden::delivery::client::Timeouts;
use postwarden::delivery::route::{HickoryResolver, Router};
use postwarden::delivery::tls::TlsContext;
use postwarden::delivery::{Deliverer, DomainOutcome, Message};
use postwarden::policy::Chain;
use postwarden_sim::server::Timing;
use postwarden_sim::{Fleet, FleetOptions, TestCa};

/// A fleet serving `scenarios`, and a deliverer that resolves through its DNS, dials its port
/// and trusts only its CA, with 2 s timeouts.
pub async fn fleet(scenarios: &[&str]) -> anyhow::Result<(Fleet, Deliverer)> {
    let fleet = Fleet::start(FleetOptions {
        scenarios: Some(scenarios.iter().map(|s| (*s).to_owned()).collect()),
        timing: Timing { tarpit: Duration::from_secs(6), ..Timing::default() },
        ca: Some(ca()?),
        ..FleetOptions::default()
    })
    .await?;
    let resolver = HickoryResolver::new(&[fleet.dns_addr()]).map_err(anyhow::Error::msg)?;
    let router = Router::new(Box::new(resolver), fleet.port(), HashMap::new(), Some(1));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fleet.ca().root_der().clone())?;
    let deliverer = Deliverer::new(
        router,
        TlsContext::new(roots),
        Timeouts::all(Duration::from_secs(2)),
        "relay.postwarden.test",
    );
    Ok((fleet, deliverer))
}

/// Delivers a small message from `sender@postwarden.test` to `user@domain`.
pub async fn send(
    deliverer: &Deliverer,
    chain: &Chain,
    domain: &str,
    requiretls: bool,
    tls_required_no: bool,
) -> DomainOutcome {
    let body = format!(
        "From: sender@postwarden.test\r\nTo: user@{domain}\r\nSubject: test\r\n\r\nhello\r\n"
    );
    let message = Message {
        mail_from: "sender@postwarden.test",
        body: body.as_bytes(),
        requiretls,
        tls_required_no,
        authenticated: false,
        smtputf8: false,
        attempt: 1,
        age: 0,
    };
    deliverer.deliver(chain, &message, domain, &[format!("user@{domain}")]).await
}

/// One test CA per process (RSA key generation is the slow part).
pub fn ca() -> anyhow::Result<Arc<TestCa>> {
    static CA: OnceLock<Result<Arc<TestCa>, String>> = OnceLock::new();
    CA.get_or_init(|| TestCa::new().map(Arc::new).map_err(|e| e.to_string()))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The command lines starting with `verb` (e.g. `MAIL`) that `domain`'s servers received, in
/// order, over any connection.
pub fn received(fleet: &Fleet, domain: &str, verb: &str) -> Vec<String> {
    fleet
        .transcript(domain)
        .connections
        .iter()
        .flat_map(|c| &c.events)
        .filter_map(|e| match e {
            postwarden_sim::transcript::Event::Received { line, .. } if line.starts_with(verb) => {
                Some(line.clone())
            }
            _ => None,
        })
        .collect()
}
