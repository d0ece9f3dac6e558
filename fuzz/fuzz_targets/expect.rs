//! The conformance harness's expectation files (TOML written by a policy author): parse, then
//! ask for every catalogue scenario's expectation.
//!
//! Checks: no panic; a parsed file answers for every scenario; an override read back is the one
//! the file gave.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postwarden_conformance::expect::{Expectations, Expected};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(expectations) = Expectations::parse(text) else { return };
    for scenario in postwarden_sim::scenario::catalogue() {
        let expected = expectations.expected(&scenario);
        if let Some(expect) = expectations.overrides.get(scenario.id) {
            match &expected {
                Expected::File(found) => assert_eq!(found, expect),
                other => panic!("{}: override {expect:?} read back as {other}", scenario.id),
            }
        }
        let _ = expected.to_string();
    }
    for id in expectations.overrides.keys() {
        assert!(postwarden_sim::scenario::find(id).is_some(), "override for unknown {id}");
    }
});
