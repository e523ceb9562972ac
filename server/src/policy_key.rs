//! Randomness for the admin's policy signing key (`latticed dev` makes
//! one for the local cluster). The key never goes into a node's data
//! directory; nodes only hold public keys (`policy_keys`).

use rand::RngCore;

/// 32 bytes from the operating system's generator: an ed25519 seed.
pub fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}
