//! Helpers for Lattice's cross-crate integration tests (in `tests/tests/`).
