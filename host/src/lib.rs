//! Postwarden: an SMTP relay whose TLS behaviour per destination is decided by WebAssembly
//! policy components.
//!
//! # Layout
//! - [`admin`]: the loopback admin listener (`/metrics`, queue status as JSON).
//! - [`config`]: the TOML configuration.
//! - [`delivery`]: outbound delivery (routing, STARTTLS, policy-driven outcomes).
//! - [`policy`]: the policy engine (contract, wasmtime, chain, fail-closed rules).
//! - [`probe`]: `postwarden probe DOMAIN`, the pre-flight check before forcing TLS.
//! - [`queue`]: the durable queue, retries and DSNs.
//! - [`service`]: the relay as a service: inbound → queue → delivery, reload, shutdown.
//! - [`smtp`]: the SMTP client's wire format, sans-IO.
//! - [`standards`]: what destinations publish about their TLS (MTA-STS), parsed sans-IO.
//! - [`cli`]: the `postwarden` command's subcommands.

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod inbound;
pub mod policy;
pub mod probe;
pub mod queue;
pub mod scaffold;
pub mod service;
pub mod smtp;
pub mod standards;
