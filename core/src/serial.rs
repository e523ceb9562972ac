//! Certificate serials, spelled one way for the node's `revoked_serials`
//! and the SDK's deny-list: lowercase hex without separators or leading
//! zero bytes (`0A:1b` and `0a1b` are the same serial).

/// A serial that is not 1 to 32 bytes of hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialError(String);

impl std::fmt::Display for SerialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SerialError {}

/// The serial `raw` (big-endian bytes, as in the certificate) as the
/// deny-list compares it.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial as written by a person (any case, `:` or spaces between bytes,
/// leading zeros) in the one form the deny-list compares.
pub fn normalize_serial(s: &str) -> Result<String, SerialError> {
    let hex: String = s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    if hex.is_empty() || hex.len() > 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(SerialError("a serial is 1 to 32 bytes of hex".into()));
    }
    let hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex };
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| SerialError(format!("a serial is hex: {e}")))?;
    Ok(serial_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling() {
        assert_eq!(normalize_serial("0A:1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial("00:0a:1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial("a1b").unwrap(), "0a1b");
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0x1b]), "0a1b");
        assert!(normalize_serial("").is_err());
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial(&"ab".repeat(33)).is_err());
    }
}
