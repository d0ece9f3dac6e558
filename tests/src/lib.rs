//! Shared helpers for the end-to-end tests.
//!
//! # Layout
//! - [`wasm`]: the bundled policies and test fixtures, built to wasm components on demand.
//! - [`polyglot`]: policies in Python, JavaScript and WAT, built with their own toolchains.
//! - [`submit`]: an independent submission client (STARTTLS, AUTH PLAIN) for running relays.
//! - [`sink`]: a plaintext SMTP destination that records what arrives.
//! - [`peers`]: real peers (private Postfix instances, aiosmtpd) and the certificates they serve.

pub mod chains;
pub mod peers;
pub mod polyglot;
pub mod sim;
pub mod sink;
pub mod submit;
pub mod wasm;
