// `partner`, JavaScript edition: forced `verify` for listed banks, forced `encrypt` for listed
// partners, opportunistic (`may`) for everyone else.
//
// The specification is policies/partner/README.md; the Rust, Python and WAT editions next to
// this one do the same, and tests/tests/polyglot.rs holds all four to the same decisions and
// error texts. `postwarden policy new --lang js` starts a project from this file.
//
// Build (componentize-js 0.23.0, SpiderMonkey/StarlingMonkey; from the repository root):
//
//     componentize-js policies/partner/js/policy.js -w policy-sdk/wit -n policy \
//         -d http fetch-event -o partner-js.wasm
//
// `-d http fetch-event` is required: the default build imports wasi:http, which the relay does
// not provide. (`jco componentize` does not work with this WIT; call componentize-js directly.)
//
// Binding conventions: the `host` interface is imported as the ES module
// 'postwarden:policy/host@0.2.0' with camelCase function names; the world's exports are named
// exports in camelCase (configure, plan, onFailure, onDelivered); record fields are camelCase
// (ctx.mxIndex), enums are their WIT names as strings ('verify'), variants are
// { tag: 'kebab-name', val } objects, an absent option is undefined, u64 is a BigInt.
// `configure` returns its `result` error by throwing a *string*: throwing an Error object
// traps the component instead ("expected a string, received [object]" on the policy's stderr).

import { log, tableGet, tablePut } from 'postwarden:policy/host@0.2.0';

// The two lists, in the order the settings name them (and are processed).
const LISTS = ['verify', 'encrypt'];

// Trailing dots removed, ASCII lower-cased (non-ASCII letters are left alone).
function normalize(name) {
  return name.replace(/\.+$/, '').replace(/[A-Z]/g, (c) => c.toLowerCase());
}

// `a.b.example` gives `a.b.example`, `.b.example`, `.example`: most specific first.
function lookupKeys(domain) {
  const d = domain.replace(/\.+$/, '');
  const keys = [d];
  for (let i = 0; i < d.length; i++) {
    if (d[i] === '.') keys.push(d.slice(i));
  }
  return keys;
}

// The level for the context's domain: the first table hit decides.
function level(ctx) {
  for (const key of lookupKeys(ctx.domain)) {
    const value = tableGet(key);
    if (value !== undefined) return LISTS.includes(value) ? value : 'may';
  }
  return 'may';
}

export function configure(settings) {
  let parsed;
  try {
    parsed = JSON.parse(settings);
  } catch (e) {
    throw `settings are not a JSON object: ${e.message}`;
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw 'settings are not a JSON object';
  }
  const unknown = Object.keys(parsed).filter((k) => !LISTS.includes(k)).sort();
  if (unknown.length > 0) {
    throw `unknown setting \`${unknown[0]}\` (expected verify, encrypt)`;
  }
  const seen = new Map(); // name -> the list it is in
  const count = { verify: 0, encrypt: 0 };
  for (const list of LISTS) {
    if (!Object.prototype.hasOwnProperty.call(parsed, list)) continue;
    const entries = parsed[list];
    if (!Array.isArray(entries) || !entries.every((e) => typeof e === 'string')) {
      throw `\`${list}\` must be a list of domain names`;
    }
    for (const entry of entries) {
      const name = normalize(entry);
      if (name === '' || name === '.' || /\s/.test(name)) {
        throw `${list}: \`${entry}\` is not a domain name`;
      }
      if ((seen.get(name) ?? list) !== list) {
        throw `\`${name}\` is listed in both verify and encrypt`;
      }
      tablePut(name, list);
      seen.set(name, list);
      count[list] += 1;
    }
  }
  log('info', `partner: ${count.verify} verify, ${count.encrypt} encrypt`);
}

export function plan(ctx) {
  return {
    tag: 'require',
    val: {
      level: level(ctx),
      matchNames: [],
      minVersion: undefined,
      basis: 'local',
      clientIdentity: undefined,
    },
  };
}

export function onFailure(ctx, failure) {
  if (level(ctx) !== 'may') {
    if (ctx.mxIndex + 1 < ctx.mxCount) return { tag: 'next-mx' };
    return { tag: 'defer', val: `partner: TLS required for ${ctx.domain}` };
  }
  if (failure.tag === 'starttls-not-offered' || failure.tag === 'starttls-refused') {
    return { tag: 'continue-plaintext' };
  }
  return { tag: 'reconnect-plaintext' };
}

export function onDelivered(ctx, report) {}
