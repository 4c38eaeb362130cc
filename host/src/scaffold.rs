//! `chanhost new-plugin`: writes the skeleton of a channel plugin in Rust,
//! JavaScript, Python or C against this host's WIT (copied into the
//! skeleton as `wit/plugin.wit`), with its build command in a README. The
//! skeleton serves a Misskey channel and a Socket.IO namespace named after
//! the plugin and echoes `echo` messages. This module only writes files.

use std::path::{Path, PathBuf};

/// The WIT the host implements.
pub const WIT: &str = include_str!("../../wit/plugin.wit");

/// A plugin language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Js,
    Python,
    C,
}

/// Why a skeleton could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "invalid plugin name `{0}`: use lower-case letters, digits and `-`, starting with a letter"
    )]
    Name(String),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// (path in the skeleton, contents) per language; `{{name}}` and
/// `{{crate}}` are replaced.
fn files(lang: Lang) -> &'static [(&'static str, &'static str)] {
    match lang {
        Lang::Rust => &[
            ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
            ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
            ("README.md", include_str!("../templates/rust/README.md")),
        ],
        Lang::Js => &[
            ("package.json", include_str!("../templates/js/package.json")),
            // Pins every transitive package, so builds do not drift.
            (
                "package-lock.json",
                include_str!("../templates/js/package-lock.json"),
            ),
            ("{{name}}.js", include_str!("../templates/js/plugin.js")),
            ("README.md", include_str!("../templates/js/README.md")),
        ],
        Lang::Python => &[
            ("app.py", include_str!("../templates/python/app.py")),
            ("README.md", include_str!("../templates/python/README.md")),
        ],
        Lang::C => &[
            ("plugin.c", include_str!("../templates/c/plugin.c")),
            ("build.sh", include_str!("../templates/c/build.sh")),
            ("README.md", include_str!("../templates/c/README.md")),
        ],
    }
}

fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// Writes the skeleton of plugin `name` into `dir` (which must not exist);
/// returns the files written.
pub fn new_plugin(lang: Lang, name: &str, dir: &Path) -> Result<Vec<PathBuf>, ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::Name(name.to_owned()));
    }
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir.to_owned()));
    }
    let fill = |s: &str| {
        s.replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
    };
    let mut written = Vec::new();
    let all = files(lang)
        .iter()
        .map(|(p, c)| (fill(p), fill(c)))
        .chain([("wit/plugin.wit".to_owned(), WIT.to_owned())]);
    for (rel, contents) in all {
        let path = dir.join(rel);
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, contents)
        };
        write().map_err(|source| ScaffoldError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// The build command of a skeleton, as its README gives it.
pub fn build_command(lang: Lang, name: &str) -> String {
    match lang {
        Lang::Rust => format!(
            "cargo build --release --target wasm32-wasip2 && cp target/wasm32-wasip2/release/{}.wasm {name}.wasm",
            name.replace('-', "_")
        ),
        Lang::Js => "npm install && npm run build".into(),
        Lang::Python => format!(
            "pip install componentize-py==0.25.1 && componentize-py -d wit -w plugin componentize app -o {name}.wasm"
        ),
        Lang::C => "sh build.sh".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_skeleton_with_the_wit_and_the_name() {
        let dir = std::env::temp_dir().join(format!("chanhost-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = dir.join("hello-world");
        let files = new_plugin(Lang::Rust, "hello-world", &out).unwrap();
        assert!(files.iter().any(|f| f.ends_with("wit/plugin.wit")));
        let lib = std::fs::read_to_string(out.join("src/lib.rs")).unwrap();
        assert!(lib.contains(r#"const NAME: &str = "hello-world";"#));
        assert!(std::fs::read_to_string(out.join("README.md"))
            .unwrap()
            .contains("release/hello_world.wasm"));
        assert_eq!(
            std::fs::read_to_string(out.join("wit/plugin.wit")).unwrap(),
            WIT
        );
        assert!(matches!(
            new_plugin(Lang::Rust, "hello-world", &out),
            Err(ScaffoldError::Exists(_))
        ));
        for bad in ["Hello", "1x", "a b", "x-", ""] {
            assert!(
                matches!(
                    new_plugin(Lang::C, bad, &dir.join("x")),
                    Err(ScaffoldError::Name(_))
                ),
                "{bad}"
            );
        }
        new_plugin(Lang::Js, "hi", &dir.join("js")).unwrap();
        assert!(dir.join("js/hi.js").exists());
        let lock = std::fs::read_to_string(dir.join("js/package-lock.json")).unwrap();
        assert!(lock.contains(r#""name": "hi""#) && !lock.contains("{{"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
