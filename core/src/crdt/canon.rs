//! Digests of values that depend on the value, not on its encoding.
//!
//! Anti-entropy compares item hashes between nodes. Hashing a state's
//! encoded bytes made every encoding change (shorter variant tags, contexts
//! left out when implied) a change of every digest, so nodes of two versions
//! would repair equal states again and again, for ever. These digests walk
//! the value itself in a fixed order, with a tag for every variant and a
//! length before every sequence, so only a change of the value changes them.
//! Changing this walk changes every digest: it is a protocol change.

use super::ccounter::PnPair;
use super::counter::{GCounter, PNCounter};
use super::dotstore::{Causal, DotFun, DotMap, DotSet};
use super::lww::LwwRegister;
use super::value::{Field, FieldKind, Nested, Value};
use super::Bytes;
use crate::clock::{CausalContext, Dot, ReplicaId};
use blake3::Hasher;

/// Feeds a canonical description of a value to a hasher.
pub(crate) trait Canon {
    fn canon(&self, h: &mut Hasher);
}

fn u(h: &mut Hasher, n: u64) {
    h.update(&n.to_le_bytes());
}

fn tag(h: &mut Hasher, t: u8) {
    h.update(&[t]);
}

impl Canon for Bytes {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.0.len() as u64);
        h.update(&self.0);
    }
}

impl Canon for ReplicaId {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.0);
    }
}

impl Canon for Dot {
    fn canon(&self, h: &mut Hasher) {
        self.replica.canon(h);
        u(h, self.counter);
    }
}

impl Canon for CausalContext {
    fn canon(&self, h: &mut Hasher) {
        let replicas: Vec<_> = self.ranges().collect();
        u(h, replicas.len() as u64);
        for (r, ranges) in replicas {
            r.canon(h);
            u(h, ranges.len() as u64);
            for &(lo, hi) in ranges {
                u(h, lo);
                u(h, hi);
            }
        }
    }
}

impl Canon for DotSet {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.0.len() as u64);
        self.0.iter().for_each(|d| d.canon(h));
    }
}

impl<T: Canon + Ord> Canon for DotFun<T> {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.0.len() as u64);
        for (d, v) in &self.0 {
            d.canon(h);
            v.canon(h);
        }
    }
}

impl<K: Canon + Ord, S: Canon> Canon for DotMap<K, S> {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.len() as u64);
        for (k, s) in self.iter() {
            k.canon(h);
            s.canon(h);
        }
    }
}

impl<S: Canon> Canon for Causal<S> {
    fn canon(&self, h: &mut Hasher) {
        self.store.canon(h);
        self.ctx.canon(h);
    }
}

impl Canon for PnPair {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.inc);
        u(h, self.dec);
    }
}

impl Canon for Field {
    fn canon(&self, h: &mut Hasher) {
        u(h, self.name.len() as u64);
        h.update(self.name.as_bytes());
        tag(
            h,
            match self.kind {
                FieldKind::Counter => 0,
                FieldKind::Register => 1,
                FieldKind::Set => 2,
                FieldKind::Map => 3,
            },
        );
    }
}

impl Canon for Nested {
    fn canon(&self, h: &mut Hasher) {
        match self {
            Nested::Counter(s) => {
                tag(h, 0);
                s.canon(h);
            }
            Nested::Register(s) => {
                tag(h, 1);
                s.canon(h);
            }
            Nested::Set(s) => {
                tag(h, 2);
                s.canon(h);
            }
            Nested::Map(s) => {
                tag(h, 3);
                s.canon(h);
            }
        }
    }
}

impl Canon for GCounter {
    fn canon(&self, h: &mut Hasher) {
        let entries: Vec<_> = self.entries().collect();
        u(h, entries.len() as u64);
        for (r, n) in entries {
            r.canon(h);
            u(h, n);
        }
    }
}

impl Canon for PNCounter {
    fn canon(&self, h: &mut Hasher) {
        let entries = self.entries();
        u(h, entries.len() as u64);
        for (r, (inc, dec)) in entries {
            r.canon(h);
            u(h, inc);
            u(h, dec);
        }
    }
}

impl Canon for LwwRegister<Option<Bytes>> {
    fn canon(&self, h: &mut Hasher) {
        match (self.stamp(), self.get()) {
            (Some((t, r)), Some(v)) => {
                tag(h, 1);
                u(h, t.wall_ms);
                u(h, u64::from(t.logical));
                r.canon(h);
                match v {
                    Some(b) => {
                        tag(h, 1);
                        b.canon(h);
                    }
                    None => tag(h, 0),
                }
            }
            _ => tag(h, 0),
        }
    }
}

impl Canon for Value {
    fn canon(&self, h: &mut Hasher) {
        match self {
            Value::GCounter(c) => {
                tag(h, 0);
                c.canon(h);
            }
            Value::PnCounter(c) => {
                tag(h, 1);
                c.canon(h);
            }
            Value::Counter(c) => {
                tag(h, 2);
                c.0.canon(h);
            }
            Value::Lww(r) => {
                tag(h, 3);
                r.canon(h);
            }
            Value::MvRegister(r) => {
                tag(h, 4);
                r.0.canon(h);
            }
            Value::Set(s) => {
                tag(h, 5);
                s.0.canon(h);
            }
            Value::Map(m) => {
                tag(h, 6);
                m.0.canon(h);
            }
            Value::Conflict(parts) => {
                tag(h, 7);
                u(h, parts.len() as u64);
                parts.iter().for_each(|p| p.canon(h));
            }
        }
    }
}
