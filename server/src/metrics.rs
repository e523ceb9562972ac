//! Prometheus metrics (prometheus-client) and the HTTP listener serving
//! `/metrics`, `/healthz` and `/status` (axum).

use crate::node::Input;
use crate::queue::EngineTx;
use crate::storage::SledStore;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use lattice_core::proto::client::NodeStatus;
use lattice_core::replica::{Replica, Time};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

type PeerGauge = Family<Vec<(String, String)>, Gauge>;
type Labels = Vec<(String, String)>;
type SecondsGauge = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;
type KeyspaceCounter = Family<Labels, Counter>;

/// The conflict counters, each labelled `keyspace` (the policy's key
/// prefix, `""` for the default policy). Definitions:
/// [`Conflicts`](lattice_core::replica::Conflicts).
struct ConflictCounters {
    lww_resolved: KeyspaceCounter,
    lww_values_lost: KeyspaceCounter,
    mv_siblings: KeyspaceCounter,
    kind_clashes: KeyspaceCounter,
    remove_update: KeyspaceCounter,
}

impl ConflictCounters {
    /// Brings each counter of `keyspace` up to the engine's total (the
    /// engine's counts only grow while the process lives).
    fn record(&self, keyspace: &str, c: &lattice_core::replica::Conflicts) {
        let label = vec![("keyspace".to_string(), keyspace.to_string())];
        for (family, total) in [
            (&self.lww_resolved, c.lww_resolved),
            (&self.lww_values_lost, c.lww_values_lost),
            (&self.mv_siblings, c.mv_siblings),
            (&self.kind_clashes, c.kind_clashes),
            (&self.remove_update, c.remove_update),
        ] {
            let counter = family.get_or_create(&label);
            let have = counter.get();
            if total > have {
                counter.inc_by(total - have);
            }
        }
    }
}

/// Buckets of [`Metrics::propagation`], seconds: 1 ms to about 65 s.
fn propagation_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

/// Every metric of a node. Counters are atomics: updating one is one add.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Client writes accepted.
    pub writes: Counter,
    /// Client reads.
    pub reads: Counter,
    /// Client requests refused with `Overloaded`.
    pub overloaded: Counter,
    /// Client requests refused with `Unauthorized`.
    pub unauthorized: Counter,
    /// Frames received from peers.
    pub peer_frames_in: Counter,
    /// Bytes received from peers.
    pub peer_bytes_in: Counter,
    /// Frames queued to peers.
    pub peer_frames_out: Counter,
    /// Bytes queued to peers.
    pub peer_bytes_out: Counter,
    /// Frames dropped because a peer's queue was full.
    pub peer_frames_dropped: Counter,
    /// Peer frames refused (decode or validation).
    pub peer_frames_rejected: Counter,
    /// Of those, frames whose integrity check failed (corrupted in transit).
    pub peer_frames_corrupt: Counter,
    /// Keys changed by remote state (merges).
    pub remote_updates: Counter,
    /// Store flushes.
    pub flushes: Counter,
    /// Time spent in flushes, microseconds.
    pub flush_micros: Counter,
    /// Client reads and writes refused by replication policy.
    pub policy_denied: Counter,
    /// Writes whose write concern was not met in time.
    pub concern_timeouts: Counter,
    /// Inputs taken by the engine in its last turn.
    pub engine_queue: Gauge,
    pub engine_busy_micros: Counter,
    pub engine_slow_steps: Counter,
    /// Connections open or in their handshake.
    pub connections_open: Gauge,
    /// Connection attempts refused by `max_connections` or
    /// `max_connections_per_ip`.
    pub connections_refused: Counter,
    /// Connection attempts asked to validate their address (QUIC Retry).
    pub connections_retried: Counter,
    /// Connections closed for a revoked certificate.
    pub connections_revoked: Counter,
    /// Client connections closed for showing no valid token in time.
    pub connections_unauthenticated: Counter,
    /// RESP connections open.
    pub resp_connections: Gauge,
    /// RESP connections refused at `resp_max_connections`.
    pub resp_connections_refused: Counter,
    /// RESP commands answered.
    pub resp_commands: Counter,
    /// RESP connections closed for a protocol error or a command over the limits.
    pub resp_protocol_errors: Counter,
    /// Client and peer streams whose frame did not arrive in time.
    pub frames_timed_out: Counter,
    /// Unidirectional streams refused on client connections.
    pub client_uni_refused: Counter,
    /// Requests that came on pipeline streams, several to a frame.
    pub pipelined_requests: Counter,
    /// Answer frames sent on pipeline streams.
    pub pipelined_frames: Counter,
    /// Bytes of client request bodies being read (the read budget in use).
    pub read_budget_bytes: Gauge,
    /// Watchers subscribed to the change feed.
    pub watchers: Gauge,
    /// Reads waiting for a causal token.
    pub waiting_reads: Gauge,
    /// Bytes the waiting reads are charged (mostly their tokens).
    pub waiting_read_bytes: Gauge,
    /// Client writes waiting for their write concern.
    pub concern_waits: Gauge,
    /// Client writes waiting for an answer (durability or concern).
    pub waiting_writes: Gauge,
    /// Bytes of change notices the feed retains.
    pub feed_bytes: Gauge,
    /// Bytes of changes the change log retains.
    pub log_bytes: Gauge,
    /// Changes the change log retains.
    pub log_changes: Gauge,
    /// Changes the change log's retention dropped (since the node started;
    /// at start it counts those dropped before, once).
    pub log_trimmed: Counter,
    /// Bytes of client requests queued for the engine.
    pub engine_client_bytes: Gauge,
    /// Bytes of peer frames queued for the engine.
    pub engine_peer_bytes: Gauge,
    policy_refused: Gauge,
    /// Policy sets refused for their signature, by reason.
    policy_sets_refused: KeyspaceCounter,
    policy_version: Gauge,
    policy_adopted: Gauge,
    rate_limited: Gauge,
    prepared_used: Gauge,
    prepared_stale: Gauge,
    record_cache_hits: Gauge,
    record_cache_misses: Gauge,
    encryption_data_keys: Gauge,
    buffer_groups: Gauge,
    buffer_bytes: Gauge,
    ae_rounds: Gauge,
    ae_keys_repaired: Gauge,
    clock_rejections: Gauge,
    pending_writes: Gauge,
    peer_alive: PeerGauge,
    peer_unacked_groups: PeerGauge,
    peer_last_heard_ms: PeerGauge,
    peer_queue: PeerGauge,
    peer_replication_lag: SecondsGauge,
    conflicts: ConflictCounters,
    /// Client requests refused with `PermissionDenied`, by permission.
    permission_denied: KeyspaceCounter,
    /// End-to-end propagation latency of remote writes, seconds: wall
    /// clock here at the apply minus the writer's HLC stamp (clamped at
    /// 0), one observation per key a delta changed.
    pub propagation: Histogram,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("lattice");
        macro_rules! counter {
            ($name:literal, $help:literal) => {{
                let c = Counter::default();
                r.register($name, $help, c.clone());
                c
            }};
        }
        macro_rules! gauge {
            ($name:literal, $help:literal) => {{
                let g = Gauge::default();
                r.register($name, $help, g.clone());
                g
            }};
        }
        macro_rules! peer_gauge {
            ($name:literal, $help:literal) => {{
                let g = PeerGauge::default();
                r.register($name, $help, g.clone());
                g
            }};
        }
        macro_rules! keyspace_counter {
            ($name:literal, $help:literal) => {{
                let c = KeyspaceCounter::default();
                r.register($name, $help, c.clone());
                c
            }};
        }
        let conflicts = ConflictCounters {
            lww_resolved: keyspace_counter!(
                "conflicts_lww_resolved",
                "Remote LWW writes that arrived superseded by a different, higher-stamped write (concurrent writes resolved by last-writer-wins), by keyspace policy"
            ),
            lww_values_lost: keyspace_counter!(
                "conflicts_lww_values_lost",
                "Of the LWW writes resolved, those whose value differed from the winner's (the value is lost), by keyspace policy"
            ),
            mv_siblings: keyspace_counter!(
                "conflicts_mv_siblings",
                "Multi-value register siblings created by merges (values beyond the larger side's count), by keyspace policy"
            ),
            kind_clashes: keyspace_counter!(
                "conflicts_kind_clashes",
                "Kinds added to a key's kind clash by merges (concurrent creations with different types), by keyspace policy"
            ),
            remove_update: keyspace_counter!(
                "conflicts_remove_update",
                "Set elements and map fields kept by an add or update that a concurrent remove had not seen (add-wins), by keyspace policy"
            ),
        };
        let peer_replication_lag = SecondsGauge::default();
        r.register(
            "peer_replication_lag_seconds",
            "Age of the oldest local delta-group the peer has not acknowledged (0 when it has them all)",
            peer_replication_lag.clone(),
        );
        let propagation = Histogram::new(propagation_buckets());
        r.register(
            "propagation_seconds",
            "Remote writes: wall clock at the apply here minus the writer's HLC stamp (clamped at 0), per key a delta changed",
            propagation.clone(),
        );
        let permission_denied = KeyspaceCounter::default();
        r.register(
            "permission_denied",
            "Client requests (or mget keys) refused with PermissionDenied: a valid credential not granted the permission (label perm) on the key or prefix",
            permission_denied.clone(),
        );
        let m = Metrics {
            peer_replication_lag,
            conflicts,
            permission_denied,
            propagation,
            writes: counter!("client_writes", "Client write batches accepted"),
            reads: counter!("client_reads", "Client reads"),
            overloaded: counter!("client_overloaded", "Client requests refused with Overloaded"),
            unauthorized: counter!("client_unauthorized", "Client requests refused with Unauthorized"),
            peer_frames_in: counter!("peer_frames_received", "Frames received from peers"),
            peer_bytes_in: counter!("peer_bytes_received", "Bytes received from peers"),
            peer_frames_out: counter!("peer_frames_sent", "Frames queued to peers"),
            peer_bytes_out: counter!("peer_bytes_sent", "Bytes queued to peers"),
            peer_frames_dropped: counter!("peer_frames_dropped", "Frames dropped because a peer queue was full"),
            peer_frames_rejected: counter!("peer_frames_rejected", "Peer frames refused by the codec or validation"),
            peer_frames_corrupt: counter!(
                "peer_frames_corrupt",
                "Peer frames whose integrity check failed (corrupted in transit), dropped like lost frames"
            ),
            remote_updates: counter!("merges", "Keys changed by merging remote state"),
            flushes: counter!("flushes", "Store flushes"),
            flush_micros: counter!("flush_microseconds", "Time spent flushing the store"),
            policy_denied: counter!(
                "policy_denied",
                "Client reads and writes refused because policy keeps the key from this region"
            ),
            concern_timeouts: counter!(
                "write_concern_timeouts",
                "Writes durable here whose write concern was not met in time"
            ),
            engine_queue: gauge!("engine_batch", "Inputs the engine took in its last turn"),
            engine_busy_micros: counter!(
                "engine_busy_microseconds",
                "Time the engine spent on its steps (its rate is the engine thread's utilisation)"
            ),
            engine_slow_steps: counter!(
                "engine_slow_steps",
                "Engine steps of 100 ms or more (each logged as `slow engine step`): inputs queued behind one waited as long"
            ),
            connections_open: gauge!("connections_open", "Connections open or in their handshake"),
            connections_refused: counter!(
                "connections_refused",
                "Connection attempts refused by max_connections or max_connections_per_ip"
            ),
            connections_retried: counter!(
                "connections_retried",
                "Connection attempts asked to validate their address (QUIC Retry)"
            ),
            connections_revoked: counter!(
                "connections_revoked",
                "Connections refused for a certificate serial in revoked_serials"
            ),
            connections_unauthenticated: counter!(
                "connections_unauthenticated",
                "Client connections closed for showing no valid token within auth_ms"
            ),
            resp_connections: gauge!("resp_connections_open", "Redis-protocol (RESP) connections open"),
            resp_connections_refused: counter!(
                "resp_connections_refused",
                "RESP connections refused at resp_max_connections"
            ),
            resp_commands: counter!("resp_commands", "RESP commands answered"),
            resp_protocol_errors: counter!(
                "resp_protocol_errors",
                "RESP connections closed for a protocol error or a command over the limits"
            ),
            frames_timed_out: counter!(
                "frames_timed_out",
                "Streams reset because a frame did not arrive within first_frame_ms or frame_ms"
            ),
            client_uni_refused: counter!(
                "client_uni_streams_refused",
                "Unidirectional streams stopped on client connections"
            ),
            pipelined_requests: counter!(
                "client_pipelined_requests",
                "Client requests that came on pipeline streams, several to a frame"
            ),
            pipelined_frames: counter!("client_pipelined_frames", "Answer frames sent on pipeline streams"),
            read_budget_bytes: gauge!(
                "read_budget_bytes",
                "Bytes of client request bodies being read (read_budget_bytes in use)"
            ),
            watchers: gauge!("watchers", "Watchers subscribed to the change feed"),
            waiting_reads: gauge!("waiting_reads", "Reads waiting for a causal token"),
            waiting_read_bytes: gauge!(
                "waiting_read_bytes",
                "Bytes the reads waiting for a causal token are charged (mostly their tokens)"
            ),
            concern_waits: gauge!("concern_waits", "Client writes waiting for their write concern"),
            waiting_writes: gauge!(
                "waiting_writes",
                "Client writes waiting for their answer (durability or write concern)"
            ),
            feed_bytes: gauge!("feed_retained_bytes", "Bytes of change notices the feed retains"),
            log_bytes: gauge!("log_bytes", "Bytes of changes the change log retains"),
            log_changes: gauge!("log_changes", "Changes the change log retains"),
            log_trimmed: counter!("log_trimmed", "Changes the change log's retention dropped"),
            engine_client_bytes: gauge!(
                "engine_client_queue_bytes",
                "Bytes of client requests queued for the engine"
            ),
            engine_peer_bytes: gauge!("engine_peer_queue_bytes", "Bytes of peer frames queued for the engine"),
            policy_refused: gauge!(
                "policy_refused_entries",
                "Keys from peers refused because policy keeps them from this region (since start)"
            ),
            policy_sets_refused: keyspace_counter!(
                "policy_sets_refused",
                "Policy sets refused from clients or peers for their signature (reason: unsigned, untrusted_key, bad_signature)"
            ),
            policy_version: gauge!("policy_version", "Version of the replication policy set in force"),
            policy_adopted: gauge!("policy_adopted", "Policy sets adopted since start"),
            rate_limited: gauge!(
                "rate_limited_intervals",
                "Sync intervals in which a peer's deltas waited for its link's rate limit (since start)"
            ),
            prepared_used: gauge!(
                "prepared_keys_taken",
                "Keys of large writes and merges whose work was done beside the engine and taken (since start)"
            ),
            prepared_stale: gauge!(
                "prepared_keys_stale",
                "Keys prepared beside the engine whose record changed first; the engine redid the work (since start)"
            ),
            record_cache_hits: gauge!(
                "record_cache_hits",
                "Engine reads of a key's record served by its record cache (since start)"
            ),
            record_cache_misses: gauge!(
                "record_cache_misses",
                "Engine reads of a key's record that went to sled (since start)"
            ),
            encryption_data_keys: gauge!(
                "encryption_data_keys",
                "Data keys in the node's key ring (0: encryption at rest off; above 1: values may be under an older key until a re-encryption completes)"
            ),
            buffer_groups: gauge!("delta_buffer_groups", "Delta-groups buffered for peers"),
            buffer_bytes: gauge!("delta_buffer_bytes", "Bytes of buffered delta-groups"),
            ae_rounds: gauge!("anti_entropy_rounds", "Anti-entropy rounds started since start"),
            ae_keys_repaired: gauge!(
                "anti_entropy_keys_repaired",
                "Keys repaired by anti-entropy since start"
            ),
            clock_rejections: gauge!("clock_rejections", "Remote clocks too far ahead, not merged"),
            pending_writes: gauge!("pending_writes", "Writes waiting for durability"),
            peer_alive: peer_gauge!("peer_alive", "1 if the peer was heard from recently"),
            peer_unacked_groups: peer_gauge!("peer_lag_groups", "Local delta-groups the peer has not acknowledged"),
            peer_last_heard_ms: peer_gauge!(
                "peer_lag_milliseconds",
                "Milliseconds since the peer was last heard from"
            ),
            peer_queue: peer_gauge!(
                "peer_queue_bytes",
                "Bytes of frames waiting in the send queue of a peer"
            ),
            registry: Mutex::new(Registry::default()),
        };
        if let Ok(mut g) = m.registry.lock() {
            *g = r;
        }
        m
    }

    /// Samples the engine's own counters (called by the engine thread).
    pub fn record_engine(&self, replica: &Replica<SledStore>, now: Time) {
        let s = replica.stats();
        let (groups, bytes) = replica.buffer_usage();
        self.buffer_groups.set(groups as i64);
        self.buffer_bytes.set(bytes as i64);
        self.ae_rounds.set(s.ae_rounds as i64);
        self.ae_keys_repaired.set(s.ae_keys_repaired as i64);
        self.clock_rejections.set(s.clock_rejections as i64);
        self.pending_writes.set(replica.pending_writes() as i64);
        self.policy_refused.set(s.policy_refused as i64);
        for (r, n) in lattice_core::policy::signed::Refusal::ALL
            .iter()
            .zip(s.policy_sets_refused)
        {
            // The engine counts since start; the counter mirrors it.
            self.policy_sets_refused
                .get_or_create(&vec![("reason".to_string(), r.name().to_string())])
                .inner()
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        self.policy_version.set(replica.policy().version as i64);
        self.policy_adopted.set(s.policy_adopted as i64);
        self.rate_limited.set(s.rate_limited as i64);
        self.prepared_used.set(s.prepared_used as i64);
        self.prepared_stale.set(s.prepared_stale as i64);
        let (hits, misses) = replica.store().cache_stats();
        self.record_cache_hits.set(hits as i64);
        self.record_cache_misses.set(misses as i64);
        self.encryption_data_keys
            .set(replica.store().crypt().data_keys().0.len() as i64);
        // Every keyspace in force has its counters, zero or not, so a
        // dashboard's queries find them from the start.
        let conflicts = &s.conflicts;
        let none = lattice_core::replica::Conflicts::default();
        for p in &replica.policy().policies {
            self.conflicts
                .record(&p.keyspace, conflicts.get(&p.keyspace).unwrap_or(&none));
        }
        self.conflicts.record("", conflicts.get("").unwrap_or(&none));
        for (keyspace, c) in conflicts {
            // A keyspace no longer in force keeps its counts.
            self.conflicts.record(keyspace, c);
        }
        for p in replica.peer_status(now) {
            let lag_label = vec![
                ("peer".to_string(), p.node.0.clone()),
                ("region".to_string(), p.region.0.clone()),
            ];
            self.peer_replication_lag
                .get_or_create(&lag_label)
                .set(p.lag_ms as f64 / 1000.0);
            let label = vec![("peer".to_string(), p.node.0.clone())];
            self.peer_alive.get_or_create(&label).set(i64::from(p.alive));
            self.peer_unacked_groups
                .get_or_create(&label)
                .set(p.unacked_groups as i64);
            self.peer_last_heard_ms
                .get_or_create(&label)
                .set(p.last_heard_ms_ago.map_or(-1, |ms| ms as i64));
        }
    }

    /// Counts a `PermissionDenied` refusal of `perm`.
    pub fn permission_denied(&self, perm: &str) {
        self.permission_denied
            .get_or_create(&vec![("perm".to_string(), perm.to_string())])
            .inc();
    }

    /// Records the bytes queued to send to a peer.
    pub fn record_queue(&self, peer: &str, depth: usize) {
        self.peer_queue
            .get_or_create(&vec![("peer".to_string(), peer.to_string())])
            .set(depth as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            if encode(&mut out, &r).is_err() {
                out.clear();
            }
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    status: StatusCache,
    token: Option<Arc<str>>,
}

impl Http {
    /// Whether the request carries the bearer token (always, without one).
    fn allowed(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        crate::net::constant_time_eq(presented.as_bytes(), token.as_bytes())
    }
}

fn unauthorized() -> axum::response::Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a bearer token (metrics_token) is required\n",
    )
        .into_response()
}

async fn metrics(State(h): State<Http>, headers: HeaderMap) -> axum::response::Response {
    if !h.allowed(&headers) {
        return unauthorized();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        h.metrics.render(),
    )
        .into_response()
}

async fn status(State(h): State<Http>, headers: HeaderMap) -> axum::response::Response {
    if !h.allowed(&headers) {
        return unauthorized();
    }
    let cached = h.status.0.read().ok().and_then(|s| s.clone());
    match cached {
        Some(s) => Json(s).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no status yet\n").into_response(),
    }
}

/// The last status the engine gave, refreshed every [`STATUS_REFRESH`]:
/// HTTP requests read this copy, so however many arrive they cost the
/// engine one status a period.
#[derive(Clone, Default)]
pub struct StatusCache(Arc<RwLock<Option<NodeStatus>>>);

/// How often the status served over HTTP is refreshed.
pub const STATUS_REFRESH: Duration = Duration::from_secs(1);

impl StatusCache {
    /// Asks the engine for its status every [`STATUS_REFRESH`] until the
    /// engine goes away.
    pub async fn refresh(self, engine: EngineTx) {
        let mut tick = tokio::time::interval(STATUS_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (tx, rx) = tokio::sync::oneshot::channel();
            if engine.try_send(Input::Status { reply: tx }).is_err() {
                // Busy: keep the last copy and try again next period.
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(2), rx).await {
                Ok(Ok(s)) => {
                    if let Ok(mut c) = self.0.write() {
                        *c = Some(s);
                    }
                }
                // The engine dropped the request unanswered: it has stopped.
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/status` on `listener` until
/// `shutdown` resolves. With `token`, `/metrics` and `/status` need
/// `Authorization: Bearer TOKEN` (`/healthz` says only "ok").
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    status: StatusCache,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(self::status))
        .with_state(Http {
            metrics,
            status,
            token: token.map(Arc::from),
        });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
