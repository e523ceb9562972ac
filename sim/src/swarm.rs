//! Swarm testing: many seeds, each drawing its own sizes and fault mix.

use crate::config::SimConfig;
use crate::sim::{Report, Sim};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs one swarm seed; a panic inside the engine becomes a violation.
pub fn run_seed(seed: u64) -> Report {
    let cfg = SimConfig::swarm(seed);
    let setup = format!(
        "nodes={} regions={} faults={}",
        cfg.nodes,
        cfg.regions,
        cfg.faults.describe()
    );
    match catch_unwind(AssertUnwindSafe(|| Sim::new(cfg).run())) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Report {
                seed,
                setup,
                violations: vec![crate::check::Violation {
                    check: "panic",
                    detail: msg,
                }],
                ..Report::default()
            }
        }
    }
}

/// Totals over a swarm.
#[derive(Clone, Debug, Default)]
pub struct SwarmTotals {
    /// Seeds run.
    pub seeds: u64,
    /// Seeds with at least one violation.
    pub failed: Vec<Report>,
    /// Sum of events, messages, bytes, acknowledged writes.
    pub events: u64,
    /// Messages.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
    /// Acknowledged writes.
    pub acked: u64,
    /// Slowest convergence after a heal.
    pub max_converge_ms: u64,
    /// Frames delivered with a flipped bit, and how many were refused.
    pub flipped_frames: (u64, u64),
    /// Stored records rotted while their node was down, and how many
    /// reopens refused them.
    pub rotted_records: (u64, u64),
    /// Prepared results the engines took, and those they found stale.
    pub prepared: (u64, u64),
}

impl SwarmTotals {
    /// Adds one run.
    pub fn add(&mut self, r: Report) {
        self.seeds += 1;
        self.events += r.events;
        self.messages += r.messages;
        self.bytes += r.bytes;
        self.acked += r.acked as u64;
        self.max_converge_ms = self.max_converge_ms.max(r.converged_ms.unwrap_or(0));
        self.flipped_frames.0 += r.flipped_frames.0;
        self.flipped_frames.1 += r.flipped_frames.1;
        self.rotted_records.0 += r.rotted_records.0;
        self.rotted_records.1 += r.rotted_records.1;
        self.prepared.0 += r.prepared.0;
        self.prepared.1 += r.prepared.1;
        if !r.violations.is_empty() {
            self.failed.push(r);
        }
    }

    /// The closing line.
    pub fn last_line(&self) -> String {
        format!(
            "seeds={} violations={} events={} messages={} bytes={} acked_writes={} max_converge_ms={} flipped_frames={}/{} refused rotted_records={}/{} refused prepared={}/{} stale",
            self.seeds,
            self.failed.len(),
            self.events,
            self.messages,
            self.bytes,
            self.acked,
            self.max_converge_ms,
            self.flipped_frames.1,
            self.flipped_frames.0,
            self.rotted_records.1,
            self.rotted_records.0,
            self.prepared.0,
            self.prepared.1
        )
    }
}
