//! `postwarden policy new`: a policy project that builds and passes its own conformance test
//! out of the box.
//!
//! Every project starts from the `partner` policy (policies/partner/README.md) in the chosen
//! language, with its settings and conformance expectations, so a new author begins with
//! something real that passes, then edits it. The sources are the repository's own editions,
//! embedded at build time, so the scaffold can never drift from what CI tests.

use std::fmt;
use std::path::{Path, PathBuf};

/// A language `policy new` can scaffold.
#[derive(Clone, Copy, Debug, Eq, PartialEq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with `postwarden-policy-sdk`, built for `wasm32-unknown-unknown`.
    Rust,
    /// Python with componentize-py.
    Python,
    /// JavaScript with componentize-js (SpiderMonkey).
    Js,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        })
    }
}

/// Why a project could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScaffoldError {
    /// The directory exists and is not empty.
    #[error("{0}: exists and is not empty; choose a new directory")]
    NotEmpty(PathBuf),
    /// The project name is not usable as a package name.
    #[error(
        "`{0}` is not a usable policy name: use lower-case letters, digits and dashes, starting \
         with a letter (pass --name to choose one other than the directory's)"
    )]
    BadName(String),
    /// The Rust SDK could not be found.
    #[error(
        "cannot find postwarden-policy-sdk (looked in {0}); pass --sdk with the `policy-sdk` \
         directory of a Postwarden checkout"
    )]
    NoSdk(PathBuf),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What to create.
#[derive(Clone, Debug)]
pub struct NewPolicy {
    /// The language.
    pub lang: Lang,
    /// The project directory (created).
    pub dir: PathBuf,
    /// The policy's name (default: the directory's name).
    pub name: Option<String>,
    /// Rust only: the `policy-sdk` directory to depend on (default: the one this binary was
    /// built from).
    pub sdk: Option<PathBuf>,
}

const WIT: &str = include_str!("../../policy-sdk/wit/policy.wit");
const SETTINGS: &str = include_str!("../../policies/partner/settings.json");
const EXPECT: &str = include_str!("../../policies/partner/expect.toml");
const RUST_SOURCE: &str = include_str!("../../policies/partner/rust/src/lib.rs");
const PYTHON_SOURCE: &str = include_str!("../../policies/partner/python/app.py");
const JS_SOURCE: &str = include_str!("../../policies/partner/js/policy.js");
const JS_PACKAGE_LOCK: &str = include_str!("../../tools/polyglot/package-lock.json");
/// The toolchain versions CI builds the editions with.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
const COMPONENTIZE_JS: &str = "0.23.0";

/// Creates the project; returns the files written, relative to the directory.
pub fn create(new: &NewPolicy) -> Result<Vec<String>, ScaffoldError> {
    if std::fs::read_dir(&new.dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::NotEmpty(new.dir.clone()));
    }
    let name = match &new.name {
        Some(name) => name.clone(),
        None => new.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    if !valid_name(&name) {
        return Err(ScaffoldError::BadName(name));
    }
    let mut files: Vec<(String, String)> = vec![
        ("settings.json".into(), SETTINGS.into()),
        ("expect.toml".into(), EXPECT.into()),
        ("README.md".into(), readme(new.lang, &name)),
        ("Makefile".into(), makefile(new.lang, &name)),
        (".gitignore".into(), gitignore(new.lang).into()),
    ];
    match new.lang {
        Lang::Rust => {
            let sdk = sdk_dir(new.sdk.as_deref())?;
            files.push(("Cargo.toml".into(), cargo_toml(&name, &sdk)));
            files.push(("src/lib.rs".into(), RUST_SOURCE.into()));
            files.push((".cargo/config.toml".into(), CARGO_CONFIG.into()));
            // The checkout's lock file pins the SDK's dependencies to the versions CI tests;
            // cargo drops the entries this project does not need.
            let lock = sdk.parent().map(|root| root.join("Cargo.lock"));
            if let Some(text) = lock.and_then(|path| std::fs::read_to_string(path).ok()) {
                files.push(("Cargo.lock".into(), text));
            }
        }
        Lang::Python => {
            files.push(("wit/policy.wit".into(), WIT.into()));
            files.push(("app.py".into(), PYTHON_SOURCE.into()));
            files.push(("requirements.txt".into(), format!("{COMPONENTIZE_PY}\n")));
        }
        Lang::Js => {
            files.push(("wit/policy.wit".into(), WIT.into()));
            files.push(("policy.js".into(), JS_SOURCE.into()));
            files.push(("package.json".into(), package_json(&name)));
            files.push(("package-lock.json".into(), package_lock(&name)));
        }
    }
    for (file, text) in &files {
        let path = new.dir.join(file);
        let io = |source| ScaffoldError::Io { path: path.clone(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, text).map_err(io)?;
    }
    Ok(files.into_iter().map(|(file, _)| file).collect())
}

fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

fn sdk_dir(given: Option<&Path>) -> Result<PathBuf, ScaffoldError> {
    let candidate = match given {
        Some(dir) => dir.to_owned(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-sdk"),
    };
    match candidate.join("Cargo.toml").canonicalize() {
        Ok(manifest) => Ok(manifest.parent().map(Path::to_owned).unwrap_or(candidate)),
        Err(_) => Err(ScaffoldError::NoSdk(candidate)),
    }
}

const CARGO_CONFIG: &str = "\
# A small linear memory (64 KiB of stack instead of Rust's default 1 MiB): policies run in a
# fresh instance per decision, and fewer pages means a cheaper reset.
[target.wasm32-unknown-unknown]
rustflags = [\"-C\", \"link-arg=-zstack-size=65536\"]
";

fn cargo_toml(name: &str, sdk: &Path) -> String {
    let sdk = sdk.display().to_string().replace('\\', "/");
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
postwarden-policy-sdk = {{ path = "{sdk}" }}
serde_json = "1"

# A project of its own, even when created inside another workspace.
[workspace]

# Policies are small, panic=abort components; a panic is a trap, which the relay turns into
# a deferral (fail closed).
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    )
}

fn package_json(name: &str) -> String {
    format!(
        r#"{{
  "name": "{name}",
  "private": true,
  "description": "A Postwarden TLS policy in JavaScript.",
  "dependencies": {{
    "@bytecodealliance/componentize-js": "{COMPONENTIZE_JS}",
    "@bytecodealliance/preview2-shim": "0.25.0"
  }}
}}
"#
    )
}

/// The repository's lock file for the same dependencies, renamed for this project.
/// (preview2-shim is listed because componentize-js 0.23.0 imports it without declaring it,
/// and `npm ci` leaves undeclared packages out.)
fn package_lock(name: &str) -> String {
    JS_PACKAGE_LOCK.replace("\"postwarden-polyglot-tools\"", &format!("\"{name}\""))
}

fn gitignore(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "/target\n/policy.wasm\n/.cache\n",
        Lang::Python => "/policy.wasm\n/.cache\n/__pycache__\n/wit_world\n",
        Lang::Js => "/policy.wasm\n/.cache\n/node_modules\n",
    }
}

fn makefile(lang: Lang, name: &str) -> String {
    let build = match lang {
        Lang::Rust => format!(
            "policy.wasm: src/lib.rs Cargo.toml\n\
             \tcargo build --release --target wasm32-unknown-unknown\n\
             \tcp $${{CARGO_TARGET_DIR:-target}}/wasm32-unknown-unknown/release/{}.wasm $@\n\n\
             unit:\n\tcargo test\n",
            name.replace('-', "_")
        ),
        Lang::Python => "COMPONENTIZE_PY ?= componentize-py\n\n\
             policy.wasm: app.py wit/policy.wit\n\
             \t$(COMPONENTIZE_PY) -d wit -w policy componentize app -o $@\n\n\
             unit:\n"
            .to_owned(),
        Lang::Js => "COMPONENTIZE_JS ?= node_modules/.bin/componentize-js\n\n\
             # wasi:http is left out: the relay does not provide it.\n\
             policy.wasm: policy.js wit/policy.wit\n\
             \t$(COMPONENTIZE_JS) policy.js -w wit -n policy -d http fetch-event -o $@\n\n\
             unit:\n"
            .to_owned(),
    };
    format!(
        "# Build the component, then run it through the simulator's whole catalogue.\n\
         POSTWARDEN ?= postwarden\n\
         POSTWARDEN_SIM ?= postwarden-sim\n\n\
         build: policy.wasm\n\n\
         {build}\n\
         test: policy.wasm unit\n\
         \t$(POSTWARDEN) policy check policy.wasm --settings \"$$(cat settings.json)\"\n\
         \t$(POSTWARDEN_SIM) conformance --policy policy.wasm --settings settings.json \\\n\
         \t\t--expect expect.toml --cache-dir .cache\n\n\
         .PHONY: build test unit\n"
    )
}

fn readme(lang: Lang, name: &str) -> String {
    let (source, setup) = match lang {
        Lang::Rust => ("src/lib.rs", "rustup target add wasm32-unknown-unknown".to_owned()),
        Lang::Python => (
            "app.py",
            format!(
                "python3 -m venv .venv && .venv/bin/pip install {COMPONENTIZE_PY}\n\
                     export COMPONENTIZE_PY=$PWD/.venv/bin/componentize-py"
            ),
        ),
        Lang::Js => ("policy.js", "npm ci".to_owned()),
    };
    format!(
        "# {name}\n\n\
         A Postwarden TLS policy in {lang}, created by `postwarden policy new`. It starts as the\n\
         `partner` example: forced `verify` for the domains in `verify`, forced `encrypt` for\n\
         those in `encrypt`, opportunistic for everyone else. Edit `{source}`.\n\n\
         ```sh\n{setup}\n\
         make build   # -> policy.wasm\n\
         make test    # contract check + the simulator's whole catalogue\n```\n\n\
         `make test` needs `postwarden` and `postwarden-sim` on PATH (or set `POSTWARDEN` and\n\
         `POSTWARDEN_SIM`). It runs every scenario of the simulator against the policy with\n\
         `settings.json` and judges the outcomes by `expect.toml`: change both when you change\n\
         what the policy does. The guide: docs/policies/{lang}.md in the Postwarden repository.\n\n\
         To use it, add to the relay's configuration:\n\n\
         ```toml\n[[policy]]\nname = \"{name}\"\npath = \"/path/to/policy.wasm\"\n\
         [policy.settings]\nverify = [\"bank.example\", \".bank.example\"]\n\
         encrypt = [\"partner.example\"]\n```\n"
    )
}
