//! Shared helpers for the end-to-end tests.
//!
//! # Layout
//! - [`wasm`]: the bundled policies and test fixtures, built to wasm components on demand.

pub mod chains;
pub mod sim;
pub mod wasm;
