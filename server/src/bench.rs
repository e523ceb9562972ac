//! Node benchmarks behind `latticed bench-sled`, `bench-footprint` and
//! `bench-peer-down` (figures and commands in BENCHMARKS.md). They drive
//! sled or the real engine and store in-process and print their figures.

use anyhow::Result;

/// `latticed bench-sled`: raw sled inserts from `threads` threads for `secs`
/// seconds, optionally with a flush and fsync after each; prints one line.
pub fn sled(
    dir: &std::path::Path,
    threads: usize,
    secs: u64,
    keys: usize,
    value_size: usize,
    flush: bool,
) -> Result<()> {
    use anyhow::Context;
    use rand::{Rng, SeedableRng};
    if threads == 0 || keys == 0 {
        anyhow::bail!("--threads and --keys must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let db = sled::open(dir).with_context(|| format!("opening sled at {}", dir.display()))?;
    let tree = db.open_tree("bench")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let started = std::time::Instant::now();
    let results: Vec<Result<(u64, hdrhistogram::Histogram<u64>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (db, tree) = (&db, &tree);
                scope.spawn(move || -> Result<(u64, hdrhistogram::Histogram<u64>)> {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                    let value = vec![b'v'; value_size];
                    let mut n = 0;
                    while std::time::Instant::now() < deadline {
                        let key = format!("bench/{:08}", rng.gen_range(0..keys));
                        let t0 = std::time::Instant::now();
                        tree.insert(key.as_bytes(), value.as_slice())?;
                        if flush {
                            // As latticed's sync and group modes do: sled's
                            // flush, then an fsync of its log.
                            db.flush()?;
                            std::fs::File::open(dir.join("db"))?.sync_data()?;
                        }
                        hist.record(t0.elapsed().as_micros().clamp(1, 60_000_000) as u64)?;
                        n += 1;
                    }
                    Ok((n, hist))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a writer thread panicked"))?)
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut ops = 0;
    for r in results {
        let (n, h) = r?;
        ops += n;
        total.add(&h)?;
    }
    println!(
        "sled flush={flush} threads={threads} ops={ops} secs={elapsed:.1} ops_per_sec={:.0} p50_us={} p99_us={} p999_us={} max_us={}",
        ops as f64 / elapsed.max(1e-9),
        total.value_at_quantile(0.5),
        total.value_at_quantile(0.99),
        total.value_at_quantile(0.999),
        total.max()
    );
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p).map_or(0, |rd| {
        rd.flatten()
            .map(|e| {
                let path = e.path();
                if path.is_dir() {
                    dir_bytes(&path)
                } else {
                    e.metadata().map_or(0, |m| m.len())
                }
            })
            .sum()
    })
}

/// `latticed bench-footprint`: `keys` keys of one CRDT type through the real
/// engine and store; prints disk and RSS growth per key.
pub fn footprint(dir: &std::path::Path, keys: usize, kind: &str, batch: usize, log: bool, encrypt: bool) -> Result<()> {
    use anyhow::Context;
    use lattice_core::crdt::{Bytes, Field, FieldKind, Op};
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use rand::SeedableRng;
    let op = |i: usize| -> Result<Op> {
        Ok(match kind {
            "counter" => Op::CounterAdd(1),
            "register" => Op::LwwSet(Bytes(format!("value-{i:010}").into_bytes())),
            "set" => Op::SetAdd(vec![Bytes(format!("e{i:08}").into_bytes())]),
            "map" => Op::MapApply {
                field: Field::new("visits", FieldKind::Counter),
                op: Box::new(Op::CounterAdd(1)),
            },
            other => anyhow::bail!("--kind must be counter, register, set or map, not {other:?}"),
        })
    };
    op(0)?;
    if batch == 0 {
        anyhow::bail!("--batch must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let before = rss_bytes();
    // With `encrypt`, a fresh random key: the cost of encryption at rest
    // on the write path (and in the bytes on disk).
    let keyring = if encrypt {
        crate::crypt::Keys::with(crate::crypt::Kek::generate())
    } else {
        crate::crypt::Keys::none()
    };
    let store = crate::storage::SledStore::open_with(
        dir,
        "footprint",
        crate::storage::Durability::Group,
        Default::default(),
        &keyring,
    )?;
    let store = if log { store } else { store.without_log() };
    let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let mut r = Replica::open(ReplicaConfig::new("footprint", "r", vec![]), store, rng, Time(0))?;
    // The wall clock, as a node sets it: changes are stamped now, not in
    // 1970 (where the log's retention by age would drop each at once).
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    r.set_wall_offset(wall_ms);
    let started = std::time::Instant::now();
    for start in (0..keys).step_by(batch) {
        let ops = (start..(start + batch).min(keys))
            .map(|i| Ok((lattice_core::Key::new(format!("key:{i:08}"))?, op(i)?)))
            .collect::<Result<Vec<_>>>()?;
        r.write(Time(0), ops)?;
        r.flush(Time(0))?;
        while r.poll_event().is_some() {}
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = rss_bytes();
    let log_bytes = r.store().log_meta().bytes;
    // Baseline in the same run: raw sled holding the same keys and the same
    // encoded final states, inserted in the same batches with a flush each.
    let raw_dir = dir.with_extension("raw");
    if raw_dir.exists() {
        std::fs::remove_dir_all(&raw_dir).with_context(|| format!("clearing {}", raw_dir.display()))?;
    }
    let raw = sled::Config::new().path(&raw_dir).open()?;
    let mut state_bytes = 0u64;
    for start in (0..keys).step_by(batch) {
        let mut b = sled::Batch::default();
        for i in start..(start + batch).min(keys) {
            let key = lattice_core::Key::new(format!("key:{i:08}"))?;
            let value = r.read(&key)?.context("a written key is missing")?;
            let bytes = lattice_core::proto::to_bytes(&value)?;
            state_bytes += (key.as_str().len() + bytes.len()) as u64;
            b.insert(key.as_str().as_bytes(), bytes);
        }
        raw.apply_batch(b)?;
        raw.flush()?;
    }
    drop(raw);
    drop(r);
    let disk = dir_bytes(dir);
    let raw_disk = dir_bytes(&raw_dir);
    let per_key = |n: u64| n as f64 / keys.max(1) as f64;
    println!(
        "kind={kind} keys={keys} log={log} encrypt={encrypt} disk_bytes={disk} disk_per_key={:.1} log_bytes_per_write={:.1} \
         rss_growth_bytes={} rss_per_key={:.1} state_per_key={:.1} raw_sled_disk_per_key={:.1} \
         disk_vs_raw_sled={:.2} secs={elapsed:.1} writes_per_sec={:.0}",
        per_key(disk),
        per_key(log_bytes),
        after.saturating_sub(before),
        per_key(after.saturating_sub(before)),
        per_key(state_bytes),
        per_key(raw_disk),
        disk as f64 / raw_disk.max(1) as f64,
        keys as f64 / elapsed.max(1e-9)
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(&raw_dir);
    Ok(())
}

/// `latticed bench-peer-down`: sustained writes with a peer that never
/// answers; prints RSS and the delta buffer every minute of engine time.
pub fn peer_down(dir: &std::path::Path, minutes: u64, rate: u64, max_buffer_mb: usize) -> Result<()> {
    use anyhow::Context;
    use lattice_core::crdt::{Bytes, Op};
    use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
    use rand::SeedableRng;
    if rate == 0 || minutes == 0 {
        anyhow::bail!("--rate and --minutes must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let store = crate::storage::SledStore::open(dir, "up", crate::storage::Durability::Group)?;
    let mut cfg = ReplicaConfig::new("up", "eu", vec![PeerConfig::new("down", "us")]);
    cfg.max_buffer_bytes = max_buffer_mb << 20;
    let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let mut r = Replica::open(cfg, store, rng, Time(0))?;
    let value = Bytes(vec![b'v'; 100]);
    // 10 ms of engine time per batch.
    let per_batch = (rate / 100).max(1);
    let mut i = 0u64;
    println!("minute rss_mb buffer_groups buffer_mb dropped_groups");
    for tick in 0..minutes * 6_000 {
        let now = Time(tick * 10);
        let ops = (0..per_batch)
            .map(|_| {
                i += 1;
                Ok((
                    lattice_core::Key::new(format!("k{:06}", i % 100_000))?,
                    Op::LwwSet(value.clone()),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        r.write(now, ops)?;
        r.handle_timeout(now)?;
        r.flush(now)?;
        while r.poll_event().is_some() {}
        while r.poll_transmit().is_some() {}
        if (tick + 1) % 6_000 == 0 {
            let (groups, bytes) = r.buffer_usage();
            println!(
                "{} {} {groups} {} {}",
                (tick + 1) / 6_000,
                rss_bytes() >> 20,
                bytes >> 20,
                r.stats().buffer_dropped
            );
        }
    }
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
