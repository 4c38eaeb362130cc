//! Build chores: `cargo xtask <command>`.
//!
//! - `plugins`: builds `plugins/*` into `plugins/<name>.wasm` and the
//!   test-only plugins `tests/plugins/*` into `target/test-plugins/<name>.wasm`.
//! - `examples`: builds the example plugins in Rust, JavaScript, Python
//!   and C into `target/example-plugins/` (see [`examples`]).
//! - `bench`: chanhost against the Node socket.io server and socketioxide
//!   (see [`mod@bench`]); writes `BENCHMARKS.md`.
//! - `run`: builds the plugins and runs the host (release) with
//!   `examples/chanhost.toml`.
//! - `test`: everything the test suite needs, then every check and test:
//!   `cargo fmt --check`, clippy and `cargo doc` with warnings denied, the
//!   wasm target, the plugins, the host, `cargo test`, a bounded run of
//!   every fuzz target, the example plugins with their toolchains, the npm
//!   packages of the end-to-end tests (from the lockfile), and the
//!   end-to-end tests.
//! - `soak [--quick]`: the host under hostile and mixed loads, measured by
//!   its memory (see [`soak`]); writes `docs/soak.md`.
//! - `fuzz [SECONDS]`: every target of `fuzz/` for SECONDS each (default
//!   30), with cargo-fuzz installed into `target/toolchains`.
//! - `screenshots`: the README's pictures of the operator page
//!   (`docs/admin*.png`), taken by Debian's chromium.

mod bench;
mod examples;
mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const WASM_TARGET: &str = "wasm32-wasip2";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn ensure_wasm_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add the wasm32-wasip2 target")?;
    if !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    Ok(())
}

/// The package name in a crate's Cargo.toml.
fn package_name(manifest: &Path) -> Result<String> {
    let text = std::fs::read_to_string(manifest)?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(v) = line.strip_prefix("name") {
                let v = v.trim_start().trim_start_matches('=').trim();
                return Ok(v.trim_matches('"').to_owned());
            }
        }
    }
    bail!("no [package] name in {}", manifest.display())
}

/// Builds one plugin workspace; copies each cdylib member's component to
/// `<out>/<member folder>.wasm`.
fn build_wasm_workspace(dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let target_dir = root().join("target/wasm");
    run(cargo()
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--release", "--target", WASM_TARGET]))?;
    std::fs::create_dir_all(out)?;
    let mut built = Vec::new();
    let mut members: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    members.sort();
    for member in members {
        let manifest = member.join("Cargo.toml");
        if !std::fs::read_to_string(&manifest)?.contains("cdylib") {
            continue;
        }
        let artifact = target_dir.join(WASM_TARGET).join("release").join(format!(
            "{}.wasm",
            package_name(&manifest)?.replace('-', "_")
        ));
        let name = member.file_name().unwrap().to_string_lossy().into_owned();
        let dest = out.join(format!("{name}.wasm"));
        // Write beside and rename, so a running host sees a whole file.
        let tmp = out.join(format!(".{name}.wasm.tmp"));
        std::fs::copy(&artifact, &tmp)
            .with_context(|| format!("copy {} to {}", artifact.display(), tmp.display()))?;
        std::fs::rename(&tmp, &dest)?;
        built.push(dest);
    }
    Ok(built)
}

fn plugins() -> Result<()> {
    ensure_wasm_target()?;
    let root = root();
    for p in build_wasm_workspace(&root.join("plugins"), &root.join("plugins"))? {
        eprintln!("built {}", p.display());
    }
    for p in build_wasm_workspace(
        &root.join("tests/plugins"),
        &root.join("target/test-plugins"),
    )? {
        eprintln!("built {}", p.display());
    }
    Ok(())
}

fn npm_ci(dir: &Path) -> Result<()> {
    let stamp = dir.join("node_modules/.package-lock.json");
    let lock = dir.join("package-lock.json");
    let fresh = match (stamp.metadata(), lock.metadata()) {
        (Ok(s), Ok(l)) => s.modified()? >= l.modified()?,
        _ => false,
    };
    if !fresh {
        // `npm ci` refuses a lockfile without entries for other platforms'
        // optional packages, which npm leaves out when the registry (or its
        // mirror) does not list them; `npm install` then still installs
        // exactly what the lockfile pins, without rewriting it.
        let ci = Command::new("npm")
            .current_dir(dir)
            .args(["ci", "--no-audit", "--no-fund"])
            .status()?;
        if !ci.success() {
            run(Command::new("npm").current_dir(dir).args([
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
            ]))?;
        }
    }
    Ok(())
}

/// The habits CI holds every change to: formatting, clippy with warnings
/// denied, documentation without broken links, in every Rust workspace of
/// the repository.
fn checks() -> Result<()> {
    let root = root();
    ensure_wasm_target()?;
    let wasm_target = root.join("target/wasm");
    for dir in ["", "plugins", "tests/plugins", "fuzz", "examples/chat-rust"] {
        run(cargo()
            .current_dir(root.join(dir))
            .args(["fmt", "--all", "--check"]))?;
    }
    run(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    for dir in ["plugins", "tests/plugins"] {
        run(cargo()
            .current_dir(root.join(dir))
            .env("CARGO_TARGET_DIR", &wasm_target)
            .args([
                "clippy",
                "--workspace",
                "--target",
                WASM_TARGET,
                "--",
                "-D",
                "warnings",
            ]))?;
    }
    run(cargo()
        .current_dir(&root)
        .env("RUSTDOCFLAGS", "-D warnings")
        .args(["doc", "--workspace", "--no-deps"]))
}

/// Installs a Debian package when `program --version` does not run.
fn ensure_debian(program: &str, package: &str) -> Result<()> {
    let found = Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Ok(());
    }
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let apt = |args: &[&str]| {
        let mut c = if root_user {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    if run(&mut apt(&install)).is_err() {
        run(&mut apt(&["update"]))?;
        run(&mut apt(&install))
            .with_context(|| format!("installing {package} (Debian package)"))?;
    }
    Ok(())
}

/// Installs Debian's `redis-server` if it is missing: the end-to-end tests
/// start their own on free ports.
pub(crate) fn ensure_redis() -> Result<()> {
    ensure_debian("redis-server", "redis-server")
}

/// Installs Debian's `chromium` if it is missing: the operator page's
/// tests drive it headless with puppeteer-core.
pub(crate) fn ensure_chromium() -> Result<()> {
    ensure_debian("chromium", "chromium")
}

fn test(filter: &[String]) -> Result<()> {
    let root = root();
    ensure_redis()?;
    ensure_chromium()?;
    if filter.is_empty() {
        checks()?;
    }
    plugins()?;
    run(cargo()
        .current_dir(&root)
        .args(["build", "-p", "chanhost", "-p", "chanhost-bench"]))?;
    if filter.is_empty() {
        run(cargo().current_dir(&root).args(["test", "--workspace"]))?;
        // The plugins' own unit tests run natively (host imports are not
        // called by them).
        run(cargo()
            .current_dir(root.join("plugins"))
            .env("CARGO_TARGET_DIR", root.join("target/wasm"))
            .args(["test", "--workspace"]))?;
        fuzz(30)?;
    }
    // The example plugins in every language (their toolchains too: the
    // end-to-end tests build `chanhost new-plugin` skeletons with them).
    examples::examples()?;
    let e2e = root.join("tests/e2e");
    let mut node = e2e_node()?;
    node.args(["--test", "--test-reporter=spec"]);
    if filter.is_empty() {
        let mut files: Vec<_> = std::fs::read_dir(&e2e)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".test.mjs"))
            .collect();
        files.sort();
        node.args(files);
    } else {
        node.args(filter);
    }
    run(&mut node)
}

/// The cargo-fuzz release the fuzz run installs.
const CARGO_FUZZ: &str = "0.13.2";

/// The `[[bin]]` names of `fuzz/Cargo.toml`: its targets.
fn fuzz_targets() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(root().join("fuzz/Cargo.toml"))?;
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin {
            if let Some(v) = line.strip_prefix("name") {
                names.push(
                    v.trim_start()
                        .trim_start_matches('=')
                        .trim()
                        .trim_matches('"')
                        .to_owned(),
                );
            }
        }
    }
    Ok(names)
}

/// Runs every fuzz target for `seconds`; a crash fails the run (its input
/// is left in `fuzz/artifacts/<target>/`).
fn fuzz(seconds: u64) -> Result<()> {
    let root = root();
    let tools = examples::toolchains();
    let bin = tools.join("bin");
    let stamp = tools.join(format!(".cargo-fuzz-{CARGO_FUZZ}"));
    if !stamp.exists() {
        run(cargo()
            .args(["install", "--locked", "--version", CARGO_FUZZ, "--root"])
            .arg(&tools)
            .arg("cargo-fuzz"))?;
        std::fs::write(&stamp, "")?;
    }
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    for target in fuzz_targets()? {
        run(cargo()
            .current_dir(root.join("fuzz"))
            .env("PATH", &path)
            // libFuzzer's instrumentation needs unstable flags.
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "fuzz",
                "run",
                &target,
                "--",
                &format!("-max_total_time={seconds}"),
            ]))?;
    }
    Ok(())
}

/// The README's screenshots of the operator page (`docs/admin.png`,
/// `docs/admin-phone.png`): a host with test plugins and a few clients,
/// seen by Debian's chromium.
fn screenshots() -> Result<()> {
    let root = root();
    ensure_chromium()?;
    plugins()?;
    run(cargo().current_dir(&root).args(["build", "-p", "chanhost"]))?;
    run(e2e_node()?.arg("screenshots.mjs"))
}

/// `node` in `tests/e2e` (its packages installed), pointed at this tree's
/// debug host.
fn e2e_node() -> Result<Command> {
    let root = root();
    let e2e = root.join("tests/e2e");
    npm_ci(&e2e)?;
    let mut node = Command::new("node");
    node.current_dir(&e2e)
        .env("CHANHOST_BIN", root.join("target/debug/chanhost"))
        .env("CHANHOST_ROOT", &root);
    Ok(node)
}

fn run_host() -> Result<()> {
    let root = root();
    plugins()?;
    run(cargo().current_dir(&root).args([
        "run",
        "--release",
        "-p",
        "chanhost",
        "--",
        "serve",
        "--config",
        "examples/chanhost.toml",
    ]))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("plugins") => plugins(),
        Some("test") => test(&args[1..]),
        Some("run") => run_host(),
        Some("examples") => examples::examples().map(|_| ()),
        Some("screenshots") => screenshots(),
        Some("bench") => bench::bench(&args[1..]),
        Some("soak") => soak::soak(&args[1..]),
        Some("fuzz") => {
            let secs = match args.get(1) {
                Some(s) => s.parse().context("fuzz SECONDS must be a number")?,
                None => 30,
            };
            fuzz(secs)
        }
        _ => {
            eprintln!("usage: cargo xtask <plugins|examples|test [E2E FILES...]|run|bench [--quick] [--repeat N] [--host PATH] [--only PREFIX]|soak [--quick]|fuzz [SECONDS]|screenshots>");
            std::process::exit(2);
        }
    }
}
