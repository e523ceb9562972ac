//! Serde round-trips of every CRDT type through MessagePack (rmp-serde),
//! and the robustness of decoding: truncated input is an error, corrupted
//! input is an error or a valid value (never a panic), and the frame codec
//! of `lattice_core::proto` enforces its version, size and validity checks.

// Clippy's `allow-unwrap-in-tests` covers `#[test]` functions only, not
// the helpers of an integration test crate.
#![allow(clippy::unwrap_used)]

use lattice_core::clock::{CausalContext, Dot, HlcTimestamp, ReplicaId, VersionVector};
use lattice_core::crdt::{
    Bytes, CCounter, Causal, Crdt, DotMap, DotSet, DotStore, Field, FieldKind, GCounter, LwwRegister, MvRegister, Op,
    OrMap, OrSet, PNCounter, Value, WriteStamp,
};
use lattice_core::proto::{self, Ack, Message, PolicyStamp, Section, FRAME_CHECK_BYTES, PEER_PROTOCOL_VERSION};
use lattice_core::{Error, Key};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Debug;

const LIMIT: usize = proto::DEFAULT_MAX_MESSAGE_BYTES;
const SEED: u64 = 0xc0de_c5ee;

fn config(cases: u32) -> ProptestConfig {
    // Deterministic: a fixed seed and case count unless PROPTEST_RNG_SEED or
    // PROPTEST_CASES say otherwise (to explore further); no regression files.
    let base = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            base.cases
        } else {
            cases
        },
        rng_seed: match base.rng_seed {
            RngSeed::Random => RngSeed::Fixed(SEED),
            fixed => fixed,
        },
        failure_persistence: None,
        ..base
    }
}

// ------------------------------------------------------ reachable states

/// A script of `(replica, code, argument)`: codes below `MERGE` are
/// operations, the others merge the replica's state into the next one.
type Script = Vec<(usize, u8, u8)>;
const MERGE: u8 = 13;

fn script() -> impl Strategy<Value = Script> {
    proptest::collection::vec((0..3usize, 0..MERGE + 3, 0u8..8), 0..30)
}

/// Runs a script on three replicas; returns the final states and the last
/// few deltas (all reachable states).
fn run<S: Crdt>(script: &Script, mutate: impl Fn(Option<&S>, ReplicaId, u8, u8) -> Option<S>) -> Vec<S> {
    let mut states: Vec<Option<S>> = vec![None, None, None];
    let mut deltas = Vec::new();
    for &(at, code, arg) in script {
        if code >= MERGE {
            if let Some(s) = states[at].clone() {
                let to = (at + 1) % 3;
                match &mut states[to] {
                    Some(t) => t.join(&s),
                    None => states[to] = Some(s),
                }
            }
            continue;
        }
        if let Some(d) = mutate(states[at].as_ref(), ReplicaId(at as u64 + 1), code, arg) {
            match &mut states[at] {
                Some(s) => s.join(&d),
                None => states[at] = Some(d.clone()),
            }
            deltas.push(d);
        }
    }
    let n = deltas.len();
    states
        .into_iter()
        .flatten()
        .chain(deltas.into_iter().skip(n.saturating_sub(3)))
        .collect()
}

fn elem(arg: u8) -> Bytes {
    Bytes(vec![b'a' + arg % 4])
}

fn gcounters(s: &Script) -> Vec<GCounter> {
    run(s, |c: Option<&GCounter>, r, code, arg| {
        let n = if code == 0 { u64::MAX } else { u64::from(arg) };
        Some(c.cloned().unwrap_or_default().inc(r, n))
    })
}

fn pncounters(s: &Script) -> Vec<PNCounter> {
    run(s, |c: Option<&PNCounter>, r, code, arg| {
        let n = if code == 0 { i64::MIN } else { i64::from(arg) - 4 };
        Some(c.cloned().unwrap_or_default().add(r, n))
    })
}

fn ccounters(s: &Script) -> Vec<CCounter> {
    run(s, |c: Option<&CCounter>, r, code, arg| {
        let c = c.cloned().unwrap_or_default();
        if code % 4 == 0 {
            Some(c.reset())
        } else {
            c.try_add(r, i64::from(arg) - 4)
        }
    })
}

fn lwws(s: &Script) -> Vec<LwwRegister<u8>> {
    run(s, |c: Option<&LwwRegister<u8>>, r, code, arg| {
        let c = c.cloned().unwrap_or_default();
        let t = HlcTimestamp {
            wall_ms: u64::from(code),
            logical: u32::from(arg),
        };
        Some(c.set(c.stamp_after(t), r, arg))
    })
}

fn lww_bytes(s: &Script) -> Vec<LwwRegister<Bytes>> {
    run(s, |c: Option<&LwwRegister<Bytes>>, r, code, arg| {
        let c = c.cloned().unwrap_or_default();
        let t = HlcTimestamp {
            wall_ms: u64::MAX - u64::from(code),
            logical: u32::MAX - u32::from(arg),
        };
        Some(c.set(c.stamp_after(t), r, Bytes(vec![arg; usize::from(code)])))
    })
}

fn mvregs(s: &Script) -> Vec<MvRegister<u8>> {
    run(s, |c: Option<&MvRegister<u8>>, r, code, arg| {
        let c = c.cloned().unwrap_or_default();
        Some(if code % 5 == 0 { c.clear() } else { c.write(r, arg) })
    })
}

fn orsets(s: &Script) -> Vec<OrSet<u8>> {
    run(s, |c: Option<&OrSet<u8>>, r, code, arg| {
        let c = c.cloned().unwrap_or_default();
        Some(match code % 6 {
            0 => c.clear(),
            1 | 2 => c.remove(&(arg % 4)),
            _ => c.add(r, arg % 4),
        })
    })
}

type MapOfSets = OrMap<u8, DotMap<u8, DotSet>>;

fn ormaps(s: &Script) -> Vec<MapOfSets> {
    run(s, |m: Option<&MapOfSets>, r, code, arg| {
        let m = m.cloned().unwrap_or_default();
        let key = code % 3;
        Some(match code % 5 {
            0 => m.remove(&key),
            1 => m.update(key, |set, _| {
                let mut dots: Vec<Dot> = Vec::new();
                if let Some(d) = set.get(&(arg % 3)) {
                    d.for_each_dot(&mut |dot| dots.push(dot));
                }
                Causal::from_parts(DotMap::empty(), CausalContext::from_dots(dots))
            }),
            _ => m.update(key, |set, ctx| OrSet::<u8>::add_to(set, ctx, r, arg % 3)),
        })
    })
}

/// An operation on a keyspace value, from a code and an argument: every
/// kind, nested maps and deletes.
fn value_op(code: u8, arg: u8) -> Op {
    let field = |name: &str, kind| Field::new(name, kind);
    match code {
        0 => Op::GCounterInc(u64::from(arg)),
        1 => Op::PnCounterAdd(i64::from(arg) - 4),
        2 => Op::CounterAdd(i64::from(arg) - 4),
        3 => Op::LwwSet(elem(arg)),
        4 => Op::MvSet(elem(arg)),
        5 => Op::SetAdd(vec![elem(arg), elem(arg + 1)]),
        6 => Op::SetRemove(vec![elem(arg)]),
        7 => Op::MapApply {
            field: field("n", FieldKind::Counter),
            op: Box::new(Op::CounterAdd(i64::from(arg))),
        },
        8 => Op::MapApply {
            field: field("s", FieldKind::Set),
            op: Box::new(Op::SetAdd(vec![elem(arg)])),
        },
        9 => Op::MapApply {
            field: field("m", FieldKind::Map),
            op: Box::new(Op::MapApply {
                field: field("r", FieldKind::Register),
                op: Box::new(if arg % 3 == 0 { Op::Delete } else { Op::MvSet(elem(arg)) }),
            }),
        },
        10 => Op::MapRemove(field(if arg % 2 == 0 { "s" } else { "m" }, FieldKind::Set)),
        11 => Op::MapApply {
            field: field("s", FieldKind::Set),
            op: Box::new(Op::SetRemove(vec![elem(arg)])),
        },
        _ => Op::Delete,
    }
}

fn values(s: &Script) -> Vec<Value> {
    run(s, |v: Option<&Value>, r, code, arg| {
        let stamp = WriteStamp {
            replica: r,
            time: HlcTimestamp {
                wall_ms: u64::from(code),
                logical: 0,
            },
        };
        // Refused operations (type mismatches, ...) produce no delta.
        Value::apply(v, &value_op(code, arg), stamp).ok()
    })
}

fn key(i: usize) -> Key {
    Key::new(format!("key-{i}")).unwrap()
}

/// A `Message::Delta` carrying `entries` (the one place that names the
/// fields of that variant).
fn delta_message(entries: Vec<(Key, Value)>) -> Message {
    Message::Delta {
        sender: ReplicaId(u64::MAX),
        base_from: Some(ReplicaId(5)),
        time: HlcTimestamp {
            wall_ms: 1_700_000_000_000,
            logical: 3,
        },
        policy: PolicyStamp { version: 7, digest: 11 },
        sections: vec![Section {
            class: 1,
            base: 1,
            from: 2,
            to: 3,
            entries: entries.into_iter().map(|(k, v)| (k, v.into())).collect(),
            written: None,
        }],
        ack: Some(Ack {
            replica: ReplicaId(9),
            from: ReplicaId(8),
            upto: [42, 41, 40],
        }),
    }
}

/// Frames: the script's values as a delta, and an acknowledgement.
fn messages(s: &Script) -> Vec<Message> {
    let entries: Vec<(Key, Value)> = values(s).into_iter().enumerate().map(|(i, v)| (key(i), v)).collect();
    vec![
        delta_message(entries),
        Message::Ack(Ack {
            replica: ReplicaId(9),
            from: ReplicaId(8),
            upto: [42, 0, 7],
        }),
    ]
}

/// Byte positions and non-zero masks to xor there: mostly single bits,
/// which keep the structure intact more often and so reach deeper checks.
fn flips() -> impl Strategy<Value = Vec<(Index, u8)>> {
    let mask = prop_oneof![3 => (0u32..8).prop_map(|b| 1u8 << b), 1 => 1u8..=255];
    proptest::collection::vec((any::<Index>(), mask), 1..3)
}

// ------------------------------------------------------------- round trips

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(x: &T) -> Result<(), TestCaseError> {
    let bytes = proto::to_bytes(x).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        &proto::from_bytes::<T>(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?,
        x
    );
    // rmp-serde directly: compact (arrays) and named (maps) encodings.
    prop_assert_eq!(&rmp_serde::to_vec(x).unwrap(), &bytes);
    prop_assert_eq!(&rmp_serde::from_slice::<T>(&bytes).unwrap(), x);
    let named = rmp_serde::to_vec_named(x).unwrap();
    prop_assert_eq!(&rmp_serde::from_slice::<T>(&named).unwrap(), x);
    prop_assert_eq!(
        &proto::from_bytes::<T>(&named).map_err(|e| TestCaseError::fail(e.to_string()))?,
        x
    );
    // The encoding is deterministic (equal states encode equally).
    prop_assert_eq!(proto::to_bytes(&x).unwrap(), bytes);
    Ok(())
}

fn roundtrip_all<T: Serialize + DeserializeOwned + PartialEq + Debug>(xs: &[T]) -> Result<(), TestCaseError> {
    xs.iter().try_for_each(roundtrip)
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn every_type_round_trips(s in script()) {
        roundtrip_all(&gcounters(&s))?;
        roundtrip_all(&pncounters(&s))?;
        roundtrip_all(&ccounters(&s))?;
        roundtrip_all(&lwws(&s))?;
        roundtrip_all(&lww_bytes(&s))?;
        roundtrip_all(&mvregs(&s))?;
        roundtrip_all(&orsets(&s))?;
        roundtrip_all(&ormaps(&s))?;
        let vs = values(&s);
        roundtrip_all(&vs)?;
        for v in &vs {
            prop_assert!(v.is_well_formed());
            // The parts the value is made of.
            if let Value::Map(m) = v {
                roundtrip(m.causal().context())?;
                roundtrip(&m.causal().context().version_vector())?;
            }
        }
        for m in messages(&s) {
            roundtrip(&m)?;
            let frame = proto::encode(&m).unwrap();
            prop_assert_eq!(frame[0], PEER_PROTOCOL_VERSION);
            prop_assert_eq!(proto::decode(&frame, LIMIT).unwrap(), m);
        }
    }

    /// Every strict prefix of an encoding is an error (MessagePack values
    /// are self-delimiting), for values and for frames.
    #[test]
    fn truncated_encodings_are_errors(s in script()) {
        fn prefixes<T: Serialize + DeserializeOwned + Debug>(xs: &[T]) -> Result<(), TestCaseError> {
            for x in xs {
                let bytes = proto::to_bytes(x).unwrap();
                for n in 0..bytes.len() {
                    let r = proto::from_bytes::<T>(&bytes[..n]);
                    prop_assert!(matches!(r, Err(Error::Codec(_))), "prefix {n} of {x:?} gave {r:?}");
                }
            }
            Ok(())
        }
        prefixes(&values(&s))?;
        prefixes(&ccounters(&s))?;
        prefixes(&orsets(&s))?;
        prefixes(&ormaps(&s))?;
        prefixes(&lww_bytes(&s))?;
        for m in messages(&s).into_iter().take(2) {
            let frame = proto::encode(&m).unwrap();
            for n in 0..frame.len() {
                prop_assert!(proto::decode(&frame[..n], LIMIT).is_err(), "prefix {n} of a {} frame decoded", m.kind());
            }
        }
    }

    /// Any single flipped bit in a frame, anywhere, is refused: as
    /// `CorruptFrame` (counted by the engine), or as `UnknownVersion` when
    /// it hits the version byte.
    #[test]
    fn a_frame_with_one_flipped_bit_is_refused(
        s in script(),
        which in prop_oneof![3 => Just(0usize), 1 => Just(1usize)],
        bit in any::<Index>(),
    ) {
        let msgs = messages(&s);
        let mut frame = proto::encode(&msgs[which]).unwrap();
        let bit = bit.index(frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        let r = proto::decode(&frame, LIMIT);
        if bit < 8 {
            prop_assert_eq!(r, Err(Error::UnknownVersion(frame[0])));
        } else {
            prop_assert_eq!(r, Err(Error::CorruptFrame { len: frame.len() }));
        }
    }

    /// Random byte flips in a body that still carries a valid check (as a
    /// bug in a sender, or memory corruption before the check was made,
    /// would produce) give an error or a value; a value that `decode`
    /// accepts is well-formed, re-encodes, and joins like any other.
    #[test]
    fn corrupted_frames_never_panic(
        s in script(),
        which in prop_oneof![3 => Just(0usize), 1 => Just(1usize)],
        flips in flips(),
    ) {
        let msgs = messages(&s);
        let original = &msgs[which];
        let mut body = proto::encode(original).unwrap()[1 + FRAME_CHECK_BYTES..].to_vec();
        for (i, x) in &flips {
            let i = i.index(body.len());
            body[i] ^= x;
        }
        let frame = proto::seal(&body);
        if let Ok(m) = proto::decode(&frame, LIMIT) {
            let lists = m.entry_lists();
            if lists.is_empty() {
                prop_assert_eq!(proto::decode(&proto::encode(&m).unwrap(), LIMIT).unwrap(), m);
                return Ok(());
            };
            let local = values(&s);
            for (k, v) in lists.into_iter().flatten() {
                prop_assert!(k.is_valid() && v.is_well_formed(), "decode accepted a malformed entry {k:?} {v:?}");
                // A validated value joins with reachable ones into a valid state.
                for l in &local {
                    let mut j = l.clone();
                    j.join(v);
                    prop_assert!(j.is_well_formed(), "{l:?} ⊔ {v:?} = {j:?}");
                    let mut j2 = v.clone();
                    j2.join(l);
                    prop_assert_eq!(j2, j);
                }
            }
            prop_assert_eq!(proto::decode(&proto::encode(&m).unwrap(), LIMIT).unwrap(), m);
        }
    }

    /// The same for bare values decoded with `from_bytes`: no panic, and
    /// the validity check decides whether the value may be used.
    #[test]
    fn corrupted_values_never_panic(
        s in script(),
        flips in flips(),
    ) {
        fn corrupt<T: Serialize + DeserializeOwned>(x: &T, flips: &[(Index, u8)]) -> Option<T> {
            let mut bytes = proto::to_bytes(x).unwrap();
            for (i, f) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= f;
            }
            proto::from_bytes::<T>(&bytes).ok()
        }
        let vs = values(&s);
        for v in &vs {
            if let Some(c) = corrupt(v, &flips) {
                let _ = c.view();
                if c.is_well_formed() {
                    let mut j = v.clone();
                    j.join(&c);
                    prop_assert!(j.is_well_formed());
                    let _ = j.novel(v);
                    let _ = v.novel(&c);
                }
            }
        }
        for c in orsets(&s).iter().filter_map(|x| corrupt(x, &flips)) {
            let _ = c.causal().is_well_formed();
        }
        for c in ccounters(&s).iter().filter_map(|x| corrupt(x, &flips)) {
            let _ = (c.value(), c.causal().is_well_formed());
        }
        for c in gcounters(&s).iter().filter_map(|x| corrupt(x, &flips)) {
            let _ = c.value();
        }
        for c in pncounters(&s).iter().filter_map(|x| corrupt(x, &flips)) {
            let _ = c.value();
        }
        for c in lww_bytes(&s).iter().filter_map(|x| corrupt(x, &flips)) {
            let _ = c.get();
        }
    }
}

// ------------------------------------------------------------- the frame

/// A frame with values of every kind, nested maps and a conflict.
fn rich_message() -> Message {
    let code = |i: u8| {
        if i % 11 == 0 {
            MERGE
        } else {
            ((u16::from(i) * 7) % u16::from(MERGE)) as u8
        }
    };
    let script: Script = (0..60u8).map(|i| (usize::from(i % 3), code(i), i % 8)).collect();
    let msgs = messages(&script);
    let mut m = msgs[0].clone();
    if let Some(entries) = match &mut m {
        Message::Delta { sections, .. } => sections.first_mut().map(|s| &mut s.entries),
        _ => None,
    } {
        let conflict = {
            let s = WriteStamp {
                replica: ReplicaId(1),
                time: HlcTimestamp::default(),
            };
            let mut v = Value::apply(None, &Op::CounterAdd(1), s).unwrap();
            v.join(&Value::apply(None, &Op::SetAdd(vec![elem(0)]), s).unwrap());
            v
        };
        assert!(matches!(conflict, Value::Conflict(_)));
        entries.push((Key::new("conflict").unwrap(), conflict.into()));
        assert!(entries.len() > 3);
    }
    m
}

#[test]
fn every_prefix_of_a_rich_frame_is_an_error() {
    let m = rich_message();
    let frame = proto::encode(&m).unwrap();
    assert!(frame.len() > 200, "{} bytes", frame.len());
    assert_eq!(proto::decode(&frame, LIMIT).unwrap(), m);
    for n in 0..frame.len() {
        assert!(
            proto::decode(&frame[..n], LIMIT).is_err(),
            "prefix of {n} bytes decoded"
        );
    }
    assert!(matches!(proto::decode(&[], LIMIT), Err(Error::Codec(_))));
    assert!(matches!(
        proto::decode(&[PEER_PROTOCOL_VERSION], LIMIT),
        Err(Error::CorruptFrame { len: 1 })
    ));
    // A correctly checked but empty body is a codec error.
    assert!(matches!(proto::decode(&proto::seal(&[]), LIMIT), Err(Error::Codec(_))));
}

#[test]
fn a_wrong_version_byte_is_unknown_version() {
    let mut frame = proto::encode(&rich_message()).unwrap();
    for v in 0..=u8::MAX {
        if v == PEER_PROTOCOL_VERSION {
            continue;
        }
        frame[0] = v;
        assert_eq!(proto::decode(&frame, LIMIT), Err(Error::UnknownVersion(v)));
    }
    // Even a one-byte frame.
    assert_eq!(
        proto::decode(&[PEER_PROTOCOL_VERSION + 1], LIMIT),
        Err(Error::UnknownVersion(PEER_PROTOCOL_VERSION + 1))
    );
    // A version-1 frame (before the integrity check) is refused as such.
    assert_eq!(proto::decode(&[1, 0x91, 0xc0], LIMIT), Err(Error::UnknownVersion(1)));
}

#[test]
fn an_oversize_frame_is_message_too_large() {
    let m = rich_message();
    let frame = proto::encode(&m).unwrap();
    let len = frame.len();
    assert_eq!(proto::decode(&frame, len).unwrap(), m);
    assert_eq!(
        proto::decode(&frame, len - 1),
        Err(Error::MessageTooLarge {
            size: len,
            limit: len - 1
        })
    );
    // The size is checked before anything else.
    let mut junk = vec![0xffu8; LIMIT + 1];
    assert_eq!(
        proto::decode(&junk, LIMIT),
        Err(Error::MessageTooLarge {
            size: LIMIT + 1,
            limit: LIMIT
        })
    );
    junk[0] = PEER_PROTOCOL_VERSION;
    assert_eq!(
        proto::decode(&junk, LIMIT),
        Err(Error::MessageTooLarge {
            size: LIMIT + 1,
            limit: LIMIT
        })
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let mut frame = proto::encode(&Message::Ack(Ack {
        replica: ReplicaId(1),
        from: ReplicaId(3),
        upto: [2, 2, 2],
    }))
    .unwrap();
    frame.push(0xc0);
    // Appended after the check was made: the check fails first.
    assert!(matches!(proto::decode(&frame, LIMIT), Err(Error::CorruptFrame { .. })));
    // Covered by the check: the codec refuses them.
    let sealed = proto::seal(&frame[1 + FRAME_CHECK_BYTES..]);
    assert!(matches!(proto::decode(&sealed, LIMIT), Err(Error::Codec(_))));
    let mut bytes = proto::to_bytes(&GCounter::default().inc(ReplicaId(1), 3)).unwrap();
    bytes.push(0);
    assert!(matches!(proto::from_bytes::<GCounter>(&bytes), Err(Error::Codec(_))));
}

fn delta_frame(entries: Vec<(Key, Value)>) -> Vec<u8> {
    proto::encode(&delta_message(entries)).unwrap()
}

#[test]
fn frames_carrying_malformed_values_are_refused() {
    let k = Key::new("k").unwrap();
    // An empty conflict and a one-part conflict.
    let frame = delta_frame(vec![(k.clone(), Value::Conflict(Vec::new()))]);
    assert_eq!(proto::decode(&frame, LIMIT), Err(Error::Malformed("k".into())));
    let one = Value::Conflict(vec![Value::GCounter(GCounter::default())]);
    assert_eq!(
        proto::decode(&delta_frame(vec![(k.clone(), one)]), LIMIT),
        Err(Error::Malformed("k".into()))
    );
    // A set whose live dots are outside its causal context.
    let mut s = OrSet::default();
    let d = s.add(ReplicaId(1), elem(0));
    s.join(&d);
    let bad = Causal::from_parts(s.causal().store().clone(), CausalContext::new());
    let bad: OrSet<Bytes> = proto::from_bytes(&proto::to_bytes(&bad).unwrap()).unwrap();
    let frame = delta_frame(vec![
        (k.clone(), Value::Set(s)),
        (Key::new("bad").unwrap(), Value::Set(bad)),
    ]);
    assert_eq!(proto::decode(&frame, LIMIT), Err(Error::Malformed("bad".into())));
    // A context whose ranges are not canonical (a counter of 0).
    let ranges: BTreeMap<ReplicaId, Vec<(u64, u64)>> = [(ReplicaId(1), vec![(0, 2)])].into_iter().collect();
    let cc: CausalContext = proto::from_bytes(&proto::to_bytes(&ranges).unwrap()).unwrap();
    assert!(!cc.is_canonical());
    let bad: OrSet<Bytes> =
        proto::from_bytes(&proto::to_bytes(&Causal::from_parts(DotMap::<Bytes, DotSet>::empty(), cc)).unwrap())
            .unwrap();
    let frame = delta_frame(vec![(k.clone(), Value::Set(bad))]);
    assert_eq!(proto::decode(&frame, LIMIT), Err(Error::Malformed("k".into())));
    // An empty key.
    let empty: Key = proto::from_bytes(&proto::to_bytes(&"").unwrap()).unwrap();
    let frame = delta_frame(vec![(empty, Value::GCounter(GCounter::default()))]);
    assert_eq!(proto::decode(&frame, LIMIT), Err(Error::Malformed(String::new())));
}

#[test]
fn values_encode_bytes_as_msgpack_bin() {
    let b = Bytes(vec![0, 1, 2]);
    let enc = proto::to_bytes(&b).unwrap();
    assert_eq!(enc, vec![0xc4, 3, 0, 1, 2]);
    assert_eq!(proto::from_bytes::<Bytes>(&enc).unwrap(), b);
}

#[test]
fn clock_types_round_trip() {
    let cc = CausalContext::from_dots([1, 2, 3, 7, 9, 10].map(|c| Dot::new(ReplicaId(4), c)));
    let back: CausalContext = proto::from_bytes(&proto::to_bytes(&cc).unwrap()).unwrap();
    assert_eq!(back, cc);
    assert!(back.is_canonical());
    let mut vv = VersionVector::default();
    vv.advance(ReplicaId(1), u64::MAX);
    vv.advance(ReplicaId(2), 3);
    let back: VersionVector = proto::from_bytes(&proto::to_bytes(&vv).unwrap()).unwrap();
    assert_eq!(back, vv);
    let t = HlcTimestamp {
        wall_ms: u64::MAX,
        logical: u32::MAX,
    };
    assert_eq!(
        proto::from_bytes::<HlcTimestamp>(&proto::to_bytes(&t).unwrap()).unwrap(),
        t
    );
    let d = Dot::new(ReplicaId(u64::MAX), u64::MAX);
    assert_eq!(
        proto::from_bytes::<Dot>(&rmp_serde::to_vec_named(&d).unwrap()).unwrap(),
        d
    );
}

/// Values and messages carry one-letter variant tags; data written with the
/// long names (every encoding before the short tags) still decodes.
#[test]
fn short_variant_tags_and_long_names_both_decode() {
    let mut g = GCounter::default();
    g.join(&g.inc(ReplicaId(3), 5));
    let v = Value::GCounter(g.clone());
    let short = proto::to_bytes(&v).unwrap();
    let long = proto::to_bytes(&BTreeMap::from([("GCounter", &g)])).unwrap();
    assert!(short.len() + 7 == long.len(), "{} vs {}", short.len(), long.len());
    assert_eq!(proto::from_bytes::<Value>(&short).unwrap(), v);
    assert_eq!(proto::from_bytes::<Value>(&long).unwrap(), v);
}

/// A section and a delta-group as senders before the write stamp encoded
/// them still decode (`written` absent), and the stamp round-trips.
#[test]
fn sections_and_groups_without_a_write_stamp_still_decode() {
    use lattice_core::proto::DeltaGroup;
    use std::sync::Arc;
    #[derive(Serialize)]
    struct OldSection {
        class: u8,
        base: u64,
        from: u64,
        to: u64,
        entries: Vec<(Key, Arc<Value>)>,
    }
    #[derive(Serialize)]
    struct OldGroup {
        seq: u64,
        origin: Option<proto::NodeId>,
        entries: Vec<(Key, Arc<Value>)>,
    }
    let stamp = WriteStamp {
        replica: ReplicaId(3),
        time: HlcTimestamp::default(),
    };
    let entries = vec![(key(1), Arc::new(Value::apply(None, &Op::CounterAdd(2), stamp).unwrap()))];
    let old = OldSection {
        class: 1,
        base: 2,
        from: 3,
        to: 4,
        entries: entries.clone(),
    };
    let s: Section = proto::from_bytes(&proto::to_bytes(&old).unwrap()).unwrap();
    assert_eq!((s.class, s.to, s.written), (1, 4, None));
    assert_eq!(s.entries, entries);
    let g: DeltaGroup = proto::from_bytes(
        &proto::to_bytes(&OldGroup {
            seq: 7,
            origin: None,
            entries,
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!((g.seq, g.written), (7, None));
    let t = HlcTimestamp {
        wall_ms: 1_800_000_000_000,
        logical: 3,
    };
    let with = Section { written: Some(t), ..s };
    let back: Section = proto::from_bytes(&proto::to_bytes(&with).unwrap()).unwrap();
    assert_eq!(back.written, Some(t));
}
