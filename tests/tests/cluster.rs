//! Real `latticed` processes on 127.0.0.1 ephemeral ports (issue #4's tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; a std mutex held across awaits only serializes
// the tests (one cluster at a time on 2 cores), which is the intent.
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, Error as ClientError, ErrorKind};
use lattice_core::crdt::{Bytes, Field, FieldKind, NestedView, Op, ValueView};
use lattice_core::proto::client::{decode_answer, RequestBody, Response, CLIENT_ALPN, PEER_ALPN};
use lattice_server::certs;
use lattice_server::storage::Durability;
use lattice_tests::{key, serial, Cluster};
use quinn::crypto::rustls::QuicClientConfig;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

async fn write(c: &Client, k: &str, op: Op) -> Result<(), ClientError> {
    c.request(RequestBody::Write {
        retry: false,
        op_id: Client::new_op_id(),
        ops: vec![(key(k), op)],
        concern: Default::default(),
        timeout_ms: 0,
    })
    .await
    .map(|_| ())
}

async fn read(c: &Client, k: &str) -> Option<ValueView> {
    lattice_tests::read_value(c, &key(k)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_on_every_type() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let client = c.client(i).unwrap();
        tasks.push(tokio::spawn(async move {
            for j in 0..40 {
                write(&client, "visits", Op::CounterAdd(1)).await.unwrap();
                write(
                    &client,
                    "tags",
                    Op::SetAdd(vec![Bytes::from(format!("n{i}-{j}").as_str())]),
                )
                .await
                .unwrap();
                write(
                    &client,
                    "greeting",
                    Op::LwwSet(Bytes::from(format!("hello from n{i}").as_str())),
                )
                .await
                .unwrap();
                write(&client, "doc", Op::MvSet(Bytes::from(format!("v{i}-{j}").as_str())))
                    .await
                    .unwrap();
                let hits = Op::MapApply {
                    field: Field::new("hits", FieldKind::Counter),
                    op: Box::new(Op::CounterAdd(2)),
                };
                write(&client, "profile", hits).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    for i in 0..3 {
        let client = c.client(i).unwrap();
        assert_eq!(read(&client, "visits").await, Some(ValueView::Counter(120)), "node {i}");
        match read(&client, "tags").await {
            Some(ValueView::Set(s)) => assert_eq!(s.len(), 120, "node {i}"),
            v => panic!("{v:?}"),
        }
        match read(&client, "profile").await {
            Some(ValueView::Map(m)) => {
                assert_eq!(
                    m.get(&Field::new("hits", FieldKind::Counter)),
                    Some(&NestedView::Counter(240))
                )
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            read(&client, "greeting").await,
            Some(ValueView::Register(Some(_)))
        ));
        assert!(matches!(read(&client, "doc").await, Some(ValueView::Values(v)) if !v.is_empty() && v.len() <= 3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::<usize>::new()));
    let client = c.client(0).unwrap();
    // Writes until one fails: the kill below always lands while they flow.
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for j in 0.. {
                let ops = vec![
                    (key("count"), Op::CounterAdd(1)),
                    (key("seen"), Op::SetAdd(vec![Bytes::from(format!("e{j}").as_str())])),
                ];
                match client
                    .request(RequestBody::Write {
                        retry: false,
                        op_id: Client::new_op_id(),
                        ops,
                        concern: Default::default(),
                        timeout_ms: 0,
                    })
                    .await
                {
                    Ok(_) => acked.lock().unwrap().push(j),
                    Err(_) => return j,
                }
            }
            unreachable!("the writes outlived the kill")
        })
    };
    // Kill the node taking the writes once 60 are acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 60 {
        assert!(Instant::now() < deadline, "60 writes not acknowledged within 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.kill(0).unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(15), writer)
        .await
        .expect("a write to the killed node must fail")
        .unwrap();
    let attempted = failed + 1;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 60, "{} acknowledged", acked.len());
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    for i in 0..3 {
        let client = c.client(i).unwrap();
        match read(&client, "count").await {
            Some(ValueView::Counter(n)) => {
                assert!(
                    n as usize >= acked.len() && n as usize <= attempted,
                    "node {i}: {n}, acked {}",
                    acked.len()
                )
            }
            v => panic!("{v:?}"),
        }
        match read(&client, "seen").await {
            Some(ValueView::Set(s)) => {
                for j in &acked {
                    assert!(
                        s.contains(&Bytes::from(format!("e{j}").as_str())),
                        "node {i} lost acknowledged e{j}"
                    );
                }
            }
            v => panic!("{v:?}"),
        }
    }
}

fn raw_endpoint(ca: &str, identity: Option<&certs::Pem>, alpn: &[u8]) -> quinn::Endpoint {
    let tls = certs::client_tls(ca, identity, alpn).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_bad_tokens_are_refused() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    // A client with a bad token.
    let bad = c.client_with_token(0, "not-the-token").unwrap();
    match bad.request(RequestBody::Status).await {
        Err(ClientError::Unauthorized(_)) => {}
        r => panic!("expected Unauthorized, got {r:?}"),
    }
    // A "peer" whose certificate comes from another CA, claiming to be n2.
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let other_ca = certs::new_ca("rogue").unwrap();
    let rogue = certs::new_node_cert(&other_ca, "n2").unwrap();
    let e = raw_endpoint(&ca, Some(&rogue), PEER_ALPN);
    // TLS 1.3 checks the client certificate after the client's side of the
    // handshake: refusal shows as the connection failing or being closed.
    let refused = async {
        match e.connect(c.defaults.endpoints[0], "localhost").unwrap().await {
            Err(err) => err.to_string(),
            Ok(conn) => conn.closed().await.to_string(),
        }
    };
    let reason = tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("a certificate from another CA must not keep a peer connection open");
    // Refused by the TLS handshake for its issuer (alert 48, unknown_ca),
    // not by a later check such as the node-name one ("not a node").
    assert!(
        reason.contains("the cryptographic handshake failed: error 48")
            && reason.contains("invalid peer certificate: UnknownIssuer"),
        "{reason}"
    );
    // A client certificate of the right CA is still not a node.
    let client_cert =
        certs::new_client_cert(&certs::read_pem(&c.dir.path().join("certs"), "ca").unwrap(), "app").unwrap();
    let e = raw_endpoint(&ca, Some(&client_cert), PEER_ALPN);
    let conn = e.connect(c.defaults.endpoints[0], "localhost").unwrap().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert!(reason.to_string().contains("not a node"), "{reason}");
    // The node still serves.
    assert!(c.status(0).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_get_errors_and_the_node_keeps_serving() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    // Client ALPN: garbage, then an oversized length.
    let e = raw_endpoint(&ca, None, CLIENT_ALPN);
    let conn = e.connect(c.defaults.endpoints[0], "localhost").unwrap().await.unwrap();
    for frame in [
        vec![0, 0, 0, 5, 1, 0xc1, 0xff, 0x00, 0x13],
        (64u32 << 20).to_be_bytes().to_vec(),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        let _ = send.finish();
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut body).await.unwrap();
        match decode_answer(&body).unwrap() {
            Response::Error(e) => assert_eq!(e.kind, ErrorKind::InvalidRequest, "{}", e.message),
            r => panic!("{r:?}"),
        }
    }
    // Peer ALPN (with n2's own certificate): garbage, then oversized.
    let rejected = c.metric(0, "lattice_peer_frames_rejected_total").unwrap();
    let n2 = certs::read_pem(&c.dir.path().join("certs"), "n2").unwrap();
    let e = raw_endpoint(&ca, Some(&n2), PEER_ALPN);
    let conn = e.connect(c.defaults.endpoints[0], "localhost").unwrap().await.unwrap();
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap(); // boot id
    s.write_all(&[0, 0, 0, 4, 1, 0xde, 0xad, 0xbe]).await.unwrap();
    s.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
    // Keep sending the announced 64 MiB: the node must stop the stream.
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = s.write_all(&chunk).await {
                return e;
            }
        }
    })
    .await
    .expect("the node must stop a stream that announces an oversized frame");
    assert!(matches!(stopped, quinn::WriteError::Stopped(_)), "{stopped:?}");
    // Still serving, and both refused peer frames are counted: the garbage
    // one by the engine's decoder, the oversized one on its length.
    let client = c.client(0).unwrap();
    write(&client, "after", Op::CounterAdd(1)).await.unwrap();
    assert_eq!(read(&client, "after").await, Some(ValueView::Counter(1)));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = c.metric(0, "lattice_peer_frames_rejected_total").unwrap() - rejected;
        if n == 2.0 {
            break;
        }
        assert!(
            n < 2.0 && Instant::now() < deadline,
            "{n} peer frames counted as rejected, not 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absent_peer_costs_bounded_memory_and_catches_up() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let limit = 64 * 1024;
    for i in 0..2 {
        c.stop(i).unwrap();
        c.edit_config(i, |cfg| cfg.max_buffer_bytes = limit).unwrap();
        c.restart(i).unwrap();
    }
    c.kill(2).unwrap();
    let client = c.client(0).unwrap();
    for batch in 0..60 {
        let ops = (0..10)
            .map(|n| {
                let j = batch * 10 + n;
                (
                    key(&format!("k{}", j % 300)),
                    Op::LwwSet(Bytes::from(format!("value {j} {}", "x".repeat(100)).as_str())),
                )
            })
            .collect();
        client
            .request(RequestBody::Write {
                retry: false,
                op_id: Client::new_op_id(),
                ops,
                concern: Default::default(),
                timeout_ms: 0,
            })
            .await
            .unwrap();
    }
    let s = c.status(0).await.unwrap();
    assert!(
        s.buffer.1 <= limit,
        "buffer {} bytes over the {limit} limit",
        s.buffer.1
    );
    c.restart(2).unwrap();
    c.wait_ready(Duration::from_secs(60)).await.unwrap();
    c.wait_converged(Duration::from_secs(60)).await.unwrap();
    let n3 = c.client(2).unwrap();
    assert!(matches!(read(&n3, "k299").await, Some(ValueView::Register(Some(_)))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_remote_writes_and_resumes_without_loss_or_repeat() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let n1 = c.client(0).unwrap();
    let n2 = c.client(1).unwrap();
    let mut w = n1.watch(0, "orders/", None).await.unwrap();
    write(&n2, "orders/1", Op::CounterAdd(1)).await.unwrap();
    write(&n2, "other", Op::CounterAdd(1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.key.as_str(), "orders/1");
    assert_eq!(first.origin.0, "us", "a remote change names its region");
    let token = w.last_token().unwrap();
    drop(w);
    // Changes while nobody watches, then resume from the token.
    write(&n1, "orders/2", Op::CounterAdd(1)).await.unwrap();
    write(&n2, "orders/3", Op::CounterAdd(1)).await.unwrap();
    let mut w = n1.watch(0, "orders/", Some(token)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ch = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(ch.key.as_str().to_string());
    }
    seen.sort();
    assert_eq!(
        seen,
        vec!["orders/2", "orders/3"],
        "resumed without losing or repeating a change"
    );
    // A token from elsewhere cannot be resumed.
    let mut bad = n1
        .watch(0, "orders/", Some(lattice_client::WatchToken { epoch: 1, seq: 0 }))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), bad.next()).await.unwrap() {
        Err(ClientError::WatchLost(_)) => {}
        r => panic!("expected WatchLost, got {r:?}"),
    }
}

/// The harness picks free ports, then the nodes bind them: another process
/// can take one in between. `start_all` then moves the cluster to new
/// ports and starts it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_before_the_node_binds_moves_the_cluster() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
    let taken = c.defaults.endpoints[1];
    let _thief = std::net::UdpSocket::bind(taken).unwrap();
    c.start_all().unwrap();
    assert!(!c.defaults.endpoints.contains(&taken), "{:?}", c.defaults.endpoints);
    assert_eq!(c.config(0).unwrap().peers[0].address, c.defaults.endpoints[1]);
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let moved = c.log_lines("Address already in use");
    assert!(!moved.is_empty(), "the taken port was never hit");
}
