#!/usr/bin/env bash
# Runs every check and test from a fresh clone: installs the wasm targets and the Python and
# JavaScript policy toolchains, builds the policies to wasm components, then formatting, lints
# and the whole test suite, after a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-unknown-unknown wasm32-wasip2 >/dev/null
./scripts/polyglot-tools.sh
# Real peers for the interoperability tests: OpenSSL's s_client (renegotiation).
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
# Real peers for tests/tests/real_peers.rs: Debian's postfix ("No configuration": no system
# instance is configured or started; each test runs a private one through
# scripts/postfix-peer.sh) and aiosmtpd from PyPI in target/peers/venv (pinned).
./scripts/postfix-peer.sh install >/dev/null
peers_venv=target/peers/venv
if ! cmp -s tools/peers/requirements.txt "$peers_venv/.requirements.txt"; then
    python3 -m venv "$peers_venv"
    "$peers_venv/bin/pip" install --quiet --disable-pip-version-check -r tools/peers/requirements.txt
    cp tools/peers/requirements.txt "$peers_venv/.requirements.txt"
fi
# Build the policy components first: the tests load them (and rebuild them if stale).
cargo build --locked --profile policy --target wasm32-unknown-unknown \
    -p opportunistic -p forced-tls -p postfix-map -p tofu -p partner
cargo build --locked --profile policy --target wasm32-wasip2 -p broken-policy
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# Every fuzz target for 20 s (fuzz/, its own workspace, built with coverage instrumentation);
# a crash fails the run.
./scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
cargo test --locked --workspace
