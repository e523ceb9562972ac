//! Limits of the network edge, for what a client can do before it shows a
//! token: connection admission (global and per source address, QUIC Retry
//! under load), frame reads with deadlines, the byte budget of request
//! bodies being read, and finding the token at the start of a request so it
//! is checked before the body is read.

use crate::config::{NetLimits, MAX_TOKEN_BYTES};
use crate::metrics::Metrics;
use lattice_core::proto::PROTOCOL_VERSION;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The longest a QUIC handshake may take once admitted.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of a client request is read before its token is checked: the
/// version byte, the array header, the longest string header and the
/// longest token a node accepts.
pub const TOKEN_PREFIX_MAX: usize = 1 + 1 + 5 + MAX_TOKEN_BYTES;

/// The source a connection is counted under: an IPv4 address (also when
/// mapped into IPv6), or an IPv6 /64, the smallest block a host usually gets.
pub fn source_of(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    handshaking: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Counts connections (open or in their handshake) in all and per source.
pub struct Admission {
    limits: NetLimits,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

/// What to do with a new connection attempt.
pub enum Decision {
    /// Accept it; the slot is given back when dropped.
    Accept(Slot),
    /// Too many handshakes and an unvalidated address: ask it to prove its
    /// address with a QUIC Retry first.
    Retry,
    /// Over a limit (named, for the log).
    Refuse(&'static str),
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: NetLimits, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counts: Mutex::new(Counts::default()),
            metrics,
        })
    }

    /// Decides on an attempt from `addr`; `validated`: the address was
    /// proven (a Retry token came back), so a Retry would not help.
    pub fn admit(self: &Arc<Self>, addr: SocketAddr, validated: bool) -> Decision {
        let source = source_of(addr);
        let Ok(mut c) = self.counts.lock() else {
            return Decision::Refuse("admission state poisoned");
        };
        if !validated && c.handshaking >= self.limits.retry_above_handshakes {
            return Decision::Retry;
        }
        if c.total >= self.limits.max_connections {
            return Decision::Refuse("max_connections");
        }
        let from_source = c.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.limits.max_connections_per_ip {
            return Decision::Refuse("max_connections_per_ip");
        }
        c.total += 1;
        c.handshaking += 1;
        *c.per_source.entry(source).or_default() += 1;
        self.metrics.connections_open.set(c.total as i64);
        Decision::Accept(Slot {
            admission: self.clone(),
            source,
            handshaking: true,
        })
    }
}

/// One admitted connection's place in the counts, given back on drop.
pub struct Slot {
    admission: Arc<Admission>,
    source: IpAddr,
    handshaking: bool,
}

impl Slot {
    /// The handshake completed: the connection no longer counts toward the
    /// Retry threshold.
    pub fn established(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            if let Ok(mut c) = self.admission.counts.lock() {
                c.handshaking = c.handshaking.saturating_sub(1);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.admission.counts.lock() {
            c.total = c.total.saturating_sub(1);
            if self.handshaking {
                c.handshaking = c.handshaking.saturating_sub(1);
            }
            if let Some(n) = c.per_source.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_source.remove(&self.source);
                }
            }
            self.admission.metrics.connections_open.set(c.total as i64);
        }
    }
}

/// The bytes of client request bodies being read at once.
pub struct ReadBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    metrics: Arc<Metrics>,
}

impl ReadBudget {
    /// A budget of `total` bytes (at most `u32::MAX`, checked by the config).
    pub fn new(total: usize, metrics: Arc<Metrics>) -> ReadBudget {
        ReadBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            metrics,
        }
    }

    /// Takes `n` bytes of the budget, waiting until `deadline`; `None` if
    /// they did not free up in time.
    pub async fn take(&self, n: usize, deadline: Instant) -> Option<BudgetShare<'_>> {
        let n = u32::try_from(n).ok()?;
        let permit = tokio::time::timeout_at(deadline, self.bytes.clone().acquire_many_owned(n))
            .await
            .ok()?
            .ok()?;
        self.record();
        Some(BudgetShare { permit, budget: self })
    }

    fn record(&self) {
        let used = self.total.saturating_sub(self.bytes.available_permits());
        self.metrics.read_budget_bytes.set(used as i64);
    }
}

/// Bytes taken from a [`ReadBudget`], given back on drop.
pub struct BudgetShare<'a> {
    permit: OwnedSemaphorePermit,
    budget: &'a ReadBudget,
}

impl Drop for BudgetShare<'_> {
    fn drop(&mut self) {
        // The permit is released after this body; the gauge may lag by one
        // share, which is fine for a gauge.
        let used = self
            .budget
            .total
            .saturating_sub(self.budget.bytes.available_permits() + self.permit.num_permits());
        self.budget.metrics.read_budget_bytes.set(used as i64);
    }
}

/// The token of a client request from the start of its frame (version
/// byte, then the msgpack array `[token, body]` that `encode_client` writes):
/// `None` if `head` does not start like a request or ends before the token.
pub fn token_of(head: &[u8]) -> Option<&[u8]> {
    let [version, array, rest @ ..] = head else {
        return None;
    };
    if *version != PROTOCOL_VERSION || *array != 0x92 {
        return None;
    }
    let (&marker, rest) = rest.split_first()?;
    let (len, rest) = match marker {
        0xa0..=0xbf => (usize::from(marker & 0x1f), rest),
        0xd9 => {
            let (&l, r) = rest.split_first()?;
            (usize::from(l), r)
        }
        0xda => {
            let (l, r) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([l[0], l[1]])), r)
        }
        0xdb => {
            let (l, r) = rest.split_at_checked(4)?;
            (u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize, r)
        }
        _ => return None,
    };
    rest.get(..len)
}

/// Why a frame was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Its bytes did not arrive before the deadline.
    #[error("the frame did not arrive in time")]
    TimedOut,
    /// The stream failed or ended inside the frame.
    #[error("stream: {0}")]
    Stream(String),
}

/// Fills `buf` from `recv` before `deadline`.
pub async fn read_exact_by(recv: &mut quinn::RecvStream, buf: &mut [u8], deadline: Instant) -> Result<(), ReadError> {
    match tokio::time::timeout_at(deadline, recv.read_exact(buf)).await {
        Err(_) => Err(ReadError::TimedOut),
        Ok(Err(e)) => Err(ReadError::Stream(e.to_string())),
        Ok(Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::proto::client::{encode_client, ClientRequest, RequestBody};

    #[test]
    fn the_token_is_found_at_the_start_of_every_request() {
        for n in [0, 1, 16, 31, 32, 255, 256, MAX_TOKEN_BYTES] {
            let token = "t".repeat(n);
            let frame = encode_client(&ClientRequest {
                token: token.clone(),
                body: RequestBody::Status,
            })
            .unwrap();
            let head = &frame[..frame.len().min(TOKEN_PREFIX_MAX)];
            assert_eq!(token_of(head), Some(token.as_bytes()), "{n}-byte token");
            // Cut before the token ends: not found, never a shorter token.
            let header = 2 + if n < 32 {
                1
            } else if n < 256 {
                2
            } else {
                3
            };
            if n > 0 {
                assert_eq!(token_of(&frame[..header + n - 1]), None, "{n}-byte token cut short");
            }
        }
        assert_eq!(token_of(&[]), None);
        assert_eq!(token_of(&[PROTOCOL_VERSION, 0x93, 0xa1, b'x']), None);
        assert_eq!(token_of(&[PROTOCOL_VERSION + 1, 0x92, 0xa1, b'x']), None);
        assert_eq!(token_of(&[PROTOCOL_VERSION, 0x92, 0xa2, b'x']), None, "truncated");
    }

    #[test]
    fn sources_are_counted_by_address_and_ipv6_by_slash_64() {
        let a: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8::ffff:2]:2".parse().unwrap();
        let c: SocketAddr = "[2001:db8:0:1::1]:2".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        let v4: SocketAddr = "10.0.0.1:5".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:6".parse().unwrap();
        assert_eq!(source_of(v4), source_of(mapped));
    }

    #[test]
    fn admission_bounds_connections_in_all_and_per_source() {
        let limits = NetLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            retry_above_handshakes: 2,
            ..NetLimits::default()
        };
        let adm = Admission::new(limits, Arc::new(Metrics::new()));
        let one: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let two: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let slot = |d| match d {
            Decision::Accept(s) => s,
            _ => panic!("expected Accept"),
        };
        let mut a = slot(adm.admit(one, false));
        let mut b = slot(adm.admit(one, false));
        // Two handshakes in progress: an unvalidated address is retried.
        assert!(matches!(adm.admit(two, false), Decision::Retry));
        a.established();
        b.established();
        assert!(matches!(
            adm.admit(one, true),
            Decision::Refuse("max_connections_per_ip")
        ));
        let _c = slot(adm.admit(two, true));
        assert!(matches!(adm.admit(two, true), Decision::Refuse("max_connections")));
        drop(a);
        let _d = slot(adm.admit(one, true));
    }
}
