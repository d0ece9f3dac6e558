//! The example configuration in the repository parses and its policy chain loads.

#![allow(clippy::unwrap_used)]

use postwarden::config::Config;
use postwarden::policy::{self, Context, StateMode, TlsLevel, Verdict};
use postwarden_tests::wasm;

#[test]
fn the_example_config_parses_and_its_chain_loads() {
    for name in wasm::BUNDLED {
        wasm::policy(name);
    }
    let path = wasm::workspace_root().join("examples/relay.toml");
    let config = Config::load(&path).unwrap();
    assert_eq!(config.policies.len(), 4);
    assert_eq!(
        config.delivery.parsed_routes().unwrap()["internal.example"],
        ("10.0.0.5".to_owned(), 2525)
    );
    assert_eq!(config.queue.delay_warning, Some(14400));
    config.inbound.options("relay.example.net").unwrap();
    let engine = policy::engine_from_config(&config).unwrap();
    let chain = policy::load_chain(&engine, &config, StateMode::Snapshot).unwrap();
    let plan = chain.plan(&Context::new("bank.example", "mx.bank.example"));
    assert!(
        matches!(plan.verdict, Verdict::Require(ref r) if r.level == TlsLevel::Verify),
        "{plan:?}"
    );
}
