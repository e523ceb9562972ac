//! `lattice-core`: a fully deterministic implementation of Lattice's
//! replication logic. It contains no networking code, no storage engine and
//! does not get any timestamps or randomness from the operating system:
//! time, randomness, storage and the network come in through arguments and
//! small traits, so the server (`latticed`, over QUIC and sled) and the
//! simulator (`lattice-sim`, in virtual time) drive the very same code.
//!
//! - [`clock`]: replica ids, dots, version vectors, causal contexts and the
//!   hybrid logical clock;
//! - [`crdt`]: delta-state CRDTs (counters, registers, sets, maps) and the
//!   keyspace [`Value`](crate::crdt::Value);
//! - [`proto`]: the versioned wire messages and their size-limited codec;
//! - [`policy`]: per-keyspace replication policies and their audit log;
//! - [`store`]: the storage trait and an in-memory implementation;
//! - [`replica`]: the replication state machine, driven like quinn-proto's
//!   `Connection` (`write`/`handle`/`handle_timeout` in,
//!   `poll_transmit`/`poll_event`/`poll_timeout` out).
//!
//! ```
//! use lattice_core::clock::ReplicaId;
//! use lattice_core::crdt::{Crdt, OrSet};
//! // Two replicas add concurrently and exchange deltas: they converge.
//! let (mut a, mut b) = (OrSet::default(), OrSet::default());
//! let da = a.add(ReplicaId(1), "apple");
//! let db = b.add(ReplicaId(2), "pear");
//! a.join(&da); a.join(&db);
//! b.join(&db); b.join(&da);
//! assert_eq!(a, b);
//! assert_eq!(a.len(), 2);
//! ```
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod clock;
pub mod crdt;
mod error;
#[cfg(feature = "planted-bugs")]
pub mod planted;

pub use error::Error;
mod key;
pub mod log;
pub mod policy;
pub mod proto;
pub mod replica;
pub mod serial;
pub mod store;
mod work;

pub use key::{Key, KeyHash, MAX_KEY_LEN};
