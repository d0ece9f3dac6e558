"""`partner`, Python edition: forced `verify` for listed banks, forced `encrypt` for listed
partners, opportunistic (`may`) for everyone else.

The specification is policies/partner/README.md; the Rust, JavaScript and WAT editions next to
this one do the same, and tests/tests/polyglot.rs holds all four to the same decisions and
error texts. `postwarden policy new --lang python` starts a project from this file.

Build (componentize-py 0.25.1, from the repository root):

    componentize-py -d policy-sdk/wit -w policy componentize app \
        -p policies/partner/python -o partner-py.wasm

Import everything at module level: componentize-py snapshots the interpreter after importing
the app, and a standard-library module first imported inside a function is missing at run time.

The generated bindings live in the module `wit_world`: the exported world is the class
`wit_world.WitWorld` (subclassed below, under the same name), the `host` imports are functions
in `wit_world.imports.host`, and the shared types are in `wit_world.imports.types`.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import host, types

# The two lists, in the order the settings name them (and are processed).
LISTS = ("verify", "encrypt")
LEVELS = {"verify": types.TlsLevel.VERIFY, "encrypt": types.TlsLevel.ENCRYPT}


def normalize(name):
    """Trailing dots removed, ASCII lower-cased (non-ASCII letters are left alone)."""
    name = name.rstrip(".")
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in name)


def lookup_keys(domain):
    """`a.b.example` gives `a.b.example`, `.b.example`, `.example`: most specific first."""
    domain = domain.rstrip(".")
    yield domain
    for i, c in enumerate(domain):
        if c == ".":
            yield domain[i:]


def level(ctx):
    """The level for the context's domain: the first table hit decides."""
    for key in lookup_keys(ctx.domain):
        value = host.table_get(key)
        if value is not None:
            return LEVELS.get(value, types.TlsLevel.MAY)
    return types.TlsLevel.MAY


class WitWorld(wit_world.WitWorld):
    def configure(self, settings: str) -> None:
        try:
            parsed = json.loads(settings)
        except ValueError as e:
            raise Err(f"settings are not a JSON object: {e}")
        if not isinstance(parsed, dict):
            raise Err("settings are not a JSON object")
        unknown = sorted(key for key in parsed if key not in LISTS)
        if unknown:
            raise Err(f"unknown setting `{unknown[0]}` (expected verify, encrypt)")
        seen = {}  # name -> the list it is in
        count = {name: 0 for name in LISTS}
        for list_name in LISTS:
            if list_name not in parsed:
                continue
            entries = parsed[list_name]
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise Err(f"`{list_name}` must be a list of domain names")
            for entry in entries:
                name = normalize(entry)
                if not name or name == "." or any(c.isspace() for c in name):
                    raise Err(f"{list_name}: `{entry}` is not a domain name")
                if seen.get(name, list_name) != list_name:
                    raise Err(f"`{name}` is listed in both verify and encrypt")
                host.table_put(name, list_name)
                seen[name] = list_name
                count[list_name] += 1
        host.log(
            host.LogLevel.INFO,
            f"partner: {count['verify']} verify, {count['encrypt']} encrypt",
        )

    def plan(self, ctx: types.Context) -> types.Decision:
        return types.Decision_Require(
            types.Requirement(
                level=level(ctx),
                match_names=[],
                min_version=None,
                basis=types.TlsBasis.LOCAL,
                client_identity=None,
            )
        )

    def on_failure(self, ctx: types.Context, failure: types.Failure) -> types.Action:
        if level(ctx) in (types.TlsLevel.VERIFY, types.TlsLevel.ENCRYPT):
            if ctx.mx_index + 1 < ctx.mx_count:
                return types.Action_NextMx()
            return types.Action_Defer(f"partner: TLS required for {ctx.domain}")
        if isinstance(failure, (types.Failure_StarttlsNotOffered, types.Failure_StarttlsRefused)):
            return types.Action_ContinuePlaintext()
        return types.Action_ReconnectPlaintext()

    def on_delivered(self, ctx: types.Context, report: types.DeliveryReport) -> None:
        pass
