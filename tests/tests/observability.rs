//! Conflicts and lag you can see (issue 16): the conflict counters, the
//! replication lag gauge and the propagation histogram move on real nodes
//! when writes really are concurrent, and the Grafana dashboard
//! (`deploy/grafana/lattice.json`) queries only metrics a node exports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::Client;
use lattice_core::crdt::{Field, FieldKind, Op, ValueView};
use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::relay::Mesh;
use lattice_tests::{http_get, key, read_value, runtime, serial, Cluster};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

const DASHBOARD: &str = include_str!("../../deploy/grafana/lattice.json");

/// Every metric name (`lattice_...`) the dashboard's PromQL queries: in
/// each target's `expr` and each template variable's `definition`.
fn dashboard_metrics(json: &str) -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(q)) => out.extend(promql_metrics(q)),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let v: serde_json::Value = serde_json::from_str(json).expect("the dashboard is not JSON");
    let mut out = BTreeSet::new();
    walk(&v, &mut out);
    out
}

/// The metric names in a PromQL expression: identifiers that start with
/// `lattice_` (label values are quoted and never do).
fn promql_metrics(q: &str) -> impl Iterator<Item = String> + '_ {
    q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("lattice_"))
        .map(str::to_string)
}

/// The names of the samples in a Prometheus text exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// What the dashboard queries that `metrics_text` does not expose.
fn missing(dashboard: &str, metrics_text: &str) -> Vec<String> {
    let have = exposed(metrics_text);
    dashboard_metrics(dashboard)
        .into_iter()
        .filter(|m| !have.contains(m))
        .collect()
}

fn metrics_text(c: &Cluster, i: usize) -> String {
    let addr = c.config(i).unwrap().metrics.expect("no metrics address");
    let a = http_get(addr, "/metrics", None).unwrap();
    assert_eq!(a.code, 200, "{}", a.body);
    a.body
}

/// The value of the sample `name` whose labels include every one of
/// `labels` (`None`: there is none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let all = labels
            .iter()
            .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        all.then(|| value.trim().parse().ok()).flatten()
    })
}

fn conflicts(c: &Cluster, i: usize, kind: &str, keyspace: &str) -> f64 {
    let text = metrics_text(c, i);
    let name = format!("lattice_conflicts_{kind}_total");
    sample(&text, &name, &[("keyspace", keyspace)])
        .unwrap_or_else(|| panic!("no {name}{{keyspace={keyspace:?}}}:\n{text}"))
}

async fn wait_for(what: &str, c: &Cluster, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn holds(client: &Client, k: &Key) -> bool {
    matches!(read_value(client, k).await, Ok(Some(_)))
}

#[test]
fn the_extractor_catches_a_metric_the_node_does_not_export() {
    let names = dashboard_metrics(DASHBOARD);
    for want in [
        "lattice_client_writes_total",
        "lattice_propagation_seconds_bucket",
        "lattice_peer_replication_lag_seconds",
        "lattice_conflicts_remove_update_total",
    ] {
        assert!(
            names.contains(want),
            "{want} not extracted from the dashboard: {names:?}"
        );
    }
    // Every name the dashboard queries, exposed: nothing missing.
    let exposition: String = names.iter().map(|n| format!("{n}{{a=\"b\"}} 1\n")).collect();
    assert_eq!(missing(DASHBOARD, &exposition), Vec::<String>::new());
    // A copy with one metric misspelt is caught.
    let typo = DASHBOARD.replacen(
        "lattice_conflicts_mv_siblings_total",
        "lattice_conflicts_mv_sibling_total",
        1,
    );
    assert_eq!(
        missing(&typo, &exposition),
        vec!["lattice_conflicts_mv_sibling_total".to_string()]
    );
    // A template variable's query counts too.
    let typo = DASHBOARD.replace(
        "label_values(lattice_client_writes_total, instance)",
        "label_values(lattice_client_write_total, instance)",
    );
    assert_eq!(
        missing(&typo, &exposition),
        vec!["lattice_client_write_total".to_string()]
    );
}

/// Concurrent writes in two regions, made concurrent by cutting the link
/// between them: each conflict counter moves on the node(s) the
/// definitions (core `replica::conflicts`) say, by the counts they say;
/// the propagation histogram has observations; the lag gauge rises while
/// the link is cut and returns to 0. Then the dashboard's every metric is
/// on the nodes' `/metrics`.
#[test]
fn concurrent_writes_in_two_regions_move_the_conflict_and_lag_metrics() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
        for i in 0..2 {
            c.edit_config(i, |cfg| {
                cfg.policy_version = 1;
                cfg.policy = vec![Policy::new("app/", Regions::All, Priority::Normal)];
            })
            .unwrap();
        }
        let mesh = Mesh::install(&c, Duration::from_millis(2)).await.unwrap();
        c.start_all().unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let (eu, us) = (c.client(0).unwrap(), c.client(1).unwrap());

        // Before the cut: a map whose counter field both regions hold.
        let map = key("map");
        let field = Field::new("n", FieldKind::Counter);
        let inc = || Op::MapApply {
            field: field.clone(),
            op: Box::new(Op::CounterAdd(1)),
        };
        eu.write(vec![(map.clone(), inc())]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !holds(&us, &map).await {
            assert!(Instant::now() < deadline, "the map never crossed\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The engine samples its counters every 200 ms of activity.
        wait_for(
            "the conflict counters on both nodes",
            &c,
            Duration::from_secs(10),
            || {
                (0..2).all(|i| {
                    sample(
                        &metrics_text(&c, i),
                        "lattice_conflicts_lww_resolved_total",
                        &[("keyspace", "app/")],
                    )
                    .is_some()
                })
            },
        )
        .await;
        for i in 0..2 {
            for kind in ["lww_resolved", "mv_siblings", "kind_clashes", "remove_update"] {
                assert_eq!(conflicts(&c, i, kind, ""), 0.0, "node {i} {kind} before any conflict");
            }
        }

        mesh.cut(0, 1, true);
        let (lww, mv, kind) = (key("app/lww"), key("mv"), key("kind"));
        eu.write(vec![
            (lww.clone(), Op::LwwSet("from-eu".into())),
            (mv.clone(), Op::MvSet("a".into())),
            (kind.clone(), Op::SetAdd(vec!["x".into()])),
            (map.clone(), Op::MapRemove(field.clone())),
        ])
        .await
        .unwrap();
        // Later on the same machine's clock: us's LWW write wins.
        tokio::time::sleep(Duration::from_millis(50)).await;
        us.write(vec![
            (lww.clone(), Op::LwwSet("from-us".into())),
            (mv.clone(), Op::MvSet("b".into())),
            (kind.clone(), Op::CounterAdd(1)),
            (map.clone(), inc()),
        ])
        .await
        .unwrap();
        // While cut, eu's writes wait for us's acknowledgement: lag in time.
        let lag = |c: &Cluster, i: usize, peer: &str| {
            sample(
                &metrics_text(c, i),
                "lattice_peer_replication_lag_seconds",
                &[("peer", peer)],
            )
            .expect("no lag gauge")
        };
        let peer = |i: usize| c.config(i).unwrap().node;
        let (n1, n2) = (peer(0), peer(1));
        wait_for(
            "a lag of at least 0.5 s both ways while cut",
            &c,
            Duration::from_secs(10),
            || lag(&c, 0, &n2) >= 0.5 && lag(&c, 1, &n1) >= 0.5,
        )
        .await;

        mesh.heal();
        c.wait_converged(Duration::from_secs(60)).await.unwrap();
        wait_for("the lag back to 0 on both nodes", &c, Duration::from_secs(20), || {
            lag(&c, 0, &n2) == 0.0 && lag(&c, 1, &n1) == 0.0
        })
        .await;
        // The gauges are sampled every 200 ms: wait for the counts too.
        wait_for("us's counts", &c, Duration::from_secs(10), || {
            conflicts(&c, 1, "remove_update", "") >= 1.0 && conflicts(&c, 1, "lww_resolved", "app/") >= 1.0
        })
        .await;

        // The outcome the counters describe.
        assert_eq!(
            read_value(&eu, &lww).await.unwrap(),
            Some(ValueView::Register(Some("from-us".into())))
        );
        match read_value(&eu, &mv).await.unwrap() {
            Some(ValueView::Values(v)) => assert_eq!(v.len(), 2, "{v:?}"),
            other => panic!("mv: {other:?}"),
        }
        assert!(matches!(
            read_value(&us, &kind).await.unwrap(),
            Some(ValueView::Conflict(_))
        ));
        match read_value(&eu, &map).await.unwrap() {
            Some(ValueView::Map(m)) => assert!(m.contains_key(&field), "the updated field was removed: {m:?}"),
            other => panic!("map: {other:?}"),
        }

        // LWW: counted where the loser arrives after the winner (us), once
        // per arrival (a repair round that crossed the delta may bring it
        // again), its value lost every time; never on eu, which received
        // the winner. Keyspace "app/".
        let resolved = conflicts(&c, 1, "lww_resolved", "app/");
        assert!((1.0..=3.0).contains(&resolved), "us lww_resolved {resolved}");
        assert_eq!(conflicts(&c, 1, "lww_values_lost", "app/"), resolved);
        assert_eq!(conflicts(&c, 0, "lww_resolved", "app/"), 0.0);
        assert_eq!(conflicts(&c, 0, "lww_resolved", ""), 0.0);
        assert_eq!(conflicts(&c, 1, "lww_resolved", ""), 0.0);
        // MV register and kind clash: one sibling, one kind, on each side.
        for i in 0..2 {
            assert_eq!(conflicts(&c, i, "mv_siblings", ""), 1.0, "node {i} mv_siblings");
            assert_eq!(conflicts(&c, i, "kind_clashes", ""), 1.0, "node {i} kind_clashes");
            assert_eq!(conflicts(&c, i, "mv_siblings", "app/"), 0.0);
        }
        // Map field: us held the field with eu's dot and its own; eu's
        // removal covered eu's only: counted on us. eu, which no longer
        // held the field, counts nothing.
        assert_eq!(conflicts(&c, 1, "remove_update", ""), 1.0);
        assert_eq!(conflicts(&c, 0, "remove_update", ""), 0.0);

        // Every key the other side changed was timed.
        for i in 0..2 {
            let n = c.metric(i, "lattice_propagation_seconds_count").unwrap();
            assert!(n >= 4.0, "node {i}: {n} propagation observations");
        }
        // The status says the same, and so does `lattice status`.
        let s = c.status(1).await.unwrap();
        let app = s
            .conflicts
            .iter()
            .find(|k| k.keyspace == "app/")
            .expect("no app/ conflicts");
        assert_eq!(app.lww_resolved as f64, resolved);
        assert!(s.peers.iter().all(|p| p.lag_ms == 0), "{:?}", s.peers);
        let cli = Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"));
        let out = std::process::Command::new(cli)
            .arg("--config")
            .arg(c.dir.path().join("client.toml"))
            .arg("status")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        // The defaults file names eu first.
        assert!(
            out.contains("conflicts (since start):")
                && out.contains("lww 0 (0 values lost), mv siblings 1, kind clashes 1, remove vs update 0")
                && out.contains("groups (0 ms)"),
            "{out}"
        );

        // The dashboard queries only what a node exports.
        for i in 0..2 {
            let text = metrics_text(&c, i);
            assert_eq!(missing(DASHBOARD, &text), Vec::<String>::new(), "node {i}:\n{text}");
        }
        c.stop(0).unwrap();
        c.stop(1).unwrap();
    });
}

/// A top-level set: eu and us add `x` concurrently (their link cut), ap
/// gets both adds; eu then removes `x` having seen only its own. ap holds
/// `x` with both dots and eu's removal covers one: counted on ap, and `x`
/// survives everywhere (add-wins). eu counts nothing (it never holds `x`
/// with a dot it saw removed). us is not asserted: whether eu's add and
/// removal reach it joined or one by one decides whether it counts.
#[test]
fn a_remove_that_missed_a_concurrent_add_is_counted_where_both_adds_met() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::prepare(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
        let mesh = Mesh::install(&c, Duration::from_millis(2)).await.unwrap();
        c.start_all().unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let (eu, us, ap) = (c.client(0).unwrap(), c.client(1).unwrap(), c.client(2).unwrap());
        let set = key("set");
        mesh.cut(0, 1, true);
        wait_for("the conflict counters on ap", &c, Duration::from_secs(10), || {
            sample(
                &metrics_text(&c, 2),
                "lattice_conflicts_remove_update_total",
                &[("keyspace", "")],
            )
            .is_some()
        })
        .await;
        let merges = |c: &Cluster| c.metric(2, "lattice_merges_total").unwrap();
        let before = merges(&c);
        eu.write(vec![(set.clone(), Op::SetAdd(vec!["x".into()]))])
            .await
            .unwrap();
        us.write(vec![(set.clone(), Op::SetAdd(vec!["x".into()]))])
            .await
            .unwrap();
        wait_for("ap merging both adds", &c, Duration::from_secs(20), || {
            merges(&c) >= before + 2.0
        })
        .await;
        eu.write(vec![(set.clone(), Op::SetRemove(vec!["x".into()]))])
            .await
            .unwrap();
        wait_for("ap counting the remove that lost", &c, Duration::from_secs(20), || {
            conflicts(&c, 2, "remove_update", "") >= 1.0
        })
        .await;
        mesh.heal();
        c.wait_converged(Duration::from_secs(60)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for client in [&eu, &us, &ap] {
            assert_eq!(
                read_value(client, &set).await.unwrap(),
                Some(ValueView::Set(vec!["x".into()]))
            );
        }
        assert_eq!(conflicts(&c, 2, "remove_update", ""), 1.0);
        assert_eq!(conflicts(&c, 0, "remove_update", ""), 0.0);
        for i in 0..3 {
            c.stop(i).unwrap();
        }
    });
}
