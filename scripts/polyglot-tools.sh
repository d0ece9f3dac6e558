#!/usr/bin/env bash
# Installs the toolchains that build policies written in Python and JavaScript:
#   componentize-py (PyPI, pinned in tools/polyglot/requirements.txt) into target/polyglot/venv,
#   componentize-js (npm, pinned by tools/polyglot/package-lock.json) into tools/polyglot/node_modules.
# Rust needs only `rustup target add wasm32-unknown-unknown`, WAT needs nothing.
# Idempotent: a second run with nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/polyglot/venv
if [ ! -x "$venv/bin/componentize-py" ] \
    || ! cmp -s tools/polyglot/requirements.txt "$venv/.requirements.txt"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tools/polyglot/requirements.txt
    cp tools/polyglot/requirements.txt "$venv/.requirements.txt"
fi

js=tools/polyglot
if [ ! -x "$js/node_modules/.bin/componentize-js" ] \
    || ! cmp -s "$js/package-lock.json" "$js/node_modules/.package-lock.json.installed"; then
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$js/package-lock.json" "$js/node_modules/.package-lock.json.installed"
fi
