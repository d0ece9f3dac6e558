//! The simulator library's error type.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::certs::CertError;

/// Why the fleet or one of its parts could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A certificate or TLS configuration could not be built.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No port was free on every address the fleet needs.
    #[error("no common port free on all fleet addresses after {attempts} attempts")]
    NoFreePort {
        /// How many ports were tried.
        attempts: usize,
    },
    /// The DNS zone could not be built.
    #[error("dns: {0}")]
    Dns(String),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A scenario id in the options is not in the catalogue.
    #[error("unknown scenario {0}")]
    UnknownScenario(String),
    /// The fleet needs more loopback addresses than 127.0.0.0/8 holds past the first one.
    #[error("ran out of loopback addresses")]
    AddressesExhausted,
    /// A blocking set-up task panicked.
    #[error("set-up task failed: {0}")]
    Join(String),
}
