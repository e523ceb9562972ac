//! The `[memory]` section of the node's configuration: byte budgets of the
//! engine and per-peer queues, the watch feed and the waiting reads. Each
//! limit's behaviour when reached is stated in `SECURITY.md` ("Memory with a token").

use crate::feed::FeedLimits;
use crate::queue::QueueLimits;
use crate::waits::WaitLimits;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Memory limits (`[memory]` in the TOML file; every field optional).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Bytes of client requests queued for the engine (each charged its
    /// frame length plus 256); past it clients get `Overloaded`.
    pub engine_queue_bytes: usize,
    /// Bytes of peer frames queued for the engine, a budget of their own so
    /// that clients cannot crowd peers out; past it frames are dropped (the
    /// peer retransmits).
    pub engine_peer_queue_bytes: usize,
    /// Bytes of frames queued to send to one peer; past it new frames are
    /// dropped (retransmission and anti-entropy repair).
    pub peer_queue_bytes: usize,
    /// Bytes of change notices (key, origin, token; no values) the watch
    /// feed retains for watchers to resume from.
    pub watch_retained_bytes: usize,
    /// Bytes of notices queued for one watcher; past it the watcher gets
    /// `WatchLagged` and resumes from its last change.
    pub watch_queue_bytes: usize,
    /// Bytes of values read for watchers and not yet written to their
    /// streams, across all watchers; a watcher waits for its share (about
    /// 1 MiB of frames plus one change of up to 4 MiB).
    pub watch_values_bytes: usize,
    /// Bytes of answers encoded and not yet written to their clients, all
    /// clients together; past it a read is answered `Overloaded`.
    pub answer_bytes: usize,
    /// Watchers on the node.
    pub watch_max_watchers: usize,
    /// Watchers on one client connection.
    pub watch_max_per_connection: usize,
    /// Reads waiting for a causal token on the node.
    pub max_waiting_reads: usize,
    /// Reads waiting for a causal token from one client connection.
    pub max_waiting_reads_per_connection: usize,
    /// Writes of one client connection waiting for their write concern.
    pub max_concern_waits_per_connection: usize,
    /// Bytes the reads waiting for a causal token hold, all together
    /// (mostly their tokens, which the clients make).
    pub waiting_read_bytes: usize,
    /// Bytes of the engine's cache of records it read or wrote lately
    /// (saves a sled lookup per write to a hot key); past it, half is
    /// dropped. 0 turns the cache off.
    pub record_cache_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        let (q, f, w) = (QueueLimits::default(), FeedLimits::default(), WaitLimits::default());
        MemoryConfig {
            engine_queue_bytes: q.client_bytes,
            engine_peer_queue_bytes: q.peer_bytes,
            peer_queue_bytes: 32 << 20,
            watch_retained_bytes: f.retained_bytes,
            watch_queue_bytes: f.queue_bytes,
            watch_values_bytes: 64 << 20,
            answer_bytes: 64 << 20,
            watch_max_watchers: f.max_watchers,
            watch_max_per_connection: f.max_watchers_per_conn,
            max_waiting_reads: w.total,
            max_waiting_reads_per_connection: w.per_conn,
            max_concern_waits_per_connection: w.concerns_per_conn,
            waiting_read_bytes: w.bytes,
            record_cache_bytes: crate::storage::RECORD_CACHE_BYTES,
        }
    }
}

impl MemoryConfig {
    /// All defaults (a written config then leaves the table out).
    pub fn is_default(&self) -> bool {
        *self == MemoryConfig::default()
    }

    /// The engine queue's budgets (`items`: the configured `engine_queue`).
    pub fn queue(&self, items: usize) -> QueueLimits {
        QueueLimits {
            client_bytes: self.engine_queue_bytes,
            peer_bytes: self.engine_peer_queue_bytes,
            items,
        }
    }

    /// The watch feed's limits.
    pub fn feed(&self) -> FeedLimits {
        FeedLimits {
            retained_bytes: self.watch_retained_bytes,
            queue_bytes: self.watch_queue_bytes,
            max_watchers: self.watch_max_watchers,
            max_watchers_per_conn: self.watch_max_per_connection,
            ..FeedLimits::default()
        }
    }

    /// The waiting reads' limits.
    pub fn waits(&self) -> WaitLimits {
        WaitLimits {
            total: self.max_waiting_reads,
            per_conn: self.max_waiting_reads_per_connection,
            concerns_per_conn: self.max_concern_waits_per_connection,
            bytes: self.waiting_read_bytes,
        }
    }

    /// Every budget must admit the largest legal input: a client request
    /// of 1 MiB, a peer frame of the frame limit.
    pub fn validate(&self) -> Result<()> {
        let frame = lattice_core::proto::DEFAULT_MAX_MESSAGE_BYTES + crate::queue::INPUT_OVERHEAD;
        let client = lattice_core::proto::client::MAX_CLIENT_FRAME + crate::queue::INPUT_OVERHEAD;
        if self.engine_queue_bytes < client {
            bail!("memory.engine_queue_bytes must be at least {client} (one largest client request)");
        }
        // Queued for the engine decoded, a frame is charged several times
        // its length: a smaller budget would drop every frame that large.
        let decoded =
            lattice_core::proto::DEFAULT_MAX_MESSAGE_BYTES * crate::queue::DECODED_COST + crate::queue::INPUT_OVERHEAD;
        if self.engine_peer_queue_bytes < decoded {
            bail!(
                "memory.engine_peer_queue_bytes must be at least {decoded} (one largest peer frame, charged decoded)"
            );
        }
        if self.peer_queue_bytes < frame {
            bail!("memory.peer_queue_bytes must be at least {frame} (one largest peer frame)");
        }
        if self.watch_values_bytes < 2 * crate::node::WATCH_BATCH_BYTES {
            bail!(
                "memory.watch_values_bytes must be at least {} (one watcher's share)",
                2 * crate::node::WATCH_BATCH_BYTES
            );
        }
        let answer = lattice_core::proto::client::MAX_ANSWER_FRAME;
        if self.answer_bytes < answer || self.answer_bytes > (u32::MAX as usize) * 1024 {
            bail!("memory.answer_bytes must be at least {answer} (one largest answer) and under 4 TiB");
        }
        if self.watch_queue_bytes < 4_096 || self.watch_retained_bytes < 4_096 {
            bail!("memory.watch_queue_bytes and memory.watch_retained_bytes must be at least 4096");
        }
        // A 1 MiB request's token, decoded and charged (`token_cost`): a
        // canonical one at most about 11.5 bytes per byte on the wire. (A
        // hostile one of empty replica entries is charged 32 per byte and
        // may be refused here even on an idle node.)
        if self.waiting_read_bytes < 16 << 20 {
            bail!("memory.waiting_read_bytes must be at least 16777216 (the token of one largest request, decoded)");
        }
        if self.watch_max_watchers == 0
            || self.watch_max_per_connection == 0
            || self.max_waiting_reads == 0
            || self.max_waiting_reads_per_connection == 0
            || self.max_concern_waits_per_connection == 0
        {
            bail!("memory's watcher, waiting-read and concern-wait limits must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Input;
    use lattice_core::proto::{NodeId, DEFAULT_MAX_MESSAGE_BYTES};
    use lattice_core::replica::Decoded;

    /// The smallest peer budget the configuration accepts still queues one
    /// largest peer frame, as the queue charges it (decoded, several times
    /// its length): a smaller one would drop every frame that large, for
    /// ever, and the keys it carries would never replicate here.
    #[test]
    fn an_accepted_peer_budget_admits_one_largest_frame() {
        let mut m = MemoryConfig::default();
        let accepted = (1..=64usize)
            .map(|mib| mib << 20)
            .find(|&b| {
                m.engine_peer_queue_bytes = b;
                m.validate().is_ok()
            })
            .expect("some budget up to 64 MiB is accepted");
        m.engine_peer_queue_bytes = accepted;
        let (tx, _rx) = crate::queue::engine_queue(m.queue(16));
        let frame = Input::Frame {
            from: NodeId("p".into()),
            frame: Decoded::new(&vec![0; DEFAULT_MAX_MESSAGE_BYTES], usize::MAX),
        };
        assert!(
            tx.try_send(frame).is_ok(),
            "engine_peer_queue_bytes = {accepted} is accepted but never queues a {DEFAULT_MAX_MESSAGE_BYTES}-byte frame"
        );
    }
}
