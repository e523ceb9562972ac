//! The data commands of the RESP listener, each a request (or a few) on the
//! node's one request path (`net::serve`), and its answer as a
//! reply. What maps to what is in the README ("Redis protocol (RESP)").

use super::wire::Reply;
use crate::net::{serve, ClientSession, Inbound, Request};
use lattice_core::crdt::{Bytes, Field, FieldKind, NestedView, Op, ValueView};
use lattice_core::proto::client::{
    CausalToken, ClientError, ErrorKind, OpId, RequestBody, Response, ScanCursor, MAX_ANSWER_FRAME, MGET_MAX_KEYS,
};
use lattice_core::Key;
use std::collections::BTreeMap;

/// The wrong-kind error, worded as Redis words it (clients match on it).
pub(crate) const WRONGTYPE: &str = "Operation against a key holding the wrong kind of value";

/// Keys whose write tokens a connection remembers, so that its reads see
/// its own writes even under `async` durability; past this many the map
/// is cleared (reads then fall back to the flushed state, which holds
/// every write acknowledged under `group` and `sync` durability).
const SEEN_KEYS: usize = 4_096;

/// How long a read waits for this connection's own earlier write.
const OWN_WRITE_WAIT_MS: u64 = 5_000;

/// Most bytes of values one `MGET` answers (its keys are bounded by the
/// argument limit, but each value may take up to the value limit): past
/// this the command answers an error, asking for fewer keys.
pub(crate) const MAX_MGET_BYTES: usize = 2 * MAX_ANSWER_FRAME;

/// What one connection has written: per key, the token of its last write.
#[derive(Default)]
pub(crate) struct Seen(BTreeMap<Key, CausalToken>);

/// One command's access to the node.
pub(crate) struct Ctx<'a> {
    pub inbound: &'a Inbound,
    pub session: &'a ClientSession,
    pub token: &'a str,
    pub conn: u64,
    /// The command's bytes on the wire: what the engine queue charges it.
    pub bytes: usize,
    pub seen: &'a mut Seen,
    /// The node's RESP scan cursors.
    pub cursors: &'a std::sync::Mutex<super::scan::Cursors>,
}

/// A command's outcome short of its reply: the reply to send instead.
type Result<T> = std::result::Result<T, Reply>;

/// The reply to a failed request.
pub(crate) fn error_reply(e: &ClientError) -> Reply {
    match e.kind {
        ErrorKind::TypeMismatch => Reply::error("WRONGTYPE", WRONGTYPE),
        ErrorKind::PolicyDenied => {
            let regions: Vec<&str> = e.regions.iter().map(|r| r.0.as_str()).collect();
            Reply::error(
                "DENIED",
                format!("{} (regions that may serve it: {})", e.message, regions.join(",")),
            )
        }
        ErrorKind::Overloaded => Reply::error("BUSY", format!("{}; retry later", e.message)),
        ErrorKind::Unauthorized => Reply::error("NOAUTH", &e.message),
        // As Redis answers a command outside a user's ACL.
        ErrorKind::PermissionDenied => Reply::error("NOPERM", &e.message),
        ErrorKind::NotCaughtUp => Reply::error("TRYAGAIN", &e.message),
        ErrorKind::Unavailable => Reply::error("ERR", format!("unavailable: {}", e.message)),
        ErrorKind::OutcomeUnknown => Reply::error("ERR", format!("outcome unknown: {}", e.message)),
        _ => Reply::error("ERR", &e.message),
    }
}

fn unexpected(r: &Response) -> Reply {
    tracing::error!(?r, "unexpected answer to a RESP command");
    Reply::error("ERR", "internal error: unexpected answer from the node")
}

/// A RESP key as a Lattice key: UTF-8, non-empty, at most
/// [`lattice_core::MAX_KEY_LEN`] bytes.
pub(crate) fn key(raw: &[u8]) -> Result<Key> {
    let s = std::str::from_utf8(raw).map_err(|_| Reply::error("ERR", "invalid key: keys must be UTF-8"))?;
    Key::new(s).map_err(|e| Reply::error("ERR", e.to_string()))
}

fn field_name(raw: &[u8]) -> Result<String> {
    String::from_utf8(raw.to_vec()).map_err(|_| Reply::error("ERR", "invalid field: hash fields must be UTF-8"))
}

/// An integer argument, as Redis parses one.
pub(crate) fn int(raw: &[u8]) -> Result<i64> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Reply::error("ERR", "value is not an integer or out of range"))
}

fn int_reply(n: i128) -> Reply {
    i64::try_from(n).map_or_else(
        |_| Reply::error("ERR", "the counter is out of the 64-bit range RESP integers have"),
        Reply::Int,
    )
}

/// The value a multi-value register shows: the greatest of its concurrent
/// values in byte order, so every node and every read picks the same one.
fn pick(values: &[Bytes]) -> Option<&Bytes> {
    values.iter().max()
}

/// A view as a Redis string: an LWW register's value, a counter in
/// decimal, or a multi-value register's [`pick`]. `None` if absent,
/// `Err` for another kind.
fn as_string(view: &ValueView) -> Result<Option<Vec<u8>>> {
    match view {
        ValueView::Register(v) => Ok(v.as_ref().map(|b| b.0.clone())),
        ValueView::Counter(0) => Ok(None),
        ValueView::Counter(n) => Ok(Some(n.to_string().into_bytes())),
        ValueView::Values(v) => Ok(pick(v).map(|b| b.0.clone())),
        ValueView::Conflict(views) => views
            .iter()
            .find_map(|v| as_string(v).ok())
            .ok_or_else(|| Reply::error("WRONGTYPE", WRONGTYPE)),
        _ => Err(Reply::error("WRONGTYPE", WRONGTYPE)),
    }
}

/// A view as a set's members (empty if absent).
fn as_set(view: Option<ValueView>) -> Result<Vec<Bytes>> {
    match view {
        None | Some(ValueView::Register(None)) => Ok(Vec::new()),
        Some(ValueView::Set(m)) => Ok(m),
        Some(ValueView::Conflict(views)) => views
            .into_iter()
            .find_map(|v| match v {
                ValueView::Set(m) => Some(m),
                _ => None,
            })
            .ok_or_else(|| Reply::error("WRONGTYPE", WRONGTYPE)),
        Some(_) => Err(Reply::error("WRONGTYPE", WRONGTYPE)),
    }
}

/// A view as a map's fields (empty if absent).
fn as_map(view: Option<ValueView>) -> Result<BTreeMap<Field, NestedView>> {
    match view {
        None | Some(ValueView::Register(None)) => Ok(BTreeMap::new()),
        Some(ValueView::Map(m)) => Ok(m),
        Some(ValueView::Conflict(views)) => views
            .into_iter()
            .find_map(|v| match v {
                ValueView::Map(m) => Some(m),
                _ => None,
            })
            .ok_or_else(|| Reply::error("WRONGTYPE", WRONGTYPE)),
        Some(_) => Err(Reply::error("WRONGTYPE", WRONGTYPE)),
    }
}

/// A hash field as Redis shows it: a register field's [`pick`], or a
/// counter field in decimal (a name with both kinds shows the register).
fn hash_field(map: &BTreeMap<Field, NestedView>, name: &str) -> Option<Vec<u8>> {
    let register = map.get(&Field::new(name, FieldKind::Register)).and_then(|v| match v {
        NestedView::Values(v) => pick(v).map(|b| b.0.clone()),
        _ => None,
    });
    register.or_else(|| match map.get(&Field::new(name, FieldKind::Counter)) {
        Some(NestedView::Counter(n)) => Some(n.to_string().into_bytes()),
        _ => None,
    })
}

/// The Redis type name of a view. What a delete leaves is `none`: a
/// tombstoned register, an empty set or hash, and a counter at 0 (a
/// deleted counter is reset to 0, and the view keeps no difference, so a
/// counter decremented to 0 reads as absent too).
pub(crate) fn type_name(view: Option<&ValueView>) -> &'static str {
    match view {
        None | Some(ValueView::Register(None) | ValueView::Counter(0)) => "none",
        Some(ValueView::Set(m)) if m.is_empty() => "none",
        Some(ValueView::Map(m)) if m.is_empty() => "none",
        Some(ValueView::Register(_) | ValueView::Counter(_) | ValueView::Values(_)) => "string",
        Some(ValueView::Set(_)) => "set",
        Some(ValueView::Map(_)) => "hash",
        Some(ValueView::Conflict(v)) => type_name(v.first()),
    }
}

fn exists(view: Option<&ValueView>) -> bool {
    type_name(view) != "none"
}

impl Ctx<'_> {
    async fn call(&mut self, body: RequestBody) -> Response {
        let meta = Request {
            bytes: self.bytes,
            conn: self.conn,
        };
        serve(self.token, body, meta, self.inbound, self.session).await
    }

    /// A key's value; after this connection's own last write of it.
    pub(crate) async fn read(&mut self, key: &Key) -> Result<Option<ValueView>> {
        let after = self.seen.0.get(key).cloned();
        let wait_ms = if after.is_some() { OWN_WRITE_WAIT_MS } else { 0 };
        let body = RequestBody::Read {
            key: key.clone(),
            after,
            wait_ms,
        };
        match self.call(body).await {
            Response::Value { value, .. } => Ok(value),
            Response::Error(e) => Err(error_reply(&e)),
            r => Err(unexpected(&r)),
        }
    }

    /// Applies `ops` atomically (one delta-group), acknowledged once durable
    /// on this node.
    pub(crate) async fn write(&mut self, ops: Vec<(Key, Op)>) -> Result<()> {
        let body = RequestBody::Write {
            op_id: OpId(rand::random()),
            retry: false,
            ops,
            concern: Default::default(),
            timeout_ms: 0,
        };
        match self.call(body).await {
            Response::Written { keys, .. } => {
                if self.seen.0.len() + keys.len() > SEEN_KEYS {
                    self.seen.0.clear();
                }
                self.seen.0.extend(keys);
                Ok(())
            }
            Response::Error(e) => Err(error_reply(&e)),
            r => Err(unexpected(&r)),
        }
    }

    /// Runs a data command (`name` upper-cased; `args` after it). `None`
    /// if `name` is not one.
    pub(crate) async fn run(&mut self, name: &str, args: &[Vec<u8>]) -> Option<Reply> {
        let arity = |ok: bool| {
            (!ok).then(|| {
                Reply::error(
                    "ERR",
                    format!("wrong number of arguments for '{}' command", name.to_ascii_lowercase()),
                )
            })
        };
        let checked = match name {
            "GET" | "TYPE" | "SMEMBERS" | "SCARD" | "HGETALL" | "INCR" | "DECR" => arity(args.len() == 1),
            "SET" | "INCRBY" | "DECRBY" | "SISMEMBER" | "HGET" => arity(args.len() == 2),
            "HINCRBY" => arity(args.len() == 3),
            "DEL" | "EXISTS" | "MGET" | "SCAN" => arity(!args.is_empty()),
            "SADD" | "SREM" | "HDEL" => arity(args.len() >= 2),
            "MSET" => arity(!args.is_empty() && args.len() % 2 == 0),
            "HSET" => arity(args.len() >= 3 && args.len() % 2 == 1),
            _ => return None,
        };
        if let Some(e) = checked {
            return Some(e);
        }
        let reply = match name {
            "GET" => self.get(&args[0]).await,
            "SET" => self.set(&args[0], &args[1]).await,
            "MGET" => self.mget(args).await,
            "SCAN" => self.scan(args).await,
            "MSET" => self.mset(args).await,
            "INCR" => self.incr(&args[0], 1).await,
            "DECR" => self.incr(&args[0], -1).await,
            "INCRBY" => match int(&args[1]) {
                Ok(n) => self.incr(&args[0], n).await,
                Err(e) => Err(e),
            },
            "DECRBY" => match int(&args[1]).and_then(|n| {
                n.checked_neg()
                    .ok_or_else(|| Reply::error("ERR", "decrement would overflow"))
            }) {
                Ok(n) => self.incr(&args[0], n).await,
                Err(e) => Err(e),
            },
            "DEL" => self.del(args).await,
            "EXISTS" => self.exists(args).await,
            "TYPE" => self.type_of(&args[0]).await,
            "SADD" => self.sadd(&args[0], &args[1..]).await,
            "SREM" => self.srem(&args[0], &args[1..]).await,
            "SMEMBERS" => self.smembers(&args[0]).await,
            "SISMEMBER" => self.sismember(&args[0], &args[1]).await,
            "SCARD" => self.scard(&args[0]).await,
            "HSET" => self.hset(&args[0], &args[1..]).await,
            "HGET" => self.hget(&args[0], &args[1]).await,
            "HGETALL" => self.hgetall(&args[0]).await,
            "HDEL" => self.hdel(&args[0], &args[1..]).await,
            "HINCRBY" => match int(&args[2]) {
                Ok(n) => self.hincrby(&args[0], &args[1], n).await,
                Err(e) => Err(e),
            },
            _ => return None,
        };
        Some(reply.unwrap_or_else(|e| e))
    }

    async fn get(&mut self, k: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        match self.read(&k).await? {
            None => Ok(Reply::Null),
            Some(v) => Ok(as_string(&v)?.map_or(Reply::Null, Reply::Bulk)),
        }
    }

    async fn set(&mut self, k: &[u8], v: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        self.write(vec![(k, Op::LwwSet(Bytes(v.to_vec())))]).await?;
        Ok(Reply::ok())
    }

    /// One native `MGet` per 1,000 keys, each key with this connection's
    /// token for it. A key the native answer could not carry (too large to
    /// share it, or not caught up in time) is read alone; one the policy
    /// keeps from this region fails the command with `-DENIED`. As in
    /// Redis, a key of another kind reads as nil.
    async fn mget(&mut self, raw: &[Vec<u8>]) -> Result<Reply> {
        let keys = raw.iter().map(|k| key(k)).collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        for chunk in keys.chunks(MGET_MAX_KEYS) {
            let asked: Vec<(Key, Option<CausalToken>)> =
                chunk.iter().map(|k| (k.clone(), self.seen.0.get(k).cloned())).collect();
            let wait_ms = if asked.iter().any(|(_, t)| t.is_some()) {
                OWN_WRITE_WAIT_MS
            } else {
                0
            };
            let entries = match self.call(RequestBody::MGet { keys: asked, wait_ms }).await {
                Response::Values(entries) if entries.len() == chunk.len() => entries,
                Response::Error(e) => return Err(error_reply(&e)),
                r => return Err(unexpected(&r)),
            };
            for entry in entries {
                let value = match entry.error {
                    None => entry.value,
                    Some(e) if e.kind == ErrorKind::PolicyDenied => return Err(error_reply(&e)),
                    Some(_) => self.read(&entry.key).await?,
                };
                let reply = match value.as_ref().map(as_string) {
                    Some(Ok(Some(b))) => {
                        bytes += b.len();
                        Reply::Bulk(b)
                    }
                    _ => Reply::Null,
                };
                if bytes > MAX_MGET_BYTES {
                    return Err(Reply::error(
                        "ERR",
                        format!(
                            "the MGET answer would hold more than {MAX_MGET_BYTES} bytes of values: ask for fewer keys"
                        ),
                    ));
                }
                out.push(reply);
            }
        }
        Ok(Reply::Array(out))
    }

    /// `SCAN cursor [MATCH pattern] [COUNT n]`: one native scan page of the
    /// pattern's literal prefix (at most `COUNT` keys, examining a bounded
    /// number), filtered by the whole pattern here. The cursor answered
    /// stands for the native one on this node ([`super::scan::Cursors`]);
    /// a page may be empty while the cursor is not `0`.
    async fn scan(&mut self, args: &[Vec<u8>]) -> Result<Reply> {
        let a = super::scan::parse(args)?;
        let native = match a.cursor {
            None => None,
            Some(id) => match self.cursors.lock().ok().and_then(|c| c.get(id)) {
                Some(native) => Some(ScanCursor(native)),
                None => {
                    return Err(Reply::error(
                        "ERR",
                        "invalid cursor: unknown to this node, or forgotten (start the scan again at 0)",
                    ))
                }
            },
        };
        let body = RequestBody::Scan {
            prefix: a.prefix,
            cursor: native,
            limit: u32::try_from(a.count).unwrap_or(u32::MAX),
            values: false,
        };
        let (entries, cursor) = match self.call(body).await {
            Response::Scanned { entries, cursor } => (entries, cursor),
            Response::Error(e) => return Err(error_reply(&e)),
            r => return Err(unexpected(&r)),
        };
        let keys = entries
            .into_iter()
            .map(|e| e.key.as_str().as_bytes().to_vec())
            .filter(|k| a.pattern.as_ref().is_none_or(|p| super::scan::glob(p, k)))
            .map(Reply::Bulk)
            .collect();
        let cursor = match cursor {
            None => 0,
            Some(native) => match self.cursors.lock() {
                Ok(mut c) => c.keep(native.0),
                Err(_) => return Err(Reply::error("ERR", "internal error: the scan cursors are unavailable")),
            },
        };
        Ok(Reply::Array(vec![Reply::text(cursor.to_string()), Reply::Array(keys)]))
    }

    async fn mset(&mut self, pairs: &[Vec<u8>]) -> Result<Reply> {
        let ops = pairs
            .chunks(2)
            .map(|p| Ok((key(&p[0])?, Op::LwwSet(Bytes(p[1].clone())))))
            .collect::<Result<Vec<_>>>()?;
        self.write(ops).await?;
        Ok(Reply::ok())
    }

    /// Adds `by` and answers the counter's value after the write (which may
    /// include concurrent additions from other regions already merged here).
    async fn incr(&mut self, k: &[u8], by: i64) -> Result<Reply> {
        let k = key(k)?;
        self.write(vec![(k.clone(), Op::CounterAdd(by))]).await?;
        match self.read(&k).await? {
            Some(ValueView::Counter(n)) => Ok(int_reply(n)),
            _ => Err(Reply::error("WRONGTYPE", WRONGTYPE)),
        }
    }

    async fn del(&mut self, keys: &[Vec<u8>]) -> Result<Reply> {
        let mut deleted = 0;
        for k in keys {
            let k = key(k)?;
            if !exists(self.read(&k).await?.as_ref()) {
                continue;
            }
            match self.write(vec![(k, Op::Delete)]).await {
                Ok(()) => deleted += 1,
                // Deleted meanwhile (by another client or region).
                Err(Reply::Error(e)) if e.contains("not found") || e.contains("absent") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Reply::Int(deleted))
    }

    async fn exists(&mut self, keys: &[Vec<u8>]) -> Result<Reply> {
        let mut n = 0;
        for k in keys {
            let k = key(k)?;
            if exists(self.read(&k).await?.as_ref()) {
                n += 1;
            }
        }
        Ok(Reply::Int(n))
    }

    async fn type_of(&mut self, k: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        let v = self.read(&k).await?;
        Ok(Reply::Simple(type_name(v.as_ref()).into()))
    }

    /// Answers the members that were not in the set as this node had it
    /// just before the write.
    async fn sadd(&mut self, k: &[u8], members: &[Vec<u8>]) -> Result<Reply> {
        let k = key(k)?;
        let before = as_set(self.read(&k).await?)?;
        let added: std::collections::BTreeSet<&[u8]> = members
            .iter()
            .map(Vec::as_slice)
            .filter(|m| !before.iter().any(|b| b.as_slice() == *m))
            .collect();
        let ops = Op::SetAdd(members.iter().map(|m| Bytes(m.clone())).collect());
        self.write(vec![(k, ops)]).await?;
        Ok(Reply::Int(added.len() as i64))
    }

    async fn srem(&mut self, k: &[u8], members: &[Vec<u8>]) -> Result<Reply> {
        let k = key(k)?;
        let before = as_set(self.read(&k).await?)?;
        let present: std::collections::BTreeSet<&[u8]> = members
            .iter()
            .map(Vec::as_slice)
            .filter(|m| before.iter().any(|b| b.as_slice() == *m))
            .collect();
        if present.is_empty() {
            return Ok(Reply::Int(0));
        }
        let op = Op::SetRemove(present.iter().map(|m| Bytes(m.to_vec())).collect());
        self.write(vec![(k, op)]).await?;
        Ok(Reply::Int(present.len() as i64))
    }

    async fn smembers(&mut self, k: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        let members = as_set(self.read(&k).await?)?;
        Ok(Reply::Set(members.into_iter().map(|m| Reply::Bulk(m.0)).collect()))
    }

    async fn sismember(&mut self, k: &[u8], m: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        let members = as_set(self.read(&k).await?)?;
        Ok(Reply::Int(members.iter().any(|b| b.as_slice() == m).into()))
    }

    async fn scard(&mut self, k: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        Ok(Reply::Int(as_set(self.read(&k).await?)?.len() as i64))
    }

    /// Answers the fields that were not in the hash as this node had it
    /// just before the write.
    async fn hset(&mut self, k: &[u8], pairs: &[Vec<u8>]) -> Result<Reply> {
        let k = key(k)?;
        let before = as_map(self.read(&k).await?)?;
        let mut ops = Vec::with_capacity(pairs.len() / 2);
        let mut new = std::collections::BTreeSet::new();
        for p in pairs.chunks(2) {
            let name = field_name(&p[0])?;
            if hash_field(&before, &name).is_none() {
                new.insert(name.clone());
            }
            let field = Field::new(name, FieldKind::Register);
            let op = Box::new(Op::MvSet(Bytes(p[1].clone())));
            ops.push((k.clone(), Op::MapApply { field, op }));
        }
        self.write(ops).await?;
        Ok(Reply::Int(new.len() as i64))
    }

    async fn hget(&mut self, k: &[u8], f: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        let name = field_name(f)?;
        let map = as_map(self.read(&k).await?)?;
        Ok(hash_field(&map, &name).map_or(Reply::Null, Reply::Bulk))
    }

    async fn hgetall(&mut self, k: &[u8]) -> Result<Reply> {
        let k = key(k)?;
        let map = as_map(self.read(&k).await?)?;
        let names: std::collections::BTreeSet<&str> = map.keys().map(|f| f.name.as_str()).collect();
        let pairs = names
            .into_iter()
            .filter_map(|n| hash_field(&map, n).map(|v| (Reply::text(n), Reply::Bulk(v))))
            .collect();
        Ok(Reply::Map(pairs))
    }

    async fn hdel(&mut self, k: &[u8], fields: &[Vec<u8>]) -> Result<Reply> {
        let k = key(k)?;
        let map = as_map(self.read(&k).await?)?;
        let mut ops = Vec::new();
        let mut removed = std::collections::BTreeSet::new();
        for f in fields {
            let name = field_name(f)?;
            for kind in [FieldKind::Register, FieldKind::Counter] {
                let field = Field::new(name.clone(), kind);
                if map.contains_key(&field) && removed.insert(field.clone()) {
                    ops.push((k.clone(), Op::MapRemove(field)));
                }
            }
        }
        if ops.is_empty() {
            return Ok(Reply::Int(0));
        }
        let names: std::collections::BTreeSet<&String> = removed.iter().map(|f| &f.name).collect();
        let n = names.len() as i64;
        self.write(ops).await?;
        Ok(Reply::Int(n))
    }

    async fn hincrby(&mut self, k: &[u8], f: &[u8], by: i64) -> Result<Reply> {
        let k = key(k)?;
        let field = Field::new(field_name(f)?, FieldKind::Counter);
        let op = Op::MapApply {
            field: field.clone(),
            op: Box::new(Op::CounterAdd(by)),
        };
        self.write(vec![(k.clone(), op)]).await?;
        match as_map(self.read(&k).await?)?.get(&field) {
            Some(NestedView::Counter(n)) => Ok(int_reply(*n)),
            _ => Err(Reply::error("ERR", "the field vanished after the increment")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_field_shows_its_greatest_value() {
        let mut map = BTreeMap::new();
        map.insert(
            Field::new("f", FieldKind::Register),
            NestedView::Values(vec![Bytes(b"b".to_vec()), Bytes(b"a".to_vec())]),
        );
        map.insert(Field::new("c", FieldKind::Counter), NestedView::Counter(-3));
        assert_eq!(hash_field(&map, "f"), Some(b"b".to_vec()));
        assert_eq!(hash_field(&map, "c"), Some(b"-3".to_vec()));
        assert_eq!(hash_field(&map, "x"), None);
    }

    #[test]
    fn kinds_have_redis_type_names() {
        assert_eq!(type_name(None), "none");
        assert_eq!(type_name(Some(&ValueView::Register(None))), "none");
        assert_eq!(type_name(Some(&ValueView::Counter(1))), "string");
        assert_eq!(type_name(Some(&ValueView::Set(vec![Bytes(b"x".to_vec())]))), "set");
        assert_eq!(type_name(Some(&ValueView::Set(vec![]))), "none");
        assert_eq!(type_name(Some(&ValueView::Map(BTreeMap::new()))), "none");
        assert!(as_string(&ValueView::Set(vec![])).is_err());
        assert_eq!(as_string(&ValueView::Counter(7)), Ok(Some(b"7".to_vec())));
        // What deletes leave reads as absent.
        assert_eq!(type_name(Some(&ValueView::Counter(0))), "none");
        assert_eq!(as_string(&ValueView::Counter(0)), Ok(None));
    }

    #[test]
    fn keys_are_checked() {
        assert!(key(b"ok").is_ok());
        assert!(key(b"").is_err());
        assert!(key(&[0xff, 0xfe]).is_err());
        assert!(key(&vec![b'k'; lattice_core::MAX_KEY_LEN + 1]).is_err());
    }
}
