//! `cargo xtask bench [--quick] [--repeat N] [--host PATH] [--only PREFIX]`:
//! chanhost side by side with the Node `socket.io` server and
//! `socketioxide`, on this machine, in one run; writes `BENCHMARKS.md` and
//! `bench-latency.svg`.
//!
//! The cluster cases run each server as two nodes on one `redis-server`
//! started for the run (chanhost with `[cluster]`, the peers with their own
//! Redis adapters), next to the same room on one server; and a mixed
//! cluster: a Node socket.io server publishing to a room whose members are
//! split between it and chanhost on `[socketio.adapter]`, next to two Node
//! servers.
//!
//! `--only PREFIX` measures the cases whose names start with `PREFIX`
//! (`cluster`, `fanout 1000`, ...) and puts their figures in place of those
//! of the saved run (`target/bench/results.json`, same `--quick` and
//! `--repeat`), so one section can be measured again without the rest; each
//! figure keeps the day it was measured on, and the cluster section says it.
//!
//! `--host PATH` runs another build of the `chanhost` binary in place of
//! this tree's (say, a release build of an earlier commit, to compare a
//! change before and after on the same machine); the `bench` plugin is
//! this tree's, so both must speak the same WIT version. The report names
//! the binary.
//!
//! Each server runs pinned to one core (`taskset -c 0`) and the load
//! generator (`tests/bench`) to the other (`taskset -c 1`); the servers take
//! turns in alternating order (in the upstream case, each protocol's
//! WebAssembly and native plugin side by side); every figure is the median
//! of the repeats.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, npm_ci, root, run};

/// A server under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Server {
    /// chanhost, clients speaking Misskey.
    ChanhostMisskey,
    /// chanhost, clients speaking Socket.IO.
    ChanhostSocketio,
    Node,
    Socketioxide,
    /// chanhost embedded with the contract as a native plugin (no
    /// WebAssembly), clients speaking Misskey: the upstream baseline.
    NativeMisskey,
    /// The same, clients speaking Socket.IO.
    NativeSocketio,
}

impl Server {
    const ALL: [Server; 6] = [
        Server::ChanhostMisskey,
        Server::ChanhostSocketio,
        Server::Node,
        Server::Socketioxide,
        Server::NativeMisskey,
        Server::NativeSocketio,
    ];
    /// The servers of the comparison; the native ones run the upstream
    /// scenario only.
    const PEERS: [Server; 4] = [
        Server::ChanhostMisskey,
        Server::ChanhostSocketio,
        Server::Node,
        Server::Socketioxide,
    ];

    fn label(self) -> &'static str {
        match self {
            Server::ChanhostMisskey => "chanhost (Misskey)",
            Server::ChanhostSocketio => "chanhost (Socket.IO)",
            Server::Node => "Node socket.io 4.8",
            Server::Socketioxide => "socketioxide 0.18",
            Server::NativeMisskey => "chanhost, native plugin (Misskey)",
            Server::NativeSocketio => "chanhost, native plugin (Socket.IO)",
        }
    }

    fn proto(self) -> &'static str {
        match self {
            Server::ChanhostMisskey | Server::NativeMisskey => "misskey",
            _ => "socketio",
        }
    }
}

pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn taskset(core: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", core]).arg(program);
    c
}

/// Starts a server on core 0 and waits for its "listening on" line.
/// The chanhost binary the servers run: `CHANHOST_BENCH_HOST` (set by
/// `--host`), else this tree's release build.
fn host_binary() -> PathBuf {
    std::env::var_os("CHANHOST_BENCH_HOST")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/chanhost"))
}

pub(crate) fn start(server: Server, plugins: &Path) -> Result<Running> {
    start_node(server, plugins, Join::Alone, false)
}

/// chanhost alone with `[socketio.recovery]`.
pub(crate) fn start_recovering(plugins: &Path) -> Result<Running> {
    start_node(Server::ChanhostSocketio, plugins, Join::Alone, true)
}

/// How a server takes part in a cluster.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Join {
    Alone,
    /// A node of a cluster on the Redis at that port: chanhost with
    /// `[cluster]`, the peers with their own Redis adapters.
    Cluster(u16),
    /// chanhost as a server of a socket.io cluster on that Redis
    /// (`[socketio.adapter]`), beside Node servers.
    Adapter(u16),
}

/// The `[socketio.recovery]` window of the recovery cases (socket.io's
/// default `maxDisconnectionDuration`).
const RECOVERY_WINDOW_MS: u64 = 120_000;

/// Starts a server on core 0, alone or joined to a Redis; with
/// `recovery`, connection state recovery on (chanhost's
/// `[socketio.recovery]`, the Node server's `connectionStateRecovery`).
fn start_node(server: Server, plugins: &Path, join: Join, recovery: bool) -> Result<Running> {
    let root = root();
    let port = free_port()?;
    let (redis_url, table) = match join {
        Join::Alone => (None, ""),
        Join::Cluster(p) => (Some(format!("redis://127.0.0.1:{p}")), "cluster"),
        Join::Adapter(p) => (Some(format!("redis://127.0.0.1:{p}")), "socketio.adapter"),
    };
    let mut config = String::new();
    if let Some(url) = &redis_url {
        config += &format!("[{table}]\nredis = \"{url}\"\n");
    }
    if recovery {
        config += &format!("[socketio.recovery]\nmax_disconnection_ms = {RECOVERY_WINDOW_MS}\n");
    }
    let mut cmd = match server {
        Server::ChanhostMisskey | Server::ChanhostSocketio => {
            let mut c = taskset("0", host_binary());
            c.args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--plugins",
            ])
            .arg(plugins)
            .env("CHANHOST_LOG", "warn");
            if !config.is_empty() {
                let file = root.join(format!("target/bench/node-{port}.toml"));
                std::fs::create_dir_all(file.parent().unwrap())?;
                std::fs::write(&file, &config)?;
                c.arg("--config").arg(file);
            }
            c
        }
        Server::Node => {
            let mut c = taskset("0", "node");
            c.arg(root.join("tests/bench/peers/node/server.mjs"))
                .arg(port.to_string())
                .args(redis_url);
            if recovery {
                c.env("RECOVERY_WINDOW_MS", RECOVERY_WINDOW_MS.to_string());
            }
            c
        }
        Server::Socketioxide => {
            let mut c = taskset(
                "0",
                root.join("target/bench-peers/release/bench-socketioxide"),
            );
            c.arg(port.to_string()).args(redis_url);
            c
        }
        Server::NativeMisskey | Server::NativeSocketio => {
            let mut c = taskset("0", root.join("target/release/chanhost-bench"));
            c.args(["serve-native", "--listen", &format!("127.0.0.1:{port}")]);
            c
        }
    };
    let child = wait_for_line(&mut cmd, "listening on", server.label())?;
    Ok(Running { child, port })
}

/// Spawns `cmd` and waits for a line of its stdout containing `ready`;
/// its stdout is drained from then on so it never blocks on a full pipe.
fn wait_for_line(cmd: &mut Command, ready: &str, label: &str) -> Result<Child> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {label}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(ready) => break,
            Some(Ok(_)) => continue,
            _ => bail!("{label} exited before it was ready"),
        }
    }
    if Instant::now() > deadline {
        bail!("{label} took too long to start");
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

/// A Redis of its own for one cluster run, on core 0 with the servers,
/// nothing persisted.
fn start_redis() -> Result<Running> {
    let port = free_port()?;
    let mut cmd = taskset("0", "redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let child = wait_for_line(&mut cmd, "Ready to accept connections", "redis-server")?;
    Ok(Running { child, port })
}

/// How a case places the servers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// One server, no Redis.
    Alone,
    /// Two nodes on one Redis, the room's members spread over both, the
    /// publisher on the first.
    Split,
    /// Two nodes on one Redis, every member and the publisher on the
    /// first: what the second node pays for a room it does not serve.
    OneNode,
    /// A Node socket.io server (the publisher's) and chanhost with
    /// `[socketio.adapter]` on one Redis, the members spread over both.
    Mixed,
}

impl Shape {
    /// Every placement of the cluster cases, in the order they run.
    const CLUSTER: [Shape; 4] = [Shape::Alone, Shape::Split, Shape::OneNode, Shape::Mixed];

    /// What the placement is, in the report's words.
    fn what(self) -> &'static str {
        match self {
            Shape::Alone => "one node",
            Shape::Split => "two nodes, room on both",
            Shape::OneNode => "two nodes, room on one",
            Shape::Mixed => "a Node server and chanhost, room on both",
        }
    }

    /// The name of the cluster case of this placement (the one place the
    /// report and the case list agree on).
    fn cluster_case(self) -> String {
        format!("cluster {CLUSTER_MEMBERS} x 100 B, {}", self.what())
    }
}

/// The servers of one run of a case, and the load generator's arguments
/// that point at them.
struct Placed {
    nodes: Vec<Running>,
    redis: Option<Running>,
}

impl Placed {
    fn start(server: Server, plugins: &Path, case: &Case) -> Result<Placed> {
        let (shape, recovery) = (case.shape, case.recovery);
        if shape == Shape::Alone {
            let node = start_node(server, plugins, Join::Alone, recovery)?;
            return Ok(Placed {
                nodes: vec![node],
                redis: None,
            });
        }
        let redis = start_redis()?;
        let join = Join::Cluster(redis.port);
        let nodes = match shape {
            Shape::Mixed => vec![
                start_node(server, plugins, join, recovery)?,
                start_node(
                    Server::ChanhostSocketio,
                    plugins,
                    Join::Adapter(redis.port),
                    recovery,
                )?,
            ],
            _ => (0..2)
                .map(|_| start_node(server, plugins, join, recovery))
                .collect::<Result<Vec<_>>>()?,
        };
        // Let every node find the cluster (subscriptions, heartbeats).
        std::thread::sleep(Duration::from_millis(500));
        Ok(Placed {
            nodes,
            redis: Some(redis),
        })
    }

    fn args(&self, shape: Shape) -> Vec<String> {
        let mut args = vec![
            "--url".to_owned(),
            format!("ws://127.0.0.1:{}", self.nodes[0].port),
            "--pid".to_owned(),
            self.nodes[0].child.id().to_string(),
        ];
        if matches!(shape, Shape::Split | Shape::Mixed) {
            for n in &self.nodes[1..] {
                args.push("--also".into());
                args.push(format!("ws://127.0.0.1:{}", n.port));
            }
        }
        if let Some(r) = &self.redis {
            args.push("--redis".into());
            args.push(format!("127.0.0.1:{}", r.port));
        }
        args
    }
}

/// Runs the load generator on core 1 against the placed servers; its JSON
/// line.
fn generate(server: Server, placed: &Placed, case: &Case) -> Result<Value> {
    let out = taskset("1", root().join("target/release/chanhost-bench"))
        .args(&case.args)
        .args(placed.args(case.shape))
        .args(["--proto", server.proto()])
        .output()
        .context("running chanhost-bench")?;
    if !out.status.success() {
        bail!(
            "chanhost-bench {:?} against {} failed: {}",
            case.args,
            server.label(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("bad output {text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One scenario's parameters.
#[derive(Clone)]
struct Case {
    name: String,
    args: Vec<String>,
    shape: Shape,
    /// Connection state recovery on.
    recovery: bool,
}

impl Case {
    fn servers(&self) -> Vec<Server> {
        if self.name.starts_with(RECOVERY_CASES) {
            // Socket.IO's; Node's recovery has no Redis adapter (only its
            // streams adapter), so it runs on one node.
            if self.shape == Shape::Alone {
                vec![Server::ChanhostSocketio, Server::Node]
            } else {
                vec![Server::ChanhostSocketio]
            }
        } else if self.name == "upstream" {
            // Each protocol's plugin as WebAssembly next to the same
            // contract as a native plugin: the two runs compared see the
            // machine in the same state (turns reverse each repeat, so the
            // pairs stay side by side).
            vec![
                Server::ChanhostMisskey,
                Server::NativeMisskey,
                Server::ChanhostSocketio,
                Server::NativeSocketio,
                Server::Node,
                Server::Socketioxide,
            ]
        } else if self.shape == Shape::Mixed {
            // The publisher's server; chanhost beside it.
            vec![Server::Node]
        } else {
            Server::PEERS.to_vec()
        }
    }
}

/// The release host and load generator, and a plugins folder holding the
/// `bench` test plugin alone; the folder.
pub(crate) fn build_host() -> Result<PathBuf> {
    let root = root();
    crate::plugins()?;
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "chanhost",
        "-p",
        "chanhost-bench",
    ]))?;
    let plugins = root.join("target/bench-plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(
        root.join("target/test-plugins/bench.wasm"),
        plugins.join("bench.wasm"),
    )?;
    Ok(plugins)
}

fn build() -> Result<PathBuf> {
    let root = root();
    let plugins = build_host()?;
    // The cluster cases start their own `redis-server`.
    crate::ensure_redis()?;
    npm_ci(&root.join("tests/bench/peers/node"))?;
    run(cargo()
        .current_dir(root.join("tests/bench/peers/socketioxide"))
        .env("CARGO_TARGET_DIR", root.join("target/bench-peers"))
        .args(["build", "--release"]))?;
    Ok(plugins)
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} RAM, Linux; Node {node}; loopback only")
}

/// Results: case name -> server -> figures of each repeat.
type Results = Vec<(String, Vec<(Server, Vec<Value>)>)>;

/// Where the figures of the last run are kept (`--report` renders them again).
fn results_path() -> PathBuf {
    root().join("target/bench/results.json")
}

fn save(results: &Results, repeat: usize, quick: bool) -> Result<()> {
    let json: Vec<Value> = results
        .iter()
        .map(|(name, by)| {
            serde_json::json!({
                "case": name,
                "runs": by.iter().map(|(s, runs)| serde_json::json!({"server": format!("{s:?}"), "runs": runs})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let path = results_path();
    std::fs::create_dir_all(path.parent().unwrap())?;
    let doc = serde_json::json!({"repeat": repeat, "quick": quick, "cases": json});
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

fn load() -> Result<(Results, usize, bool)> {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(results_path())
            .context("no saved results: run `cargo xtask bench` first")?,
    )?;
    let server = |name: &str| Server::ALL.into_iter().find(|s| format!("{s:?}") == name);
    let mut results = Results::new();
    for case in doc["cases"].as_array().into_iter().flatten() {
        let mut by = Vec::new();
        for r in case["runs"].as_array().into_iter().flatten() {
            if let Some(s) = r["server"].as_str().and_then(server) {
                by.push((s, r["runs"].as_array().cloned().unwrap_or_default()));
            }
        }
        results.push((case["case"].as_str().unwrap_or_default().to_owned(), by));
    }
    Ok((
        results,
        doc["repeat"].as_u64().unwrap_or(1) as usize,
        doc["quick"].as_bool().unwrap_or(false),
    ))
}

fn write_report(results: &Results, repeat: usize, quick: bool) -> Result<()> {
    std::fs::write(root().join("BENCHMARKS.md"), render(results, repeat, quick))?;
    std::fs::write(root().join("bench-latency.svg"), plot(results))?;
    eprintln!("wrote BENCHMARKS.md and bench-latency.svg");
    Ok(())
}

pub fn bench(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--report") {
        let (results, repeat, quick) = load()?;
        return write_report(&results, repeat, quick);
    }
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(host) = args
        .iter()
        .position(|a| a == "--host")
        .and_then(|i| args.get(i + 1))
    {
        let host = std::fs::canonicalize(host).with_context(|| format!("--host {host}"))?;
        std::env::set_var("CHANHOST_BENCH_HOST", host);
    }
    let repeat: usize = args
        .iter()
        .position(|a| a == "--repeat")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let plugins = build()?;
    let sizes_connect: &[usize] = if quick {
        &[1000, 5000]
    } else {
        &[1000, 5000, 10000, 19000]
    };
    let sizes_fanout: &[usize] = if quick {
        &[100, 1000]
    } else {
        &[100, 1000, 10000]
    };
    let payloads: &[usize] = if quick { &[100] } else { &[100, 1024] };
    let mut cases = Vec::new();
    for &n in sizes_connect {
        cases.push(Case {
            name: format!("connect {n}"),
            args: vec!["connect".into(), "--n".into(), n.to_string()],
            shape: Shape::Alone,
            recovery: false,
        });
    }
    for &m in sizes_fanout {
        for &p in payloads {
            cases.push(Case {
                name: format!("fanout {m} x {p} B"),
                args: fanout_args(m, p, quick),
                shape: Shape::Alone,
                recovery: false,
            });
        }
    }
    cases.push(Case {
        name: "upstream".into(),
        args: vec![
            "upstream".into(),
            "--secs".into(),
            measured_secs(quick).to_string(),
        ],
        shape: Shape::Alone,
        recovery: false,
    });
    // The cluster: one room on one node, then on two nodes of one Redis,
    // run next to each other.
    for shape in Shape::CLUSTER {
        cases.push(Case {
            name: shape.cluster_case(),
            args: fanout_args(CLUSTER_MEMBERS, 100, quick),
            shape,
            recovery: false,
        });
    }
    // Connection state recovery off and on, one node and two: what
    // numbering and keeping every event costs the fan-out.
    for shape in [Shape::Alone, Shape::Split] {
        for recovery in [false, true] {
            cases.push(Case {
                name: recovery_case(shape, recovery),
                args: fanout_args(CLUSTER_MEMBERS, 100, quick),
                shape,
                recovery,
            });
        }
    }
    // `--only PREFIX`: the cases whose names start with it, their figures
    // put in place of the saved ones (the others kept as they were).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    if let Some(prefix) = only {
        cases.retain(|c| c.name.starts_with(prefix.as_str()));
        if cases.is_empty() {
            bail!("--only {prefix}: no case's name starts with it");
        }
    }
    let mut results: Results = cases
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                c.servers().into_iter().map(|s| (s, Vec::new())).collect(),
            )
        })
        .collect();
    for r in 0..repeat {
        for (ci, case) in cases.iter().enumerate() {
            let mut order = case.servers();
            if (r + ci) % 2 == 1 {
                order.reverse();
            }
            for server in order {
                eprintln!("bench: {} / {} (run {})", case.name, server.label(), r + 1);
                // A server that does not start is a failed run, reported
                // with the others; the bench goes on.
                let mut v = match Placed::start(server, &plugins, case)
                    .and_then(|placed| generate(server, &placed, case))
                {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("bench: {e:#}");
                        serde_json::json!({ "error": format!("{e:#}") })
                    }
                };
                v["at"] = Value::String(today());
                let slot = &mut results[ci].1;
                if let Some((_, runs)) = slot.iter_mut().find(|(s, _)| *s == server) {
                    runs.push(v);
                }
            }
        }
    }
    if only.is_some() {
        let Ok((mut saved, saved_repeat, saved_quick)) = load() else {
            // Nothing to merge into: keep these figures, and put the
            // sections they make up (cluster, recovery) in place in
            // BENCHMARKS.md; the rest of it is left as it is.
            save(&results, repeat, quick)?;
            let mut part = String::new();
            cluster(&mut part, &results);
            recovery(&mut part, &results);
            let path = root().join("BENCHMARKS.md");
            let mut doc = std::fs::read_to_string(&path).unwrap_or_default();
            for section in sections(&part) {
                doc = splice_section(&doc, section);
            }
            if !part.is_empty() {
                std::fs::write(&path, doc)?;
            }
            eprintln!(
                "bench: no earlier run saved; figures in {}{}",
                results_path().display(),
                if part.is_empty() {
                    " (BENCHMARKS.md left as it is)"
                } else {
                    "; their sections of BENCHMARKS.md replaced"
                }
            );
            return Ok(());
        };
        if (saved_repeat, saved_quick) != (repeat, quick) {
            bail!(
                "--only: the saved run measured {saved_repeat} repeat(s){}; run the same way",
                if saved_quick { " with --quick" } else { "" }
            );
        }
        for (name, by) in results {
            match saved.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = by,
                None => saved.push((name, by)),
            }
        }
        save(&saved, repeat, quick)?;
        return write_report(&saved, repeat, quick);
    }
    save(&results, repeat, quick)?;
    // Plugin dispatch: one core is enough; the servers are gone by now.
    run(cargo().current_dir(root()).args([
        "bench",
        "-p",
        "chanhost",
        "--bench",
        "dispatch",
        "--",
        "--warm-up-time",
        "2",
        "--measurement-time",
        if quick { "3" } else { "10" },
    ]))?;
    write_report(&results, repeat, quick)
}

/// The `## ` sections of a rendered part, each with its heading.
fn sections(part: &str) -> Vec<&str> {
    let mut starts: Vec<usize> = part.match_indices("## ").map(|(i, _)| i).collect();
    starts.retain(|&i| i == 0 || part.as_bytes()[i - 1] == b'\n');
    starts
        .iter()
        .enumerate()
        .map(|(k, &i)| &part[i..starts.get(k + 1).copied().unwrap_or(part.len())])
        .collect()
}

/// The report with `section` (a `## ` heading and its text) in place of
/// the generated section of the same heading (the first one: the analysis
/// appended after the figures may reuse a heading), or before the budget
/// section when there is none.
fn splice_section(doc: &str, section: &str) -> String {
    let heading = section.lines().next().unwrap_or_default();
    let find = |h: &str| {
        doc.match_indices(h).map(|(i, _)| i).find(|&i| {
            (i == 0 || doc.as_bytes()[i - 1] == b'\n') && doc[i..].lines().next() == Some(h)
        })
    };
    let (start, end) = match find(heading) {
        Some(i) => {
            let rest = &doc[i + heading.len()..];
            let end = rest
                .find("\n## ")
                .map_or(doc.len(), |j| i + heading.len() + j + 1);
            (i, end)
        }
        None => {
            let at = find(BUDGET_HEADING).unwrap_or(doc.len());
            (at, at)
        }
    };
    format!("{}{}{}", &doc[..start], section, &doc[end..])
}

/// The budget section's heading (the recovery section goes before it).
const BUDGET_HEADING: &str = "## chanhost against the budget (DESIGN.md)";

/// The arguments of a fan-out run: about 60k frames/s offered, whatever
/// the room size.
fn fanout_args(members: usize, payload: usize, quick: bool) -> Vec<String> {
    let rate = (60_000.0 / members as f64).max(1.0);
    vec![
        "fanout".into(),
        "--members".into(),
        members.to_string(),
        "--payload".into(),
        payload.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--secs".into(),
        measured_secs(quick).to_string(),
        "--warmup".into(),
        FANOUT_WARMUP_SECS.to_string(),
    ]
}

/// The room of the cluster cases.
const CLUSTER_MEMBERS: usize = 1000;

/// The prefix of the recovery cases' names.
const RECOVERY_CASES: &str = "recovery ";

/// The name of a recovery case (the one place the report and the case
/// list agree on).
fn recovery_case(shape: Shape, recovery: bool) -> String {
    format!(
        "{RECOVERY_CASES}{CLUSTER_MEMBERS} x 100 B, {}, {}",
        shape.what(),
        if recovery { "on" } else { "off" }
    )
}

/// The day of a measurement (UTC), kept with its figures.
fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Seconds each fan-out and upstream run measures.
fn measured_secs(quick: bool) -> u64 {
    if quick {
        5
    } else {
        10
    }
}

/// Seconds of fan-out publishing before the measured ones (delivered, not
/// in the latencies).
const FANOUT_WARMUP_SECS: u64 = 2;

/// The median of a Criterion benchmark of `host/benches/dispatch.rs`, in ns
/// (the mean moves with the outliers this shared machine produces).
fn dispatch_ns(which: &str) -> f64 {
    let path = root().join(format!(
        "target/criterion/dispatch/{which}/new/estimates.json"
    ));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["median"]["point_estimate"].as_f64())
        .unwrap_or(f64::NAN)
}

/// The median over `runs` of the figure at `key`; a dotted key reaches
/// into an object (`redis.publishes`).
fn fig(runs: &[Value], key: &str) -> f64 {
    median(
        runs.iter()
            .filter_map(|v| key.split('.').try_fold(v, |v, k| v.get(k))?.as_f64())
            .collect(),
    )
}

fn fmt(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "—".into()
    } else {
        format!("{x:.digits$}")
    }
}

fn render(results: &Results, repeat: usize, quick: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}` — do not edit by hand.\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(s, "- Machine: {}.", machine());
    if std::env::var_os("CHANHOST_BENCH_HOST").is_some() {
        let _ = writeln!(s, "- chanhost binary: `{}`.", host_binary().display());
    }
    let (secs, warmup) = (measured_secs(quick), FANOUT_WARMUP_SECS);
    let _ = writeln!(
        s,
        "- Method: each server pinned to core 0 (`taskset -c 0`), the load generator \
         (`tests/bench`, Rust, tokio, small buffers) to core 1; servers take turns in \
         alternating order (upstream: each protocol's WebAssembly and native plugin \
         runs side by side); every figure is the median of {repeat} run(s). All servers \
         run the same broadcast contract (`tests/plugins/bench` for chanhost, \
         `tests/bench/peers/` for the others): WebSocket transport, no compression.\n\
         - Connect: N idle clients subscribed to a room; connections/s while opening \
         256 at a time; server memory per connection = growth of the server's RSS \
         (`/proc/<pid>/smaps_rollup`) divided by N (includes the runtime's own growth).\n\
         - Fan-out: M subscribers in one room, one publisher sending through the \
         server at a fixed rate (open loop, ~60k offered frames/s); latency from a \
         timestamp inside each payload to its arrival, over {secs} s of publishing \
         after {warmup} s of warm-up (delivered and counted for drops, not in the \
         latencies: the first bursts after 10,000 connections open run slower than a \
         settled room's); drops = offered − delivered.\n\
         - Upstream: 8 publishers send ~200-byte `publish` messages as fast as the \
         server takes them (at most 2,048 in flight, flushed 8 at a time), one \
         subscriber counts what it receives; messages/s over {secs} s after 1 s of \
         warm-up. chanhost handles each message in the `bench` plugin \
         (WebAssembly), the peers in their own language; \"chanhost, native \
         plugin\" is the same host with the same contract compiled in (the \
         baseline of the throughput-loss row).\n"
    );
    let _ = writeln!(s, "## Idle connections\n");
    let _ = writeln!(
        s,
        "| N | server | connections/s | KiB per connection | vs chanhost (Socket.IO) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (name, by) in results.iter().filter(|(n, _)| n.starts_with("connect")) {
        let n = name.trim_start_matches("connect ");
        let base = by
            .iter()
            .find(|(s, _)| *s == Server::ChanhostSocketio)
            .map_or(f64::NAN, |(_, r)| fig(r, "kib_per_conn"));
        for (server, runs) in by {
            let kib = fig(runs, "kib_per_conn");
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} |",
                server.label(),
                fmt(fig(runs, "per_sec"), 0),
                fmt(kib, 1),
                fmt(kib / base, 2)
            );
        }
    }
    let _ = writeln!(s, "\n## Broadcast fan-out\n");
    let _ = writeln!(
        s,
        "| room × payload | server | delivered frames/s | p50 ms | p99 ms | p99.9 ms | drops | p99 vs chanhost (Socket.IO) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (name, by) in results.iter().filter(|(n, _)| n.starts_with("fanout")) {
        let n = name.trim_start_matches("fanout ");
        let base = by
            .iter()
            .find(|(s, _)| *s == Server::ChanhostSocketio)
            .map_or(f64::NAN, |(_, r)| fig(r, "p99_ms"));
        for (server, runs) in by {
            let p99 = fig(runs, "p99_ms");
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} | {} | {} | {} |",
                server.label(),
                fmt(fig(runs, "frames_per_sec"), 0),
                fmt(fig(runs, "p50_ms"), 2),
                fmt(p99, 2),
                fmt(fig(runs, "p999_ms"), 2),
                fmt(fig(runs, "drops"), 0),
                fmt(p99 / base, 2)
            );
        }
    }
    let _ = writeln!(
        s,
        "\n![fan-out p99 latency against room size](bench-latency.svg)\n"
    );
    if let Some((_, by)) = results.iter().find(|(n, _)| n == "upstream") {
        let _ = writeln!(s, "## Upstream messages\n");
        let _ = writeln!(
            s,
            "| server | messages/s delivered | vs chanhost (Socket.IO) |"
        );
        let _ = writeln!(s, "|---|---|---|");
        let base = by
            .iter()
            .find(|(s, _)| *s == Server::ChanhostSocketio)
            .map_or(f64::NAN, |(_, r)| fig(r, "messages_per_sec"));
        for (server, runs) in by {
            let v = fig(runs, "messages_per_sec");
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                server.label(),
                fmt(v, 0),
                fmt(v / base, 2)
            );
        }
        let _ = writeln!(s);
    }
    cluster(&mut s, results);
    recovery(&mut s, results);
    budget(&mut s, results);
    if let Ok(notes) = std::fs::read_to_string(root().join("tests/bench/analysis.md")) {
        let _ = writeln!(s, "{notes}");
    }
    let errors: Vec<String> = results
        .iter()
        .flat_map(|(name, by)| {
            by.iter().flat_map(move |(server, runs)| {
                runs.iter().filter_map(move |v| {
                    v.get("error")
                        .and_then(Value::as_str)
                        .map(|e| format!("- {name} / {}: {e}", server.label()))
                })
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "## Failed runs\n\n{}\n", errors.join("\n"));
    }
    s
}

/// One Markdown table row of `cells`.
fn row(s: &mut String, cells: &[String]) {
    let _ = writeln!(s, "| {} |", cells.join(" | "));
}

/// The cluster section: one room on one node and on two nodes of one Redis,
/// every server with its own Redis adapter.
fn cluster(s: &mut String, results: &Results) {
    let cases: Vec<_> = results
        .iter()
        .filter(|(n, _)| n.starts_with("cluster "))
        .collect();
    if cases.is_empty() {
        return;
    }
    let at = cases
        .iter()
        .flat_map(|(_, by)| by.iter().flat_map(|(_, runs)| runs.iter()))
        .find_map(|v| v.get("at").and_then(Value::as_str))
        .unwrap_or("—")
        .to_owned();
    let _ = writeln!(
        s,
        "## Several nodes on Redis
"
    );
    let _ = writeln!(
        s,
        "Measured on {at}. One room of {CLUSTER_MEMBERS} members, ~100-byte payloads, \
         ~60k offered frames/s as above, in placements run one after the other: \
         one server alone (no Redis); two nodes of one cluster, the members spread \
         over both (every other connection), the publisher on the first; two nodes, \
         every member and the publisher on the first (the second node serves nobody \
         in the room); and a mixed cluster, a Node socket.io server (the publisher's) \
         with chanhost beside it on `[socketio.adapter]`, the members spread over \
         both (its \"other node\" is chanhost), next to two Node servers. Each server clusters with its own Redis adapter — chanhost \
         `[cluster]`, Node `@socket.io/redis-adapter` 8.3 on node-redis 4.7, \
         socketioxide `socketioxide-redis` 0.4 — on one `redis-server` (Debian 7.0) \
         started for the run; both nodes and Redis share core 0, the load generator \
         has core 1. \"Other node\" latencies are those of the members on the node \
         the publisher is not on: their events crossed Redis.\n"
    );
    let _ = writeln!(
        s,
        "| placement | server | delivered frames/s | p50 ms | p99 ms | other node p50 ms | other node p99 ms | drops |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let label = |name: &str| {
        name.split_once(", ")
            .map_or(name.to_owned(), |(_, w)| w.to_owned())
    };
    for (name, by) in &cases {
        for (server, runs) in by {
            row(
                s,
                &[
                    label(name),
                    server.label().to_owned(),
                    fmt(fig(runs, "frames_per_sec"), 0),
                    fmt(fig(runs, "p50_ms"), 2),
                    fmt(fig(runs, "p99_ms"), 2),
                    fmt(fig(runs, "p50_remote_ms"), 2),
                    fmt(fig(runs, "p99_remote_ms"), 2),
                    fmt(fig(runs, "drops"), 0),
                ],
            );
        }
    }
    let find = |shape: Shape, server: Server| -> Option<&Vec<Value>> {
        let name = shape.cluster_case();
        cases
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, by)| by.iter().find(|(s, _)| *s == server))
            .map(|(_, r)| r)
    };
    let _ = writeln!(
        s,
        "\nWhat Redis carried per published event (its `INFO` counters before the \
         first publish and after the last delivery, divided by the events published; \
         heartbeats and other background traffic included), and the Redis hop: the \
         other node's p50 less the p50 of the same room on one node.\n"
    );
    let _ = writeln!(
        s,
        "| server | room on both: publishes | bytes in | bytes out | room on one: publishes | bytes in | bytes out | Redis hop, p50 ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for server in Server::PEERS {
        let both = find(Shape::Split, server).map_or(&[][..], |r| r);
        let one = find(Shape::OneNode, server).map_or(&[][..], |r| r);
        let alone = find(Shape::Alone, server).map_or(&[][..], |r| r);
        row(
            s,
            &[
                server.label().to_owned(),
                fmt(fig(both, "redis.publishes"), 2),
                fmt(fig(both, "redis.in_bytes"), 0),
                fmt(fig(both, "redis.out_bytes"), 0),
                fmt(fig(one, "redis.publishes"), 2),
                fmt(fig(one, "redis.in_bytes"), 0),
                fmt(fig(one, "redis.out_bytes"), 0),
                fmt(fig(both, "p50_remote_ms") - fig(alone, "p50_ms"), 2),
            ],
        );
    }
    let _ = writeln!(s);
}

/// The recovery section: the same room with connection state recovery
/// off and on.
fn recovery(s: &mut String, results: &Results) {
    let cases: Vec<_> = results
        .iter()
        .filter(|(n, _)| n.starts_with(RECOVERY_CASES))
        .collect();
    if cases.is_empty() {
        return;
    }
    let at = cases
        .iter()
        .flat_map(|(_, by)| by.iter().flat_map(|(_, runs)| runs.iter()))
        .find_map(|v| v.get("at").and_then(Value::as_str))
        .unwrap_or("—")
        .to_owned();
    let _ = writeln!(s, "## Connection state recovery\n");
    let _ = writeln!(
        s,
        "Measured on {at}. One Socket.IO room of {CLUSTER_MEMBERS} members, ~100-byte payloads, ~60k offered \
         frames/s, with connection state recovery off and on (chanhost \
         `[socketio.recovery] max_disconnection_ms = {RECOVERY_WINDOW_MS}`, the Node \
         server `connectionStateRecovery` with the same window): every event is \
         numbered, kept in the room's history and carries its offset to each member. \
         On two nodes (chanhost `[cluster]`, members spread over both) the history \
         lives in Redis; Node's recovery needs its streams adapter there, so it \
         runs on one node only. Redis figures are per published event.\n"
    );
    let _ = writeln!(
        s,
        "| placement | recovery | server | delivered frames/s | p50 ms | p99 ms | drops | Redis bytes in | Redis bytes out |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for (name, by) in &cases {
        let mut parts = name.rsplitn(2, ", ");
        let on = parts.next().unwrap_or("");
        let placement = parts
            .next()
            .and_then(|p| p.split_once(", "))
            .map_or("", |(_, w)| w);
        for (server, runs) in by {
            row(
                s,
                &[
                    placement.to_owned(),
                    on.to_owned(),
                    server.label().to_owned(),
                    fmt(fig(runs, "frames_per_sec"), 0),
                    fmt(fig(runs, "p50_ms"), 2),
                    fmt(fig(runs, "p99_ms"), 2),
                    fmt(fig(runs, "drops"), 0),
                    fmt(fig(runs, "redis.in_bytes"), 0),
                    fmt(fig(runs, "redis.out_bytes"), 0),
                ],
            );
        }
    }
    let _ = writeln!(s);
}

/// The performance budget of DESIGN.md against chanhost's figures.
fn budget(s: &mut String, results: &Results) {
    let of = |case: &str, server: Server, key: &str| -> f64 {
        results
            .iter()
            .find(|(n, _)| n == case)
            .and_then(|(_, by)| by.iter().find(|(s, _)| *s == server))
            .map_or(f64::NAN, |(_, runs)| fig(runs, key))
    };
    // The largest connect run each protocol completed.
    let largest = |server: Server| -> (String, f64) {
        results
            .iter()
            .filter(|(n, _)| n.starts_with("connect"))
            .rev()
            .find_map(|(n, _)| {
                let v = of(n, server, "kib_per_conn");
                v.is_finite()
                    .then(|| (n.trim_start_matches("connect ").to_owned(), v))
            })
            .unwrap_or(("—".into(), f64::NAN))
    };
    // The 10,000-member room at the offered 60k frames/s: all delivered?
    let rate_10k = of(
        "fanout 10000 x 100 B",
        Server::ChanhostSocketio,
        "frames_per_sec",
    );
    let drops_10k = of("fanout 10000 x 100 B", Server::ChanhostSocketio, "drops");
    let held = of("connect 19000", Server::ChanhostSocketio, "n");
    // The worse of the two protocols.
    let p99_10k = of("fanout 10000 x 100 B", Server::ChanhostSocketio, "p99_ms").max(of(
        "fanout 10000 x 100 B",
        Server::ChanhostMisskey,
        "p99_ms",
    ));
    let verdict = |ok: bool, measured: bool| match (measured, ok) {
        (false, _) => "not measured",
        (true, true) => "met",
        (true, false) => "missed",
    };
    let (mn, mk) = largest(Server::ChanhostMisskey);
    let (sn, sk) = largest(Server::ChanhostSocketio);
    let _ = writeln!(s, "{BUDGET_HEADING}\n");
    let _ = writeln!(s, "| target | chanhost | verdict |");
    let _ = writeln!(s, "|---|---|---|");
    let _ = writeln!(
        s,
        "| idle Misskey connection ≤ 8 KiB | {} KiB ({mn} connections) | {} |",
        fmt(mk, 1),
        verdict(mk <= 8.0, mk.is_finite())
    );
    let _ = writeln!(
        s,
        "| idle Socket.IO connection ≤ 10 KiB | {} KiB ({sn} connections) | {} |",
        fmt(sk, 1),
        verdict(sk <= 10.0, sk.is_finite())
    );
    let _ = writeln!(
        s,
        "| 19,000 connections held | {} | {} |",
        if held.is_finite() {
            "19,000 held"
        } else {
            "—"
        },
        verdict(held >= 19000.0, held.is_finite())
    );
    let _ = writeln!(
        s,
        "| 10,000-member room: p99 ≤ 150 ms | {} ms (the worse protocol) | {} |",
        fmt(p99_10k, 1),
        verdict(p99_10k <= 150.0, p99_10k.is_finite())
    );
    let _ = writeln!(
        s,
        "| sustain 60,000 delivered frames/s | {} frames/s, {} dropped (10,000-member room, 60,000 offered) | {} |",
        fmt(rate_10k, 0),
        fmt(drops_10k, 0),
        verdict(rate_10k >= 59_400.0 && drops_10k == 0.0, rate_10k.is_finite())
    );
    let (plugin, native) = (dispatch_ns("plugin"), dispatch_ns("native"));
    let bare = dispatch_ns("plugin-noop");
    let floor = dispatch_ns("plugin-forward") - dispatch_ns("native-forward");
    // `plugin-batch` is one `messages` call of 32.
    let batched = dispatch_ns("plugin-batch") / 32.0;
    let over = (plugin - native) / 1000.0;
    let _ = writeln!(
        s,
        "| plugin dispatch ≤ 2 µs over native | {} µs ({} µs through the plugin, of which {} µs is the bare call; {} µs natively; with no JSON work, a call and one broadcast back cost {} µs over native; in a batch of 32, {} µs per message) | {} |",
        fmt(over, 2),
        fmt(plugin / 1000.0, 2),
        fmt(bare / 1000.0, 2),
        fmt(native / 1000.0, 2),
        fmt(floor / 1000.0, 2),
        fmt(batched / 1000.0, 2),
        verdict(over <= 2.0, over.is_finite())
    );
    // The same host with the same contract as a native plugin: what running
    // the plugin as WebAssembly costs end to end (the worse protocol).
    let loss_of = |wasm: Server, native: Server| {
        let (w, n) = (
            of("upstream", wasm, "messages_per_sec"),
            of("upstream", native, "messages_per_sec"),
        );
        ((1.0 - w / n) * 100.0, w, n)
    };
    let (lm, wm, nm) = loss_of(Server::ChanhostMisskey, Server::NativeMisskey);
    let (ls, ws, ns) = loss_of(Server::ChanhostSocketio, Server::NativeSocketio);
    let loss = lm.max(ls);
    let _ = writeln!(
        s,
        "| end-to-end throughput loss ≤ 15 % | {} % (messages/s through the WebAssembly plugin against the native plugin: Misskey {} / {}, Socket.IO {} / {}; the worse protocol) | {} |\n",
        fmt(loss.max(0.0), 1),
        fmt(wm, 0),
        fmt(nm, 0),
        fmt(ws, 0),
        fmt(ns, 0),
        verdict(loss <= 15.0, loss.is_finite())
    );
    let _ = writeln!(
        s,
        "Plugin dispatch is `host/benches/dispatch.rs` (Criterion, medians): a ~200-byte \
         `publish {{room, data}}` client message read (`room` decoded, `data` passed \
         on as JSON text) and turned into one broadcast, by the `bench` test plugin \
         and by the same logic in Rust, host effects dropped (so the fan-out itself \
         is not in either figure); the bare call is the same message with an event \
         the plugin ignores (arguments in, nothing done); \"no JSON work\" broadcasts \
         the payload as it came, without reading it, through the plugin and natively \
         (`plugin-forward`, `native-forward`); the batch is 32 such messages in one \
         `messages` call, their broadcasts back in one `apply` (`plugin-batch`, per \
         message). The throughput row compares the upstream \
         scenario through the `bench` WebAssembly plugin with the same host serving \
         the same contract from a native plugin (`chanhost-bench serve-native`, \
         `tests/bench/src/native.rs`).\n"
    );
}

/// An SVG line chart: p99 latency (100 B payload) against room size.
fn plot(results: &Results) -> String {
    let series: Vec<(Server, Vec<(f64, f64)>)> = Server::PEERS
        .iter()
        .map(|&srv| {
            let pts = results
                .iter()
                .filter(|(n, _)| n.starts_with("fanout") && n.ends_with(" x 100 B"))
                .filter_map(|(n, by)| {
                    let m: f64 = n.split_whitespace().nth(1)?.parse().ok()?;
                    let runs = &by.iter().find(|(s, _)| *s == srv)?.1;
                    let p = fig(runs, "p99_ms");
                    p.is_finite().then_some((m, p))
                })
                .collect();
            (srv, pts)
        })
        .collect();
    let (w, h, l, b) = (640.0, 360.0, 60.0, 40.0);
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let xs = [100.0_f64, 1000.0, 10000.0];
    let x = |m: f64| l + (m.log10() - 2.0) / 2.0 * (w - l - 20.0);
    let y = |v: f64| h - b - v / max_y * (h - b - 20.0);
    let colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="14" text-anchor="middle">Broadcast p99 latency (ms) against room size, 100 B payload</text>
<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{l}" y1="20" x2="{l}" y2="{}" stroke="black"/>
"#,
        w / 2.0,
        h - b,
        w - 20.0,
        h - b,
        h - b
    );
    for m in xs {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{m}</text>"#,
            x(m),
            h - b + 16.0
        );
    }
    for i in 0..=4 {
        let v = max_y * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.0}</text>"#,
            l - 6.0,
            y(v) + 4.0
        );
    }
    for (i, (srv, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(m, v)| format!("{:.1},{:.1}", x(*m), y(*v)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" fill="{c}">{}</text>"#,
            l + 10.0,
            30.0 + 14.0 * i as f64,
            srv.label()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_replaces_the_generated_one_of_its_heading() {
        let doc = "# B\n\n## Several nodes on Redis\n\nold\n\n## chanhost against the budget (DESIGN.md)\n\nb\n\n## Several nodes on Redis\n\nanalysis\n";
        let out = splice_section(doc, "## Several nodes on Redis\n\nnew\n\n");
        assert_eq!(
            out,
            "# B\n\n## Several nodes on Redis\n\nnew\n\n## chanhost against the budget (DESIGN.md)\n\nb\n\n## Several nodes on Redis\n\nanalysis\n"
        );
    }

    #[test]
    fn a_new_section_goes_before_the_budget() {
        let doc = "# B\n\n## Upstream\n\nu\n\n## chanhost against the budget (DESIGN.md)\n\nb\n";
        let out = splice_section(doc, "## Connection state recovery\n\nr\n\n");
        assert_eq!(
            out,
            "# B\n\n## Upstream\n\nu\n\n## Connection state recovery\n\nr\n\n## chanhost against the budget (DESIGN.md)\n\nb\n"
        );
    }

    #[test]
    fn a_part_splits_into_its_sections() {
        let part = "## A\n\na ## not a heading\n\n## B\n\nb\n";
        assert_eq!(
            sections(part),
            ["## A\n\na ## not a heading\n\n", "## B\n\nb\n"]
        );
    }
}
