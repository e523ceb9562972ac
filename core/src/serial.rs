//! Certificate serial numbers as revocation lists spell them. The node and
//! the SDK both compare serials against a `revoked_serials` list; one
//! spelling, defined here, keeps the two from drifting.

/// A spelling that is not 1 to 32 bytes of hex.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a serial is 1 to 32 bytes of hex, not {0:?}")]
pub struct InvalidSerial(pub String);

/// A certificate's raw serial as lowercase hex without leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial in the one form the deny-lists compare: lowercase hex without
/// separators or leading zero bytes (`0A:1b`, `00:0a:1b` and `a1b` are all
/// `0a1b`).
pub fn normalize_serial(s: &str) -> Result<String, InvalidSerial> {
    let invalid = || InvalidSerial(s.chars().take(100).collect());
    let hex: String = s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    if hex.is_empty() || hex.len() > 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex };
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| invalid())?;
    Ok(serial_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_serial_is_one() {
        assert_eq!(normalize_serial("0A:1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial("00:0a:1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial("a1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial(" 0a 1b ").unwrap(), "0a1b");
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0x1b]), "0a1b");
        for bad in ["", "xyz", ":", &"ab".repeat(33)] {
            assert!(normalize_serial(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_serial(&"ab".repeat(32)).unwrap(), "ab".repeat(32));
    }
}
