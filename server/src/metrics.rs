//! Prometheus metrics (prometheus-client) and the HTTP listener serving
//! `/metrics`, `/healthz` and `/status` (axum).

use crate::node::Input;
use crate::queue::EngineTx;
use crate::storage::SledStore;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use lattice_core::replica::{Replica, Time};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type PeerGauge = Family<Vec<(String, String)>, Gauge>;

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
    /// Watchers subscribed to the change feed.
    pub watchers: Gauge,
    /// Reads waiting for a causal token.
    pub waiting_reads: Gauge,
    /// Bytes of change notices the feed retains.
    pub feed_bytes: Gauge,
    /// Bytes of client requests queued for the engine.
    pub engine_client_bytes: Gauge,
    /// Bytes of peer frames queued for the engine.
    pub engine_peer_bytes: Gauge,
    policy_refused: Gauge,
    policy_version: Gauge,
    policy_adopted: Gauge,
    rate_limited: Gauge,
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
        let m = Metrics {
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
            watchers: gauge!("watchers", "Watchers subscribed to the change feed"),
            waiting_reads: gauge!("waiting_reads", "Reads waiting for a causal token"),
            feed_bytes: gauge!("feed_retained_bytes", "Bytes of change notices the feed retains"),
            engine_client_bytes: gauge!(
                "engine_client_queue_bytes",
                "Bytes of client requests queued for the engine"
            ),
            engine_peer_bytes: gauge!("engine_peer_queue_bytes", "Bytes of peer frames queued for the engine"),
            policy_refused: gauge!(
                "policy_refused_entries",
                "Keys from peers refused because policy keeps them from this region (since start)"
            ),
            policy_version: gauge!("policy_version", "Version of the replication policy set in force"),
            policy_adopted: gauge!("policy_adopted", "Policy sets adopted since start"),
            rate_limited: gauge!(
                "rate_limited_intervals",
                "Sync intervals in which a peer's deltas waited for its link's rate limit (since start)"
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
        self.policy_version.set(replica.policy().version as i64);
        self.policy_adopted.set(s.policy_adopted as i64);
        self.rate_limited.set(s.rate_limited as i64);
        for p in replica.peer_status(now) {
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
    engine: EngineTx,
}

async fn metrics(State(h): State<Http>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        h.metrics.render(),
    )
}

async fn status(State(h): State<Http>) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if h.engine.try_send(Input::Status { reply: tx }).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "engine busy").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), rx).await {
        Ok(Ok(s)) => Json(s).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "engine did not answer").into_response(),
    }
}

/// Serves `/metrics`, `/healthz` and `/status` on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    engine: EngineTx,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .with_state(Http { metrics, engine });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
