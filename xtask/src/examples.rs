//! `cargo xtask examples`: the chat-room example plugin in Rust,
//! JavaScript, Python and C, built into `target/example-plugins/
//! chat-<lang>.wasm`, with the guest toolchains installed from their
//! registries into `target/toolchains` (kept between runs):
//!
//! - Rust: the `wasm32-wasip2` target (rustup);
//! - JavaScript: `@bytecodealliance/componentize-js` and `jco` (npm, from
//!   `examples/package-lock.json`);
//! - Python: `componentize-py` (PyPI, in a virtualenv);
//! - C: `ziglang` (PyPI) for the compiler, `wit-bindgen-cli` (crates.io)
//!   for the bindings, `jco new` for the component.
//!
//! A component is rebuilt only when its sources or the WIT changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::{cargo, ensure_wasm_target, npm_ci, root, run};

pub const COMPONENTIZE_PY: &str = "0.25.1";
pub const ZIGLANG: &str = "0.17.1";
pub const WIT_BINDGEN: &str = "0.46.0";

/// The example languages, in build order.
pub const LANGS: [&str; 4] = ["rust", "js", "python", "c"];

/// Where the guest toolchains live.
pub fn toolchains() -> PathBuf {
    root().join("target/toolchains")
}

/// The virtualenv's Python, with componentize-py and ziglang installed.
pub fn python() -> Result<PathBuf> {
    let venv = toolchains().join("py");
    let py = venv.join("bin/python");
    let stamp = venv.join(format!(".installed-{COMPONENTIZE_PY}-{ZIGLANG}"));
    if !stamp.exists() {
        if !py.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("Python 3 with venv is needed for the Python and C examples")?;
        }
        run(Command::new(&py).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("componentize-py=={COMPONENTIZE_PY}"),
            &format!("ziglang=={ZIGLANG}"),
        ]))?;
        std::fs::write(&stamp, "")?;
    }
    Ok(py)
}

/// `wit-bindgen` (C generator only), installed with cargo.
pub fn wit_bindgen() -> Result<PathBuf> {
    let bin = toolchains().join("bin/wit-bindgen");
    let current = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(WIT_BINDGEN));
    if !current {
        run(cargo()
            .args(["install", "--locked", "--quiet", "--root"])
            .arg(toolchains())
            .args([
                "wit-bindgen-cli",
                "--version",
                WIT_BINDGEN,
                "--no-default-features",
                "--features",
                "c",
            ]))?;
    }
    Ok(bin)
}

/// Installs every toolchain the examples and the scaffold tests need; the
/// `PATH` to build with them.
pub fn ensure_toolchains() -> Result<String> {
    ensure_wasm_target()?;
    npm_ci(&root().join("examples"))?;
    let py = python()?;
    let wbg = wit_bindgen()?;
    let mut path: Vec<PathBuf> = vec![
        py.parent().unwrap().to_owned(),
        wbg.parent().unwrap().to_owned(),
        root().join("examples/node_modules/.bin"),
    ];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    Ok(std::env::join_paths(path)?.to_string_lossy().into_owned())
}

fn newest(paths: &[PathBuf]) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for p in paths {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                let kids: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|k| {
                        let n = k.file_name().unwrap_or_default().to_string_lossy();
                        !n.starts_with('.')
                            && n != "node_modules"
                            && n != "target"
                            && !n.ends_with(".wasm")
                    })
                    .collect();
                t = t.max(newest(&kids));
            }
        } else if let Ok(m) = p.metadata().and_then(|m| m.modified()) {
            t = t.max(m);
        }
    }
    t
}

fn up_to_date(out: &Path, inputs: &[PathBuf]) -> bool {
    out.metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|o| o >= newest(inputs))
}

/// Builds one example into `out`.
fn build(lang: &str, out: &Path, path: &str) -> Result<()> {
    let root = root();
    let ex = root.join("examples");
    // The JavaScript, Python and C examples are built against WIT 0.1.0,
    // which the host still links (the Rust one uses the SDK: 0.2.0).
    let wit = root.join("wit/0.1.0");
    match lang {
        "rust" => {
            let target = root.join("target/wasm");
            run(cargo()
                .current_dir(ex.join("chat-rust"))
                .env("CARGO_TARGET_DIR", &target)
                .args(["build", "--release", "--target", "wasm32-wasip2"]))?;
            std::fs::copy(target.join("wasm32-wasip2/release/chat_rust.wasm"), out)?;
        }
        "js" => run(Command::new(ex.join("node_modules/.bin/componentize-js"))
            .current_dir(&ex)
            .arg("chat-js/chat.js")
            .arg("--wit")
            .arg(&wit)
            .args(["--world-name", "plugin", "-o"])
            .arg(out))?,
        "python" => run(Command::new(toolchains().join("py/bin/componentize-py"))
            .current_dir(ex.join("chat-python"))
            .arg("-d")
            .arg(&wit)
            .args(["-w", "plugin", "componentize", "app", "-o"])
            .arg(out))?,
        "c" => run(Command::new("sh")
            .current_dir(&ex)
            .env("PATH", path)
            .env("PYTHON", toolchains().join("py/bin/python"))
            .arg("chat-c/build.sh")
            .arg(out))?,
        other => anyhow::bail!("no example in {other}"),
    }
    Ok(())
}

/// Builds the four examples; their paths.
pub fn examples() -> Result<Vec<PathBuf>> {
    let path = ensure_toolchains()?;
    let root = root();
    let out_dir = root.join("target/example-plugins");
    std::fs::create_dir_all(&out_dir)?;
    let mut built = Vec::new();
    for lang in LANGS {
        let out = out_dir.join(format!("chat-{lang}.wasm"));
        let inputs = [root.join("wit"), root.join(format!("examples/chat-{lang}"))];
        if !up_to_date(&out, &inputs) {
            build(lang, &out, &path).with_context(|| format!("building chat-{lang}"))?;
        }
        eprintln!("built {}", out.display());
        built.push(out);
    }
    Ok(built)
}
