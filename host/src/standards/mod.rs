//! What destinations publish about their own TLS: MTA-STS (RFC 8461) today; DANE (RFC 7672)
//! and TLS-RPT (RFC 8460) to come. The host gathers these facts, policies decide on them
//! (`policy::facts`), and the host keeps the floors the RFCs set.
//!
//! # Layout
//! - [`sts`]: the `_mta-sts` record, the policy file and the MX pattern rule, sans-IO.
//! - [`sts_cache`]: when to look up and fetch again, and which policy is in force, sans-IO.
//! - [`fetch`]: the policy fetch over HTTPS.
//! - [`gather`]: the cache of a running relay, driven with real DNS and HTTPS.

pub mod fetch;
pub mod gather;
pub mod sts;
pub mod sts_cache;
