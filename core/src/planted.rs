//! Deliberately broken behaviours, compiled only with the `planted-bugs`
//! feature and switched on per thread at run time, so tests can prove that
//! the simulator's checkers catch a broken engine.

use std::cell::Cell;

/// A bug to plant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// No bug.
    None,
    /// `DotSet::join` forgets the newest dot of the other side.
    JoinDropsDot,
    /// The delta buffer forgets groups that some peer has not acknowledged.
    BufferForgetsUnacked,
    /// Writes are acknowledged before the store has flushed them.
    AckBeforeDurable,
    /// Deltas and anti-entropy states ignore the replication policy.
    PolicyLeak,
    /// Anti-entropy digests cover every key, whatever the policy.
    DigestLeak,
    /// A write concern counts as met once the write is durable locally.
    ConcernEarly,
    /// A store reopened after a crash keeps its replica id (review finding
    /// 1, and lying disks: dots and sequence numbers peers hold are handed
    /// out again).
    AsyncReusesId,
    /// A relay leaves a large novel part to anti-entropy with no gap marked
    /// (review finding 2).
    RelayHole,
    /// Delta sections are sized by the group's average entry (review
    /// finding 3).
    SizeByAverage,
    /// `stamp_after` raises the stamp only on equality, so a local LWW
    /// write after reading a future-stamped value loses.
    StampAfterOnEqual,
    /// `DotFun::join` adds the other side's dots without checking that this
    /// side has not already seen (and dropped) them.
    DotFunNoGuard,
    /// A partial anti-entropy round counts as a completed repair.
    PartialRoundCompletes,
    /// `on_ack` no longer trims the delta buffer.
    AckNoTrim,
    /// The pieces of a state split for anti-entropy carry the whole
    /// context, so a piece removes the values that other pieces hold.
    SplitWholeContext,
    /// Remote values are no longer checked for what no honest peer sends
    /// (dots of this replica it never made, counter totals above its own,
    /// stamps beyond the clock bound).
    HostileAccepted,
    /// Peer frames are decoded without verifying their integrity check, so
    /// a bit flipped in transit is merged.
    FrameCheckIgnored,
    /// Stored records are decoded without verifying their integrity check,
    /// so a bit flipped on disk is read back as a value.
    RecordCheckIgnored,
    /// A result prepared beside the engine is taken without checking that
    /// its key's record is still the one it was computed from.
    PreparedBaseUnchecked,
    /// The change log leaves out the changes of anti-entropy repairs.
    LogDropsRepairs,
    /// Policy sets are adopted without checking their signature.
    PolicySignatureIgnored,
}

thread_local! {
    static ACTIVE: Cell<PlantedBug> = const { Cell::new(PlantedBug::None) };
}

/// Plants `bug` for the current thread until [`set`] is called again.
pub fn set(bug: PlantedBug) {
    ACTIVE.with(|a| a.set(bug));
}

/// Whether `bug` is planted on the current thread.
pub fn active(bug: PlantedBug) -> bool {
    ACTIVE.with(|a| a.get() == bug)
}
