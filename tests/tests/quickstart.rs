//! The README's quick start, as a new user runs it: `latticed dev` in an
//! empty directory (generated certificates, token and configs, three nodes
//! on ports 7401-7403), then the SDK's quick-start example and the CLI's
//! commands from that directory, then Ctrl-C. Uses the README's fixed
//! ports: a `latticed dev` already running on this machine makes it fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lattice_tests::serial;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `bin` with `args` in `dir`: (success, stdout, stderr).
fn run(dir: &Path, bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin).current_dir(dir).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `latticed dev`, stopped with Ctrl-C (SIGINT) if the test fails before
/// it does: a cluster left on the fixed ports would fail the next run.
struct Dev(std::process::Child);

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = self.0.wait();
        }
    }
}

#[test]
fn latticed_dev_then_the_quickstart_example_and_the_cli() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let cli = env!("CARGO_BIN_EXE_lattice-test-cli");
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let dev = Command::new(env!("CARGO_BIN_EXE_latticed-test"))
        .current_dir(dir.path())
        .arg("dev")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut dev = Dev(dev);
    let logs = || std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
    // Ready once the CLI, with the generated defaults, gets a status.
    let started = Instant::now();
    loop {
        let (ok, out, _) = run(dir.path(), cli, &["status"]);
        if ok && out.contains("peer n2") && out.contains("peer n3") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`latticed dev` never answered a status\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for f in ["certs/ca.pem", "token", "client.toml"] {
        assert!(dir.path().join(".lattice-dev").join(f).exists(), "no .lattice-dev/{f}");
    }
    let (ok, out, err) = run(dir.path(), env!("CARGO_BIN_EXE_lattice-quickstart"), &[]);
    assert!(ok, "the quick-start example failed: {out}\n{err}\n{}", logs());
    for line in ["visits = 1", "tags = [\"crdt\", \"rust\"]", "refused as expected:"] {
        assert!(out.contains(line), "the example printed no `{line}`:\n{out}");
    }
    // The README's CLI lines.
    assert_eq!(run(dir.path(), cli, &["incr", "visits", "5"]).1, "ok");
    assert_eq!(run(dir.path(), cli, &["get", "visits"]).1, "5");
    assert_eq!(run(dir.path(), cli, &["set", "greeting", "hello"]).1, "ok");
    assert_eq!(run(dir.path(), cli, &["sadd", "tags", "a", "b"]).1, "ok");
    assert_eq!(run(dir.path(), cli, &["srem", "tags", "a"]).1, "ok");
    assert_eq!(run(dir.path(), cli, &["get", "tags"]).1, "b");
    // Read in another region, once replication got there.
    let started = Instant::now();
    loop {
        let (_, out, _) = run(dir.path(), cli, &["--endpoint", "n3@127.0.0.1:7403", "get", "visits"]);
        if out == "5" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "n3 reads visits as {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ctrl-C stops the cluster, cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = dev.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "`latticed dev` did not stop on Ctrl-C\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "`latticed dev` exited with {status}\n{}", logs());
    let (ok, _, _) = run(dir.path(), cli, &["get", "visits"]);
    assert!(!ok, "a node still answers after Ctrl-C");
}
