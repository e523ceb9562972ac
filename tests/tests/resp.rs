//! The Redis-protocol (RESP) listener against real `latticed` processes,
//! driven by clients nobody here wrote: `redis-cli` and `redis-benchmark`
//! (Debian `redis-tools`) and redis-py (`tests/resp/client.py`). A missing
//! tool fails the test with what to install (CI installs them in `.ci/run`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::proto::RegionId;
use lattice_server::storage::Durability;
use lattice_tests::{serial, Cluster};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Fails (never skips) when `tool` is missing.
fn need(tool: &str, install: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{tool} is not installed: install it with `{install}` (CI installs it in .ci/run)"
    );
}

fn need_redis_tools() {
    need("redis-cli", "apt-get install -y redis-tools");
    need("redis-benchmark", "apt-get install -y redis-tools");
}

/// Runs redis-cli against `addr` (authenticated with `token` if given) and
/// returns what it printed, trimmed.
fn cli_with(addr: SocketAddr, token: Option<&str>, extra: &[&str], args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()]);
    cmd.args(extra);
    if let Some(t) = token {
        cmd.args(["--no-auth-warning", "-a", t]);
    }
    let out = cmd.args(args).output().expect("redis-cli runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text.trim().to_string()
}

struct Cli<'a> {
    addr: SocketAddr,
    token: &'a str,
    extra: Vec<&'a str>,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> String {
        cli_with(self.addr, Some(self.token), &self.extra, args)
    }

    #[track_caller]
    fn expect(&self, args: &[&str], want: &str) {
        let got = self.run(args);
        assert_eq!(got, want, "redis-cli {}", args.join(" "));
    }
}

/// Two regions: eu's node serves RESP in the clear, us's over TLS. Every
/// command of the README's table goes through redis-cli, with AUTH, the
/// Redis errors clients match on, RESP3 (`-3`), and a write made in eu
/// read through RESP in us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_runs_every_command_and_reads_another_regions_write() {
    need_redis_tools();
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
    let eu = c.enable_resp(0, false).unwrap();
    c.enable_resp(1, true).unwrap();
    for i in 0..2 {
        c.edit_config(i, |cfg| {
            cfg.policy_version = 1;
            cfg.policy = vec![Policy::new(
                "us-only/",
                Regions::Only(vec![RegionId("us".into())]),
                Priority::Normal,
            )];
        })
        .unwrap();
    }
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let eu = c.resp_addr(0).unwrap_or(eu);
    let token = c.defaults.token.clone();
    let r = Cli {
        addr: eu,
        token: &token,
        extra: Vec::new(),
    };

    // Nothing is answered before AUTH; a wrong token is refused.
    assert_eq!(cli_with(eu, None, &[], &["PING"]), "NOAUTH Authentication required.");
    assert_eq!(
        cli_with(eu, None, &[], &["GET", "k"]),
        "NOAUTH Authentication required."
    );
    let wrong = cli_with(eu, Some("not-the-token-not-the-token"), &[], &["PING"]);
    assert!(wrong.contains("WRONGPASS"), "{wrong}");
    r.expect(&["AUTH", &token], "OK");
    r.expect(&["AUTH", "default", &token], "OK");

    r.expect(&["PING"], "PONG");
    r.expect(&["PING", "hi"], "hi");
    r.expect(&["ECHO", "hello world"], "hello world");
    r.expect(&["SELECT", "0"], "OK");
    assert!(r.run(&["SELECT", "1"]).starts_with("ERR"));
    r.expect(&["CLIENT", "SETNAME", "tester"], "OK");
    r.expect(&["CLIENT", "SETINFO", "LIB-NAME", "x"], "OK");

    // Strings (LWW registers) and counters.
    r.expect(&["SET", "s", "v1"], "OK");
    r.expect(&["GET", "s"], "v1");
    r.expect(&["GET", "absent"], "");
    r.expect(&["INCR", "n"], "1");
    r.expect(&["INCRBY", "n", "41"], "42");
    r.expect(&["DECR", "n"], "41");
    r.expect(&["DECRBY", "n", "40"], "1");
    r.expect(&["GET", "n"], "1");
    assert!(r.run(&["INCRBY", "n", "x"]).contains("not an integer"));
    r.expect(&["MSET", "m1", "a", "m2", "b"], "OK");
    r.expect(&["MGET", "m1", "absent", "m2"], "a\n\nb");
    r.expect(&["EXISTS", "s", "n", "absent"], "2");
    r.expect(&["TYPE", "s"], "string");
    r.expect(&["TYPE", "n"], "string");
    r.expect(&["TYPE", "absent"], "none");

    // SCAN with MATCH, page by page, as redis-cli --scan does it and by
    // hand (COUNT 5): every key of the pattern once, no other.
    for i in 0..30 {
        r.expect(&["SET", &format!("user:{i}"), "x"], "OK");
    }
    r.expect(&["SET", "other:1", "x"], "OK");
    let want = |f: &dyn Fn(usize) -> bool| -> BTreeSet<String> {
        (0..30).filter(|i| f(*i)).map(|i| format!("user:{i}")).collect()
    };
    let listed: Vec<String> = r
        .run(&["--scan", "--pattern", "user:*"])
        .lines()
        .map(String::from)
        .collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), unique.len(), "a key listed twice: {listed:?}");
    assert_eq!(unique, want(&|_| true));
    let scan = |pattern: &str| -> BTreeSet<String> {
        let (mut cursor, mut found, mut pages) = ("0".to_string(), BTreeSet::new(), 0);
        loop {
            let out = r.run(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "5"]);
            let mut lines = out.lines().filter(|l| !l.is_empty());
            cursor = lines.next().expect("a cursor").to_string();
            found.extend(lines.map(String::from));
            pages += 1;
            assert!(pages < 100, "SCAN never ended");
            if cursor == "0" {
                return found;
            }
        }
    };
    assert_eq!(scan("user:1*"), want(&|i| i == 1 || (10..20).contains(&i)));
    assert_eq!(scan("user:?"), want(&|i| i < 10));
    assert_eq!(scan("user:[12]?"), want(&|i| (10..30).contains(&i)));
    assert!(r.run(&["SCAN", "not-a-cursor"]).starts_with("ERR invalid cursor"));
    assert!(r.run(&["SCAN", "987654321"]).starts_with("ERR invalid cursor"));
    let mget: Vec<String> = (0..30).map(|i| format!("user:{i}")).collect();
    let mut args = vec!["MGET"];
    args.extend(mget.iter().map(String::as_str));
    assert_eq!(r.run(&args), vec!["x"; 30].join("\n"));

    // Sets.
    r.expect(&["SADD", "set", "a", "b", "c"], "3");
    r.expect(&["SADD", "set", "c", "d"], "1");
    r.expect(&["SMEMBERS", "set"], "a\nb\nc\nd");
    r.expect(&["SISMEMBER", "set", "b"], "1");
    r.expect(&["SISMEMBER", "set", "z"], "0");
    r.expect(&["SREM", "set", "a", "z"], "1");
    r.expect(&["SCARD", "set"], "3");
    r.expect(&["TYPE", "set"], "set");

    // Hashes.
    r.expect(&["HSET", "h", "f1", "v1", "f2", "v2"], "2");
    r.expect(&["HSET", "h", "f1", "v1b"], "0");
    r.expect(&["HGET", "h", "f1"], "v1b");
    r.expect(&["HGET", "h", "nope"], "");
    r.expect(&["HINCRBY", "h", "count", "5"], "5");
    r.expect(&["HINCRBY", "h", "count", "-2"], "3");
    r.expect(&["HGETALL", "h"], "count\n3\nf1\nv1b\nf2\nv2");
    r.expect(&["HDEL", "h", "f2", "nope"], "1");
    r.expect(&["TYPE", "h"], "hash");

    // Deletes, of every kind.
    r.expect(&["DEL", "s", "set", "h", "n", "absent"], "4");
    r.expect(&["EXISTS", "s", "set", "h", "n"], "0");
    r.expect(&["GET", "s"], "");

    // The errors clients match on, and nothing that hangs or drops.
    r.expect(&["SET", "str", "x"], "OK");
    let wrongtype = "WRONGTYPE Operation against a key holding the wrong kind of value";
    r.expect(&["SADD", "str", "x"], wrongtype);
    r.expect(&["HGET", "str", "f"], wrongtype);
    r.expect(&["INCR", "str"], wrongtype);
    r.expect(&["SADD", "set2", "x"], "1");
    r.expect(&["GET", "set2"], wrongtype);
    // A key the policy keeps out of this region.
    let denied = r.run(&["SET", "us-only/k", "v"]);
    assert!(denied.starts_with("DENIED") && denied.contains("us"), "{denied}");
    let denied = r.run(&["GET", "us-only/k"]);
    assert!(denied.starts_with("DENIED"), "{denied}");
    let unknown = r.run(&["FLUSHALL", "ASYNC"]);
    assert!(unknown.starts_with("ERR unknown command 'FLUSHALL'"), "{unknown}");
    r.expect(&["PING"], "PONG");
    let long_key = "k".repeat(lattice_core::MAX_KEY_LEN + 1);
    assert!(r.run(&["SET", &long_key, "v"]).starts_with("ERR invalid key"));
    assert!(r.run(&["GET"]).contains("wrong number of arguments for 'get'"));

    // RESP3: a map and a set arrive typed.
    r.expect(&["HSET", "h3", "a", "1"], "1");
    let three = Cli {
        addr: eu,
        token: &token,
        extra: vec!["-3"],
    };
    three.expect(&["HGETALL", "h3"], "a 1");
    three.expect(&["GET", "absent"], "");
    let hello = three.run(&["HELLO", "3"]);
    assert!(hello.contains("proto 3"), "{hello}");
    let info = r.run(&["INFO"]);
    assert!(
        info.contains("# Replication") && info.contains("lattice_peers:1"),
        "{info}"
    );
    let peer = info.lines().find(|l| l.starts_with("peer0:")).unwrap_or_default();
    assert!(
        peer.contains("node=n2") && peer.contains("region=us") && peer.contains("unacked_groups="),
        "{info}"
    );
    let commands = r.run(&["COMMAND", "COUNT"]);
    assert_eq!(commands, "0");

    // A write in eu, read through RESP (over TLS) in us.
    r.expect(&["SET", "crossing", "from-eu"], "OK");
    r.expect(&["SADD", "crossing-set", "x", "y"], "2");
    let us = Cli {
        addr: c.resp_addr(1).unwrap(),
        token: &token,
        extra: vec!["--tls", "--cacert", c.defaults.ca.to_str().unwrap()],
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = (us.run(&["GET", "crossing"]), us.run(&["SMEMBERS", "crossing-set"]));
        if got == ("from-eu".to_string(), "x\ny".to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "us never read eu's writes: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let plain = cli_with(c.resp_addr(1).unwrap(), Some(&token), &[], &["PING"]);
    assert_ne!(plain, "PONG", "the TLS listener must not answer in the clear");
}

/// redis-benchmark, plain and with 16-command pipelines, finishes with no
/// error; redis-py pipelines in RESP2 and RESP3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_and_redis_py_run_clean() {
    need_redis_tools();
    let python = redis_py();
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    c.enable_resp(0, false).unwrap();
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let addr = c.resp_addr(0).unwrap();
    let token = c.defaults.token.clone();
    for pipeline in ["1", "16"] {
        let out = Command::new("timeout")
            .args([
                "120",
                "redis-benchmark",
                "-h",
                "127.0.0.1",
                "-p",
                &addr.port().to_string(),
            ])
            .args(["-a", &token, "-t", "set,get,incr,sadd,hset", "-n", "2000", "-c", "20"])
            .args(["-P", pipeline, "-q"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "redis-benchmark -P {pipeline} failed:\n{text}");
        assert!(
            !text.to_lowercase().contains("error"),
            "redis-benchmark -P {pipeline} saw errors:\n{text}"
        );
        for t in ["SET", "GET", "INCR", "SADD", "HSET"] {
            assert!(
                text.contains(&format!("{t}: ")) && text.contains("requests per second"),
                "no {t} figure from redis-benchmark -P {pipeline}:\n{text}"
            );
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("resp/client.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["127.0.0.1", &addr.port().to_string(), &token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.is_running(0));
}

/// A Python with redis-py 5 or later (RESP3 needs it; Debian 12's
/// python3-redis is 4.3).
fn redis_py() -> String {
    for python in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(python)
            .args([
                "-c",
                "import redis,sys; sys.exit(int(redis.__version__.split('.')[0]) < 5)",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return python.to_string();
        }
    }
    panic!(
        "redis-py 5 or later is not installed for python3: install it with `python3 -m pip install 'redis>=5'` \
         (Debian 12's python3-redis is 4.3, without RESP3; CI installs it in .ci/run)"
    );
}

/// A raw TCP connection to the RESP port.
fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `bytes`, then reads until `want` bytes or the end of the stream.
fn exchange(s: &mut TcpStream, bytes: &[u8], want: usize) -> String {
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the node closed the connection (reads the end of the stream).
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0))
}

fn auth(addr: SocketAddr, token: &str) -> TcpStream {
    let mut s = raw(addr);
    let cmd = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{token}\r\n", token.len());
    assert_eq!(exchange(&mut s, cmd.as_bytes(), 5), "+OK\r\n");
    s
}

/// Hostile input: claimed lengths far over the limits are refused at
/// their header (nothing is allocated for them: the node's memory does not
/// grow), too many arguments and garbage get errors, a command that stalls
/// midway is cut off, connections past the limit are refused; the node
/// keeps serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_resp_input_gets_errors_and_the_node_stays_healthy() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    c.enable_resp(0, false).unwrap();
    c.edit_config(0, |cfg| {
        cfg.resp_max_connections = 16;
        cfg.limits.frame_ms = 1_000;
    })
    .unwrap();
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let addr = c.resp_addr(0).unwrap();
    let token = c.defaults.token.clone();
    let rss_before = c.rss_kib(0).unwrap();

    // Before AUTH: a huge bulk length, a huge argument count.
    let mut s = raw(addr);
    let got = exchange(&mut s, b"*1\r\n$99999999999\r\n", 1);
    assert!(got.starts_with("-ERR Protocol error: invalid bulk length"), "{got}");
    assert!(closed(&mut s));
    let mut s = raw(addr);
    let got = exchange(&mut s, b"*2147483647\r\n", 1);
    assert!(
        got.starts_with("-ERR Protocol error: invalid multibulk length"),
        "{got}"
    );
    // Garbage answers NOAUTH (inline), and the connection stays.
    let mut s = raw(addr);
    let got = exchange(&mut s, b"\x00\x01\xfe\xff garbage\r\n", 1);
    assert!(got.starts_with("-NOAUTH"), "{got}");
    let got = exchange(&mut s, b"PING\r\n", 1);
    assert!(got.starts_with("-NOAUTH"), "{got}");
    drop(s);

    // After AUTH: 1 GiB and 8 EiB claims, too many arguments, bad headers.
    for hostile in [
        &b"*2\r\n$3\r\nGET\r\n$1073741824\r\n"[..],
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$9223372036854775807\r\n",
        b"*1000000\r\n",
        b"*2\r\n:1\r\n",
        b"*abc\r\n",
        b"*1\r\n$-1\r\n",
    ] {
        let mut s = auth(addr, &token);
        let got = exchange(&mut s, hostile, 1);
        assert!(
            got.starts_with("-ERR Protocol error"),
            "{:?}: {got}",
            String::from_utf8_lossy(hostile)
        );
        assert!(closed(&mut s));
    }
    // Garbage that parses as an inline command is an unknown command.
    let mut s = auth(addr, &token);
    let got = exchange(&mut s, b"\x00\xff\x13 junk\r\n", 1);
    assert!(got.starts_with("-ERR unknown command"), "{got}");
    assert_eq!(exchange(&mut s, b"PING\r\n", 7), "+PONG\r\n");
    drop(s);

    // A command that stops midway is cut off after frame_ms (1 s here).
    let mut s = auth(addr, &token);
    let got = exchange(&mut s, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nonly-some", 1);
    assert!(got.contains("did not arrive in time"), "{got}");

    // A large legal value (512 KiB, over the read-budget threshold) goes
    // through and reads back.
    let mut s = auth(addr, &token);
    let value = vec![b'v'; 512 << 10];
    let mut cmd = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", value.len()).into_bytes();
    cmd.extend_from_slice(&value);
    cmd.extend_from_slice(b"\r\n");
    assert_eq!(exchange(&mut s, &cmd, 5), "+OK\r\n");
    let got = exchange(&mut s, b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n", value.len() + 11);
    assert_eq!(got.len(), value.len() + 11, "GET big returns the whole value");
    drop(s);
    // One over the bulk limit is refused at its header.
    let mut s = auth(addr, &token);
    let over = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n", (1 << 20) + 1);
    let got = exchange(&mut s, over.as_bytes(), 1);
    assert!(got.starts_with("-ERR Protocol error: invalid bulk length"), "{got}");

    // Connections past resp_max_connections are refused with a clear error.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held: Vec<TcpStream> = (0..16).map(|_| auth(addr, &token)).collect();
    let mut extra = raw(addr);
    let got = exchange(&mut extra, b"PING\r\n", 1);
    assert!(got.starts_with("-ERR max number of clients reached"), "{got}");
    drop(held);

    // The node is healthy: RESP and the native API answer, and the claims
    // above did not grow its memory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = auth(addr, &token);
    assert_eq!(exchange(&mut s, b"PING\r\n", 7), "+PONG\r\n");
    c.status(0).await.unwrap();
    let rss_after = c.rss_kib(0).unwrap();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the node's memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(c.is_running(0));
}
