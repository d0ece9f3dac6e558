//! `postwarden probe DOMAIN`: the check a destination's owner must pass before forced TLS is
//! switched on for it.
//!
//! For every MX host: is STARTTLS offered, which TLS version and cipher, which names the
//! certificate carries, does it verify for the MX host name (`verify`) and for the domain
//! (`secure`), and what the configured chain would decide. When the chain's requirement names a
//! client identity (mutual TLS), the probe presents that certificate too, as a delivery would.
//! It ends with a plain verdict.
//! Nothing is sent beyond EHLO and STARTTLS: no MAIL, no message.

use std::fmt::Write as _;

use crate::config::Config;
use crate::delivery::client::{Client, StartTls, TlsInfo};
use crate::delivery::route::{HickoryResolver, Router};
use crate::policy::{Chain, Context, Failure, Requirement, TlsLevel, Verdict};

/// What one handshake at one level found.
enum Check {
    /// TLS up, with what it showed.
    Up(TlsInfo),
    /// STARTTLS not offered or refused, or the handshake failed.
    Down(String),
}

/// Probes `domain` as `config` would deliver to it; returns the report and whether forced TLS
/// (`verify`) would succeed on every MX host.
pub async fn probe(config: &Config, chain: &Chain, domain: &str) -> anyhow::Result<(String, bool)> {
    let delivery = &config.delivery;
    let resolver = HickoryResolver::new(&delivery.dns_servers).map_err(anyhow::Error::msg)?;
    let router = Router::new(
        Box::new(resolver),
        delivery.port,
        delivery.parsed_routes().map_err(anyhow::Error::msg)?,
        Some(0),
    );
    let tls = config.tls.context().map_err(anyhow::Error::msg)?;
    let timeouts = delivery.timeouts.to_timeouts();
    let mut out = String::new();
    let hosts = router.route(domain).await.map_err(|e| anyhow::anyhow!("{domain}: {e}"))?;
    let mut verify_ok = true;
    let mut reasons = Vec::new();
    for (index, host) in hosts.iter().enumerate() {
        let Some(&addr) = host.addrs.first() else { continue };
        writeln!(
            out,
            "MX {} {} [{}] (preference {})",
            index + 1,
            host.name,
            addr,
            host.preference
        )?;
        let mut ctx = Context::new(domain, &host.name);
        ctx.ip = addr.ip().to_string();
        ctx.mx_index = u32::try_from(index).unwrap_or(u32::MAX);
        ctx.mx_count = u32::try_from(hosts.len()).unwrap_or(u32::MAX);
        let plan = chain.plan(&ctx);
        match &plan.verdict {
            Verdict::Require(r) => writeln!(out, "  policy:       {} decides {r}", plan.decider)?,
            Verdict::Defer { code, reason } => {
                writeln!(out, "  policy:       defer {code} {reason}")?
            }
        }
        let identity = match &plan.verdict {
            Verdict::Require(r) => r.client_identity.clone(),
            Verdict::Defer { .. } => None,
        };
        if let Some(name) = &identity {
            writeln!(out, "  client cert:  {name} (from [tls.client_identities], presented)")?;
        }
        let mut offered = None;
        for level in [TlsLevel::Verify, TlsLevel::Secure] {
            let mut requirement = Requirement::new(level);
            requirement.client_identity = identity.clone();
            let (client, _) = match Client::connect(addr, timeouts).await {
                Ok(pair) if pair.1.code() == 220 => pair,
                Ok((_, greeting)) => {
                    writeln!(out, "  greeting:     {}", greeting.to_string().trim_end())?;
                    break;
                }
                Err(e) => {
                    writeln!(out, "  connect:      {e}")?;
                    if level == TlsLevel::Verify {
                        verify_ok = false;
                        reasons.push(format!("{}: {e}", host.name));
                    }
                    break;
                }
            };
            let mut client = client;
            if let Err(e) = client.ehlo(&delivery.helo_name).await {
                writeln!(out, "  ehlo:         {e}")?;
                break;
            }
            if offered.is_none() {
                offered = Some(client.capabilities.starttls);
                writeln!(
                    out,
                    "  STARTTLS:     {}",
                    if client.capabilities.starttls { "offered" } else { "NOT offered" }
                )?;
            }
            let (tls_config, judge) = tls
                .client_config(&requirement, domain, &host.name, addr.port())
                .map_err(anyhow::Error::msg)?;
            let server_name = rustls_pki_types::ServerName::try_from(host.name.clone())
                .unwrap_or_else(|_| rustls_pki_types::ServerName::IpAddress(addr.ip().into()));
            let check =
                match client.starttls(tls_config, server_name, &judge, &delivery.helo_name).await {
                    StartTls::Upgraded(tls_client, info) => {
                        tls_client.quit().await;
                        Check::Up(info)
                    }
                    StartTls::Refused { reply, client } => {
                        client.quit().await;
                        Check::Down(format!("STARTTLS refused: {}", reply.to_string().trim_end()))
                    }
                    StartTls::Failed(failure) => Check::Down(describe(&failure)),
                    StartTls::RefusedInTls { reply, .. } => Check::Down(format!(
                        "refused the session after STARTTLS: {}",
                        reply.to_string().trim_end()
                    )),
                    StartTls::OutOfStep(e) => Check::Down(format!("after TLS: {e}")),
                };
            let label =
                if level == TlsLevel::Verify { "verify (MX name)" } else { "secure (domain)" };
            match &check {
                Check::Up(info) => {
                    if level == TlsLevel::Verify {
                        writeln!(
                            out,
                            "  TLS:          {} {}, {} certificate(s), names: {}",
                            match info.version {
                                crate::policy::TlsVersion::Tls13 => "TLSv1.3",
                                crate::policy::TlsVersion::Tls12 => "TLSv1.2",
                            },
                            info.cipher,
                            info.chain_len,
                            if info.names.is_empty() {
                                "(none)".to_owned()
                            } else {
                                info.names.join(", ")
                            }
                        )?;
                    }
                    writeln!(out, "  {label:<13} ok: chain trusted, name matches, dates valid")?;
                }
                Check::Down(why) => {
                    writeln!(out, "  {label:<13} FAILS: {why}")?;
                    if level == TlsLevel::Verify {
                        verify_ok = false;
                        reasons.push(format!("{}: {why}", host.name));
                    }
                }
            }
        }
    }
    if hosts.is_empty() {
        verify_ok = false;
        reasons.push("no MX host".to_owned());
    }
    let because = if verify_ok {
        "every MX host offers STARTTLS with a certificate that verifies for its name".to_owned()
    } else {
        reasons.join("; ")
    };
    writeln!(
        out,
        "\nforced TLS (verify) would succeed: {}, because {because}",
        if verify_ok { "yes" } else { "no" }
    )?;
    Ok((out, verify_ok))
}

fn describe(failure: &Failure) -> String {
    failure.to_string()
}
