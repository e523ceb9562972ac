//! The `lattice` CLI's map, multi-value register, scan and mget commands
//! and its `--json` output, against a real two-region cluster: what a user
//! types and what `jq` would read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_server::storage::Durability;
use lattice_tests::relay::Mesh;
use lattice_tests::{runtime, serial, Cluster};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Runs the CLI against node `i` (then the others): (success, stdout, stderr).
fn cli(c: &Cluster, i: usize, args: &[&str]) -> (bool, String, String) {
    let out = raw_cli(c, i, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// The CLI's stdout, which must succeed.
fn ok(c: &Cluster, i: usize, args: &[&str]) -> String {
    let (success, out, err) = cli(c, i, args);
    assert!(success, "lattice {args:?} failed: {out}\n{err}");
    out
}

fn json_of(c: &Cluster, i: usize, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ok(c, i, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lattice {all:?} printed no JSON ({e}): {out}"))
}

#[test]
fn maps_registers_scans_and_natural_json_from_the_cli() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
        let mesh = Mesh::install(&c, Duration::from_millis(1)).await.unwrap();
        c.start_all().unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();

        // Natural JSON of each type.
        assert_eq!(ok(&c, 0, &["set", "greeting", "hello"]), "ok");
        let g = json_of(&c, 0, &["get", "greeting"]);
        assert_eq!(g["key"], "greeting");
        assert_eq!(g["type"], "register");
        assert_eq!(g["value"], "hello");
        assert!(g["token"].is_string(), "{g}");
        ok(&c, 0, &["incr", "visits", "5"]);
        assert_eq!(json_of(&c, 0, &["get", "visits"])["value"], json!(5));
        ok(&c, 0, &["sadd", "tags", "a", "b"]);
        assert_eq!(json_of(&c, 0, &["get", "tags"])["value"], json!(["a", "b"]));
        let absent = json_of(&c, 0, &["get", "nope"]);
        assert_eq!(
            (&absent["key"], &absent["type"], &absent["value"]),
            (&json!("nope"), &Value::Null, &Value::Null)
        );
        let w = json_of(&c, 0, &["set", "k", "v"]);
        assert_eq!(w["ok"], true);
        assert_eq!(w["duplicate"], false);

        // Maps.
        assert_eq!(ok(&c, 0, &["hset", "user:1", "name", "ada"]), "ok");
        assert_eq!(ok(&c, 0, &["hincr", "user:1", "logins", "3"]), "ok");
        assert_eq!(ok(&c, 0, &["hincr", "user:1", "logins", "-1"]), "ok");
        assert_eq!(ok(&c, 0, &["hget", "user:1", "name"]), "ada");
        assert_eq!(ok(&c, 0, &["hget", "user:1", "logins"]), "2");
        assert_eq!(ok(&c, 0, &["hget", "user:1", "nope"]), "(absent)");
        assert_eq!(ok(&c, 0, &["hgetall", "user:1"]), "logins = 2\nname = ada");
        assert_eq!(
            json_of(&c, 0, &["hgetall", "user:1"]),
            json!({"key": "user:1", "type": "map", "value": {"logins": 2, "name": ["ada"]}})
        );
        assert_eq!(
            json_of(&c, 0, &["hget", "user:1", "name"]),
            json!({"key": "user:1", "field": "name", "value": ["ada"]})
        );
        assert_eq!(ok(&c, 0, &["hdel", "user:1", "name"]), "ok");
        assert_eq!(ok(&c, 0, &["hgetall", "user:1"]), "logins = 2");
        assert_eq!(ok(&c, 0, &["hdel", "user:1", "name"]), "ok (no such field)");
        // A map command on a register is refused, naming the type.
        let (success, _, err) = cli(&c, 0, &["hget", "greeting", "x"]);
        assert!(
            !success && err.contains("register") && err.contains("not a map"),
            "{err}"
        );
        let (success, _, err) = cli(&c, 0, &["hincr", "greeting", "x"]);
        assert!(!success && err.contains("type mismatch"), "{err}");

        // A multi-value register written concurrently in two regions keeps
        // both values: the link is cut so neither write sees the other.
        mesh.cut(0, 1, true);
        assert_eq!(ok(&c, 0, &["mvset", "doc", "from-eu"]), "ok");
        assert_eq!(ok(&c, 1, &["mvset", "doc", "from-us"]), "ok");
        mesh.cut(0, 1, false);
        let started = Instant::now();
        loop {
            let v = json_of(&c, 0, &["get", "doc"]);
            let mut values: Vec<String> = v["value"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default();
            values.sort();
            if values == ["from-eu", "from-us"] {
                assert_eq!(v["type"], "mv-register");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "doc reads {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let doc = ok(&c, 0, &["get", "doc"]);
        let mut lines: Vec<&str> = doc.lines().collect();
        lines.sort();
        assert_eq!(lines, ["from-eu", "from-us"]);

        // mget and scan.
        assert_eq!(
            ok(&c, 0, &["mget", "greeting", "visits", "nope"]),
            "greeting = hello\nvisits = 5\nnope = (absent)"
        );
        let m = json_of(&c, 0, &["mget", "greeting", "tags"]);
        assert_eq!(m[0]["value"], "hello");
        assert_eq!(m[1]["value"], json!(["a", "b"]));
        for i in 0..25 {
            ok(&c, 0, &["set", &format!("page:{i:02}"), &format!("v{i}")]);
        }
        let keys = ok(&c, 0, &["scan", "page:", "--page", "7"]);
        let mut keys: Vec<&str> = keys.lines().collect();
        keys.sort();
        let want: Vec<String> = (0..25).map(|i| format!("page:{i:02}")).collect();
        assert_eq!(keys, want);
        let lines = ok(&c, 0, &["--json", "scan", "page:", "--values", "--page", "10"]);
        let objs: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(objs.len(), 25);
        assert!(objs
            .iter()
            .all(|o| o["type"] == "register" && o["value"].as_str().is_some_and(|v| v.starts_with('v'))));
        assert_eq!(ok(&c, 0, &["scan", "page:", "--max", "3"]).lines().count(), 3);
        let (success, _, err) = cli(&c, 0, &["scan", &"p".repeat(2_000)]);
        assert!(!success && err.contains("prefix"), "{err}");
    });
}

/// `--json` prints one JSON document for every command that answers once
/// (and one per line for scan); a failing command prints its error on
/// stderr, nothing on stdout, and exits 1; map commands on a non-map are
/// refused without writing.
#[test]
fn every_command_prints_json_and_errors_go_to_stderr() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let commands: &[&[&str]] = &[
            &["set", "r", "v"],
            &["get", "r"],
            &["incr", "n", "2"],
            &["sadd", "s", "a", "b"],
            &["srem", "s", "a"],
            &["mvset", "mv", "x"],
            &["hset", "m", "f", "v"],
            &["hincr", "m", "c", "3"],
            &["hget", "m", "f"],
            &["hgetall", "m"],
            &["hdel", "m", "f"],
            &["hdel", "m", "absent"],
            &["mget", "r", "n", "s", "nope"],
            &["del", "mv"],
            &["status"],
            &["policy", "show"],
            &["audit", "show"],
            &["audit", "verify"],
        ];
        for args in commands {
            json_of(&c, 0, args);
        }
        let lines = ok(&c, 0, &["--json", "scan", "", "--values"]);
        for l in lines.lines() {
            let o: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("scan line {l:?}: {e}"));
            assert!(o["key"].is_string(), "{o}");
        }
        // --max stops at max even across pages.
        assert_eq!(ok(&c, 0, &["scan", "", "--page", "1", "--max", "2"]).lines().count(), 2);

        // Errors: stderr, exit 1, nothing on stdout, with and without --json.
        for args in [
            &["hdel", "r", "f"][..],
            &["--json", "hdel", "r", "f"],
            &["--json", "hget", "r", "f"],
            &["--json", "hgetall", "n"],
            &["--json", "scan", &"p".repeat(1_025)],
        ] {
            let out = raw_cli(&c, 0, args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(
                out.stdout.is_empty(),
                "{args:?} printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(err.starts_with("lattice: error:"), "{args:?}: {err}");
        }
        let out = raw_cli(&c, 0, &["hdel", "r", "f"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("register") && err.contains("not a map"), "{err}");
        assert_eq!(ok(&c, 0, &["get", "r"]), "v", "hdel on a register changed it");
    });
}

fn raw_cli(c: &Cluster, i: usize, args: &[&str]) -> std::process::Output {
    let endpoint = format!("n{}@{}", i + 1, c.defaults.endpoints[i]);
    Command::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
        .arg("--config")
        .arg(c.dir.path().join("no-defaults.toml"))
        .args(["--endpoint", &endpoint, "--token", &c.defaults.token, "--ca"])
        .arg(&c.defaults.ca)
        .args(args)
        .output()
        .unwrap()
}

/// A shell loop of 200 CLI invocations against one node: each closes its
/// connection before exiting, so the node's 64-per-address limit is never
/// reached. And a CLI pointed at a dead endpoint fails promptly, exit 1.
#[test]
fn two_hundred_cli_runs_in_a_row_and_a_dead_endpoint() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        ok(&c, 0, &["set", "loop", "v"]);
        let started = Instant::now();
        for i in 0..200 {
            let (success, out, err) = cli(&c, 0, &["get", "loop"]);
            assert!(success && out == "v", "run {i}: {out}\n{err}\n{}", c.logs());
        }
        println!("200 runs in {:?}", started.elapsed());
        let refused = c.metric(0, "lattice_connections_refused_total").unwrap();
        assert_eq!(refused, 0.0, "the node refused connections");

        // A dead endpoint: a port nothing listens on.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
            .arg("--config")
            .arg(c.dir.path().join("no-defaults.toml"))
            .args([
                "--endpoint",
                &format!("n1@{addr}"),
                "--token",
                &c.defaults.token,
                "--ca",
            ])
            .arg(&c.defaults.ca)
            .args(["get", "loop"])
            .output()
            .unwrap();
        let took = started.elapsed();
        println!("a dead endpoint: {took:?}, {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1));
        assert!(took < Duration::from_secs(15), "a dead endpoint took {took:?}");
    });
}
