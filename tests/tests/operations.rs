//! Operational claims of the README against real `latticed` processes
//! (issue 19): what a client refuses in a node's TLS certificate (another
//! CA, another name, a production certificate under a bare address, an
//! expired one), and what the HTTP listener gives a Prometheus scrape, a
//! health check and an operator (`/metrics`, `/healthz`, `/status`),
//! including the refusal counters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, Endpoint, Error as ClientError, NodeStatus};
use lattice_core::clock::{HlcTimestamp, ReplicaId};
use lattice_core::crdt::{GCounter, Value};
use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::proto::client::{RequestBody, Response, PEER_ALPN};
use lattice_core::proto::{Message, PolicyStamp, Section};
use lattice_core::Key;
use lattice_server::certs;
use lattice_server::storage::Durability;
use lattice_tests::{http_get, serial, Cluster};
use quinn::crypto::rustls::QuicClientConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// The SDK's error for a status request to `endpoint`, trusting `ca`: the
/// handshake must fail, so the request never leaves (`Unreachable`).
async fn refused(what: &str, endpoint: Endpoint, token: &str, ca: &str) -> String {
    let client = Client::new(vec![endpoint], token, ca)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    match client.request(RequestBody::Status).await {
        Err(ClientError::Unreachable(m)) => m,
        r => panic!("{what}: the node was not refused in the handshake: {r:?}"),
    }
}

/// Whether a client trusting `ca` gets node `endpoint`'s status.
async fn served(endpoint: Endpoint, token: &str, ca: &str) -> bool {
    let client = Client::new(vec![endpoint], token, ca)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    matches!(client.request(RequestBody::Status).await, Ok(Response::Status(_)))
}

/// A node certificate as `latticed dev` makes one (node name and
/// `localhost`, role `node`, the cluster CA), but valid from 30 days ago
/// to yesterday: only its dates are wrong.
fn expired_dev_node_cert(ca: &certs::Pem, node: &str) -> certs::Pem {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![node.to_string(), "localhost".to_string()]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    p.not_before = epoch + now - Duration::from_secs(30 * 86_400);
    p.not_after = epoch + now - Duration::from_secs(86_400);
    p.distinguished_name.push(rcgen::DnType::CommonName, node);
    p.distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, certs::NODE_OU);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &issuer).unwrap();
    certs::Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Replaces node `i`'s certificate and key with `pem` and restarts it,
/// waiting until it has bound its sockets.
fn restart_with_cert(c: &mut Cluster, i: usize, pem: &certs::Pem) {
    c.stop(i).unwrap();
    certs::replace_pem(&c.dir.path().join("certs"), &format!("n{}", i + 1), pem).unwrap();
    c.start_all().unwrap();
    assert!(c.is_running(i), "n{} did not start:\n{}", i + 1, c.logs());
}

/// README, "Running a real multi-region deployment", step 4, and
/// SECURITY.md's transport paragraph: a client checks the node's
/// certificate against the cluster CA, the name in its endpoint (a bare
/// address: `localhost`, which only dev certificates carry) and its dates,
/// and says which check failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_client_refuses_another_ca_another_name_and_an_expired_certificate() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let token = c.defaults.token.clone();
    let addr: SocketAddr = c.defaults.endpoints[0];
    assert!(served(c.endpoint(0), &token, &ca).await, "the right CA and name");

    // Another cluster's CA: n1's certificate does not chain to it.
    let other = certs::new_ca("other").unwrap();
    let m = refused("another CA", c.endpoint(0), &token, &other.cert).await;
    assert!(m.contains("invalid peer certificate: UnknownIssuer"), "{m}");
    // The CLI says the same and exits non-zero.
    let other_pem = c.dir.path().join("other-ca.pem");
    std::fs::write(&other_pem, &other.cert).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
        .arg("--config")
        .arg(c.dir.path().join("client.toml"))
        .arg("--ca")
        .arg(&other_pem)
        .args(["get", "k"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("UnknownIssuer"), "{err}");

    // n1's certificate asked for as n2: the CA is right, the name is not.
    let m = refused("another name", Endpoint::named("n2", addr), &token, &ca).await;
    assert!(m.contains("certificate not valid for name \"n2\""), "{m}");

    // A production certificate (it names n1 only) under a bare address,
    // which is checked against localhost: refused; under its name: served.
    let ca_pem = certs::read_pem(&c.dir.path().join("certs"), "ca").unwrap();
    restart_with_cert(&mut c, 0, &certs::new_node_cert(&ca_pem, "n1").unwrap());
    let m = refused(
        "a production certificate under a bare address",
        Endpoint::from(addr),
        &token,
        &ca,
    )
    .await;
    assert!(m.contains("certificate not valid for name \"localhost\""), "{m}");
    assert!(
        served(c.endpoint(0), &token, &ca).await,
        "the production certificate under its name"
    );

    // An expired certificate of the right CA, with the right names.
    restart_with_cert(&mut c, 0, &expired_dev_node_cert(&ca_pem, "n1"));
    for endpoint in [c.endpoint(0), Endpoint::from(addr)] {
        let m = refused("expired", endpoint, &token, &ca).await;
        assert!(m.contains("invalid peer certificate: certificate expired"), "{m}");
    }
}

/// One scrape of a Prometheus text exposition, checked the way a scraper
/// reads it: every sample belongs to a family declared by a `# TYPE` line
/// before it, names are legal, values are numbers.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let legal = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut types = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let (name, kind) = decl.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
                assert!(legal(name), "illegal metric name in {line:?}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped", "unknown"].contains(&kind),
                    "unknown type in {line:?}"
                );
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "a second TYPE line for {name}"
                );
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a sample without a value: {line:?}"));
            let name = series.split('{').next().unwrap_or_default();
            assert!(legal(name), "illegal metric name in {line:?}");
            let family = match name.strip_suffix("_total") {
                Some(f) if types.get(f).is_some_and(|k| k == "counter") => f,
                // A histogram's series (lattice_propagation_seconds).
                _ => ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .find(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                    .unwrap_or(name),
            };
            assert!(
                types.contains_key(family),
                "sample {line:?} has no # TYPE line before it"
            );
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("a value that is not a number: {line:?}"));
            samples.insert(series.to_string(), value);
        }
        Scrape { types, samples }
    }

    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in the scrape: {:?}", self.samples.keys()))
    }
}

/// A scrape of node `i`'s `/metrics`.
fn scrape(c: &Cluster, i: usize) -> Scrape {
    let a = http_get(c.config(i).unwrap().metrics.unwrap(), "/metrics", None).unwrap();
    assert_eq!(a.code, 200, "{a:?}");
    Scrape::parse(&a.body)
}

/// Polls node `i`'s metric `series` until `ok` holds of it.
async fn metric_until(c: &Cluster, i: usize, series: &str, ok: impl Fn(f64) -> bool, what: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = scrape(c, i).value(series);
        if ok(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "n{}: {series} = {v}: {what}\n{}",
            i + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// README: `curl .../metrics` gives Prometheus metrics, the `metrics`
/// address serves `/metrics`, `/healthz` and `/status`, and refusals are
/// counted: unauthorized requests and reads a policy keeps from the region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_metrics_healthz_and_status_serve_a_scrape_and_count_refusals() {
    let _g = serial();
    let eu_only = Policy::new("eu-only/", Regions::Only(vec!["eu".into()]), Priority::Normal);
    let c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |_, cfg| {
        cfg.policy_version = 1;
        cfg.policy = vec![eu_only.clone()];
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let http = c.config(0).unwrap().metrics.unwrap();

    let health = http_get(http, "/healthz", None).unwrap();
    assert_eq!((health.code, health.body.as_str()), (200, "ok\n"), "{health:?}");

    // What a Prometheus scrape needs: 200, the text format's content type,
    // and samples of declared families.
    let m = http_get(http, "/metrics", None).unwrap();
    assert_eq!(m.code, 200);
    let ct = m.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain") && ct.contains("version=0.0.4"), "{ct}");
    let before = Scrape::parse(&m.body);
    for (family, kind) in [
        ("lattice_client_writes", "counter"),
        ("lattice_client_unauthorized", "counter"),
        ("lattice_peer_frames_rejected", "counter"),
        ("lattice_policy_refused_entries", "gauge"),
        ("lattice_connections_open", "gauge"),
    ] {
        assert_eq!(before.types.get(family).map(String::as_str), Some(kind), "{family}");
    }

    // A write moves the write counter by one on its node, and the merge
    // counter on the other.
    let eu = c.client(0).unwrap();
    let merges = scrape(&c, 1).value("lattice_merges_total");
    eu.counter("visits").incr(1).await.unwrap();
    assert_eq!(
        scrape(&c, 0).value("lattice_client_writes_total"),
        before.value("lattice_client_writes_total") + 1.0
    );
    metric_until(&c, 1, "lattice_merges_total", |v| v > merges, "the write never merged").await;

    // A bad token is refused and counted, once per request.
    let unauthorized = scrape(&c, 0).value("lattice_client_unauthorized_total");
    let bad = c.client_with_token(0, "not-the-token-0123456789").unwrap();
    assert!(matches!(
        bad.request(RequestBody::Status).await,
        Err(ClientError::Unauthorized(_))
    ));
    assert_eq!(
        scrape(&c, 0).value("lattice_client_unauthorized_total"),
        unauthorized + 1.0
    );

    // A read the policy keeps from us is refused there, and counted.
    let us = c.client(1).unwrap();
    let denied = scrape(&c, 1).value("lattice_policy_denied_total");
    match us.counter("eu-only/secret").get().await {
        Err(ClientError::PolicyDenied { regions, .. }) => assert_eq!(regions, vec!["eu".to_string()]),
        r => panic!("expected PolicyDenied at us, got {r:?}"),
    }
    assert_eq!(scrape(&c, 1).value("lattice_policy_denied_total"), denied + 1.0);

    // /status: the node's status as JSON, refreshed every second.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = http_get(http, "/status", None).unwrap();
        assert_eq!(a.code, 200, "{a:?}");
        assert_eq!(a.header("content-type"), Some("application/json"));
        let s: NodeStatus = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            (s.node.as_str(), s.region.0.as_str(), s.policy_version),
            ("n1", "eu", 1)
        );
        if s.peers.iter().any(|p| p.node == "n2" && p.alive) {
            break;
        }
        assert!(Instant::now() < deadline, "/status never showed n2 alive: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// README, "Replication policies": a node refuses to store a key from a
/// peer that its region may not hold (`lattice_policy_refused_entries`).
/// Nodes that agree on the policy never send one, so this test speaks for
/// n2 (with n2's certificate, n1 running alone) and sends n1 a delta with
/// a `us-only/` key beside a key every region may hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_a_key_a_peer_sends_against_the_policy_is_refused_and_counted() {
    let _g = serial();
    let us_only = Policy::new("us-only/", Regions::Only(vec!["us".into()]), Priority::Normal);
    let mut c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
    for i in 0..2 {
        c.edit_config(i, |cfg| {
            cfg.policy_version = 1;
            cfg.policy = vec![us_only.clone()];
        })
        .unwrap();
    }
    c.restart(0).unwrap();
    c.wait_serving(0, Duration::from_secs(30)).await.unwrap();
    let refused = scrape(&c, 0).value("lattice_policy_refused_entries");

    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let n2 = certs::read_pem(&c.dir.path().join("certs"), "n2").unwrap();
    let tls = certs::client_tls(&ca, Some(&n2), PEER_ALPN).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = e.connect(c.defaults.endpoints[0], "n1").unwrap().await.unwrap();
    let mut s = conn.open_uni().await.unwrap();
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    s.write_all(&frame(&0x5eed_u64.to_be_bytes())).await.unwrap(); // boot id
    let sender = ReplicaId(0x5eed);
    let entry = |k: &str| {
        let v = Value::GCounter(GCounter::default().inc(sender, 1));
        (Key::new(k).unwrap(), Arc::new(v))
    };
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let delta = Message::Delta {
        sender,
        base_from: None,
        time: HlcTimestamp { wall_ms, logical: 0 },
        policy: PolicyStamp::of(&c.config(0).unwrap().policy_set().unwrap()),
        sections: vec![Section {
            class: 1,
            base: 0,
            from: 0,
            to: 0,
            entries: vec![entry("us-only/k"), entry("public/k")],
            written: None,
        }],
        ack: None,
    };
    s.write_all(&frame(&lattice_core::proto::encode(&delta).unwrap()))
        .await
        .unwrap();

    // n1 stores the key it may hold, and refuses and counts the other.
    let n1 = c.client(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lattice_tests::read_value(&n1, &Key::new("public/k").unwrap())
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "n1 never took the delta:\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    metric_until(
        &c,
        0,
        "lattice_policy_refused_entries",
        |v| v == refused + 1.0,
        "not refused once",
    )
    .await;
    assert!(
        !c.log_lines("refused a key this region may not hold").is_empty(),
        "the refusal is logged"
    );
    drop(s);
}
