//! Natural JSON for values, as `lattice --json` prints them: what `jq`
//! users expect, not serde's enum shapes.
//!
//! - a counter is a number (a string when it does not fit in 64 bits);
//! - bytes are a string when they are UTF-8, else `{"base64": "..."}`;
//! - an LWW register is its bytes (`null` once deleted);
//! - a multi-value register is an array of its concurrent values (one
//!   element when there is no conflict), a set an array of its elements;
//! - a map is an object of its fields; fields are typed, and two fields of
//!   one name and different types (concurrent creations) are keyed
//!   `NAME#TYPE` (`counter`, `register`, `set`, `map`); a register field is
//!   an array like a multi-value register;
//! - a value created concurrently with different types is
//!   `[{"type": T, "value": V}, ...]` under type `conflict`.
//!
//! [`entry`] gives the object of one key: `{"key", "type", "value"}` and,
//! when known, `"token"` (the causal token, MessagePack in base64: opaque).

use base64::Engine as _;
use lattice_core::crdt::{Bytes, Field, FieldKind, NestedView, ValueView};
use lattice_core::proto::client::CausalToken;
use serde_json::{json, Map, Value as Json};
use std::collections::BTreeMap;

/// Bytes as a string when they are UTF-8, else `{"base64": "..."}`.
pub fn bytes(b: &Bytes) -> Json {
    match std::str::from_utf8(&b.0) {
        Ok(s) => Json::String(s.to_string()),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&b.0) }),
    }
}

fn number(n: i128) -> Json {
    match i64::try_from(n) {
        Ok(n) => Json::from(n),
        Err(_) => Json::String(n.to_string()),
    }
}

/// The type name of a value, as `--json` prints it (`null` when absent).
pub fn type_name(v: &ValueView) -> &'static str {
    match v {
        ValueView::Counter(_) => "counter",
        ValueView::Register(_) => "register",
        ValueView::Values(_) => "mv-register",
        ValueView::Set(_) => "set",
        ValueView::Map(_) => "map",
        ValueView::Conflict(_) => "conflict",
    }
}

/// A value as natural JSON.
pub fn value(v: &ValueView) -> Json {
    match v {
        ValueView::Counter(n) => number(*n),
        ValueView::Register(b) => b.as_ref().map_or(Json::Null, bytes),
        ValueView::Values(vs) | ValueView::Set(vs) => Json::Array(vs.iter().map(bytes).collect()),
        ValueView::Map(fields) => map(fields),
        ValueView::Conflict(parts) => Json::Array(
            parts
                .iter()
                .map(|p| json!({ "type": type_name(p), "value": value(p) }))
                .collect(),
        ),
    }
}

fn field_kind(k: FieldKind) -> &'static str {
    match k {
        FieldKind::Counter => "counter",
        FieldKind::Register => "register",
        FieldKind::Set => "set",
        FieldKind::Map => "map",
    }
}

/// A map's fields as a JSON object (see the module docs for field names).
pub fn map(fields: &BTreeMap<Field, NestedView>) -> Json {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for f in fields.keys() {
        *names.entry(f.name.as_str()).or_default() += 1;
    }
    let mut out = Map::new();
    for (f, v) in fields {
        let name = if names.get(f.name.as_str()).copied().unwrap_or(0) > 1 {
            format!("{}#{}", f.name, field_kind(f.kind))
        } else {
            f.name.clone()
        };
        out.insert(name, nested(v));
    }
    Json::Object(out)
}

/// A map field's value as natural JSON.
pub fn nested(v: &NestedView) -> Json {
    match v {
        NestedView::Counter(n) => number(*n),
        NestedView::Values(vs) | NestedView::Set(vs) => Json::Array(vs.iter().map(bytes).collect()),
        NestedView::Map(fields) => map(fields),
    }
}

/// An opaque causal token as a string.
pub fn token(t: &CausalToken) -> Json {
    match rmp_serde::to_vec(t) {
        Ok(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Err(_) => Json::Null,
    }
}

/// One key's object: `{"key", "type", "value"}` (type and value `null`
/// when absent), and `"token"` when given.
pub fn entry(key: &str, v: Option<&ValueView>, t: Option<&CausalToken>) -> Json {
    let mut o = Map::new();
    o.insert("key".into(), Json::String(key.to_string()));
    o.insert(
        "type".into(),
        v.map_or(Json::Null, |v| Json::String(type_name(v).into())),
    );
    o.insert("value".into(), v.map_or(Json::Null, value));
    if let Some(t) = t {
        o.insert("token".into(), token(t));
    }
    Json::Object(o)
}

/// A change of the change log: its position, key, origin, stamps, op id
/// and delta (as a value: what joined into the key's state; for a
/// counter, the writing replica's new totals).
pub fn logged(l: &lattice_core::log::Logged) -> Json {
    let c = &l.change;
    let delta = c.delta.view();
    json!({
        "partition": l.partition,
        "seq": l.seq,
        "gseq": l.gseq,
        "key": c.key.as_str(),
        "origin": c.origin.0,
        "type": type_name(&delta),
        "delta": value(&delta),
        "op": c.op.map(|o| format!("{:032x}", o.0)),
        "applied_ms": c.applied.wall_ms,
        "written_ms": c.written.map(|w| w.wall_ms),
        "first": c.first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_a_person_would_write_them() {
        let b = |s: &str| Bytes::from(s);
        assert_eq!(value(&ValueView::Counter(-5)), json!(-5));
        assert_eq!(value(&ValueView::Counter(i128::MAX)), json!(i128::MAX.to_string()));
        assert_eq!(value(&ValueView::Register(Some(b("hello")))), json!("hello"));
        assert_eq!(value(&ValueView::Register(None)), Json::Null);
        assert_eq!(
            value(&ValueView::Register(Some(Bytes(vec![0xff, 0x00])))),
            json!({"base64": "/wA="})
        );
        assert_eq!(value(&ValueView::Set(vec![b("a"), b("b")])), json!(["a", "b"]));
        assert_eq!(value(&ValueView::Values(vec![b("x")])), json!(["x"]));
        let mut fields = BTreeMap::new();
        fields.insert(Field::new("n", FieldKind::Counter), NestedView::Counter(2));
        fields.insert(Field::new("n", FieldKind::Set), NestedView::Set(vec![b("s")]));
        fields.insert(
            Field::new("name", FieldKind::Register),
            NestedView::Values(vec![b("al")]),
        );
        assert_eq!(
            value(&ValueView::Map(fields)),
            json!({"n#counter": 2, "n#set": ["s"], "name": ["al"]})
        );
        let clash = ValueView::Conflict(vec![ValueView::Counter(1), ValueView::Set(vec![b("a")])]);
        assert_eq!(
            value(&clash),
            json!([{"type": "counter", "value": 1}, {"type": "set", "value": ["a"]}])
        );
        assert_eq!(
            entry("greeting", Some(&ValueView::Register(Some(b("hello")))), None),
            json!({"key": "greeting", "type": "register", "value": "hello"})
        );
        assert_eq!(
            entry("nope", None, None),
            json!({"key": "nope", "type": null, "value": null})
        );
        let t = entry("k", Some(&ValueView::Counter(1)), Some(&CausalToken::default()));
        assert!(t["token"].is_string(), "{t}");
    }
}
