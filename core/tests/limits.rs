#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The engine's size limits at their edge, driven by hand against the
//! in-memory store: for each, the largest legal input is taken and one past
//! it is refused the documented way (ARCHITECTURE.md, "Bounds"; README,
//! "Retries").

use lattice_core::crdt::{Field, FieldKind, Op, Value, ValueView, MAX_NESTING};
use lattice_core::proto::client::{decode_client, encode_client, ClientRequest, OpId, RequestBody, MAX_CLIENT_FRAME};
use lattice_core::proto::{self, Message, NodeId, RegionId, MAX_DECODE_DEPTH};
use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
use lattice_core::store::{MemoryStore, OP_ID_RETENTION};
use lattice_core::{Error, Key, MAX_KEY_LEN};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

fn open(me: usize, n: usize, seed: u64) -> Replica<MemoryStore> {
    let peers = (0..n)
        .filter(|&j| j != me)
        .map(|j| PeerConfig::new(NodeId(format!("n{j}")), RegionId(format!("r{j}"))))
        .collect();
    let mut c = ReplicaConfig::new(format!("n{me}"), format!("r{me}"), peers);
    c.tree_depth = 3;
    c.ae_interval_ms = 0;
    Replica::open(
        c,
        MemoryStore::new(),
        Box::new(ChaCha8Rng::seed_from_u64(seed)),
        Time(0),
    )
    .unwrap()
}

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn counter(r: &Replica<MemoryStore>, k: &str) -> i128 {
    match r.read(&key(k)).unwrap().map(|v| v.view()) {
        Some(ValueView::Counter(n)) => n,
        other => panic!("{k}: {other:?}"),
    }
}

/// A key of 1,024 bytes is a key; one of 1,025 is refused with
/// `InvalidKey` naming the limit, by `Key::new` and, for a key that came
/// off the wire unchecked, by the engine's write.
#[test]
fn the_key_length_limit_is_exact() {
    let longest = "k".repeat(MAX_KEY_LEN);
    let k = Key::new(longest.clone()).unwrap();
    assert!(k.is_valid());
    let over = format!("{longest}k");
    match Key::new(over.clone()) {
        Err(Error::InvalidKey(m)) => assert_eq!(m, format!("{} bytes, limit {MAX_KEY_LEN}", MAX_KEY_LEN + 1)),
        other => panic!("a {}-byte key: {other:?}", MAX_KEY_LEN + 1),
    }
    // Decoding does not check (a key is a transparent string); the engine does.
    let wire: Key = proto::from_bytes(&proto::to_bytes(&over).unwrap()).unwrap();
    assert!(!wire.is_valid());
    let mut r = open(0, 1, 1);
    r.write(Time(1), vec![(k.clone(), Op::CounterAdd(1))]).unwrap();
    assert!(matches!(
        r.write(Time(2), vec![(wire.clone(), Op::CounterAdd(1))]),
        Err(Error::InvalidKey(_))
    ));
    r.flush(Time(3)).unwrap();
    assert_eq!(counter(&r, &longest), 1);
    assert!(r.read(&wire).map_or(true, |v| v.is_none()));
}

/// Any depth of nested lists, for finding the decoder's depth bound.
#[derive(Debug, Deserialize)]
struct Nest(#[allow(dead_code)] Vec<Nest>);

/// `depth` MessagePack arrays, each holding the next (the innermost empty).
fn nested(depth: usize) -> Vec<u8> {
    let mut b = vec![0x91; depth - 1];
    b.push(0x90);
    b
}

/// Nesting `MAX_DECODE_DEPTH` deep or more is refused as a codec error,
/// whatever its depth: a client write nested as deep as its 1 MiB frame
/// allows must not overflow the stack (which would abort this test binary).
#[test]
fn decoding_is_bounded_in_depth_not_by_the_stack() {
    // rmp-serde refuses the container that brings the depth to its limit:
    // 127 nested arrays decode, 128 do not.
    proto::from_bytes::<Nest>(&nested(MAX_DECODE_DEPTH - 1)).unwrap();
    proto::from_bytes::<serde::de::IgnoredAny>(&nested(MAX_DECODE_DEPTH - 1)).unwrap();
    match proto::from_bytes::<serde::de::IgnoredAny>(&nested(MAX_DECODE_DEPTH)) {
        Err(Error::Codec(m)) => assert!(m.contains("depth"), "{m}"),
        other => panic!("{MAX_DECODE_DEPTH} levels: {other:?}"),
    }
    match proto::from_bytes::<Nest>(&nested(MAX_DECODE_DEPTH)) {
        Err(Error::Codec(m)) => assert!(m.contains("depth"), "{m}"),
        other => panic!("{MAX_DECODE_DEPTH} levels: {other:?}"),
    }
    // A client write whose op is `MapApply` nested as deep as 1 MiB allows
    // (each level a map and an array): the one recursive type a client
    // sends. Hand-built, as encoding (or dropping) it would recurse too.
    let request = |op: Op| ClientRequest {
        token: "t".repeat(32),
        body: RequestBody::Write {
            op_id: OpId(1),
            retry: false,
            ops: vec![(key("m"), op)],
            concern: Default::default(),
            timeout_ms: 0,
        },
    };
    let leaf = Op::CounterAdd(0x5eed_5eed);
    let level = |op: Op| Op::MapApply {
        field: Field::new("f", FieldKind::Map),
        op: Box::new(op),
    };
    // The deepest a legal write goes (map nesting is bounded by
    // `MAX_NESTING`) decodes.
    let mut legal = leaf.clone();
    for _ in 0..MAX_NESTING {
        legal = level(legal);
    }
    let frame = encode_client(&request(legal.clone())).unwrap();
    let back: ClientRequest = decode_client(&frame).unwrap();
    assert_eq!(back, request(legal));
    let flat = encode_client(&request(leaf.clone())).unwrap();
    let one = encode_client(&request(level(leaf.clone()))).unwrap();
    let prefix_len = one.len() - flat.len();
    let at = (0..flat.len()).find(|&i| flat[i..] == one[i + prefix_len..]).unwrap();
    let prefix = one[at..at + prefix_len].to_vec();
    let mut deep = flat[..at].to_vec();
    while deep.len() + prefix.len() + (flat.len() - at) <= MAX_CLIENT_FRAME {
        deep.extend(&prefix);
    }
    deep.extend(&flat[at..]);
    assert!(deep.len() > MAX_CLIENT_FRAME - prefix.len() && deep.len() <= MAX_CLIENT_FRAME);
    match decode_client::<ClientRequest>(&deep) {
        Err(Error::Codec(m)) => assert!(m.contains("depth"), "{m}"),
        other => panic!("a write nested {} levels deep: {other:?}", deep.len() / prefix.len()),
    }
}

/// README, "Retries": a node applies a retried write once while its op id
/// is among its last 100,000. The oldest of exactly `OP_ID_RETENTION` ids
/// is still recognised; one id more and it is forgotten (a retry of it is
/// a new write), while the next oldest is still recognised.
#[test]
fn op_ids_are_retained_for_exactly_the_last_100_000_writes() {
    assert_eq!(OP_ID_RETENTION, 100_000);
    let mut r = open(0, 1, 1);
    let k = || vec![(key("n"), Op::CounterAdd(1))];
    let mut now = 1;
    for id in 0..OP_ID_RETENTION as u128 {
        let (_, dup) = r.write_once(Time(now), Some(OpId(id)), k()).unwrap();
        assert!(!dup);
        if id % 1_000 == 999 {
            now += 1;
            r.flush(Time(now)).unwrap();
            while r.poll_event().is_some() {}
        }
    }
    let dup = |r: &mut Replica<MemoryStore>, id: u128| r.write_once(Time(now), Some(OpId(id)), k()).unwrap().1;
    assert!(dup(&mut r, 0), "the oldest of 100,000 ids");
    r.write_once(Time(now), Some(OpId(OP_ID_RETENTION as u128)), k())
        .unwrap();
    assert!(dup(&mut r, 1), "the oldest of the last 100,000");
    assert!(!dup(&mut r, 0), "the 100,001st id back");
    r.flush(Time(now + 1)).unwrap();
    // 100,001 writes, and the forgotten id's retry applied as a new one.
    assert_eq!(counter(&r, "n"), OP_ID_RETENTION as i128 + 2);
}

/// Early delta-intervals wait for their gap within 16 MiB (as received)
/// per peer and class: two frames of exactly 8 MiB fill it and are held,
/// a third frame, however small, is dropped (counted as out of order, to be
/// retransmitted); filling the gap applies the two held ones.
#[test]
fn the_reorder_buffer_holds_exactly_16_mib() {
    use lattice_core::clock::HlcTimestamp;
    use lattice_core::proto::{PolicyStamp, Section};
    const HELD: usize = 16 << 20;
    let mut a = open(0, 2, 1);
    let mut b = open(1, 2, 2);
    let big = |b: &mut Replica<MemoryStore>, k: &str, n: usize| -> (Key, Value) {
        b.write(Time(1), vec![(key(k), Op::LwwSet(vec![7u8; n].into()))])
            .unwrap();
        (key(k), b.read(&key(k)).unwrap().unwrap())
    };
    let fixed: Vec<(Key, Value)> = (0..3).map(|i| big(&mut b, &format!("big{i}"), 2_500_000)).collect();
    let sender = b.id();
    let policy = PolicyStamp::of(&b.config().policy);
    let frame = |entries: Vec<(Key, Value)>, from: u64, to: u64| {
        proto::encode(&Message::Delta {
            sender,
            base_from: None,
            time: HlcTimestamp { wall_ms: 1, logical: 0 },
            policy,
            sections: vec![Section {
                class: 1,
                base: 0,
                from,
                to,
                entries: entries.into_iter().map(|(k, v)| (k, v.into())).collect(),
                written: None,
            }],
            ack: None,
        })
        .unwrap()
    };
    // Pad each frame to exactly half the buffer with a fourth value.
    let mut pad = 100_000;
    let padded = |b: &mut Replica<MemoryStore>, pad: usize, from: u64| {
        let mut e = fixed.clone();
        e.push(big(b, "pad", pad));
        frame(e, from, from + 1)
    };
    for _ in 0..4 {
        let len = padded(&mut b, pad, 1_000).len();
        if len == HELD / 2 {
            break;
        }
        pad = pad + HELD / 2 - len;
    }
    let first = padded(&mut b, pad, 1_000);
    let second = padded(&mut b, pad, 1_001);
    assert_eq!((first.len(), second.len()), (HELD / 2, HELD / 2));
    let n1 = NodeId("n1".into());
    a.handle(Time(1), &n1, &first).unwrap();
    a.handle(Time(1), &n1, &second).unwrap();
    assert_eq!(a.reorder_usage(), 2, "16 MiB of early frames must be held");
    let dropped = a.stats().out_of_order;
    let small = frame(vec![(key("small"), big(&mut b, "small", 1).1)], 1_002, 1_003);
    a.handle(Time(1), &n1, &small).unwrap();
    assert_eq!(a.reorder_usage(), 2, "one byte past 16 MiB must not be held");
    assert_eq!(a.stats().out_of_order, dropped + 1);
    assert!(a.read(&key("small")).unwrap().is_none());
    // The gap filled, both held intervals are applied.
    a.handle(Time(1), &n1, &frame(Vec::new(), 0, 1_000)).unwrap();
    assert_eq!(a.reorder_usage(), 0);
    for k in ["big0", "big1", "big2", "pad"] {
        assert!(a.read(&key(k)).unwrap().is_some(), "{k} was held and then applied");
    }
}

/// The largest answer a node may send goes alone in one pipeline frame;
/// packs of the smallest answers (the most tags) and of mixed sizes each
/// encode within the pipeline frame limit; a frame past it is refused, not
/// truncated.
#[test]
fn pipeline_answer_packs_fit_one_frame() {
    use lattice_core::proto::client::{
        decode_pipeline_answers, encode_pipeline_answers, AnswerPack, Response, Tagged, MAX_ANSWER_FRAME,
        MAX_PIPELINE_ANSWER_FRAME,
    };
    use rand_chacha::rand_core::RngCore;
    let answer = |tag: u32, len: usize| Tagged {
        tag: u32::MAX - tag,
        frame: vec![7u8; len],
    };
    let check = |pack: Vec<Tagged>| {
        let frame = encode_pipeline_answers(pack.clone()).expect("a pack fits one frame");
        assert!(frame.len() <= MAX_PIPELINE_ANSWER_FRAME);
        assert_eq!(decode_pipeline_answers(&frame).unwrap(), Response::Pipeline(pack));
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for round in 0..3 {
        let mut packer = AnswerPack::default();
        let (mut packs, mut answers) = (0, 0);
        let n = [20_000, 20_000, 300][round];
        for tag in 0..n {
            let len = match round {
                0 => 1,
                1 => 1 + (rng.next_u32() as usize % 70_000),
                _ => [1, 40, MAX_ANSWER_FRAME][rng.next_u32() as usize % 3],
            };
            if let Some(pack) = packer.push(answer(tag, len)) {
                answers += pack.len();
                packs += 1;
                check(pack);
            }
        }
        let last = packer.take();
        answers += last.len();
        check(last);
        assert!(packer.is_empty());
        assert_eq!(answers, n as usize, "no answer lost or repeated by the packer");
        assert!(packs > 1);
    }
    let over = answer(1, MAX_PIPELINE_ANSWER_FRAME);
    assert!(matches!(
        encode_pipeline_answers(vec![over]),
        Err(Error::MessageTooLarge { .. })
    ));
}
