//! Postwarden: an SMTP relay whose TLS behaviour per destination is decided by WebAssembly
//! policy components.
//!
//! # Layout
//! - [`config`]: the TOML configuration.
//! - [`policy`]: the policy engine (contract, wasmtime, chain, fail-closed rules).
//! - [`cli`]: the `postwarden` command's subcommands.

pub mod cli;
pub mod config;
pub mod policy;
