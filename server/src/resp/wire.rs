//! The RESP wire format: a bounded request parser (multibulk arrays and
//! inline commands) and the replies, encoded as RESP2 or RESP3.
//!
//! Hand-written rather than taken from a crate: a request is only ever an
//! array of bulk strings (or an inline line), and the parser must refuse a
//! claimed length *before* it waits for (and buffers) the bytes; the RESP
//! crates on crates.io decode whole frames from a buffer the caller fills,
//! so a `$999999999` header would only be noticed once the buffer is full.

/// What a connection may send in one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most arguments (the command name included).
    pub max_args: usize,
    /// Longest bulk string, in bytes.
    pub max_bulk: usize,
    /// Most bytes of one command on the wire, headers included.
    pub max_command: usize,
    /// Longest inline command line, in bytes.
    pub max_inline: usize,
}

/// Longest header line (`*N` or `$N`): a 20-digit number and its sign.
const MAX_HEADER_LINE: usize = 32;

/// A parse of the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A complete command: its arguments and the bytes it took.
    Command(Vec<Vec<u8>>, usize),
    /// An empty inline line (ignored, as Redis does), and its bytes.
    Empty(usize),
    /// More bytes are needed: at least `need` in all, from the start of the
    /// buffer (already checked against the limits).
    Incomplete {
        /// Bytes the command is known to take so far.
        need: usize,
    },
}

/// Why a request cannot be parsed; the connection answers it, then closes
/// (what Redis does on a protocol error: the stream is out of sync).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    /// A `*N` header that is not a number, or over the argument limit.
    #[error("Protocol error: invalid multibulk length")]
    MultibulkLength,
    /// A `$N` header that is not a number, or over the bulk limit.
    #[error("Protocol error: invalid bulk length")]
    BulkLength,
    /// Something other than `$` where a bulk string must start.
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    /// A bulk string not followed by CRLF.
    #[error("Protocol error: a bulk string is not followed by CRLF")]
    MissingCrlf,
    /// A command whose bytes are over the limit in all.
    #[error("Protocol error: a command of more than {0} bytes")]
    TooLarge(usize),
    /// An inline line over the limit.
    #[error("Protocol error: too big inline request")]
    InlineTooLong,
    /// A header line with no end within its limit.
    #[error("Protocol error: too big mbulk count string")]
    HeaderTooLong,
}

/// Parses the first command in `buf`. Every length is checked against
/// `limits` as soon as its header is read, before the bytes it announces
/// are waited for; nothing is allocated for a claimed length.
pub(crate) fn parse(buf: &[u8], limits: &Limits) -> Result<Parsed, ProtocolError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete { need: 1 }),
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

/// The header line at `at` (its text, and where the next line starts), or
/// `None` if its end has not arrived.
fn line(buf: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = &buf[at..];
    let window = &rest[..rest.len().min(max)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if rest.len() >= max => Err(ProtocolError::HeaderTooLong),
        None => Ok(None),
    }
}

fn number(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

fn parse_multibulk(buf: &[u8], limits: &Limits) -> Result<Parsed, ProtocolError> {
    let Some((head, mut at)) = line(buf, 0, MAX_HEADER_LINE)? else {
        return Ok(Parsed::Incomplete { need: buf.len() + 1 });
    };
    let count = number(&head[1..]).ok_or(ProtocolError::MultibulkLength)?;
    if count <= 0 {
        // `*0` and `*-1` are empty commands: skipped, as Redis does.
        return Ok(Parsed::Empty(at));
    }
    let count = usize::try_from(count).map_err(|_| ProtocolError::MultibulkLength)?;
    if count > limits.max_args {
        return Err(ProtocolError::MultibulkLength);
    }
    // Grown as bulk strings arrive, never to the claimed count up front
    // beyond the (checked) argument limit.
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let Some((head, start)) = line(buf, at, MAX_HEADER_LINE)? else {
            return Ok(Parsed::Incomplete { need: buf.len() + 1 });
        };
        match head.first() {
            Some(b'$') => {}
            Some(&c) => return Err(ProtocolError::ExpectedBulk(c as char)),
            None => return Err(ProtocolError::ExpectedBulk(' ')),
        }
        let len = number(&head[1..]).ok_or(ProtocolError::BulkLength)?;
        let len = usize::try_from(len).map_err(|_| ProtocolError::BulkLength)?;
        if len > limits.max_bulk {
            return Err(ProtocolError::BulkLength);
        }
        let end = start + len + 2;
        if end > limits.max_command {
            return Err(ProtocolError::TooLarge(limits.max_command));
        }
        if buf.len() < end {
            return Ok(Parsed::Incomplete { need: end });
        }
        if &buf[start + len..end] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        args.push(buf[start..start + len].to_vec());
        at = end;
    }
    Ok(Parsed::Command(args, at))
}

fn parse_inline(buf: &[u8], limits: &Limits) -> Result<Parsed, ProtocolError> {
    let window = &buf[..buf.len().min(limits.max_inline)];
    let Some(end) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= limits.max_inline {
            return Err(ProtocolError::InlineTooLong);
        }
        return Ok(Parsed::Incomplete { need: buf.len() + 1 });
    };
    let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let args: Vec<Vec<u8>> = text
        .split(|b| b.is_ascii_whitespace())
        .filter(|a| !a.is_empty())
        .take(limits.max_args + 1)
        .map(<[u8]>::to_vec)
        .collect();
    if args.len() > limits.max_args {
        return Err(ProtocolError::MultibulkLength);
    }
    if args.is_empty() {
        return Ok(Parsed::Empty(end + 1));
    }
    Ok(Parsed::Command(args, end + 1))
}

/// A reply, encoded for the connection's protocol version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK` and the like.
    Simple(String),
    /// An error: its code (`ERR`, `WRONGTYPE`, ...) and message, one line.
    Error(String),
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Vec<u8>),
    /// No value (`$-1` in RESP2, `_` in RESP3).
    Null,
    /// An array.
    Array(Vec<Reply>),
    /// A map (`%` in RESP3, a flat array of pairs in RESP2).
    Map(Vec<(Reply, Reply)>),
    /// A set (`~` in RESP3, an array in RESP2).
    Set(Vec<Reply>),
}

impl Reply {
    /// `+OK`.
    pub(crate) fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// An error reply `CODE message`; line breaks in the message become
    /// spaces, so the reply stays one line.
    pub(crate) fn error(code: &str, message: impl AsRef<str>) -> Reply {
        let message: String = message
            .as_ref()
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        Reply::Error(format!("{code} {message}"))
    }

    /// A bulk string of text.
    pub(crate) fn text(s: impl Into<String>) -> Reply {
        Reply::Bulk(s.into().into_bytes())
    }

    /// Appends the reply's encoding to `out`.
    pub(crate) fn encode(&self, resp3: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        // Writes to a Vec do not fail.
        let _ = match self {
            Reply::Simple(s) => write!(out, "+{s}\r\n"),
            Reply::Error(e) => write!(out, "-{e}\r\n"),
            Reply::Int(n) => write!(out, ":{n}\r\n"),
            Reply::Bulk(b) => {
                let _ = write!(out, "${}\r\n", b.len());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
                Ok(())
            }
            Reply::Null if resp3 => write!(out, "_\r\n"),
            Reply::Null => write!(out, "$-1\r\n"),
            Reply::Array(items) => {
                let _ = write!(out, "*{}\r\n", items.len());
                items.iter().for_each(|i| i.encode(resp3, out));
                Ok(())
            }
            Reply::Set(items) => {
                let _ = write!(out, "{}{}\r\n", if resp3 { '~' } else { '*' }, items.len());
                items.iter().for_each(|i| i.encode(resp3, out));
                Ok(())
            }
            Reply::Map(pairs) => {
                let _ = if resp3 {
                    write!(out, "%{}\r\n", pairs.len())
                } else {
                    write!(out, "*{}\r\n", pairs.len() * 2)
                };
                for (k, v) in pairs {
                    k.encode(resp3, out);
                    v.encode(resp3, out);
                }
                Ok(())
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_args: 8,
        max_bulk: 16,
        max_command: 100,
        max_inline: 32,
    };

    fn args(a: &[&str]) -> Vec<Vec<u8>> {
        a.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_commands_parse_one_at_a_time() {
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let Ok(Parsed::Command(a, n)) = parse(buf, &LIMITS) else {
            panic!("no command")
        };
        assert_eq!(a, args(&["GET", "k"]));
        assert_eq!(parse(&buf[n..], &LIMITS), Ok(Parsed::Command(args(&["PING"]), 14)));
    }

    #[test]
    fn every_prefix_of_a_command_is_incomplete() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nv\r\nxy\r\n";
        for i in 0..buf.len() {
            match parse(&buf[..i], &LIMITS) {
                Ok(Parsed::Incomplete { need }) => assert!(need > i, "{i}: need {need}"),
                other => panic!("{i}: {other:?}"),
            }
        }
        let Ok(Parsed::Command(a, n)) = parse(buf, &LIMITS) else {
            panic!("no command")
        };
        assert_eq!((a, n), (args(&["SET", "k", "v\r\nxy"]), buf.len()));
    }

    #[test]
    fn claimed_lengths_are_refused_before_their_bytes_arrive() {
        assert_eq!(parse(b"*99999999999\r\n", &LIMITS), Err(ProtocolError::MultibulkLength));
        assert_eq!(parse(b"*9\r\n", &LIMITS), Err(ProtocolError::MultibulkLength));
        assert_eq!(
            parse(b"*1\r\n$9999999999999\r\n", &LIMITS),
            Err(ProtocolError::BulkLength)
        );
        assert_eq!(parse(b"*1\r\n$-5\r\n", &LIMITS), Err(ProtocolError::BulkLength));
        assert_eq!(parse(b"*1\r\n$x\r\n", &LIMITS), Err(ProtocolError::BulkLength));
        assert_eq!(parse(b"*1\r\n:1\r\n", &LIMITS), Err(ProtocolError::ExpectedBulk(':')));
        // Eight bulk strings of 16 bytes are more than 100 bytes in all.
        let mut big = b"*8\r\n".to_vec();
        for _ in 0..8 {
            big.extend_from_slice(b"$16\r\n0123456789abcdef\r\n");
        }
        assert_eq!(parse(&big, &LIMITS), Err(ProtocolError::TooLarge(100)));
        assert_eq!(parse(&[b'*'; 40], &LIMITS), Err(ProtocolError::HeaderTooLong));
        assert_eq!(parse(b"*1\r\n$2\r\nabXY", &LIMITS), Err(ProtocolError::MissingCrlf));
    }

    #[test]
    fn inline_commands_split_on_spaces() {
        assert_eq!(
            parse(b"PING hello\r\nrest", &LIMITS),
            Ok(Parsed::Command(args(&["PING", "hello"]), 12))
        );
        assert_eq!(parse(b"\r\n", &LIMITS), Ok(Parsed::Empty(2)));
        assert_eq!(parse(b"*0\r\n", &LIMITS), Ok(Parsed::Empty(4)));
        assert_eq!(parse(b"PING", &LIMITS), Ok(Parsed::Incomplete { need: 5 }));
        assert_eq!(parse(&[b'x'; 40], &LIMITS), Err(ProtocolError::InlineTooLong));
        assert_eq!(
            parse(b"a b c d e f g h i\r\n", &LIMITS),
            Err(ProtocolError::MultibulkLength)
        );
    }

    #[test]
    fn replies_encode_in_both_versions() {
        let r = Reply::Map(vec![(Reply::text("a"), Reply::Int(1))]);
        let (mut two, mut three) = (Vec::new(), Vec::new());
        r.encode(false, &mut two);
        r.encode(true, &mut three);
        assert_eq!(two, b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(three, b"%1\r\n$1\r\na\r\n:1\r\n");
        let mut null = Vec::new();
        Reply::Null.encode(false, &mut null);
        Reply::Null.encode(true, &mut null);
        Reply::Set(vec![Reply::Bulk(b"x".to_vec())]).encode(true, &mut null);
        assert_eq!(null, b"$-1\r\n_\r\n~1\r\n$1\r\nx\r\n");
        let mut e = Vec::new();
        Reply::error("ERR", "two\r\nlines").encode(false, &mut e);
        assert_eq!(e, b"-ERR two  lines\r\n");
    }
}
