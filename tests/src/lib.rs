//! Helpers for Lattice's real-process tests (in `tests/tests/`): start a
//! cluster of `latticed` processes on loopback, talk to it, kill and
//! restart nodes.

pub mod chaos;
pub mod relay;

use anyhow::{bail, Context, Result};
use lattice_client::{Client, Endpoint, NodeStatus};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_server::config::Config;
use lattice_server::dev::{prepare, ClientDefaults, DevArgs};
use lattice_server::storage::Durability;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Clusters are heavy on 2 cores: real-process tests take this lock so that
/// one cluster runs at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The runtime a real-process test runs in: two workers, like the machine.
/// Panics if the OS refuses the threads (a test cannot go on without them).
#[allow(clippy::expect_used)]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A key a test names; panics on an invalid one (a bug in the test).
#[allow(clippy::expect_used)]
pub fn key(s: &str) -> lattice_core::Key {
    lattice_core::Key::new(s).expect("a valid key")
}

/// A cluster of real `latticed` processes.
pub struct Cluster {
    /// Working directory (certs, configs, data, logs).
    pub dir: tempfile::TempDir,
    /// Config file of each node.
    pub configs: Vec<PathBuf>,
    /// What a client needs.
    pub defaults: ClientDefaults,
    bin: PathBuf,
    children: Vec<Option<Child>>,
    /// The log file of each node's latest start.
    logs: Vec<Option<PathBuf>>,
}

/// How many times [`Cluster::start_all`] moves a cluster to new ports when
/// one was taken between [`free_base_port`]'s check and the node's bind.
const PORT_RETRIES: usize = 5;

/// How long a node may take from its spawn to binding its sockets.
const BIND_WITHIN: Duration = Duration::from_secs(30);

/// What became of a node just spawned.
enum Bound {
    /// It logged `latticed ready`: both its sockets are bound.
    Ready,
    /// It exited because an address it needs is taken.
    AddressInUse(String),
    /// It exited for another reason (a test may want exactly that).
    Exited,
}

fn free_base_port(n: usize) -> Result<u16> {
    // Ports base..base+n (UDP) and base+100.. (TCP) must be free.
    for _ in 0..200 {
        let base: u16 = 20_000 + (rand_port() % 30_000);
        let ok = (0..n as u16).all(|i| {
            std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if ok {
            return Ok(base);
        }
    }
    bail!("no free port range found")
}

/// A loopback TCP address that was free a moment ago (the OS's pick).
fn free_tcp_addr() -> Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?)
}

fn rand_port() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ std::process::id().rotate_left(7)) as u16
}

impl Cluster {
    /// Prepares and starts `regions.len()` nodes with `bin` (the latticed
    /// binary), waiting until each answers a status request.
    pub fn start(bin: &Path, regions: &[&str], durability: Durability) -> Result<Cluster> {
        Cluster::start_with(bin, regions, durability, |_, _| {})
    }

    /// [`Cluster::start`], with each node's config edited by `edit(i, ..)`
    /// before the first start (policies, rate limits, ...).
    pub fn start_with(
        bin: &Path,
        regions: &[&str],
        durability: Durability,
        edit: impl Fn(usize, &mut Config),
    ) -> Result<Cluster> {
        let mut c = Cluster::prepare(bin, regions, durability)?;
        for i in 0..c.configs.len() {
            c.edit_config(i, |cfg| edit(i, cfg))?;
        }
        c.start_all()?;
        Ok(c)
    }

    /// Writes the certificates and configs of `regions.len()` nodes without
    /// starting them: edit them with [`Cluster::edit_config`], then call
    /// [`Cluster::start_all`].
    pub fn prepare(bin: &Path, regions: &[&str], durability: Durability) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let args = DevArgs {
            dir: dir.path().to_path_buf(),
            base_port: free_base_port(regions.len())?,
            regions: regions.iter().map(|r| r.to_string()).collect(),
            durability,
            prepare_only: true,
            // Opened per node with `Cluster::enable_resp`.
            no_resp: true,
            encrypt: false,
        };
        let (configs, defaults) = prepare(&args)?;
        let children = configs.iter().map(|_| None).collect();
        let logs = configs.iter().map(|_| None).collect();
        Ok(Cluster {
            dir,
            configs,
            defaults,
            bin: bin.to_path_buf(),
            children,
            logs,
        })
    }

    /// Starts every prepared node that is not running and waits until each
    /// has bound its sockets (or exited). The ports were free when
    /// [`Cluster::prepare`] picked them, but another process can take one
    /// before the node binds it: then the nodes just started are stopped and
    /// the whole cluster moves to new ports (configs and `client.toml`
    /// rewritten), up to `PORT_RETRIES` times. A cluster whose peers are
    /// wired through relays ([`relay::Mesh`]) cannot move: that is an error.
    pub fn start_all(&mut self) -> Result<()> {
        for attempt in 0..=PORT_RETRIES {
            let started: Vec<usize> = (0..self.configs.len())
                .filter(|&i| self.children[i].is_none())
                .collect();
            for &i in &started {
                self.restart(i)?;
            }
            let mut taken = None;
            for &i in &started {
                if let Bound::AddressInUse(why) = self.wait_bound(i)? {
                    taken = Some(format!("n{}: {why}", i + 1));
                    break;
                }
            }
            let Some(why) = taken else {
                return Ok(());
            };
            if attempt == PORT_RETRIES || started.len() != self.configs.len() {
                bail!("an address was taken before the node could bind it: {why}");
            }
            for &i in &started {
                self.kill(i)?;
            }
            self.move_ports()
                .with_context(|| format!("moving the cluster to new ports after: {why}"))?;
        }
        Ok(())
    }

    /// Waits until node `i`, just spawned, has bound its sockets (its
    /// `/healthz` answers, which it serves after binding QUIC; without an
    /// HTTP address, until it logs `latticed ready`) or has exited.
    fn wait_bound(&mut self, i: usize) -> Result<Bound> {
        let log = self.logs[i].clone().context("node never started")?;
        let http = self.config(i)?.metrics;
        let deadline = Instant::now() + BIND_WITHIN;
        loop {
            let ready = match http {
                Some(addr) => http_get(addr, "/healthz", None).is_ok_and(|a| a.code == 200 && a.body == "ok\n"),
                None => std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("latticed ready"),
            };
            if ready {
                return Ok(Bound::Ready);
            }
            let exited = match self.children[i].as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Ok(if text.contains("Address already in use") {
                    let why: Vec<&str> = text.lines().rev().take(4).collect();
                    Bound::AddressInUse(why.into_iter().rev().collect::<Vec<_>>().join(" | "))
                } else {
                    Bound::Exited
                });
            }
            if Instant::now() > deadline {
                bail!("node {} did not bind within {BIND_WITHIN:?}:\n{}", i + 1, self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves every node to a fresh range of ports: its QUIC and HTTP
    /// addresses, the peer addresses that point at it, and the client
    /// defaults. Refused when a peer address points elsewhere (a relay).
    fn move_ports(&mut self) -> Result<()> {
        let n = self.configs.len();
        let configs: Vec<Config> = (0..n).map(|i| self.config(i)).collect::<Result<_>>()?;
        let listens: Vec<std::net::SocketAddr> = configs.iter().map(|c| c.listen).collect();
        if configs
            .iter()
            .flat_map(|c| &c.peers)
            .any(|p| !listens.contains(&p.address))
        {
            bail!("peers are wired through relays: the cluster cannot move to new ports");
        }
        let base = free_base_port(n)?;
        let quic = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], base + i as u16));
        let http = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], base + 100 + i as u16));
        for i in 0..n {
            self.edit_config(i, |cfg| {
                cfg.listen = quic(i);
                if cfg.metrics.is_some() {
                    cfg.metrics = Some(http(i));
                }
                if cfg.resp.is_some() {
                    cfg.resp = free_tcp_addr().ok();
                }
                for p in &mut cfg.peers {
                    if let Some(j) = listens.iter().position(|a| *a == p.address) {
                        p.address = quic(j);
                    }
                }
            })?;
        }
        self.defaults.endpoints = (0..n).map(quic).collect();
        std::fs::write(self.dir.path().join("client.toml"), toml::to_string(&self.defaults)?)?;
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<Child> {
        let log = self.dir.path().join(format!("n{}.{}.log", i + 1, now_ms()));
        let f = std::fs::File::create(&log)?;
        self.logs[i] = Some(log);
        Command::new(&self.bin)
            .arg("run")
            .arg("--config")
            .arg(&self.configs[i])
            .env(
                "LATTICE_LOG",
                std::env::var("LATTICE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
    }

    /// Opens a Redis-protocol (RESP) listener on node `i` (TLS with the
    /// node's certificate if `tls`), on a free loopback port: call it
    /// before the node starts. Returns the address.
    pub fn enable_resp(&self, i: usize, tls: bool) -> Result<std::net::SocketAddr> {
        let addr = free_tcp_addr()?;
        self.edit_config(i, |cfg| {
            cfg.resp = Some(addr);
            cfg.resp_tls = tls;
        })?;
        Ok(addr)
    }

    /// The RESP address of node `i`, if [`Cluster::enable_resp`] opened one.
    pub fn resp_addr(&self, i: usize) -> Result<std::net::SocketAddr> {
        self.config(i)?
            .resp
            .with_context(|| format!("node {} has no RESP listener (Cluster::enable_resp)", i + 1))
    }

    /// The config of node `i`.
    pub fn config(&self, i: usize) -> Result<Config> {
        Config::from_file(&self.configs[i])
    }

    /// Node `i` as an endpoint that names it (its certificate must).
    pub fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint::named(format!("n{}", i + 1), self.defaults.endpoints[i])
    }

    /// A client for node `i` only.
    pub fn client(&self, i: usize) -> Result<Client> {
        let ca = std::fs::read_to_string(&self.defaults.ca)?;
        Ok(Client::new(vec![self.endpoint(i)], self.defaults.token.clone(), &ca)?.with_timeout(Duration::from_secs(5)))
    }

    /// The admin policy key `latticed dev` made for the cluster
    /// (`DIR/policy.key`), which every node trusts.
    pub fn policy_key(&self) -> Result<ed25519_dalek::SigningKey> {
        let path = self.dir.path().join("policy.key");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        lattice_core::policy::signed::parse_key_file(&text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// `set` signed with the cluster's admin key, ready for `SetPolicy`.
    pub fn sign(&self, set: lattice_core::policy::PolicySet) -> Result<lattice_core::policy::signed::SignedPolicySet> {
        Ok(lattice_core::policy::signed::SignedPolicySet::sign(
            set,
            &self.policy_key()?,
        )?)
    }

    /// A client with a wrong token.
    pub fn client_with_token(&self, i: usize, token: &str) -> Result<Client> {
        let ca = std::fs::read_to_string(&self.defaults.ca)?;
        Ok(Client::new(vec![self.endpoint(i)], token, &ca)?)
    }

    /// The process id of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    /// The resident memory of node `i` in KiB (`VmRSS` in
    /// `/proc/PID/status`).
    pub fn rss_kib(&self, i: usize) -> Result<u64> {
        let pid = self.pid(i).with_context(|| format!("node {} is not running", i + 1))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.children[i].take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Stops node `i` with SIGTERM (graceful) and waits for it.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.children[i].take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            c.wait()?;
        }
        Ok(())
    }

    /// Freezes node `i` with SIGSTOP: its process stays, its sockets stay
    /// bound, and nothing it was sent is answered until [`Cluster::resume`].
    ///
    /// Returns once every thread of the node has stopped. `kill` only
    /// queues the stop: one thread takes it and then stops the others, and
    /// on a loaded machine the rest may run (and answer a request) for
    /// milliseconds after `kill` returned.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP)?;
        let pid = self.children[i]
            .as_ref()
            .map(|c| c.id())
            .context("node is not running")?;
        let started = Instant::now();
        while !all_threads_stopped(pid)? {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("node {} did not stop within 10 s of SIGSTOP", i + 1);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Thaws node `i` (SIGCONT) after [`Cluster::pause`].
    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal(i, nix::sys::signal::Signal::SIGCONT)
    }

    /// Whether node `i` has a process (started and not killed or stopped).
    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    fn signal(&self, i: usize, sig: nix::sys::signal::Signal) -> Result<()> {
        let c = self.children[i]
            .as_ref()
            .with_context(|| format!("node {} is not running", i + 1))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)?;
        Ok(())
    }

    /// The value of metric `name` (e.g. `lattice_watchers`) on node `i`'s
    /// HTTP endpoint.
    pub fn metric(&self, i: usize, name: &str) -> Result<f64> {
        use std::io::{Read, Write};
        let addr = self.config(i)?.metrics.context("no metrics address")?;
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no metric {name} in:\n{body}"))
    }

    /// Rewrites node `i`'s config (the node must be stopped).
    pub fn edit_config(&self, i: usize, f: impl FnOnce(&mut Config)) -> Result<()> {
        let mut c = self.config(i)?;
        f(&mut c);
        std::fs::write(&self.configs[i], toml::to_string(&c)?)?;
        Ok(())
    }

    /// Waits until node `i` answers a status request (its peers need not
    /// be up).
    pub async fn wait_serving(&self, i: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.status(i).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("node {} not serving within {within:?}: {e}\n{}", i + 1, self.logs())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Starts node `i` again on its data dir.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let child = self.spawn(i)?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Status of node `i`.
    pub async fn status(&self, i: usize) -> Result<NodeStatus> {
        status_of(&self.client(i)?).await
    }

    /// Waits until every node answers and sees every peer alive.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        'outer: loop {
            for i in 0..self.configs.len() {
                match self.status(i).await {
                    Ok(s) if s.peers.iter().all(|p| p.alive) => {}
                    _ => {
                        if Instant::now() > deadline {
                            bail!("node {} not ready within {within:?}:\n{}", i + 1, self.logs());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'outer;
                    }
                }
            }
            return Ok(());
        }
    }

    /// Waits until every running node reports the same digest.
    pub async fn wait_converged(&self, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let mut digests = std::collections::BTreeSet::new();
            let mut all = true;
            for i in 0..self.configs.len() {
                match self.status(i).await {
                    Ok(s) => {
                        digests.insert(s.digest);
                    }
                    Err(_) => all = false,
                }
            }
            if all && digests.len() == 1 {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!("no convergence within {within:?}: {digests:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every log line of every node that contains `needle`, prefixed with
    /// its log file's name.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.log_files() {
            let name = l
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&l).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|t| t.contains(needle))
                    .map(|t| format!("{name}: {t}")),
            );
        }
        out
    }

    /// Every node's log files (each start writes a new one), sorted.
    fn log_files(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs
    }

    /// The tail of every node's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for l in self.log_files() {
            let text = std::fs::read_to_string(&l).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n", l.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// An HTTP answer: status code, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub code: u16,
    /// Each header as (lowercased name, value), in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpAnswer {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.0 (the server closes the connection after the
/// answer), with `Authorization: Bearer TOKEN` when given.
pub fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Result<HttpAnswer> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of the HTTP head")?;
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpAnswer {
        code,
        headers,
        body: body.to_string(),
    })
}

/// A client request frame with `token`, as the SDK sends it on a stream
/// (its length prefix first), for tests that speak the protocol raw.
pub fn request_frame(token: &str, body: RequestBody) -> Vec<u8> {
    let frame = lattice_core::proto::client::encode_client(&lattice_core::proto::client::ClientRequest {
        token: token.into(),
        body,
    })
    .expect("a test request encodes");
    let mut out = (frame.len() as u32).to_be_bytes().to_vec();
    out.extend(frame);
    out
}

/// The status of the node `client` talks to.
pub async fn status_of(client: &Client) -> Result<NodeStatus> {
    match client.request(RequestBody::Status).await? {
        Response::Status(s) => Ok(s),
        r => bail!("unexpected answer {r:?}"),
    }
}

/// A key's value as the node `client` talks to holds it now (no token, no
/// wait).
pub async fn read_value(client: &Client, key: &lattice_core::Key) -> Result<Option<lattice_core::crdt::ValueView>> {
    let body = RequestBody::Read {
        key: key.clone(),
        after: None,
        wait_ms: 0,
    };
    match client.request(body).await? {
        Response::Value { value, .. } => Ok(value),
        r => bail!("unexpected answer {r:?}"),
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The node binary for a benchmark binary: `arg` if given, else
/// `latticed-test` or `latticed` beside the running executable.
pub fn node_binary(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory for this binary")?;
    for name in ["latticed-test", "latticed"] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "no latticed binary beside {}: build it (`cargo build --release -p lattice-tests --bins`) or pass --latticed",
        exe.display()
    )
}

/// Whether every thread of process `pid` is in the stopped state (`T` in
/// `/proc/PID/task/TID/stat`).
fn all_threads_stopped(pid: u32) -> Result<bool> {
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let stat = task?.path().join("stat");
        // A thread that exited between the listing and the read is gone.
        let Ok(stat) = std::fs::read_to_string(&stat) else {
            continue;
        };
        // `pid (comm) state ...`: the command may hold spaces and parens.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if !matches!(state, Some("T" | "t")) {
            return Ok(false);
        }
    }
    Ok(true)
}
