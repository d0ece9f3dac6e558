#!/usr/bin/env bash
# The main job, for now: build the bundled policies and show what the example chain decides for
# a few destinations and failures. (The full demo against the simulator fleet is issue 5.)
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-unknown-unknown wasm32-wasip2 >/dev/null
cargo build --locked --quiet --profile policy --target wasm32-unknown-unknown \
    -p opportunistic -p forced-tls -p postfix-map -p tofu
cargo build --locked --quiet --release -p postwarden-cli
for domain in bank.example mx1.bank.example partner.example example.com legacy.example example.org; do
    ./target/release/postwarden policy explain --config examples/relay.toml "$domain" \
        --mx "mx.$domain" --failure starttls-not-offered
    echo
done
