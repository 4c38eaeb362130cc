//! `cargo xtask soak [--quick]`: the host under hostile and mixed loads,
//! measured by its resident memory; writes `docs/soak.md`.
//!
//! Each scenario runs against a fresh release host (the `bench` test
//! plugin, default limits) pinned to core 0, with the load generator
//! (`chanhost-bench`, see `tests/bench/src/soak.rs`) on core 1: what one
//! attacking connection makes the host hold, what slow consumers hold, what
//! polling handshakes with large headers leave behind, and a mixed soak whose
//! memory must come back to its baseline once its clients are gone.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bench::{build_host, machine, start, start_recovering, taskset, Server};
use crate::root;

struct Scenario {
    title: &'static str,
    args: Vec<String>,
    /// The host runs with `[socketio.recovery]`.
    recovery: bool,
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let soak_secs = if quick { "20" } else { "120" };
    vec![
        Scenario {
            title: "10 Misskey streams, 32 connects + 1,536 subNote each, 60 KB ids",
            args: a(&["attack-ids", "--conns", "10", "--id-bytes", "60000"]),
            recovery: false,
        },
        Scenario {
            title: "10 Misskey streams, 32 connects + 1,536 subNote each, 128-byte ids (the longest kept)",
            args: a(&["attack-ids", "--conns", "10", "--id-bytes", "128"]),
            recovery: false,
        },
        Scenario {
            title: "2 clients that never read, 600 events of 1 MB",
            args: a(&["attack-slow", "--clients", "2", "--events", "600", "--size", "1000000"]),
            recovery: false,
        },
        Scenario {
            title: "100 clients that never read, 1,000 events of 10 KB",
            args: a(&["attack-slow", "--clients", "100", "--events", "1000", "--size", "10000"]),
            recovery: false,
        },
        Scenario {
            title: "2,000 polling handshakes with 361 KB of headers, closed at once",
            args: a(&["attack-headers", "--n", "2000", "--header-bytes", "361000"]),
            recovery: false,
        },
        Scenario {
            title: "2,000 polling handshakes with 60 KB of headers (under max_header_bytes), closed at once",
            args: a(&["attack-headers", "--n", "2000", "--header-bytes", "60000"]),
            recovery: false,
        },
        Scenario {
            title: "2 × 5,000 Socket.IO sockets lost and kept ([socketio.recovery]), then 20,000 events of 100 B kept in 20 room histories",
            args: a(&["recovery-memory", "--sockets", "5000", "--rooms", "20", "--events", "20000", "--size", "100"]),
            recovery: true,
        },
        Scenario {
            title: "mixed soak: 2,000 idle, a 200-member room at 20 events/s, slow consumers, churn, malformed clients",
            args: a(&["soak", "--secs", soak_secs]),
            recovery: false,
        },
    ]
}

fn mib(v: &Value, key: &str) -> String {
    v[key]
        .as_f64()
        .map(|k| format!("{:.1}", k / 1024.0))
        .unwrap_or_else(|| "–".into())
}

fn render(results: &[(String, Value)], quick: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Soak and attack report\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask soak{}` on {}. The host (release, default limits, the `bench` test plugin) runs pinned to one core, the load generator to the other; each scenario gets a fresh host. Memory is the host's resident set (`Rss` of `/proc/<pid>/smaps_rollup`), in MiB.\n",
        if quick { " --quick" } else { "" },
        machine()
    );
    let _ = writeln!(s, "| scenario | before | peak | loaded | after close | figure |\n|---|---:|---:|---:|---:|---|");
    for (title, v) in results {
        let (loaded, after, figure) = match v["scenario"].as_str() {
            Some("attack-ids") => (
                mib(v, "rss_attacked_kib"),
                mib(v, "rss_closed_kib"),
                format!("{:.0} KiB per attacking connection", v["kib_per_conn"].as_f64().unwrap_or(f64::NAN)),
            ),
            Some("attack-slow") => (
                mib(v, "rss_loaded_kib"),
                mib(v, "rss_closed_kib"),
                format!("{:.1} MiB of growth at the peak", v["growth_peak_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0),
            ),
            Some("recovery-memory") => (
                mib(v, "rss_history_kib"),
                "–".into(),
                format!(
                    "{:.0} B per kept session, {:.0} B per kept {} B event",
                    v["bytes_per_session"].as_f64().unwrap_or(f64::NAN),
                    v["bytes_per_entry"].as_f64().unwrap_or(f64::NAN),
                    v["size"]
                ),
            ),
            Some("attack-headers") => (
                mib(v, "rss_after_kib"),
                "–".into(),
                if v["accepted"].as_u64() == Some(0) {
                    format!("all {} refused (431)", v["refused"])
                } else {
                    format!(
                        "{} accepted, {} refused; {:.1} KiB kept per accepted session",
                        v["accepted"], v["refused"], v["kib_kept_per_session"].as_f64().unwrap_or(f64::NAN)
                    )
                },
            ),
            _ => (
                "–".into(),
                mib(v, "rss_end_kib"),
                format!(
                    "{} s; {} slow consumers, {} reconnects, {} malformed clients; end − baseline {:.1} MiB",
                    v["secs"], v["slow_consumers"], v["reconnects"], v["malformed_clients"],
                    (v["rss_end_kib"].as_f64().unwrap_or(0.0) - v["rss_baseline_kib"].as_f64().unwrap_or(0.0)) / 1024.0
                ),
            ),
        };
        let before = if v["rss_before_kib"].is_null() {
            mib(v, "rss_baseline_kib")
        } else {
            mib(v, "rss_before_kib")
        };
        let _ = writeln!(
            s,
            "| {title} | {before} | {} | {loaded} | {after} | {figure} |",
            mib(v, "rss_peak_kib")
        );
    }
    if let Some((_, soak)) = results.iter().find(|(_, v)| v["scenario"] == "soak") {
        let series: Vec<String> = soak["rss_series_kib"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(soak["rss_settle_kib"].as_array().into_iter().flatten())
            .filter_map(Value::as_f64)
            .map(|k| format!("{:.0}", k / 1024.0))
            .collect();
        let _ = writeln!(
            s,
            "\nThe soak's memory, one sample a second (MiB), the last fifteen after every client closed:\n\n```\n{}\n```",
            series.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "\nWhat bounds each figure is in the README's \"Limits\" section: ids and names by length, instances and captures by count, what waits for a client by `send_queue_bytes`, request heads by `max_header_bytes`, what a session keeps of its request by a fixed 16 KiB."
    );
    s
}

pub fn soak(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let root = root();
    let plugins = build_host()?;
    let mut results = Vec::new();
    for sc in scenarios(quick) {
        eprintln!("soak: {}", sc.title);
        let host = if sc.recovery {
            start_recovering(&plugins)?
        } else {
            start(Server::ChanhostMisskey, &plugins)?
        };
        std::thread::sleep(Duration::from_secs(1));
        let out = taskset("1", root.join("target/release/chanhost-bench"))
            .args(&sc.args)
            .args([
                "--url",
                &format!("ws://127.0.0.1:{}", host.port),
                "--pid",
                &host.child.id().to_string(),
            ])
            .output()
            .context("running chanhost-bench")?;
        if !out.status.success() {
            bail!(
                "chanhost-bench {:?} failed: {}",
                sc.args,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value =
            serde_json::from_str(text.trim()).with_context(|| format!("bad output {text}"))?;
        eprintln!("{v}");
        results.push((sc.title.to_owned(), v));
    }
    let report = render(&results, quick);
    std::fs::write(root.join("docs/soak.md"), &report)?;
    std::fs::write(
        root.join("target/soak-results.json"),
        serde_json::to_string_pretty(
            &results
                .iter()
                .map(|(t, v)| serde_json::json!({"title": t, "result": v}))
                .collect::<Vec<_>>(),
        )?,
    )?;
    println!("{report}");
    Ok(())
}
