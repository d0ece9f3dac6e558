//! The relay's TOML configuration, an operator's file: parse and validate, then turn every
//! section into the runtime values the relay builds from it (what `run` does after loading,
//! short of reading the files it names).
//!
//! Checks: no panic on any text, including in the conversions of a file that validated.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use postwarden::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text, Path::new("/etc/postwarden/relay.toml")) else { return };
    let hostname = "relay.test";
    let _ = config.delivery.parsed_routes().expect("validated routes parse");
    let _ = config.queue.options(hostname);
    let _ = config.delivery.timeouts.to_timeouts();
    for policy in &config.policies {
        let _ = policy.settings_json();
        let _ = policy.limits();
    }
    // The inbound options read the certificate and credential files (or make a key); without
    // them they are pure conversions.
    let inbound = &config.inbound;
    if inbound.tls_cert.is_none()
        && inbound.tls_key.is_none()
        && inbound.credentials_file.is_none()
        && !inbound.tls_self_signed
    {
        let _ = config.inbound.options(hostname);
    }
});
