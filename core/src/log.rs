//! The durable change log's types.
//!
//! Every change a replica applies is a [`Change`]: a local write's delta
//! once it is part of a [`WriteBatch`](crate::store::WriteBatch), or the
//! novel part of a remote state or delta it merged. The engine hands the
//! changes to the store in the same batch as the states they produced, so a
//! change is logged exactly when its state is stored, with the same
//! durability. The store numbers them: each goes to a *partition* chosen by
//! its key's hash ([`partition_of`]), where it gets the partition's next
//! sequence number, so one key's changes are in order within one partition
//! and partitions can be read in parallel; and every change gets a node-wide
//! sequence number too (the watch feed's order).
//!
//! Joining a key's logged deltas, in any order, from an empty state gives
//! the key's state: a local delta joined into the old state gives the new
//! one, and so does a remote novel part. This is what replay, point-in-time
//! reads and a backup's catch-up rely on (and what the tests check).

use crate::clock::HlcTimestamp;
use crate::crdt::{Crdt, Value};
use crate::key::Key;
use crate::proto::client::OpId;
use crate::proto::RegionId;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One change as the engine hands it to the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// What changed: the delta joined into the key's state.
    pub delta: Arc<Value>,
    /// The region the change came from: this node's for a local write, the
    /// sending peer's for a remote one (a relayed change names the relay).
    pub origin: RegionId,
    /// The writer's stamp, when known (local writes; deltas carry the stamp
    /// of their oldest write, anti-entropy repairs none).
    pub written: Option<HlcTimestamp>,
    /// When this node applied it, on its hybrid logical clock: what
    /// retention by age and point-in-time reads go by.
    pub applied: HlcTimestamp,
    /// The client operation id of a local write.
    pub op: Option<OpId>,
    /// The key had no state on this node before this change. A key whose
    /// oldest retained change is its first has its whole history retained
    /// (retention drops a partition's oldest changes first).
    #[serde(default)]
    pub first: bool,
}

/// A change as the log holds it: its partition and positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    /// The partition ([`partition_of`] its key).
    pub partition: u16,
    /// Its number in the partition (from 0, without gaps).
    pub seq: u64,
    /// Its number on the node (from 0, increasing in apply order).
    pub gseq: u64,
    /// The change.
    pub change: Change,
}

/// Most partitions a log may have.
pub const MAX_PARTITIONS: u16 = 1_024;

/// The partition of `key` in a log of `partitions` partitions.
pub fn partition_of(key: &Key, partitions: u16) -> u16 {
    (key.hash().0 % u64::from(partitions.max(1))) as u16
}

/// Where a log reader is: the log it reads (each node's log has a random
/// id, drawn when the log is created, so a cursor is never applied to
/// another node's log or to a log rebuilt from a backup) and the next
/// sequence number to read in each partition (index = partition). A
/// shorter list reads the missing partitions from their start; a cursor of
/// log 0 reads from the start of any log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogCursor {
    /// The log's id (0: any).
    pub log: u64,
    /// The next sequence number of each partition.
    pub next: Vec<u64>,
}

impl LogCursor {
    /// The next sequence number to read in `partition`.
    pub fn get(&self, partition: u16) -> u64 {
        self.next.get(partition as usize).copied().unwrap_or(0)
    }

    /// Moves `partition` on to `next`.
    pub fn set(&mut self, partition: u16, next: u64) {
        let i = partition as usize;
        if self.next.len() <= i {
            self.next.resize(i + 1, 0);
        }
        self.next[i] = next;
    }

    /// The cursor as text: the log id in hex, a colon, then the positions
    /// comma-separated (`"9f0c2a11d3e4b5a6:0,12,3"`).
    pub fn to_text(&self) -> String {
        let next = self.next.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        format!("{:016x}:{next}", self.log)
    }

    /// Parses [`LogCursor::to_text`]'s form (at most [`MAX_PARTITIONS`]
    /// positions).
    pub fn parse(s: &str) -> Result<LogCursor, Error> {
        let bad = || {
            Error::InvalidOp(format!(
                "a log cursor is LOG_ID:N,N,... as `lattice log` prints it, not {s:?}"
            ))
        };
        let (log, next) = s.trim().split_once(':').ok_or_else(bad)?;
        let log = u64::from_str_radix(log, 16).map_err(|_| bad())?;
        let next = if next.is_empty() {
            Vec::new()
        } else {
            next.split(',')
                .map(|p| p.trim().parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad())?
        };
        if next.len() > MAX_PARTITIONS as usize {
            return Err(Error::InvalidOp(format!(
                "a log cursor has at most {MAX_PARTITIONS} positions, not {}",
                next.len()
            )));
        }
        Ok(LogCursor { log, next })
    }
}

/// Milliseconds since the Unix epoch of a time as the tools take it: RFC
/// 3339 (`2026-11-29T07:40:00Z`), a number of milliseconds, or `-DURATION`
/// (`-90s`, `-5m`, `-2h`) before `now_ms`.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, Error> {
    let bad = |why: String| {
        Error::InvalidOp(format!(
            "time {s:?}: {why} (RFC 3339, milliseconds since the epoch, or -DURATION)"
        ))
    };
    if let Some(ago) = s.strip_prefix('-') {
        let d = humantime::parse_duration(ago).map_err(|e| bad(e.to_string()))?;
        return Ok(now_ms.saturating_sub(d.as_millis().min(u128::from(u64::MAX)) as u64));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| bad(e.to_string()))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("before the Unix epoch".into()))?
        .as_millis();
    Ok(ms.min(u128::from(u64::MAX)) as u64)
}

/// Joins `changes` (one key's, in any order) into one state, from `None`.
pub fn replay<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Option<Value> {
    let mut state: Option<Value> = None;
    for c in changes {
        match &mut state {
            None => state = Some((*c.delta).clone()),
            Some(s) => s.join(&c.delta),
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_from_text_and_refuse_garbage() {
        let mut c = LogCursor {
            log: 0xab,
            next: Vec::new(),
        };
        c.set(3, 17);
        assert_eq!(c.to_text(), "00000000000000ab:0,0,0,17");
        assert_eq!(LogCursor::parse(&c.to_text()).unwrap(), c);
        assert_eq!(LogCursor::parse("0:").unwrap(), LogCursor::default());
        assert!(LogCursor::parse("1,2").is_err());
        assert!(LogCursor::parse("ab:1,x").is_err());
        assert!(LogCursor::parse(&format!("1:{}", vec!["1"; 2_000].join(","))).is_err());
        assert_eq!(c.get(9), 0);
    }

    #[test]
    fn times_parse_in_three_forms() {
        assert_eq!(parse_time("1234", 0).unwrap(), 1234);
        assert_eq!(parse_time("-90s", 100_000).unwrap(), 10_000);
        assert_eq!(parse_time("-1h", 5).unwrap(), 0);
        assert_eq!(parse_time("1970-01-01T00:00:01Z", 0).unwrap(), 1_000);
        assert!(parse_time("yesterday", 0).is_err());
        assert!(parse_time("", 0).is_err());
    }

    #[test]
    fn partitions_spread_keys_and_stay_in_range() {
        let mut seen = [0u32; 4];
        for i in 0..1_000 {
            let p = partition_of(&Key::new(format!("k{i}")).unwrap(), 4);
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(partition_of(&Key::new("a").unwrap(), 1), 0);
    }
}
