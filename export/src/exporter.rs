//! The export loop: read a batch from the log, publish it, wait for the
//! broker's confirms, store the checkpoint; on any failure, back off and
//! start again from the stored checkpoint.

use crate::broker::{Broker, Topology};
use crate::message::ExportedChange;
use crate::stats::Stats;
use crate::Error;
use lattice_client::{Client, LogConsumer};
use lattice_core::log::Logged;
use lattice_core::proto::client::LOG_MAX_CHANGES;
use std::time::Duration;

/// Keys under this prefix are log consumers' checkpoints (the exporter's
/// own among them): they are not exported, or each checkpoint would be a
/// change to export and checkpoint again, for ever.
pub const CHECKPOINT_PREFIX: &str = "_consumers/";

/// Whether a change is exported at all.
pub(crate) fn exported(l: &Logged) -> bool {
    !l.change.key.as_str().starts_with(CHECKPOINT_PREFIX)
}

/// How the exporter runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The broker (`amqp://USER:PASS@HOST:PORT/VHOST`, or `amqps://`).
    pub amqp_url: String,
    /// Where messages go.
    pub topology: Topology,
    /// The consumer name: the checkpoint is the register `_consumers/NAME`.
    pub name: String,
    /// Export only keys starting with this.
    pub prefix: String,
    /// Export only these partitions (empty: all). Several exporters may
    /// share a log by splitting its partitions, each under its own name.
    pub partitions: Vec<u16>,
    /// Most changes per batch: published, confirmed, then checkpointed
    /// together (1 to [`LOG_MAX_CHANGES`]).
    pub batch: u32,
    /// How long a batch may wait for the broker's confirms (and a
    /// connection for the broker's handshake).
    pub confirm_timeout: Duration,
    /// First and longest wait between attempts (it doubles from the first).
    pub backoff: (Duration, Duration),
    /// How long one log read waits for new changes when caught up.
    pub poll_wait: Duration,
}

impl Settings {
    /// Defaults: exchange and queue `lattice.changes`, consumer `export`,
    /// every key and partition, batches of 500, 30 s for confirms, backoff
    /// from 200 ms to 30 s, 1 s polls.
    pub fn new(amqp_url: impl Into<String>) -> Settings {
        Settings {
            amqp_url: amqp_url.into(),
            topology: Topology {
                exchange: "lattice.changes".into(),
                queue: Some("lattice.changes".into()),
            },
            name: "export".into(),
            prefix: String::new(),
            partitions: Vec::new(),
            batch: 500,
            confirm_timeout: Duration::from_secs(30),
            backoff: (Duration::from_millis(200), Duration::from_secs(30)),
            poll_wait: Duration::from_secs(1),
        }
    }
}

/// Exports node 0 of a client's endpoints (give the client that one node
/// only: the checkpoint is read and written there too).
pub struct Exporter<'a> {
    client: &'a Client,
    settings: &'a Settings,
    stats: &'a Stats,
}

impl<'a> Exporter<'a> {
    /// An exporter of `client`'s node 0.
    pub fn new(client: &'a Client, settings: &'a Settings, stats: &'a Stats) -> Exporter<'a> {
        Exporter {
            client,
            settings,
            stats,
        }
    }

    /// Exports for ever; returns only on a fatal error ([`Error::is_fatal`]).
    /// Every other failure (broker or node down, a confirm timeout, a
    /// refused message) is logged, counted in `retries`, and followed by a
    /// backoff and a fresh start from the stored checkpoint, so what was
    /// published but not checkpointed is published again (at least once).
    pub async fn run(&self) -> Result<(), Error> {
        let (first, longest) = self.settings.backoff;
        let mut backoff = first;
        loop {
            let mut progressed = false;
            let e = self.attempt(&mut progressed).await;
            self.stats.broker_up.set(0);
            if e.is_fatal() {
                return Err(e);
            }
            if progressed {
                backoff = first;
            }
            self.stats.retries.inc();
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "export interrupted; retrying from the checkpoint");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(longest);
        }
    }

    /// One connection's worth of exporting, until something fails. The
    /// checkpoint is read first, so that the lag is counted from it even
    /// while the broker cannot be reached.
    async fn attempt(&self, progressed: &mut bool) -> Error {
        let s = self.settings;
        let mut consumer = match LogConsumer::open(self.client, 0, &s.name, &s.prefix, &s.partitions).await {
            Ok(c) => c,
            Err(e) => return Error::lattice(e),
        };
        consumer.page = s.batch.clamp(1, LOG_MAX_CHANGES);
        consumer.wait = s.poll_wait;
        self.stats.set_checkpoint(consumer.position());
        let broker = match Broker::connect(&s.amqp_url, &s.topology, s.confirm_timeout).await {
            Ok(b) => b,
            Err(e) => return e,
        };
        self.stats.broker_up.set(1);
        tracing::info!(
            checkpoint = consumer
                .position()
                .map(|c| c.to_text())
                .unwrap_or_else(|| "none (from the oldest retained)".into()),
            "exporting"
        );
        let e = self.export(&broker, &mut consumer, progressed).await;
        broker.close().await;
        e
    }

    /// Publishes batch after batch, checkpointing each once confirmed.
    async fn export(&self, broker: &Broker, consumer: &mut LogConsumer<'_>, progressed: &mut bool) -> Error {
        let s = self.settings;
        loop {
            let batch = match next_batch(consumer, s.batch).await {
                Ok(b) => b,
                Err(e) => return e,
            };
            if batch.is_empty() {
                // Nothing to publish. Checkpointing here would log a change
                // (the checkpoint) that the next read skips: leave it.
                continue;
            }
            if let Err(e) = broker.publish(&batch, s.confirm_timeout).await {
                return e;
            }
            self.stats.confirmed.inc_by(batch.len() as u64);
            if let Err(e) = consumer.commit().await {
                return Error::lattice(e);
            }
            self.stats.batches.inc();
            self.stats.set_checkpoint(consumer.position());
            *progressed = true;
        }
    }
}

/// The changes to publish next: what the consumer hands out until its
/// fetched page is used up or `max` are gathered (so a batch never waits
/// for a second page), less the checkpoints.
async fn next_batch(consumer: &mut LogConsumer<'_>, max: u32) -> Result<Vec<ExportedChange>, Error> {
    let mut batch = Vec::new();
    while batch.len() < max as usize {
        let Some(l) = consumer.next().await.map_err(Error::lattice)? else {
            break;
        };
        if exported(&l) {
            let log = consumer.position().map_or(0, |c| c.log);
            batch.push(ExportedChange::new(log, &l));
        }
        if consumer.buffered() == 0 {
            break;
        }
    }
    Ok(batch)
}
