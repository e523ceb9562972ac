//! `lattice-server`: `latticed`, the regional Lattice node. An I/O driver
//! around `lattice-core`'s replica: sled storage ([`storage`]), QUIC gossip
//! and the client API ([`net`]), the engine thread ([`node`]), metrics and
//! status over HTTP ([`metrics`]), certificates ([`certs`]), configuration
//! ([`config`]) and the local development cluster ([`dev`]). It contains no
//! replication logic of its own.

pub mod access;
pub mod audit;
pub mod backup;
pub mod bench;
pub mod certs;
pub mod changelog;
pub mod config;
pub mod crypt;
pub mod dev;
pub mod edge;
pub mod feed;
pub mod files;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod node;
pub mod policy_key;
pub mod queue;
pub mod reencrypt;
pub mod replay;
pub mod resp;
pub mod storage;
pub mod waits;

use anyhow::{Context, Result};
use config::Config;
use lattice_core::proto::{NodeId, RegionId};
use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
use rand::SeedableRng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Starts a background re-encryption pass when values may be under an
/// older data key (after a key rotation at start, or when encryption was
/// turned on for a dir with unencrypted values): the node serves
/// meanwhile, and the old data keys are dropped once nothing uses them.
fn start_reencryption(store: &storage::SledStore) {
    let reader = store.reader();
    if !reader.crypt().has_old() {
        return;
    }
    let spawned = std::thread::Builder::new().name("reencrypt".into()).spawn(move || {
        let dir = reader.data_dir().map(|d| d.to_path_buf()).unwrap_or_default();
        match reencrypt::run(&reader, &dir, false) {
            Ok(s) => tracing::info!(
                rewritten = s.rewritten,
                raced = s.raced,
                passes = s.passes,
                retired = s.retired,
                complete = s.complete,
                "background re-encryption done"
            ),
            Err(e) => tracing::error!(error = %e, "background re-encryption failed; old data keys are kept"),
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting the background re-encryption failed");
    }
}

/// Runs a node until `shutdown` resolves, then stops gracefully: stop
/// accepting, flush, close connections.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let keys = config.encryption.keys(&config.data_dir)?;
    let mut store = storage::SledStore::open_with(
        &config.data_dir,
        &config.node,
        config.durability,
        config.log.settings(),
        &keys,
    )?;
    store.set_cache_bytes(config.memory.record_cache_bytes);
    start_reencryption(&store);
    // The watch feed publishes the changes the log holds, by their
    // node-wide numbers, and rebuilds its ring from the log at start.
    store.collect_written();
    let reader = store.reader();
    let feed = feed::Feed::open_from_log(
        store.feed_tree().context("opening the watch feed")?,
        config.memory.feed(),
        config.durability != storage::Durability::Async,
        store.log_meta().next_gseq,
        |take| {
            if let Err(e) = reader.log().newest(take) {
                tracing::warn!(error = %e, "reading the change log for the watch feed failed; watchers will not resume");
            }
        },
    );
    let peers: Vec<PeerConfig> = config
        .peers
        .iter()
        .map(|p| PeerConfig {
            node: NodeId(p.name.clone()),
            region: RegionId(p.region.clone()),
            rate_limit: p.rate_limit,
        })
        .collect();
    let mut rc = ReplicaConfig::new(config.node.clone(), config.region.clone(), peers);
    // The policy in force: the newer of the file's and the last one this
    // node adopted (from a peer or an admin), as its audit log records.
    let head = store.audit_tree().context("opening the audit head")?;
    let audit_key = config.audit_key()?;
    let mut audit = audit::AuditLog::open(&config.data_dir, Some(head), audit_key).context(
        "the policy audit log (audit.log in the data directory) does not verify: it may have been tampered with \
         (or it was written without the audit key this node now has, or with another one)",
    )?;
    // The file's set is trusted here (the operator wrote it) but, being
    // unsigned, is never sent to peers. A set the log recorded keeps its
    // signature, so a restarted node still spreads what it adopted.
    let from_file = config.policy_set()?;
    let (initial, signature) = match audit.last() {
        Some(last) if !last.policy.is_superseded_by(&from_file) => (last.policy.clone(), last.policy_signature()),
        _ => (from_file, None),
    };
    if audit.last_policy() != Some(&initial) {
        audit
            .append(&config.node, "config", initial.clone(), None)
            .context("appending to the audit log")?;
    }
    rc.policy = initial;
    rc.policy_signature = signature;
    rc.policy_keys = config.trusted_policy_keys()?;
    rc.ae_interval_ms = config.anti_entropy_ms;
    rc.max_buffer_bytes = config.max_buffer_bytes;
    // Randomness comes from the OS here, in the driver, never in the core.
    let rng = Box::new(rand_chacha::ChaCha8Rng::from_entropy());
    let replica = match Replica::open(rc, store, rng, Time(0)) {
        Ok(r) => r,
        Err(lattice_core::Error::Corrupt { key }) => anyhow::bail!(
            "refusing to start: the stored record of key {key:?} in the data dir {} fails its integrity check \
             (the disk changed it). This node will not read or replicate corrupt data. To recover, stop this node, \
             move the data dir aside (or delete it) and start again: the node comes back empty under a new replica \
             id and anti-entropy refills it from its peers (writes only this node held are lost). Or restore the \
             data dir from a backup. Check the disk (SMART, dmesg) before reusing it.",
            config.data_dir.display()
        ),
        Err(e) => return Err(anyhow::Error::new(e).context("opening the replica")),
    };
    let ca = std::fs::read_to_string(&config.ca).with_context(|| format!("reading {}", config.ca.display()))?;
    let identity = certs::Pem {
        cert: std::fs::read_to_string(&config.cert).with_context(|| format!("reading {}", config.cert.display()))?,
        key: std::fs::read_to_string(&config.key).with_context(|| format!("reading {}", config.key.display()))?,
    };
    let access = access::Access::new(&config.tokens, &config.admin_tokens, &config.access);
    if access.is_empty() {
        tracing::warn!("no client or admin tokens are configured: every client request will be refused (set tokens or LATTICE_TOKENS, or [[access]])");
    }
    let deny = Arc::new(certs::DenyList::new(&config.revoked_serials)?);
    let own = certs::certs_from_pem(&identity.cert)?;
    if let Some(serial) = deny.revoked(&own) {
        anyhow::bail!("this node's own certificate (serial {serial}) is in revoked_serials: renew it first");
    }
    let endpoint = net::endpoint(config.listen, &ca, &identity, &config.limits)?;
    let dial = net::peer_client_config(&ca, &identity)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let (engine_tx, engine_rx) = queue::engine_queue(config.memory.queue(config.engine_queue));
    let mut queues = BTreeMap::new();
    let mut dial_signals = BTreeMap::new();
    let boot: u64 = rand::random();
    for p in &config.peers {
        let (tx, rx) = queue::peer_queue(config.memory.peer_queue_bytes);
        queues.insert(NodeId(p.name.clone()), tx);
        let signals = Arc::new(net::DialSignals::default());
        dial_signals.insert(p.name.clone(), signals.clone());
        let peer = NodeId(p.name.clone());
        tokio::spawn(net::dial_peer(
            endpoint.clone(),
            dial.clone(),
            peer,
            p.address,
            rx,
            boot,
            signals,
            engine_tx.clone(),
            deny.clone(),
        ));
    }
    let reads = Arc::new(node::Reads::new(&replica));
    let engine = {
        let (metrics, node) = (metrics.clone(), config.node.clone());
        let (durability, group) = (config.durability, Duration::from_millis(config.group_commit_ms));
        let concern_ms = config.write_concern_timeout_ms;
        let waits = config.memory.waits();
        let reads = reads.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                node::run(
                    replica,
                    node::Clock::new(),
                    durability,
                    group,
                    engine_rx,
                    queues,
                    metrics,
                    node,
                    feed,
                    audit,
                    concern_ms,
                    waits,
                    reads,
                )
            })
            .context("starting the engine thread")?
    };
    let inbound = Arc::new(net::Inbound {
        engine: engine_tx.clone(),
        watch_budget: tokio::sync::Semaphore::new(config.memory.watch_values_bytes / 1024),
        watch_budget_kib: config.memory.watch_values_bytes / 1024,
        answer_budget: tokio::sync::Semaphore::new(config.memory.answer_bytes / 1024),
        reads,
        direct_reads: Arc::new(tokio::sync::Semaphore::new(net::DIRECT_READS)),
        scan_slots: Arc::new(tokio::sync::Semaphore::new(net::DIRECT_READS / 2)),
        peers: config.peers.iter().map(|p| p.name.clone()).collect::<BTreeSet<_>>(),
        access,
        metrics: metrics.clone(),
        dial: dial_signals,
        boots: std::sync::Mutex::new(BTreeMap::new()),
        limits: config.limits.clone(),
        admission: edge::Admission::new(config.limits.clone(), metrics.clone()),
        budget: edge::ReadBudget::new(config.limits.read_budget_bytes, metrics.clone()),
        deny,
    });
    // Bound before the node reports ready, so a taken port fails the start.
    let resp = match config.resp {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the RESP listener on {addr}"))?;
            let tls = if config.resp_tls {
                Some(certs::resp_server_tls(&identity)?)
            } else {
                None
            };
            let state = resp::Resp::new(inbound.clone(), tls, config.resp_max_connections);
            tracing::info!(%addr, tls = config.resp_tls, "RESP listener ready");
            Some(tokio::spawn(resp::accept_loop(listener, state)))
        }
        None => None,
    };
    tokio::spawn(net::accept_loop(endpoint.clone(), inbound));
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let status = metrics::StatusCache::default();
        let refresh = tokio::spawn(status.clone().refresh(engine_tx.clone()));
        let (m, token) = (metrics.clone(), config.metrics_token.clone());
        tokio::spawn(async move {
            let stop = async move {
                let _ = http_stopped.await;
                refresh.abort();
            };
            if let Err(e) = metrics::serve(listener, m, status, token, stop).await {
                tracing::error!(error = %e, "the HTTP listener failed");
            }
        });
    }
    tracing::info!(node = %config.node, region = %config.region, listen = %config.listen, durability = ?config.durability, "latticed ready");
    shutdown.await;
    tracing::info!("shutting down: no new connections, flushing");
    endpoint.set_server_config(None);
    if let Some(resp) = resp {
        resp.abort();
    }
    let _ = engine_tx.try_send(node::Input::Shutdown);
    drop(engine_tx);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    let _ = http_stop.send(());
    endpoint.close(net::code::SHUTDOWN.into(), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a signal that arrives
/// while the node or `latticed dev` is still starting is then a clean stop,
/// not the default action (which left `dev`'s nodes running, orphaned).
/// Call it inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let (int, term) = (
            wait(signal(SignalKind::interrupt()).ok()),
            wait(signal(SignalKind::terminate()).ok()),
        );
        async move {
            tokio::select! {
                () = int => {}
                () = term => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
