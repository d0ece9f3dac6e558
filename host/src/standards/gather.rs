//! Gathering MTA-STS facts for a delivery: the cache's rules ([`super::sts_cache`]) driven
//! with real DNS and HTTPS.
//!
//! The cache lives in the [`Gatherer`], which outlives reloads (a reload that forgot cached
//! policies would open the downgrade RFC 8461 §3.3 forbids); it is in memory, so a restart
//! starts afresh (persisting it in the spool is the next step). Two deliveries to one domain at
//! the same moment may both look up and fetch; the later answer wins, and both are valid.

use std::collections::HashMap;
use std::sync::Mutex;

use super::fetch::Fetcher;
use super::sts::{RecordError, parse_record};
use super::sts_cache::{Entry, Next, TxtAnswer};
use crate::delivery::route::{Lookup, Resolve};

/// Most domains kept; past this the least recently checked half is forgotten.
const MAX_DOMAINS: usize = 100_000;

/// The MTA-STS cache of a running relay.
#[derive(Debug, Default)]
pub struct Gatherer {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Gatherer {
    /// The cache entry for `domain` at `now`, after whatever lookups and fetch it calls for.
    pub async fn entry(
        &self,
        resolver: &dyn Resolve,
        fetcher: &Fetcher,
        domain: &str,
        now: impl Fn() -> u64,
    ) -> Entry {
        let mut entry = self.lock().get(domain).cloned().unwrap_or_default();
        if entry.next(now()) != Next::LookupTxt {
            return entry;
        }
        let answer = match resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(Lookup::Found(records)) => match parse_record(&records) {
                Ok(record) => TxtAnswer::Record(record),
                Err(why) => TxtAnswer::NoRecord(why),
            },
            Ok(Lookup::NoRecords | Lookup::NoSuchName) => TxtAnswer::NoRecord(RecordError::None),
            Err(why) => TxtAnswer::Failed(why),
        };
        if let Next::Fetch(id) = entry.txt_answered(now(), answer) {
            let result = fetcher.fetch(resolver, domain).await;
            if let Err(e) = &result {
                tracing::warn!(domain, "MTA-STS: {e}");
            }
            entry.fetched(now(), id, result);
        }
        let mut entries = self.lock();
        if entries.len() >= MAX_DOMAINS {
            let mut checked: Vec<u64> =
                entries.values().map(|e| e.txt_checked_at.unwrap_or(0)).collect();
            checked.sort_unstable();
            let median = checked[checked.len() / 2];
            entries.retain(|_, e| e.txt_checked_at.unwrap_or(0) > median);
        }
        entries.insert(domain.to_owned(), entry.clone());
        entry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
