//! What a chaos run records: its writes and their outcomes, its kills, and
//! the values read after the heal.

use lattice_core::crdt::ValueView;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// How long before a kill an `async` node's acknowledged writes may be lost.
/// sled writes its log every 500 ms and `async` acknowledges before that, so
/// a SIGKILL loses what was acknowledged since the last write-out; three
/// intervals leave room for a flusher thread delayed on a busy 2-core
/// machine. A write is excused when its node was killed after the write was
/// sent and at most this long after the client received the acknowledgement
/// (the node acknowledged it somewhere in between).
pub const ASYNC_LOSS_WINDOW: Duration = Duration::from_millis(1_500);

/// One client write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Add `by` (> 0) to a counter.
    Incr {
        /// The counter.
        key: String,
        /// The amount.
        by: u64,
    },
    /// Add a unique element to a set.
    Add {
        /// The set.
        key: String,
        /// The element (no two adds share one).
        elem: String,
    },
    /// Remove an element whose add was acknowledged before this was sent.
    Remove {
        /// The set.
        key: String,
        /// The element.
        elem: String,
    },
    /// Write a unique value to an LWW register.
    Set {
        /// The register.
        key: String,
        /// The value (no two writes share one).
        value: String,
    },
}

impl WriteOp {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Incr { key, .. }
            | WriteOp::Add { key, .. }
            | WriteOp::Remove { key, .. }
            | WriteOp::Set { key, .. } => key,
        }
    }
}

/// How a write ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The node answered that it applied the write; `at` is when the answer
    /// arrived, since the run began.
    Acked {
        /// Arrival of the answer.
        at: Duration,
    },
    /// Timed out or failed after it may have been sent: it may or may not
    /// be applied.
    Unknown {
        /// The client's error.
        error: String,
    },
}

/// One write of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The client (worker) that issued it.
    pub client: usize,
    /// The node it was sent to (each client talks to one node only).
    pub node: usize,
    /// When it was sent, since the run began.
    pub sent: Duration,
    /// What it wrote.
    pub op: WriteOp,
    /// How it ended.
    pub outcome: Outcome,
}

impl Write {
    /// When the acknowledgement arrived, if it did.
    pub fn acked(&self) -> Option<Duration> {
        match self.outcome {
            Outcome::Acked { at } => Some(at),
            Outcome::Unknown { .. } => None,
        }
    }
}

impl fmt::Display for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} by client {} at node {} sent {} ms, ",
            self.op,
            self.client,
            self.node,
            self.sent.as_millis()
        )?;
        match &self.outcome {
            Outcome::Acked { at } => write!(f, "acknowledged {} ms", at.as_millis()),
            Outcome::Unknown { error } => write!(f, "outcome unknown ({error})"),
        }
    }
}

/// Everything a run did that the checker needs.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every write, in any order.
    pub writes: Vec<Write>,
    /// `(node, when)`: each SIGKILL, since the run began, taken after the
    /// process was reaped.
    pub kills: Vec<(usize, Duration)>,
    /// `None` when no acknowledged write may be lost (`sync`, `group`);
    /// [`ASYNC_LOSS_WINDOW`] for `async`.
    pub loss_window: Option<Duration>,
}

impl History {
    /// Whether a crash may have lost this acknowledged write: its node was
    /// killed after it was sent and within the loss window after it was
    /// acknowledged. Never, without a loss window.
    pub fn may_be_lost(&self, w: &Write) -> bool {
        let (Some(window), Some(acked)) = (self.loss_window, w.acked()) else {
            return false;
        };
        self.kills
            .iter()
            .any(|&(node, at)| node == w.node && w.sent <= at && at <= acked + window)
    }

    /// The kills of `node`, for reports.
    pub(super) fn kills_of(&self, node: usize) -> Vec<u128> {
        self.kills
            .iter()
            .filter(|k| k.0 == node)
            .map(|k| k.1.as_millis())
            .collect()
    }
}

/// A key's value after the heal, with elements and values decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never written, as far as the node knows.
    Absent,
    /// A counter.
    Counter(i128),
    /// A set of strings.
    Set(BTreeSet<String>),
    /// An LWW register of a string.
    Register(Option<String>),
    /// Anything else (another kind, or undecodable).
    Other(String),
}

impl Seen {
    /// Decodes a read (set elements and register values are rmp-encoded
    /// strings, as the SDK's typed handles write them).
    pub fn decode(v: Option<&ValueView>) -> Seen {
        let dec = |b: &lattice_core::crdt::Bytes| rmp_serde::from_slice::<String>(&b.0).ok();
        match v {
            None => Seen::Absent,
            Some(ValueView::Counter(n)) => Seen::Counter(*n),
            Some(ValueView::Set(es)) => match es.iter().map(dec).collect::<Option<BTreeSet<_>>>() {
                Some(s) => Seen::Set(s),
                None => Seen::Other(format!("{v:?}")),
            },
            Some(ValueView::Register(None)) => Seen::Register(None),
            Some(ValueView::Register(Some(b))) => match dec(b) {
                Some(s) => Seen::Register(Some(s)),
                None => Seen::Other(format!("{v:?}")),
            },
            Some(other) => Seen::Other(format!("{other:?}")),
        }
    }
}
