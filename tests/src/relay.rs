//! A UDP relay that adds a fixed one-way delay and can cut the link: the
//! stand-in for `tc netem` between real processes, since the kernels these
//! benchmarks run on may lack the `sch_netem` module.
//!
//! One relay carries one direction of dialling: a node sends to
//! [`Relay::addr`] instead of its peer, the relay forwards each datagram to
//! the peer after `delay` from a socket of its own, and the peer's answers
//! come back the same way, after `delay` too. Datagrams keep their order.
//! While [`Relay::set_cut`] is on, every datagram in either direction is
//! dropped, as in a partition. A [`Mesh`] puts one relay on every peer link
//! of a cluster.

use crate::Cluster;
use anyhow::{Context, Result};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Datagrams waiting in one direction of a relay; beyond this they are
/// dropped, as a router's queue would.
const MAX_QUEUED: usize = 10_000;

/// A delaying UDP relay to one target (see the module docs).
pub struct Relay {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    cut: AtomicBool,
    bytes: AtomicU64,
}

type Line = mpsc::Sender<(Instant, Vec<u8>)>;

impl Relay {
    /// Starts a relay on a free loopback port that forwards to `target`.
    pub async fn start(target: SocketAddr, delay: Duration) -> Result<Relay> {
        let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await.context("binding a relay")?);
        let addr = listen.local_addr()?;
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(listen, target, delay, state.clone()));
        Ok(Relay { addr, state, task })
    }

    /// Where the dialling side should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link (drops everything both ways) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.state.cut.store(cut, Ordering::SeqCst);
    }

    /// UDP payload bytes forwarded so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(listen: Arc<UdpSocket>, target: SocketAddr, delay: Duration, state: Arc<State>) {
    // Owned here, so aborting this task stops every line and reader.
    let mut tasks = JoinSet::new();
    let mut upstreams: HashMap<SocketAddr, Line> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = listen.recv_from(&mut buf).await else {
            continue;
        };
        if state.cut.load(Ordering::SeqCst) {
            continue;
        }
        let line = match upstreams.entry(from) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(slot) => {
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let up = Arc::new(up);
                let forward = delay_line(&mut tasks, up.clone(), target);
                let back = delay_line(&mut tasks, listen.clone(), from);
                let state = state.clone();
                tasks.spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = up.recv(&mut buf).await {
                        if !state.cut.load(Ordering::SeqCst) {
                            state.bytes.fetch_add(n as u64, Ordering::Relaxed);
                            let _ = back.try_send((Instant::now() + delay, buf[..n].to_vec()));
                        }
                    }
                });
                slot.insert(forward).clone()
            }
        };
        state.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let _ = line.try_send((Instant::now() + delay, buf[..n].to_vec()));
    }
}

/// A relay on every peer link of a [`Cluster`]: `relays[a][b]` carries
/// node `a`'s dialling path to node `b` (and `b`'s answers back), so cutting
/// both `[a][b]` and `[b][a]` partitions the pair. Clients still reach every
/// node directly.
pub struct Mesh {
    relays: Vec<Vec<Option<Relay>>>,
}

impl Mesh {
    /// Starts the relays and points every node's `[[peers]]` address at
    /// them. Call between [`Cluster::prepare`] and [`Cluster::start_all`]
    /// (the configs are rewritten).
    pub async fn install(cluster: &Cluster, delay: Duration) -> Result<Mesh> {
        let n = cluster.configs.len();
        let configs: Vec<_> = (0..n).map(|i| cluster.config(i)).collect::<Result<_>>()?;
        let mut relays = Vec::new();
        for a in 0..n {
            let mut row = Vec::new();
            for (b, to) in configs.iter().enumerate() {
                row.push(if a == b {
                    None
                } else {
                    Some(Relay::start(to.listen, delay).await?)
                });
            }
            relays.push(row);
        }
        for (a, row) in relays.iter().enumerate() {
            cluster.edit_config(a, |cfg| {
                for peer in &mut cfg.peers {
                    if let Some(b) = configs.iter().position(|c| c.node == peer.name) {
                        if let Some(r) = &row[b] {
                            peer.address = r.addr();
                        }
                    }
                }
            })?;
        }
        Ok(Mesh { relays })
    }

    /// Cuts (or heals) the link between nodes `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize, cut: bool) {
        for (x, y) in [(a, b), (b, a)] {
            if let Some(r) = &self.relays[x][y] {
                r.set_cut(cut);
            }
        }
    }

    /// Cuts (or heals) every link of node `a`.
    pub fn isolate(&self, a: usize, cut: bool) {
        for b in 0..self.relays.len() {
            self.cut(a, b, cut);
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        for r in self.relays.iter().flatten().flatten() {
            r.set_cut(false);
        }
    }

    /// UDP payload bytes relayed so far, every link and direction.
    pub fn bytes(&self) -> u64 {
        self.relays.iter().flatten().flatten().map(Relay::bytes).sum()
    }
}

/// A FIFO that sends each datagram on `sock` to `to` at its deadline.
fn delay_line(tasks: &mut JoinSet<()>, sock: Arc<UdpSocket>, to: SocketAddr) -> Line {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_QUEUED);
    tasks.spawn(async move {
        while let Some((at, datagram)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let _ = sock.send_to(&datagram, to).await;
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn delays_both_ways_and_cuts() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(server.local_addr().unwrap(), Duration::from_millis(30))
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 16];

        let t = std::time::Instant::now();
        client.send_to(b"ping", relay.addr()).await.unwrap();
        let (n, via) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", via).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert!(t.elapsed() >= Duration::from_millis(60), "{:?}", t.elapsed());

        relay.set_cut(true);
        client.send_to(b"lost", relay.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), server.recv_from(&mut buf)).await;
        assert!(r.is_err(), "a cut relay forwarded a datagram");

        relay.set_cut(false);
        client.send_to(b"again", relay.addr()).await.unwrap();
        let (n, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"again");
    }
}
