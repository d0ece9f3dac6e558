//! MTA-STS set-ups as data (RFC 8461 §3): the `_mta-sts.<domain>` TXT records and how
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt` answers.
//!
//! A [`StsKnobs`] is attached to a domain through [`crate::Scenario::sts`],
//! [`crate::FleetOptions::sts`] or, while the fleet runs, [`crate::Fleet::set_sts`]. The DNS
//! ([`crate::dns`]) and the HTTPS responder ([`crate::https`]) both read the fleet's
//! [`StsTable`], so a change made mid-test (a new policy id while HTTPS is down, RFC 8461 §3.3)
//! is seen by the next query and the next request.
//!
//! Every knob is deliberately loose: the simulator serves malformed records and policies as
//! readily as good ones, because the catalogue of broken set-ups is the point.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::ServerConfig;

use crate::certs::CertKind;

/// The only path a sender may fetch (RFC 8461 §3.3); any other gets 404.
pub const WELL_KNOWN_PATH: &str = "/.well-known/mta-sts.txt";

/// The longest character-string a TXT record can hold (RFC 1035 §3.3).
pub const MAX_CHARACTER_STRING: usize = 255;

/// What a domain publishes for MTA-STS. The default publishes nothing: no TXT record (the
/// name gets NXDOMAIN) and no `mta-sts.<domain>` host.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct StsKnobs {
    /// The TXT records at `_mta-sts.<domain>`, in answer order; empty means none (NXDOMAIN,
    /// unless `txt_fault` is set). Any number, so "two `v=STSv1` records" can be served.
    pub txt: Vec<TxtRecord>,
    /// Makes the TXT lookup fail instead of answering `txt`.
    pub txt_fault: Option<TxtFault>,
    /// The policy host `mta-sts.<domain>`: when set, it resolves to 127.0.0.1 and the fleet's
    /// HTTPS responder answers for it; when `None`, the name gets NXDOMAIN.
    pub https: Option<HttpsKnobs>,
}

impl StsKnobs {
    /// Publishes nothing (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// A well-formed set-up: the record `v=STSv1; id=<id>;` and `policy` served as
    /// `text/plain` with a valid certificate.
    pub fn serving(id: &str, policy: &str) -> Self {
        Self {
            txt: vec![TxtRecord::from(format!("v=STSv1; id={id};"))],
            txt_fault: None,
            https: Some(HttpsKnobs::policy(policy)),
        }
    }

    /// Whether the domain publishes nothing at all.
    pub fn is_none(&self) -> bool {
        self.txt.is_empty() && self.txt_fault.is_none() && self.https.is_none()
    }
}

/// One TXT record: one or more character-strings, which a reader concatenates (RFC 8461
/// §3.1 lets a record be split anywhere).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TxtRecord {
    /// The character-strings, in order; each at most [`MAX_CHARACTER_STRING`] bytes.
    pub strings: Vec<String>,
}

impl TxtRecord {
    /// A record made of exactly these character-strings (e.g. `["v=STSv1; ", "id=1;"]`).
    pub fn split<S: Into<String>>(strings: impl IntoIterator<Item = S>) -> Self {
        Self { strings: strings.into_iter().map(Into::into).collect() }
    }

    /// The record's text: its strings concatenated.
    pub fn text(&self) -> String {
        self.strings.concat()
    }
}

impl From<String> for TxtRecord {
    /// One character-string, or several of [`MAX_CHARACTER_STRING`] bytes when the text is
    /// longer (cut on character boundaries).
    fn from(text: String) -> Self {
        if text.len() <= MAX_CHARACTER_STRING {
            return Self { strings: vec![text] };
        }
        let mut strings = Vec::new();
        let mut current = String::new();
        for c in text.chars() {
            if current.len() + c.len_utf8() > MAX_CHARACTER_STRING {
                strings.push(std::mem::take(&mut current));
            }
            current.push(c);
        }
        strings.push(current);
        Self { strings }
    }
}

impl From<&str> for TxtRecord {
    fn from(text: &str) -> Self {
        Self::from(text.to_owned())
    }
}

/// How the `_mta-sts.<domain>` TXT lookup fails.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TxtFault {
    /// Answer SERVFAIL.
    ServFail,
    /// Never answer: the resolver times out.
    Timeout,
}

/// How `https://mta-sts.<domain>/` answers. The response always ends the connection
/// (`Connection: close`); there is no keep-alive.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct HttpsKnobs {
    /// The status code (200 by default; any number, including nonsense ones).
    pub status: u16,
    /// The `Content-Type` header; `None` sends none.
    pub content_type: Option<String>,
    /// The body bytes, sent as they are.
    pub body: Vec<u8>,
    /// How long to wait after the request before answering (a slow server).
    pub delay: Duration,
    /// A `Location` header, for redirects (pair it with a 3xx `status`).
    pub location: Option<String>,
    /// How the body is delimited.
    pub framing: Framing,
    /// The certificate, issued for `mta-sts.<domain>` ([`CertKind::WrongHost`] names another
    /// host, [`CertKind::Expired`] is long expired, ...).
    pub cert: CertKind,
    /// Read the request, then close without a response (after `delay`).
    pub close_without_reply: bool,
}

impl HttpsKnobs {
    /// 200, `text/plain`, this policy text, a valid certificate.
    pub fn policy(text: &str) -> Self {
        Self { body: text.as_bytes().to_vec(), ..Self::default() }
    }
}

impl Default for HttpsKnobs {
    fn default() -> Self {
        Self {
            status: 200,
            content_type: Some("text/plain".to_owned()),
            body: Vec::new(),
            delay: Duration::ZERO,
            location: None,
            framing: Framing::ContentLength,
            cert: CertKind::Valid,
            close_without_reply: false,
        }
    }
}

/// HTTP/1.1 message framing of the response body (RFC 9112 §6).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Framing {
    /// A `Content-Length` header.
    #[default]
    ContentLength,
    /// `Transfer-Encoding: chunked`, with chunks of at most this many bytes.
    Chunked(usize),
}

/// The host name of a domain's policy server.
pub fn policy_host(domain: &str) -> String {
    format!("mta-sts.{domain}")
}

/// The live STS set-ups of a fleet, keyed by lower-case domain. Cheap to clone; shared by the
/// DNS handler and the HTTPS responder.
#[derive(Clone, Debug, Default)]
pub struct StsTable {
    inner: Arc<RwLock<BTreeMap<String, StsEntry>>>,
}

/// One domain's set-up and the TLS configuration that serves its certificate.
#[derive(Clone, Debug)]
pub(crate) struct StsEntry {
    pub(crate) knobs: StsKnobs,
    pub(crate) tls: Option<Arc<ServerConfig>>,
}

impl StsTable {
    /// The knobs of `domain`, if it publishes anything.
    pub fn knobs(&self, domain: &str) -> Option<StsKnobs> {
        self.entry(domain).map(|e| e.knobs)
    }

    /// The domains that publish something.
    pub fn domains(&self) -> Vec<String> {
        self.read(|map| map.keys().cloned().collect())
    }

    pub(crate) fn entry(&self, domain: &str) -> Option<StsEntry> {
        let key = key(domain);
        self.read(|map| map.get(&key).cloned())
    }

    /// Replaces the set-up of `domain`; a [`StsKnobs::is_none`] one removes it.
    pub(crate) fn set(&self, domain: &str, entry: StsEntry) {
        let key = key(domain);
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if entry.knobs.is_none() {
            map.remove(&key);
        } else {
            map.insert(key, entry);
        }
    }

    fn read<T>(&self, f: impl FnOnce(&BTreeMap<String, StsEntry>) -> T) -> T {
        // A poisoned lock only means a writer panicked between two whole-entry updates.
        f(&self.inner.read().unwrap_or_else(PoisonError::into_inner))
    }
}

fn key(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_into_character_strings() {
        let text = "x".repeat(600);
        let record = TxtRecord::from(text.as_str());
        let lengths: Vec<usize> = record.strings.iter().map(String::len).collect();
        assert_eq!(lengths, vec![255, 255, 90]);
        assert_eq!(record.text(), text);
    }

    #[test]
    fn default_publishes_nothing() {
        assert!(StsKnobs::default().is_none());
        assert!(!StsKnobs::serving("1", "version: STSv1\n").is_none());
    }
}
