//! `lattice-sim`: a deterministic simulator for Lattice.
//!
//! Many nodes run in one thread under virtual time and one seeded random
//! source (ChaCha8). Each node is the real `lattice-core` replica on an
//! in-memory store; every message is encoded and decoded with the real codec
//! and its bytes counted. The network has per-link latency with jitter,
//! loss, duplication and reordering; faults (partitions, one-way links,
//! region isolation, flapping links, crashes, lost disks, clock skew,
//! pauses) run on a schedule drawn from the seed. After the faults stop and
//! the network heals, checkers verify convergence, that no acknowledged write
//! was lost, and read-your-writes. With replication policies (random in
//! swarm runs), a leak checker inspects every message: no key, key hash or
//! digest of a keyspace reaches a region its policy excludes.
//!
//! The same seed always gives the same run, shown by the trace hash:
//!
//! ```
//! use lattice_sim::{Sim, SimConfig};
//! let mut cfg = SimConfig::new(7);
//! cfg.ops = 100;
//! let a = Sim::new(cfg.clone()).run();
//! let b = Sim::new(cfg).run();
//! assert_eq!(a.trace, b.trace);
//! assert!(a.violations.is_empty(), "{:?}", a.violations);
//! ```
#![warn(missing_docs)]

pub mod bench;
pub mod bench_priority;
pub mod bench_sync;
pub mod check;
pub mod config;
pub mod faults;
pub mod net;
pub mod policy;
mod sim;
pub mod swarm;
pub mod workload;

pub use config::{FaultMix, SimConfig};
pub use sim::{Report, Sim};
