//! The `postfix-map` policy's table parser: any text pasted as the `map` setting.
//!
//! Checks: no panic in `configure`; every stored entry reads back (`Requirement::decode`, as
//! the decisions do) and re-encodes to the same text; looking each key up gives that entry's
//! level; under a forced level the policy never answers a failure with plaintext.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postfix_map::PostfixMap;
use postwarden_policy_sdk::testing::{FakeHost, context};
use postwarden_policy_sdk::{Action, Decision, Failure, Policy, Requirement};

fuzz_target!(|data: &[u8]| {
    let Ok(map) = std::str::from_utf8(data) else { return };
    let settings = serde_json::json!({ "map": map }).to_string();
    let Ok(host) = FakeHost::configured::<PostfixMap>(&settings) else { return };
    let table = host.table.borrow().clone();
    for (key, value) in &table {
        let requirement = Requirement::decode(value).expect("stored entries decode");
        assert_eq!(&requirement.encode(), value, "entry for {key} does not round-trip");
        // A domain key is found by its own domain; a `[host]` key by the MX host.
        let ctx = match key.strip_prefix('[').and_then(|k| k.strip_suffix(']')) {
            Some(mx) => {
                let mut ctx = context("unlisted.invalid");
                ctx.mx_host = mx.to_owned();
                ctx
            }
            None if key.starts_with('.') => context(&format!("sub{key}")),
            None => context(key),
        };
        let Decision::Require(found) = PostfixMap::plan(&ctx, &host) else {
            // A more specific key can shadow this one only by existing; it would have answered.
            panic!("key {key:?} not found by its own lookup");
        };
        for failure in [
            Failure::StarttlsNotOffered,
            Failure::HandshakeFailed("x".to_owned()),
            Failure::CertificateUntrusted("x".to_owned()),
        ] {
            let action = PostfixMap::on_failure(&ctx, &failure, &host);
            if found.is_forced() {
                assert!(
                    !matches!(action, Action::ContinuePlaintext | Action::ReconnectPlaintext),
                    "{key}: {} answered {action:?}",
                    found.level.as_str()
                );
            }
        }
    }
});
