//! The history of a chaos run (`tests/tests/chaos.rs`) and the checker that
//! judges it against what every node holds after the heal.
//!
//! A run records each client write with the node it went to, when it was
//! sent and how it ended: acknowledged (and when the answer arrived), or
//! unknown (a timeout or an error after it may have left, so it may or may
//! not be applied). It also records when each node was killed. [`check`]
//! then demands:
//! - every node holds the same value for every key;
//! - each counter lies between its acknowledged increments (less those a
//!   crash may lose, see [`History::may_be_lost`]) and every increment
//!   issued, acknowledged or not: nothing lost, nothing invented;
//! - each set holds only elements some add issued, and every element whose
//!   add was acknowledged, unless a remove of it was issued (removes only
//!   name elements whose add was already acknowledged, so an element may be
//!   absent exactly when such a remove exists) or a crash may lose the add;
//! - each register holds a value some write issued, holds one if a write
//!   that cannot be lost was acknowledged, and not a value that a later
//!   acknowledged write must have superseded (see [`LWW_MARGIN`]).
//!
//! The unit tests below feed it fabricated histories, to show each kind of
//! violation is reported.

mod check;
mod history;
#[cfg(test)]
mod tests;

pub use check::{check, excused_losses, Violation, LWW_MARGIN};
pub use history::{History, Outcome, Seen, Write, WriteOp, ASYNC_LOSS_WINDOW};
