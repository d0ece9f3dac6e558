//! The destination simulator: fake MX servers, the DNS that points at them, and the checks
//! that judge a relay from the servers' side.
//!
//! Every scenario of the research catalogue (`shared/research/starttls-scenarios.md` §2–§3) is a
//! domain `<label>.sim.test` whose MX hosts play a scripted behaviour: STARTTLS offered or
//! stripped, odd replies, broken handshakes, bad certificates, forged replies injected after the
//! 220, SMTP faults at every stage. A relay pointed at the fleet's DNS, port and CA delivers to
//! these domains; the transcripts and [`invariants::check`] tell what it did on the wire.
//!
//! The simulator never depends on the relay: it speaks SMTP with its own small parser
//! ([`smtp`]), so a parser bug in the relay cannot hide in the conformance tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postwarden_sim::Error> {
//! use std::time::Duration;
//! use postwarden_sim::{Fleet, FleetOptions, check};
//!
//! let fleet = Fleet::start(FleetOptions::default()).await?;
//! // Point the relay at fleet.dns_addr() and fleet.port(), trust only fleet.ca_pem(),
//! // deliver to user@cap-02.sim.test under a forced policy, then:
//! let transcript = fleet.transcripts().settled("cap-02.sim.test", Duration::from_secs(5)).await;
//! assert!(check("CAP-02", &transcript, true).is_empty(), "plaintext MAIL under forced TLS");
//! fleet.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! Lower modules know nothing of higher ones:
//!
//! | module | concern |
//! | --- | --- |
//! | [`smtp`] | server-side SMTP wire format without I/O: lines, commands, DATA body, replies |
//! | [`certs`] | the test CA (fixed dates), certificate variants, rustls server configurations |
//! | [`sts`] | MTA-STS set-ups as data: TXT records, faults, HTTPS answers; the live table |
//! | [`scenario`] | the catalogue as data: behaviours, MX layout, expected outcomes per policy |
//! | [`transcript`] | what the servers saw: events per connection, shared per domain |
//! | [`server`] | one fake MX: plays a behaviour, performs the STARTTLS switch, records |
//! | [`invariants`] | I1, I2, I4, I5 and related checks over a transcript; I9 against the relay's report |
//! | [`https`] | the MTA-STS policy host: one HTTPS port for every `mta-sts.<domain>` |
//! | [`dns`] | the hickory authority for `sim.test` (MX and A records, MTA-STS names) |
//! | [`fleet`] | every scenario on its own 127.0.0.N, one common port, plus DNS and HTTPS |
//! | [`error`] | the library error type |

#![forbid(unsafe_code)]

pub mod certs;
pub mod dns;
pub mod error;
pub mod fleet;
pub mod https;
pub mod invariants;
pub mod scenario;
pub mod server;
pub mod smtp;
pub mod sts;
pub mod transcript;

pub use certs::{CertKind, ServerIdentity, TestCa, TlsKnobs};
pub use error::Error;
pub use fleet::{Fleet, FleetOptions, Route, RouteMx};
pub use invariants::{Delivery, Invariant, Violation, check, check_deliveries};
pub use scenario::{Behaviour, Expected, MxSpec, Outcome, Policy, Scenario, catalogue};
pub use server::Timing;
pub use sts::{Framing, HttpsKnobs, StsKnobs, TxtFault, TxtRecord};
pub use transcript::{ConnectionLog, Event, Service, Transcript, Transcripts};
