//! Pipelining against a real `latticed` (issue 15): a client's small
//! requests share one stream, several to a frame, and the node answers them
//! as they complete. Answers must reach their own callers; the node must
//! bound what one connection has in flight, refuse frames over the limits
//! only after answering what already ran, and a client that does not read
//! its answers must hold up no one else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::proto::client::{
    decode_answer, decode_pipeline_answers, encode_client, CausalToken, ErrorKind, OpId, RequestBody, Response, Tagged,
    WriteConcern, CLIENT_ALPN, PIPELINE_MAX_REQUESTS,
};
use lattice_core::Key;
use lattice_server::certs;
use lattice_server::storage::Durability;
use lattice_tests::{request_frame, serial, Cluster};
use quinn::crypto::rustls::QuicClientConfig;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

async fn node() -> Cluster {
    let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    c
}

/// A raw client connection to node 0, from `ip`.
async fn raw(c: &Cluster, ip: &str) -> (quinn::Endpoint, quinn::Connection) {
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let tls = certs::client_tls(&ca, None, CLIENT_ALPN).unwrap();
    let mut e = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = e.connect(c.defaults.endpoints[0], "n1").unwrap().await.unwrap();
    (e, conn)
}

/// A pipeline frame of `requests` (tag, body), with its length prefix.
fn pipeline_frame(token: &str, requests: Vec<(u32, RequestBody)>) -> Vec<u8> {
    let body = RequestBody::Pipeline(
        requests
            .into_iter()
            .map(|(tag, b)| Tagged {
                tag,
                frame: encode_client(&b).unwrap(),
            })
            .collect(),
    );
    request_frame(token, body)
}

/// The next frame of a pipeline stream: `Ok(answers by tag)`, `Err(the
/// refusal)`, or `None` at the stream's end. Fails after 20 s without one
/// (a node that misses a limit must fail the test, not hang it).
async fn next_answers(recv: &mut quinn::RecvStream) -> Option<Result<Vec<(u32, Response)>, Response>> {
    let mut len = [0u8; 4];
    let within = Duration::from_secs(20);
    let read = |r: Result<Result<(), quinn::ReadExactError>, _>| match r {
        Ok(r) => r.ok(),
        Err(_) => panic!("no answer frame and no end of the stream within {within:?}"),
    };
    read(tokio::time::timeout(within, recv.read_exact(&mut len)).await)?;
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    read(tokio::time::timeout(within, recv.read_exact(&mut frame)).await)?;
    match decode_pipeline_answers(&frame).unwrap() {
        Response::Pipeline(answers) => Some(Ok(answers
            .into_iter()
            .map(|a| (a.tag, decode_answer(&a.frame).unwrap()))
            .collect())),
        other => Some(Err(other)),
    }
}

fn incr(k: &str) -> RequestBody {
    RequestBody::Write {
        op_id: OpId(rand::random()),
        retry: false,
        ops: vec![(Key::new(k).unwrap(), Op::CounterAdd(1))],
        concern: WriteConcern::Local,
        timeout_ms: 0,
    }
}

fn read(k: &str, after: Option<CausalToken>, wait_ms: u64) -> RequestBody {
    RequestBody::Read {
        key: Key::new(k).unwrap(),
        after,
        wait_ms,
    }
}

fn counter_of(r: &Response) -> Option<i128> {
    match r {
        Response::Value {
            value: Some(ValueView::Counter(n)),
            ..
        } => Some(*n),
        _ => None,
    }
}

fn metric(c: &Cluster, name: &str) -> f64 {
    let addr = c.config(0).unwrap().metrics.unwrap();
    let page = lattice_tests::http_get(addr, "/metrics", None).unwrap().body;
    page.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// 2,000 concurrent writes of distinct values through one client, then
/// 2,000 concurrent reads: every read gets its own key's value (an answer
/// handed to the wrong caller shows), and they went over pipeline streams,
/// several answers to a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_answers_reach_their_own_callers() {
    let _g = serial();
    let c = node().await;
    let client = Arc::new(c.client(0).unwrap());
    let n = 2_000;
    let writes = (0..n).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let k = Key::new(format!("pipe/{i:05}")).unwrap();
            client
                .write(vec![(k, Op::LwwSet(Bytes(format!("value {i}").into_bytes())))])
                .await
        })
    });
    for w in writes.collect::<Vec<_>>() {
        w.await.unwrap().unwrap();
    }
    let reads = (0..n).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let k = Key::new(format!("pipe/{i:05}")).unwrap();
            (i, client.read(&k).await)
        })
    });
    for r in reads.collect::<Vec<_>>() {
        let (i, value) = r.await.unwrap();
        let want = format!("value {i}").into_bytes();
        match value.unwrap() {
            Some(ValueView::Register(v)) => assert_eq!(v, Some(Bytes(want)), "read {i} got another key's value"),
            other => panic!("read {i}: {other:?}"),
        }
    }
    let requests = metric(&c, "lattice_client_pipelined_requests_total");
    let frames = metric(&c, "lattice_client_pipelined_frames_total");
    println!("{requests} pipelined requests answered in {frames} frames");
    assert!(requests >= (2 * n) as f64, "{requests} pipelined requests");
    assert!(frames < requests, "{frames} answer frames for {requests} requests");
}

/// Writes a set of about 3.7 MB at `k`.
async fn big_value(c: &Cluster, k: &str) {
    let client = c.client(0).unwrap();
    for i in 0..4 {
        let elements = (0..900).map(|j| format!("{i}-{j:03}-{}", "z".repeat(1_000)).as_str().into());
        client
            .write(vec![(Key::new(k).unwrap(), Op::SetAdd(elements.collect()))])
            .await
            .unwrap();
    }
}

/// One connection has at most 256 pipelined requests in flight, counted
/// until their answers are written: 256 reads of a 3.7 MB value whose
/// answers the client does not read hold them all, so a plain read sent on
/// another pipeline stream of the same connection is not answered; once
/// the client reads the 256 answers, it is. Another connection is not held
/// up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_has_at_most_256_pipelined_requests_in_flight() {
    let _g = serial();
    let c = node().await;
    big_value(&c, "pipe/big").await;
    let token = c.defaults.token.clone();
    let (_e, conn) = raw(&c, "127.0.0.1").await;
    let big: Vec<(u32, RequestBody)> = (0..PIPELINE_MAX_REQUESTS as u32)
        .map(|t| (t, read("pipe/big", None, 0)))
        .collect();
    let (mut send1, mut recv1) = conn.open_bi().await.unwrap();
    send1.write_all(&pipeline_frame(&token, big)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut send2, mut recv2) = conn.open_bi().await.unwrap();
    send2
        .write_all(&pipeline_frame(&token, vec![(1, read("pipe/plain", None, 0))]))
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1_500), next_answers(&mut recv2)).await;
    assert!(
        early.is_err(),
        "a 257th request was answered while 256 unread answers held the connection's slots: {early:?}"
    );
    // Another connection meanwhile: answered at once.
    let other = c.client(0).unwrap();
    let t = Instant::now();
    other.read(&Key::new("pipe/plain").unwrap()).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "another connection waited {:?}",
        t.elapsed()
    );
    let (mut answered, mut values) = (0, 0);
    while answered < PIPELINE_MAX_REQUESTS {
        for (_, r) in next_answers(&mut recv1).await.unwrap().unwrap() {
            match &r {
                Response::Value { value: Some(_), .. } => values += 1,
                Response::Error(e) if e.kind == ErrorKind::Overloaded => {}
                r => panic!("{r:?}"),
            }
            answered += 1;
        }
    }
    println!("{values} of 256 big reads answered with the value, the rest Overloaded");
    let plain = tokio::time::timeout(Duration::from_secs(2), next_answers(&mut recv2))
        .await
        .expect("the 257th request is answered once the others' answers are read");
    assert!(
        matches!(
            plain.as_ref().unwrap().as_ref().unwrap().as_slice(),
            [(1, Response::Value { value: None, .. })]
        ),
        "{plain:?}"
    );
    let _ = (send1.finish(), send2.finish());
    assert!(
        next_answers(&mut recv1).await.is_none(),
        "the stream ends after its answers"
    );
}

/// A pipeline frame over 256 requests, or a frame that is not a pipeline
/// frame, ends the stream: the requests that came before are answered,
/// then the refusal comes as a plain error, and none of the refused
/// frame's requests runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_pipeline_frames_over_the_limits_are_refused_after_what_ran() {
    let _g = serial();
    let c = node().await;
    let token = c.defaults.token.clone();
    let (_e, conn) = raw(&c, "127.0.0.1").await;
    for (case, second) in [
        (
            "257 requests",
            pipeline_frame(
                &token,
                (0..=PIPELINE_MAX_REQUESTS as u32)
                    .map(|t| (100 + t, incr("pipe/refused")))
                    .collect(),
            ),
        ),
        ("a plain request", request_frame(&token, incr("pipe/refused"))),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let first = pipeline_frame(&token, vec![(1, incr("pipe/ran")), (2, incr("pipe/ran"))]);
        send.write_all(&first).await.unwrap();
        send.write_all(&second).await.unwrap();
        let _ = send.finish();
        let mut tags = Vec::new();
        let refusal = loop {
            match next_answers(&mut recv).await {
                Some(Ok(answers)) => {
                    for (tag, r) in answers {
                        assert!(matches!(r, Response::Written { .. }), "{case}: {r:?}");
                        tags.push(tag);
                    }
                }
                Some(Err(refusal)) => break refusal,
                None => panic!("{case}: the stream ended without a refusal"),
            }
        };
        tags.sort();
        assert_eq!(
            tags,
            vec![1, 2],
            "{case}: the first frame's requests are answered first"
        );
        assert!(
            matches!(&refusal, Response::Error(e) if e.kind == ErrorKind::InvalidRequest),
            "{case}: {refusal:?}"
        );
        println!("{case}: {refusal:?}");
        assert!(
            next_answers(&mut recv).await.is_none(),
            "{case}: nothing after the refusal"
        );
    }
    let client = c.client(0).unwrap();
    let ran = client.request(read("pipe/ran", None, 0)).await.unwrap();
    assert_eq!(counter_of(&ran), Some(4));
    let refused = client.request(read("pipe/refused", None, 0)).await.unwrap();
    assert!(matches!(refused, Response::Value { value: None, .. }), "{refused:?}");
}

/// A client pipelines 200 reads of a 3.7 MB value and never reads the
/// answers: the reads still run to their (charged or refused) answers, so
/// the node's read slots are free and another client's read is answered
/// within a second, and the node's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_unread_pipelined_answers_hold_up_no_other_client() {
    let _g = serial();
    let c = node().await;
    big_value(&c, "pipe/big").await;
    let baseline = c.rss_kib(0).unwrap();
    let token = c.defaults.token.clone();
    let (_e, conn) = raw(&c, "127.0.0.3").await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let reads: Vec<(u32, RequestBody)> = (0..200).map(|t| (t, read("pipe/big", None, 0))).collect();
    send.write_all(&pipeline_frame(&token, reads)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..5 {
        let other = c.client(0).unwrap();
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(1), other.read(&Key::new("pipe/probe").unwrap())).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "a normal read was not answered within 1 s while a client left its pipelined answers unread: {r:?}"
        );
        println!("normal read answered in {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss = c.rss_kib(0).unwrap();
    println!("RSS {} MiB over a baseline of {} MiB", rss / 1024, baseline / 1024);
    // The answer budget (64 MiB), QUIC's buffers for the connection and
    // the allocator's slack.
    assert!(rss < baseline + 250 * 1024, "RSS {} MiB", rss / 1024);
}

/// A token no state holds: a dot of a replica that never wrote.
fn unmet_token() -> CausalToken {
    CausalToken {
        context: lattice_core::clock::CausalContext::from_dots([lattice_core::clock::Dot {
            replica: lattice_core::clock::ReplicaId(999_999),
            counter: 7,
        }]),
        ..CausalToken::default()
    }
}

/// A client that resets its side of a pipeline stream gives up its
/// answers: the 100 reads it left waiting (30 s each) are dropped within a
/// second, as when it stops the stream or closes the connection. (The
/// node used to take a reset for a finish and keep them waiting.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_its_pipeline_stream_gives_up_its_waiting_reads() {
    let _g = serial();
    let c = node().await;
    let token = c.defaults.token.clone();
    let (_e, conn) = raw(&c, "127.0.0.1").await;
    let waiting: Vec<(u32, RequestBody)> = (0..100)
        .map(|t| (t, read("pipe/w", Some(unmet_token()), 30_000)))
        .collect();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&pipeline_frame(&token, waiting)).await.unwrap();
    let gauge = || metric(&c, "lattice_waiting_reads");
    let t = Instant::now();
    while gauge() < 100.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the reads wait: {}", gauge());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send.reset(0u32.into()).unwrap();
    let t = Instant::now();
    while gauge() > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{} reads still wait {:?} after their client reset its stream",
            gauge(),
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("100 waiting reads dropped {:?} after the reset", t.elapsed());
}

/// A node that refuses a pipeline stream (here a stand-in that answers
/// every stream's first frame with `Overloaded`, as a node whose read
/// budget is full does) fails the SDK's calls on it with that error at
/// once; the SDK retries a write on fresh streams and then reports it,
/// never waiting out its 10 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_fails_its_calls_with_the_nodes_refusal_of_a_pipeline_stream() {
    use lattice_core::proto::client::{encode_answer, ClientError};
    let ca = certs::new_ca("test").unwrap();
    let n1 = certs::new_dev_node_cert(&ca, "n1").unwrap();
    let mut tls = certs::server_tls(&ca.cert, &n1).unwrap();
    tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    let node = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = node.local_addr().unwrap();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = refused.clone();
    tokio::spawn(async move {
        while let Some(incoming) = node.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let counted = counted.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut len = [0u8; 4];
                    if recv.read_exact(&mut len).await.is_err() {
                        continue;
                    }
                    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                    let _ = recv.read_exact(&mut frame).await;
                    let refusal = encode_answer(&Response::Error(ClientError {
                        kind: ErrorKind::Overloaded,
                        message: "the node is reading too many requests at once".into(),
                        regions: Vec::new(),
                    }))
                    .unwrap();
                    let mut out = (refusal.len() as u32).to_be_bytes().to_vec();
                    out.extend(refusal);
                    let _ = send.write_all(&out).await;
                    let _ = send.finish();
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let client =
        lattice_client::Client::new(vec![lattice_client::Endpoint::named("n1", addr)], "token", &ca.cert).unwrap();
    let t = Instant::now();
    let r = client.write(vec![(Key::new("k").unwrap(), Op::CounterAdd(1))]).await;
    println!(
        "{r:?} after {:?}, {} streams refused",
        t.elapsed(),
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(matches!(r, Err(lattice_client::Error::Overloaded(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "each attempt on a fresh stream"
    );
}
