//! What one exported change looks like on the broker: its body, headers
//! and properties.

use crate::Error;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use lattice_core::clock::HlcTimestamp;
use lattice_core::crdt::Value;
use lattice_core::log::Logged;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The body's content type.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// AMQP delivery mode 2: the broker writes the message to disk (in a
/// durable queue) before it confirms it.
pub const PERSISTENT: u8 = 2;

/// Most bytes of an encoded body. A change's delta is bounded by the
/// node's value limits well below this; a larger one is an error rather
/// than a frame the broker may refuse (RabbitMQ's default maximum message
/// size is 128 MiB).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// One change as exported: the message body, MessagePack with named fields
/// (`rmp_serde::to_vec_named`). Decode it with [`ExportedChange::decode`],
/// or with any MessagePack library (`delta` is `lattice-core`'s
/// `crdt::Value`, serialised as on Lattice's wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedChange {
    /// The id of the node's log (hex): positions are only comparable
    /// within one log.
    pub log: String,
    /// The partition the key hashes to.
    pub partition: u16,
    /// The change's number in its partition (consecutive from 0).
    pub seq: u64,
    /// The change's number on the node (increasing in apply order).
    pub gseq: u64,
    /// The key.
    pub key: String,
    /// The region the change came from.
    pub origin: String,
    /// The writer's stamp, when known.
    pub written: Option<HlcTimestamp>,
    /// When the node applied it.
    pub applied: HlcTimestamp,
    /// The client operation id of a local write (32 hex digits).
    pub op: Option<String>,
    /// The key had no state on the node before this change.
    pub first: bool,
    /// The delta joined into the key's state.
    pub delta: Arc<Value>,
}

impl ExportedChange {
    /// The exported form of `l`, a change of log `log`.
    pub fn new(log: u64, l: &Logged) -> ExportedChange {
        let c = &l.change;
        ExportedChange {
            log: format!("{log:016x}"),
            partition: l.partition,
            seq: l.seq,
            gseq: l.gseq,
            key: c.key.as_str().to_string(),
            origin: c.origin.0.clone(),
            written: c.written,
            applied: c.applied,
            op: c.op.map(|o| format!("{:032x}", o.0)),
            first: c.first,
            delta: c.delta.clone(),
        }
    }

    /// The message id: the change's position, unique within the log
    /// (`LOG:PARTITION:SEQ`). Redeliveries of one change carry the same.
    pub fn message_id(&self) -> String {
        format!("{}:{}:{}", self.log, self.partition, self.seq)
    }

    /// The routing key: the partition number, so a consumer may bind a
    /// queue per partition and keep each key's order.
    pub fn routing_key(&self) -> String {
        self.partition.to_string()
    }

    /// The body.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let body = rmp_serde::to_vec_named(self).map_err(|e| Error::Encode(e.to_string()))?;
        if body.len() > MAX_BODY_BYTES {
            return Err(Error::Encode(format!(
                "the change at {} encodes to {} bytes, over the {MAX_BODY_BYTES} limit",
                self.message_id(),
                body.len()
            )));
        }
        Ok(body)
    }

    /// Reads a body back (size-checked before decoding).
    pub fn decode(body: &[u8]) -> Result<ExportedChange, Error> {
        if body.len() > MAX_BODY_BYTES {
            return Err(Error::Decode(format!(
                "a body of {} bytes is over the limit",
                body.len()
            )));
        }
        rmp_serde::from_slice(body).map_err(|e| Error::Decode(e.to_string()))
    }

    /// The message's properties: persistent, typed, with the message id and
    /// the ids as headers (`lattice-log`, `lattice-partition`,
    /// `lattice-seq`, `lattice-gseq`, `lattice-key`, `lattice-origin`,
    /// `lattice-applied-ms`, and `lattice-op` when the change has one) so a
    /// consumer can deduplicate without decoding the body.
    pub fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_string()));
        h.insert(ShortString::from("lattice-log"), s(&self.log));
        h.insert(
            ShortString::from("lattice-partition"),
            AMQPValue::LongInt(i32::from(self.partition)),
        );
        h.insert(
            ShortString::from("lattice-seq"),
            AMQPValue::LongLongInt(clamp(self.seq)),
        );
        h.insert(
            ShortString::from("lattice-gseq"),
            AMQPValue::LongLongInt(clamp(self.gseq)),
        );
        h.insert(ShortString::from("lattice-key"), s(&self.key));
        h.insert(ShortString::from("lattice-origin"), s(&self.origin));
        h.insert(
            ShortString::from("lattice-applied-ms"),
            AMQPValue::LongLongInt(clamp(self.applied.wall_ms)),
        );
        if let Some(op) = &self.op {
            h.insert(ShortString::from("lattice-op"), s(op));
        }
        BasicProperties::default()
            .with_content_type(ShortString::from(CONTENT_TYPE))
            .with_delivery_mode(PERSISTENT)
            .with_message_id(ShortString::from(self.message_id()))
            .with_timestamp(self.applied.wall_ms / 1_000)
            .with_type(ShortString::from("lattice.change"))
            .with_headers(h)
    }
}

/// AMQP tables have signed 64-bit integers; positions and times stay far
/// below `i64::MAX`, and one that did not would read as the maximum rather
/// than wrap to a negative.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::crdt::Kind;
    use lattice_core::log::Change;
    use lattice_core::proto::client::OpId;
    use lattice_core::proto::RegionId;
    use lattice_core::Key;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_change_reads_back_from_its_body_and_names_its_position() {
        let delta = Value::empty(Kind::Counter);
        let l = Logged {
            partition: 3,
            seq: 41,
            gseq: 99,
            change: Change {
                key: Key::new("visits").unwrap(),
                delta: Arc::new(delta),
                origin: RegionId("eu".into()),
                written: Some(HlcTimestamp { wall_ms: 5, logical: 1 }),
                applied: HlcTimestamp {
                    wall_ms: 7_000,
                    logical: 0,
                },
                op: Some(OpId(0xab)),
                first: true,
            },
        };
        let e = ExportedChange::new(0x1f, &l);
        assert_eq!(e.message_id(), "000000000000001f:3:41");
        assert_eq!(e.op.as_deref(), Some("000000000000000000000000000000ab"));
        assert_eq!(ExportedChange::decode(&e.encode().unwrap()).unwrap(), e);
        assert!(ExportedChange::decode(b"\xc1garbage").is_err());
        let p = e.properties();
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT));
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("lattice-seq"), Some(&AMQPValue::LongLongInt(41)));
    }
}
