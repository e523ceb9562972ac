//! Client-facing size limits at their edge, against a real `latticed`: the
//! largest legal input is taken, one past it gets the documented error
//! (README "Sizes", SECURITY.md "request size" and "policy set",
//! ARCHITECTURE.md "Bounds"). The SDK's own 1 MiB check and the value limit
//! are `hostile_a_request_over_its_frame_and_a_value_over_its_limit_are_refused_clearly`
//! in `hostile_edge.rs`; this file covers what reaches the node itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::Error as ClientError;
use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::policy::{Policy, PolicySet, Priority, Regions, MAX_POLICIES};
use lattice_core::proto::client::{
    decode_answer, encode_client, ClientRequest, ErrorKind, OpId, RequestBody, Response, CLIENT_ALPN, MAX_CLIENT_FRAME,
};
use lattice_core::{proto, Key, MAX_KEY_LEN};
use lattice_server::certs;
use lattice_server::storage::Durability;
use lattice_tests::{serial, Cluster};
use quinn::crypto::rustls::QuicClientConfig;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const ADMIN: &str = "admin-token-for-the-limits-test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

async fn node() -> Cluster {
    let c = Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
        cfg.admin_tokens = vec![ADMIN.into()];
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    c
}

/// A key of 1,024 bytes is written and read back; one of 1,025 is refused
/// by the SDK before it is sent, and by the node (`InvalidRequest`, "invalid
/// key") when a client sends it anyway, in a write or a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_length_limit_holds_at_the_node() {
    let _g = serial();
    let c = node().await;
    let client = c.client(0).unwrap();
    let longest = "k".repeat(MAX_KEY_LEN);
    client.counter(&longest).incr(3).await.unwrap();
    assert_eq!(client.counter(&longest).get().await.unwrap(), 3);
    let over = format!("{longest}k");
    match client.counter(&over).incr(1).await {
        Err(ClientError::InvalidRequest(m)) => assert!(m.contains("1025 bytes, limit 1024"), "{m}"),
        other => panic!("the SDK sent a 1,025-byte key: {other:?}"),
    }
    // The same key off the wire, unchecked, as another client could send it.
    let wire: Key = proto::from_bytes(&proto::to_bytes(&over).unwrap()).unwrap();
    let body = RequestBody::Write {
        retry: false,
        op_id: OpId(1),
        ops: vec![(wire.clone(), Op::CounterAdd(1))],
        concern: Default::default(),
        timeout_ms: 0,
    };
    match client.request(body).await {
        Err(ClientError::InvalidRequest(m)) => assert!(m.contains("invalid key"), "{m}"),
        other => panic!("the node took a 1,025-byte key: {other:?}"),
    }
    // A read of it is refused the same way (it used to answer "no value").
    let body = RequestBody::Read {
        key: wire,
        after: None,
        wait_ms: 0,
    };
    match client.request(body).await {
        Err(ClientError::InvalidRequest(m)) => assert!(m.contains("invalid key"), "{m}"),
        other => panic!("the node read a 1,025-byte key: {other:?}"),
    }
}

/// A policy set of 256 policies is put in force; one of 257 (well within
/// the set's byte limit) is refused with `InvalidPolicy` naming the count,
/// and the set in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_count_limit_holds_at_the_node() {
    let _g = serial();
    let c = node().await;
    let admin = c.client_with_token(0, ADMIN).unwrap();
    let set = |version: u64, n: usize| PolicySet {
        version,
        policies: (0..n)
            .map(|i| Policy::new(format!("ks{i:03}/"), Regions::All, Priority::Normal))
            .collect(),
    };
    // Signed as they are: the node checks the signature, then the limits.
    let signed =
        |s: PolicySet| lattice_core::policy::signed::SignedPolicySet::sign_as_is(s, &c.policy_key().unwrap()).unwrap();
    match admin
        .request(RequestBody::SetPolicy(signed(set(2, MAX_POLICIES))))
        .await
    {
        Ok(Response::PolicySet { version: 2 }) => {}
        other => panic!("a set of {MAX_POLICIES} policies: {other:?}"),
    }
    match admin
        .request(RequestBody::SetPolicy(signed(set(3, MAX_POLICIES + 1))))
        .await
    {
        Err(ClientError::InvalidPolicy(m)) => assert!(m.contains("257 policies, at most 256"), "{m}"),
        other => panic!("a set of {} policies: {other:?}", MAX_POLICIES + 1),
    }
    let status = c.status(0).await.unwrap();
    assert_eq!(status.policy_version, 2, "{status:?}");
}

fn raw_endpoint(ca: &str) -> quinn::Endpoint {
    let tls = certs::client_tls(ca, None, CLIENT_ALPN).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    e
}

/// A write request padded to exactly `len` bytes of frame.
fn frame_of(token: &str, len: usize) -> Vec<u8> {
    let encoded = |n: usize| {
        encode_client(&ClientRequest {
            token: token.into(),
            body: RequestBody::Write {
                op_id: OpId(7),
                retry: false,
                ops: vec![(Key::new("edge/frame").unwrap(), Op::LwwSet(Bytes::from(vec![b'x'; n])))],
                concern: Default::default(),
                timeout_ms: 0,
            },
        })
        .unwrap()
    };
    let base = encoded(len - 1_000).len() - (len - 1_000);
    let f = encoded(len - base);
    assert_eq!(f.len(), len);
    f
}

/// The node's own check of a request's length prefix, past the SDK: a
/// request of exactly 1 MiB is applied; one byte more is answered
/// `InvalidRequest` naming the limit, before its body is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_frame_of_exactly_1_mib_is_taken_and_one_byte_more_is_refused() {
    let _g = serial();
    let c = node().await;
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let e = raw_endpoint(&ca);
    let conn = e.connect(c.defaults.endpoints[0], "localhost").unwrap().await.unwrap();
    let token = c.defaults.token.clone();
    for (len, ok) in [(MAX_CLIENT_FRAME, true), (MAX_CLIENT_FRAME + 1, false)] {
        // Encoded as `MAX_CLIENT_FRAME` would be refused by `encode_client`:
        // pad the legal frame's register by one byte by hand.
        let frame = if ok {
            frame_of(&token, len)
        } else {
            let f = frame_of(&token, MAX_CLIENT_FRAME);
            let mut padded = f.clone();
            padded.push(0);
            padded
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&(frame.len() as u32).to_be_bytes()).await.unwrap();
        // Only the head: an over-long request must be answered on its prefix.
        let head = if ok { frame.len() } else { 2_048 };
        send.write_all(&frame[..head]).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut l = [0u8; 4];
            recv.read_exact(&mut l).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(l) as usize];
            recv.read_exact(&mut body).await.unwrap();
            decode_answer(&body).unwrap()
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to a request of {len} bytes"));
        match (ok, answer) {
            (true, Response::Written { .. }) => {}
            (false, Response::Error(e)) => {
                assert_eq!(e.kind, ErrorKind::InvalidRequest, "{}", e.message);
                assert!(
                    e.message.contains(&format!(
                        "request of {len} bytes is over the limit of {MAX_CLIENT_FRAME}"
                    )),
                    "{}",
                    e.message
                );
            }
            (_, r) => panic!("a request of {len} bytes: {r:?}"),
        }
    }
    let client = c.client(0).unwrap();
    match client.read(&Key::new("edge/frame").unwrap()).await.unwrap() {
        Some(ValueView::Register(Some(b))) => assert!(b.0.len() > MAX_CLIENT_FRAME - 1_000, "{}", b.0.len()),
        other => panic!("{other:?}"),
    }
}
