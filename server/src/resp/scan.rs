//! `SCAN`'s arguments and cursors. Redis clients take a cursor for an
//! unsigned 64-bit number (redis-cli and go-redis parse it as one), and the
//! native scan's cursor is a storage position of up to a key's length, so
//! the RESP cursor is a number this node maps to the native cursor it
//! stands for ([`Cursors`], bounded in bytes; `0` starts and ends a scan).
//! The `MATCH` pattern is Redis glob syntax: its literal prefix is what the
//! node scans, the rest is matched here.

use super::wire::Reply;
use std::collections::{HashMap, VecDeque};

/// Bytes of native cursors a node keeps for RESP scans; past it (or past
/// [`MAX_CURSORS`]) the oldest are forgotten, and a scan that comes back
/// with one is told to start again.
pub(crate) const MAX_CURSOR_BYTES: usize = 4 << 20;
/// Most native cursors kept, whatever their size.
pub(crate) const MAX_CURSORS: usize = 65_536;

/// The native cursors RESP scans are at, by the number their clients
/// were given. Forgotten oldest first, never on use (a client may repeat a
/// call whose answer it lost).
#[derive(Default)]
pub(crate) struct Cursors {
    by_id: HashMap<u64, Vec<u8>>,
    order: VecDeque<u64>,
    bytes: usize,
    last: u64,
}

impl Cursors {
    /// Keeps `native` and returns its number (never 0).
    pub(crate) fn keep(&mut self, native: Vec<u8>) -> u64 {
        while !self.order.is_empty()
            && (self.bytes + native.len() > MAX_CURSOR_BYTES || self.order.len() >= MAX_CURSORS)
        {
            if let Some(old) = self.order.pop_front().and_then(|id| self.by_id.remove(&id)) {
                self.bytes -= old.len();
            }
        }
        self.last = self.last.wrapping_add(1).max(1);
        self.bytes += native.len();
        self.order.push_back(self.last);
        self.by_id.insert(self.last, native);
        self.last
    }

    /// The native cursor a number stands for.
    pub(crate) fn get(&self, id: u64) -> Option<Vec<u8>> {
        self.by_id.get(&id).cloned()
    }
}

/// Most keys one `SCAN` call asks for (`COUNT` is a hint, as in Redis):
/// a native scan page's limit.
pub(crate) const MAX_COUNT: usize = lattice_core::proto::client::SCAN_MAX_KEYS as usize;

/// A parsed `SCAN cursor [MATCH pattern] [COUNT n]`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ScanArgs {
    /// The cursor's number (`None`: from the start).
    pub cursor: Option<u64>,
    /// The pattern's literal prefix: what the node scans.
    pub prefix: String,
    /// The whole pattern, when it is more than `prefix*`.
    pub pattern: Option<Vec<u8>>,
    /// Keys asked for.
    pub count: usize,
}

/// Parses `SCAN`'s arguments (after the command name).
pub(crate) fn parse(args: &[Vec<u8>]) -> Result<ScanArgs, Reply> {
    let syntax = || Reply::error("ERR", "syntax error");
    let Some(cursor) = args.first() else {
        return Err(Reply::error("ERR", "wrong number of arguments for 'scan' command"));
    };
    let cursor = decode_cursor(cursor)?;
    let (mut pattern, mut count) = (None, 10usize);
    let mut rest = args[1..].iter();
    while let Some(opt) = rest.next() {
        let value = rest.next().ok_or_else(syntax)?;
        match opt.to_ascii_uppercase().as_slice() {
            b"MATCH" => pattern = Some(value.clone()),
            b"COUNT" => {
                count = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| Reply::error("ERR", "value is not an integer or out of range"))?;
            }
            b"TYPE" => return Err(Reply::error("ERR", "SCAN TYPE is not supported by Lattice")),
            _ => return Err(syntax()),
        }
    }
    let (prefix, pattern) = match pattern {
        None => (String::new(), None),
        Some(p) => {
            let literal = literal_prefix(&p);
            let prefix = String::from_utf8(literal.clone())
                .map_err(|_| Reply::error("ERR", "invalid pattern: keys are UTF-8"))?;
            let whole = (p.len() != literal.len() + 1 || p.last() != Some(&b'*')).then_some(p);
            (prefix, whole)
        }
    };
    Ok(ScanArgs {
        cursor,
        prefix,
        pattern,
        count: count.min(MAX_COUNT),
    })
}

fn decode_cursor(raw: &[u8]) -> Result<Option<u64>, Reply> {
    let n = std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Reply::error("ERR", "invalid cursor"))?;
    Ok((n != 0).then_some(n))
}

/// The bytes of `pattern` before its first special character.
fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'*' | b'?' | b'[' => break,
            b'\\' if i + 1 < pattern.len() => {
                out.push(pattern[i + 1]);
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Redis's glob: `*`, `?`, `[abc]`, `[a-z]`, `[^a]` and `\x`. Iterative
/// with one backtrack point per `*`, so its cost is at most the product of
/// the two lengths (both bounded: a key and an argument).
pub(crate) fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                star = Some((p, t));
                p += 1;
                continue;
            }
            let next = match pattern[p] {
                b'?' => Some(p + 1),
                b'[' => class(pattern, p, text[t]).and_then(|(m, next)| m.then_some(next)),
                b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(p + 2),
                c => (c == text[t]).then_some(p + 1),
            };
            if let Some(next) = next {
                p = next;
                t += 1;
                continue;
            }
        }
        match star {
            Some((sp, st)) => {
                star = Some((sp, st + 1));
                p = sp + 1;
                t = st + 1;
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at `pattern[at]`: whether `c` is in it and where the
/// pattern goes on; `None` if the class is not closed.
fn class(pattern: &[u8], at: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = at + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (lo, hi) = (pattern[i].min(pattern[i + 2]), pattern[i].max(pattern[i + 2]));
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= pattern[i] == c;
            i += 1;
        }
    }
    (i < pattern.len()).then_some((matched != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<Vec<u8>> {
        a.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn cursors_are_numbers_kept_within_their_bytes() {
        assert_eq!(decode_cursor(b"0"), Ok(None));
        assert_eq!(decode_cursor(b"17"), Ok(Some(17)));
        assert!(decode_cursor(b"6b2d").is_err());
        assert!(decode_cursor(b"-1").is_err());
        let mut c = Cursors::default();
        let first = c.keep(b"position".to_vec());
        assert_ne!(first, 0);
        assert_eq!(c.get(first), Some(b"position".to_vec()));
        // Large cursors push the oldest out, within the byte bound.
        let big = vec![7u8; MAX_CURSOR_BYTES / 4];
        let ids: Vec<u64> = (0..8).map(|_| c.keep(big.clone())).collect();
        assert!(c.bytes <= MAX_CURSOR_BYTES);
        assert_eq!(c.get(first), None);
        assert_eq!(c.get(ids[7]), Some(big));
        assert_eq!(c.get(ids[0]), None);
    }

    #[test]
    fn a_prefix_pattern_is_scanned_by_prefix() {
        assert_eq!(parse(&args(&["42"])).unwrap().cursor, Some(42));
        let a = parse(&args(&["0", "MATCH", "user:*", "COUNT", "50"])).unwrap();
        assert_eq!(
            (a.cursor, a.prefix.as_str(), a.pattern, a.count),
            (None, "user:", None, 50)
        );
        let a = parse(&args(&["0", "match", "u?er:*x"])).unwrap();
        assert_eq!((a.prefix.as_str(), a.pattern), ("u", Some(b"u?er:*x".to_vec())));
        assert_eq!(parse(&args(&["0"])).unwrap().count, 10);
        assert_eq!(parse(&args(&["0", "COUNT", "99999999"])).unwrap().count, MAX_COUNT);
        assert!(parse(&args(&["0", "COUNT", "0"])).is_err());
        assert!(parse(&args(&["0", "MATCH"])).is_err());
        assert!(parse(&args(&["0", "TYPE", "string"])).is_err());
        assert!(parse(&args(&[])).is_err());
    }

    #[test]
    fn globs_match_as_redis_does() {
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"user:*", b"user:1"));
        assert!(!glob(b"user:*", b"use"));
        assert!(glob(b"h?llo", b"hello"));
        assert!(glob(b"h[ae]llo", b"hallo"));
        assert!(!glob(b"h[^e]llo", b"hello"));
        assert!(glob(b"h[a-c]llo", b"hbllo"));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(!glob(b"a*b*c", b"axxbyy"));
        assert!(glob(b"a\\*", b"a*"));
        assert!(!glob(b"a\\*", b"ab"));
        assert_eq!(literal_prefix(b"a\\*b*"), b"a*b".to_vec());
    }
}
