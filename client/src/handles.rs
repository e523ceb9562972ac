//! Typed handles: one per CRDT type, values encoded with rmp-serde.

use crate::{Client, Error};
use lattice_core::crdt::{Bytes, Field, FieldKind, NestedView, Op, ValueView};
use lattice_core::Key;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::marker::PhantomData;

fn key(k: &str) -> Result<Key, Error> {
    Key::new(k).map_err(|e| Error::InvalidRequest(e.to_string()))
}

fn enc<T: Serialize>(v: &T) -> Result<Bytes, Error> {
    rmp_serde::to_vec(v).map(Bytes).map_err(|e| Error::Codec(e.to_string()))
}

fn dec<T: DeserializeOwned>(b: &Bytes) -> Result<T, Error> {
    rmp_serde::from_slice(&b.0).map_err(|e| Error::Codec(e.to_string()))
}

fn mismatch(key: &str, want: &str, got: &Option<ValueView>) -> Error {
    Error::TypeMismatch(format!("{key} holds {got:?}, not a {want}"))
}

/// A counter (resettable PN-counter): every increment counts, across regions.
///
/// Deleting the key (or removing a counter field of a map) resets what the
/// deleting node had seen. An increment made concurrently elsewhere
/// survives carrying its node's whole running total, including the part the
/// delete had seen: with 5 counted at node A, a delete at B concurrent with
/// `incr(3)` at A leaves 8, not 3. Each node keeps one running total per
/// counter, which is what keeps the state bounded.
pub struct CounterHandle<'a> {
    pub(crate) client: &'a Client,
    pub(crate) key: String,
}

impl CounterHandle<'_> {
    /// Adds `n` (negative to subtract).
    pub async fn incr(&self, n: i64) -> Result<(), Error> {
        self.client
            .write(vec![(key(&self.key)?, Op::CounterAdd(n))])
            .await
            .map(|_| ())
    }
    /// Subtracts `n`.
    pub async fn decr(&self, n: i64) -> Result<(), Error> {
        self.incr(
            n.checked_neg()
                .ok_or_else(|| Error::InvalidRequest("decrement too large".into()))?,
        )
        .await
    }
    /// The value (0 when absent).
    pub async fn get(&self) -> Result<i128, Error> {
        match self.client.read(&key(&self.key)?).await? {
            None => Ok(0),
            Some(ValueView::Counter(n)) => Ok(n),
            other => Err(mismatch(&self.key, "counter", &other)),
        }
    }
}

/// A last-writer-wins register of `T`.
pub struct RegisterHandle<'a, T> {
    pub(crate) client: &'a Client,
    pub(crate) key: String,
    pub(crate) _t: PhantomData<T>,
}

impl<T: Serialize + DeserializeOwned> RegisterHandle<'_, T> {
    /// Writes `v` (the latest write by hybrid logical clock wins).
    pub async fn set(&self, v: &T) -> Result<(), Error> {
        self.client
            .write(vec![(key(&self.key)?, Op::LwwSet(enc(v)?))])
            .await
            .map(|_| ())
    }
    /// The current value.
    pub async fn get(&self) -> Result<Option<T>, Error> {
        match self.client.read(&key(&self.key)?).await? {
            None | Some(ValueView::Register(None)) => Ok(None),
            Some(ValueView::Register(Some(b))) => dec(&b).map(Some),
            other => Err(mismatch(&self.key, "register", &other)),
        }
    }
}

/// A multi-value register of `T`: concurrent writes are all kept.
pub struct MvRegisterHandle<'a, T> {
    pub(crate) client: &'a Client,
    pub(crate) key: String,
    pub(crate) _t: PhantomData<T>,
}

impl<T: Serialize + DeserializeOwned> MvRegisterHandle<'_, T> {
    /// Writes `v`, replacing the values this session has seen.
    pub async fn set(&self, v: &T) -> Result<(), Error> {
        self.client
            .write(vec![(key(&self.key)?, Op::MvSet(enc(v)?))])
            .await
            .map(|_| ())
    }
    /// Every concurrent value (one when there is no conflict).
    pub async fn get(&self) -> Result<Vec<T>, Error> {
        match self.client.read(&key(&self.key)?).await? {
            None => Ok(Vec::new()),
            Some(ValueView::Values(vs)) => vs.iter().map(dec).collect(),
            other => Err(mismatch(&self.key, "multi-value register", &other)),
        }
    }
}

/// An add-wins set of `T`.
pub struct SetHandle<'a, T> {
    pub(crate) client: &'a Client,
    pub(crate) key: String,
    pub(crate) _t: PhantomData<T>,
}

impl<T: Serialize + DeserializeOwned> SetHandle<'_, T> {
    /// Adds an element.
    pub async fn add(&self, v: &T) -> Result<(), Error> {
        self.client
            .write(vec![(key(&self.key)?, Op::SetAdd(vec![enc(v)?]))])
            .await
            .map(|_| ())
    }
    /// Removes an element (an add concurrent with it wins).
    pub async fn remove(&self, v: &T) -> Result<(), Error> {
        self.client
            .write(vec![(key(&self.key)?, Op::SetRemove(vec![enc(v)?]))])
            .await
            .map(|_| ())
    }
    /// The elements.
    pub async fn get(&self) -> Result<Vec<T>, Error> {
        match self.client.read(&key(&self.key)?).await? {
            None => Ok(Vec::new()),
            Some(ValueView::Set(vs)) => vs.iter().map(dec).collect(),
            other => Err(mismatch(&self.key, "set", &other)),
        }
    }
}

/// A map of typed fields (counters, registers, sets, nested maps).
pub struct MapHandle<'a> {
    pub(crate) client: &'a Client,
    pub(crate) key: String,
}

impl MapHandle<'_> {
    /// Applies `op` to a field (`Op::CounterAdd`, `Op::MvSet`, `Op::SetAdd`,
    /// `Op::SetRemove`, `Op::MapApply`, `Op::MapRemove`, `Op::Delete`).
    pub async fn apply(&self, field: Field, op: Op) -> Result<(), Error> {
        self.client
            .write(vec![(
                key(&self.key)?,
                Op::MapApply {
                    field,
                    op: Box::new(op),
                },
            )])
            .await
            .map(|_| ())
    }
    /// Adds `n` to the counter field `name`.
    pub async fn incr(&self, name: &str, n: i64) -> Result<(), Error> {
        self.apply(Field::new(name, FieldKind::Counter), Op::CounterAdd(n))
            .await
    }
    /// Writes the register field `name`.
    pub async fn set_field<T: Serialize>(&self, name: &str, v: &T) -> Result<(), Error> {
        self.apply(Field::new(name, FieldKind::Register), Op::MvSet(enc(v)?))
            .await
    }
    /// Adds to the set field `name`.
    pub async fn add_to<T: Serialize>(&self, name: &str, v: &T) -> Result<(), Error> {
        self.apply(Field::new(name, FieldKind::Set), Op::SetAdd(vec![enc(v)?]))
            .await
    }
    /// Removes a field (an update concurrent with it keeps the field; for a
    /// counter field, with its node's whole running total: see
    /// [`CounterHandle`]).
    pub async fn remove(&self, field: Field) -> Result<(), Error> {
        self.client
            .write(vec![(key(&self.key)?, Op::MapRemove(field))])
            .await
            .map(|_| ())
    }
    /// The fields and their values (register and set contents stay encoded;
    /// decode them with `rmp_serde`).
    pub async fn get(&self) -> Result<BTreeMap<Field, NestedView>, Error> {
        match self.client.read(&key(&self.key)?).await? {
            None => Ok(BTreeMap::new()),
            Some(ValueView::Map(m)) => Ok(m),
            other => Err(mismatch(&self.key, "map", &other)),
        }
    }
}

/// Operations applied atomically, as one delta-group.
pub struct Batch<'a> {
    pub(crate) client: &'a Client,
    pub(crate) ops: Vec<(Key, Op)>,
    pub(crate) error: Option<Error>,
}

impl Batch<'_> {
    /// Adds an operation.
    pub fn op(mut self, k: &str, op: Op) -> Self {
        match key(k) {
            Ok(k) => self.ops.push((k, op)),
            Err(e) => self.error = self.error.or(Some(e)),
        }
        self
    }
    /// Adds to a counter.
    pub fn incr(self, k: &str, n: i64) -> Self {
        self.op(k, Op::CounterAdd(n))
    }
    /// Writes an LWW register.
    pub fn set<T: Serialize>(mut self, k: &str, v: &T) -> Self {
        match enc(v) {
            Ok(b) => self.op(k, Op::LwwSet(b)),
            Err(e) => {
                self.error = self.error.or(Some(e));
                self
            }
        }
    }
    /// Applies every operation, or none.
    pub async fn commit(self) -> Result<(), Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        self.client.write(self.ops).await.map(|_| ())
    }
}

impl Client {
    /// A counter handle.
    pub fn counter(&self, key: &str) -> CounterHandle<'_> {
        CounterHandle {
            client: self,
            key: key.to_string(),
        }
    }
    /// A last-writer-wins register handle.
    pub fn register<T>(&self, key: &str) -> RegisterHandle<'_, T> {
        RegisterHandle {
            client: self,
            key: key.to_string(),
            _t: PhantomData,
        }
    }
    /// A multi-value register handle.
    pub fn mv_register<T>(&self, key: &str) -> MvRegisterHandle<'_, T> {
        MvRegisterHandle {
            client: self,
            key: key.to_string(),
            _t: PhantomData,
        }
    }
    /// A set handle.
    pub fn set<T>(&self, key: &str) -> SetHandle<'_, T> {
        SetHandle {
            client: self,
            key: key.to_string(),
            _t: PhantomData,
        }
    }
    /// A map handle.
    pub fn map(&self, key: &str) -> MapHandle<'_> {
        MapHandle {
            client: self,
            key: key.to_string(),
        }
    }
    /// Deletes a key (observed-remove: a concurrent write survives).
    pub async fn delete(&self, k: &str) -> Result<(), Error> {
        self.write(vec![(key(k)?, Op::Delete)]).await.map(|_| ())
    }
    /// Starts an atomic batch.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            client: self,
            ops: Vec::new(),
            error: None,
        }
    }
}
