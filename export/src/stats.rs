//! What the exporter reports: counters and lag, as Prometheus metrics.

use lattice_core::log::LogCursor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// The exporter's counters and lag, shared by its tasks. Cheap to clone
/// (the metrics are shared atomics).
#[derive(Default)]
pub struct Stats {
    /// Messages the broker confirmed (`lattice_export_confirmed_total`).
    pub confirmed: Counter,
    /// Batches confirmed and checkpointed (`lattice_export_batches_total`).
    pub batches: Counter,
    /// Failed attempts, each followed by a backoff (`lattice_export_retries_total`).
    pub retries: Counter,
    /// Changes of the log not yet confirmed, as of the last probe, counted
    /// up to [`crate::LAG_COUNT_MAX`]; -1 until first counted
    /// (`lattice_export_lag_changes`).
    pub lag_changes: Gauge,
    /// Milliseconds since the node applied the oldest change not yet
    /// confirmed, 0 when caught up, -1 until first counted
    /// (`lattice_export_lag_ms`).
    pub lag_ms: Gauge,
    /// 1 while the exporter holds a confirming channel (`lattice_export_broker_up`).
    pub broker_up: Gauge,
    /// The stored checkpoint: where the lag is counted from (`None` before
    /// the exporter first opened its consumer).
    pub checkpoint: Mutex<Option<Option<LogCursor>>>,
}

impl Stats {
    /// Fresh stats, the lag unknown (-1) until first counted.
    pub fn new() -> Stats {
        let s = Stats::default();
        s.lag_changes.set(-1);
        s.lag_ms.set(-1);
        s
    }

    /// The metrics, in a registry to encode.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("lattice_export");
        r.register("confirmed", "Messages the broker confirmed", self.confirmed.clone());
        r.register("batches", "Batches confirmed and checkpointed", self.batches.clone());
        r.register(
            "retries",
            "Failed attempts, each followed by a backoff",
            self.retries.clone(),
        );
        r.register(
            "lag_changes",
            "Log changes not yet confirmed by the broker (counted up to 10000)",
            self.lag_changes.clone(),
        );
        r.register(
            "lag_ms",
            "Milliseconds since the oldest change not yet confirmed was applied (0: caught up)",
            self.lag_ms.clone(),
        );
        r.register("broker_up", "1 while connected to the broker", self.broker_up.clone());
        r
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }

    /// Notes the stored checkpoint (`None`: none yet, from the oldest).
    pub(crate) fn set_checkpoint(&self, c: Option<LogCursor>) {
        if let Ok(mut g) = self.checkpoint.lock() {
            *g = Some(c);
        }
    }

    /// The stored checkpoint, once known.
    pub(crate) fn checkpoint(&self) -> Option<Option<LogCursor>> {
        self.checkpoint.lock().ok().and_then(|g| g.clone())
    }
}
