//! Links between regions in real processes: a peer's `rate_limit` and the
//! keyspace priorities under it, and a policy set adopted by a region that
//! was partitioned when it was set (README, "Link budgets" and "Policies").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::Client;
use lattice_core::crdt::{Bytes, Op};
use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::proto::RegionId;
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::relay::Mesh;
use lattice_tests::{key, read_value, runtime, serial, Cluster};
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Whether node `i` holds `k`.
async fn holds(client: &Client, k: &Key) -> bool {
    matches!(read_value(client, k).await, Ok(Some(_)))
}

/// Bytes per second eu may send us.
const RATE: u64 = 64 << 10;

/// eu sends us deltas at most at 64 KiB/s. eu takes 512 KiB of `bulk/`
/// values, then one `critical` key: the critical key crosses the link ahead
/// of the bulk backlog (within 3 s), and the backlog takes the time the
/// limit gives it (its last key not before 4 s). Anti-entropy is kept out
/// of the way (one round a minute): its answers are not gated by the limit
/// (ARCHITECTURE.md, "Rate limits and priorities"), so a round could carry
/// the whole backlog in one frame.
#[test]
fn critical_keys_cross_a_rate_limited_link_ahead_of_bulk() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |i, cfg| {
            cfg.policy_version = 1;
            cfg.anti_entropy_ms = 60_000;
            cfg.policy = vec![
                Policy::new("crit/", Regions::All, Priority::Critical),
                Policy::new("bulk/", Regions::All, Priority::Bulk),
            ];
            if i == 0 {
                for p in &mut cfg.peers {
                    p.rate_limit = Some(RATE);
                }
            }
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let us = c.client(1).unwrap();
        // The first repair round comes soon after the start, whatever the
        // interval; its answers would carry the backlog. Wait it out, and
        // for a probe to cross (deltas flow).
        let deadline = Instant::now() + Duration::from_secs(20);
        while (0..2).any(|i| c.metric(i, "lattice_anti_entropy_rounds").unwrap() < 1.0) {
            assert!(Instant::now() < deadline, "no first repair round\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let probe = key("probe");
        eu.write(vec![(probe.clone(), Op::CounterAdd(1))]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !holds(&us, &probe).await {
            assert!(Instant::now() < deadline, "the probe never crossed\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        for n in 0..8 {
            let value = Bytes::from(vec![b'b'; 64 << 10]);
            eu.write(vec![(key(&format!("bulk/{n}")), Op::LwwSet(value))])
                .await
                .unwrap();
        }
        let crit = key("crit/alarm");
        eu.write(vec![(crit.clone(), Op::CounterAdd(1))]).await.unwrap();
        let last_bulk = key("bulk/7");
        let (mut crit_at, mut bulk_at) = (None, None);
        while crit_at.is_none() || bulk_at.is_none() {
            if crit_at.is_none() && holds(&us, &crit).await {
                crit_at = Some(started.elapsed());
            }
            if bulk_at.is_none() && holds(&us, &last_bulk).await {
                bulk_at = Some(started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "critical at {crit_at:?}, last bulk at {bulk_at:?}\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (crit_at, bulk_at) = (crit_at.unwrap(), bulk_at.unwrap());
        eprintln!("critical key at {crit_at:?}, the last of 512 KiB of bulk at {bulk_at:?}");
        assert!(
            crit_at < bulk_at && crit_at < Duration::from_secs(3),
            "the critical key waited behind bulk: at {crit_at:?}, the last bulk key at {bulk_at:?}"
        );
        assert!(
            bulk_at >= Duration::from_secs(4),
            "512 KiB crossed a {RATE} B/s link in {bulk_at:?}: the limit is not applied"
        );
    });
}

/// ap is cut off from eu and us when an admin sets version 2, which keeps
/// `eu/` in eu. eu and us adopt it; ap keeps version 1 and, under it, takes
/// a write of `eu/x`. Once the links heal, ap adopts version 2 and serves
/// `eu/` no more, and us never holds it. (ap's write stays on ap's disk,
/// neither served nor sent, as ARCHITECTURE.md says of keys a region may no
/// longer hold: it does not reach eu. A hand-off to the regions that may
/// hold it is not built.)
#[test]
fn a_partitioned_region_adopts_the_policy_set_when_the_partition_heals() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::prepare(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
        for i in 0..3 {
            c.edit_config(i, |cfg| {
                cfg.policy_version = 1;
                cfg.admin_tokens = vec!["admin-secret-token".into()];
                cfg.anti_entropy_ms = 500;
            })
            .unwrap();
        }
        let mesh = Mesh::install(&c, Duration::from_millis(2)).await.unwrap();
        c.start_all().unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        mesh.isolate(2, true);
        let admin = c.client_with_token(0, "admin-secret-token").unwrap();
        let v2 = PolicySet::new(
            2,
            vec![Policy::new(
                "eu/",
                Regions::Only(vec![RegionId::from("eu")]),
                Priority::Normal,
            )],
        );
        let r = admin
            .request(RequestBody::SetPolicy(c.sign(v2.unwrap()).unwrap()))
            .await
            .unwrap();
        assert!(matches!(r, Response::PolicySet { version: 2 }), "{r:?}");
        let version = |i: usize| {
            let c = &c;
            async move { c.status(i).await.map(|s| s.policy_version).unwrap_or(0) }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while version(1).await != 2 {
            assert!(Instant::now() < deadline, "us never adopted version 2\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Cut off, ap still runs version 1 and takes a write of eu/x.
        let ap = c.client(2).unwrap();
        let x = key("eu/x");
        ap.write(vec![(x.clone(), Op::CounterAdd(7))]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(version(2).await, 1, "ap adopted a set it was cut off from");
        assert!(holds(&ap, &x).await, "ap, under version 1, serves eu/x");
        mesh.heal();
        let deadline = Instant::now() + Duration::from_secs(30);
        while version(2).await != 2 {
            assert!(
                Instant::now() < deadline,
                "ap never adopted version 2 after the heal\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = read_value(&ap, &x).await;
        assert!(
            e.as_ref().is_err_and(|e| e.to_string().contains("eu")),
            "ap serves eu/x under version 2: {e:?}"
        );
        let us = c.client(1).unwrap();
        let e = read_value(&us, &x).await;
        assert!(e.is_err(), "us serves eu/x: {e:?}");
        // Nor does us hold it on disk, after repair rounds under version 2
        // (digests do not converge: ap keeps a key nobody else holds).
        let rounds = |i: usize| c.metric(i, "lattice_anti_entropy_rounds").unwrap();
        let (us0, ap0) = (rounds(1), rounds(2));
        let deadline = Instant::now() + Duration::from_secs(20);
        while rounds(1) < us0 + 4.0 || rounds(2) < ap0 + 4.0 {
            assert!(Instant::now() < deadline, "no repair rounds after the heal");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let on_disk = |i: usize| {
            walk(&c.config(i).unwrap().data_dir)
                .iter()
                .any(|f| std::fs::read(f).is_ok_and(|b| b.windows(4).any(|w| w == b"eu/x")))
        };
        assert!(!on_disk(1), "us's data dir holds eu/x");
        assert!(on_disk(2), "ap's write is not on its disk");
    });
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
