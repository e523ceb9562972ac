//! `lattice-client`: the Lattice client SDK. Not built yet (issue 5); this
//! shell re-exports the protocol types it will share with the server.

pub use lattice_core::crdt::{Op, ValueView};
