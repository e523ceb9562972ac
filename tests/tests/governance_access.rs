//! Scoped credentials against real nodes (issue 18, "Scoped tokens and
//! client certificates"): a token or a client certificate carries
//! per-prefix `read`, `write`, `watch` and `admin` permissions; what it is
//! not granted is refused with `PermissionDenied` (counted), and scans, log
//! reads and watches of a wider prefix are filtered to what it may read, and
//! to what the region's read policy allows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lattice_client::{Client, Error};
use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::proto::client::{ErrorKind, RequestBody, Response};
use lattice_server::certs;
use lattice_server::config::{AccessEntry, GrantEntry, Perm};
use lattice_server::storage::Durability;
use lattice_tests::{key, runtime, serial, Cluster};
use std::path::Path;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn cli() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
}

const ADMIN: &str = "governance-admin-token-0001";
const EU_APP: &str = "governance-eu-app-token-0001";
const READER: &str = "governance-reader-token-0001";
const WATCHER: &str = "governance-watcher-token-0001";

fn grant(prefix: &str, allow: &[Perm]) -> GrantEntry {
    GrantEntry {
        prefix: prefix.into(),
        allow: allow.to_vec(),
    }
}

fn entry(name: &str, token: Option<&str>, cert: Option<&str>, grants: Vec<GrantEntry>) -> AccessEntry {
    AccessEntry {
        name: name.into(),
        token: token.map(Into::into),
        token_env: None,
        client_cert: cert.map(Into::into),
        grants,
    }
}

/// The credentials of these tests: an admin token, `eu-app` (read and
/// write under `eu/`), `reader` (read everything), `watcher` (read and
/// watch under `eu/`), and `cert-app`, a client certificate reading `eu/`.
fn access() -> Vec<AccessEntry> {
    vec![
        entry(
            "eu-app",
            Some(EU_APP),
            None,
            vec![grant("eu/", &[Perm::Read, Perm::Write])],
        ),
        entry("reader", Some(READER), None, vec![grant("", &[Perm::Read])]),
        entry(
            "watcher",
            Some(WATCHER),
            None,
            vec![grant("eu/", &[Perm::Read, Perm::Watch])],
        ),
        entry("cert-app", None, Some("cert-app"), vec![grant("eu/", &[Perm::Read])]),
    ]
}

fn reg(s: &str) -> Op {
    Op::LwwSet(Bytes::from(s))
}

fn denied<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::PermissionDenied(m)) => assert!(!m.is_empty(), "{what}"),
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

fn text(v: &Option<ValueView>) -> Option<String> {
    match v {
        Some(ValueView::Register(Some(b))) => Some(String::from_utf8_lossy(&b.0).into_owned()),
        _ => None,
    }
}

fn start() -> Cluster {
    Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
        cfg.admin_tokens = vec![ADMIN.into()];
        cfg.access = access();
    })
    .unwrap()
}

#[test]
fn governance_tokens_are_scoped_to_their_prefixes_and_permissions() {
    let _g = serial();
    let c = start();
    let rt = runtime();
    rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let admin = c.client_with_token(0, ADMIN).unwrap();
        let eu = c.client_with_token(0, EU_APP).unwrap();
        let reader = c.client_with_token(0, READER).unwrap();
        admin
            .write(vec![(key("patients/1"), reg("secret")), (key("eu/0"), reg("zero"))])
            .await
            .unwrap();

        // Writes: only under eu/, and a write touching one other key is
        // refused whole.
        eu.write(vec![(key("eu/1"), reg("one"))]).await.unwrap();
        denied(
            eu.write(vec![(key("patients/2"), reg("x"))]).await,
            "eu-app writes patients/",
        );
        denied(
            eu.write(vec![(key("eu/2"), reg("two")), (key("patients/2"), reg("x"))])
                .await,
            "a mixed write",
        );
        assert_eq!(
            text(&admin.read(&key("eu/2")).await.unwrap()),
            None,
            "nothing of it applied"
        );
        assert_eq!(text(&admin.read(&key("patients/2")).await.unwrap()), None);

        // Reads.
        assert_eq!(text(&eu.read(&key("eu/1")).await.unwrap()).as_deref(), Some("one"));
        denied(eu.read(&key("patients/1")).await, "eu-app reads patients/");
        assert_eq!(
            text(&reader.read(&key("patients/1")).await.unwrap()).as_deref(),
            Some("secret")
        );
        denied(
            reader.write(vec![(key("eu/3"), reg("x"))]).await,
            "a read-only token writes",
        );

        // mget: each key on its own.
        let entries = eu.mget(&[key("eu/1"), key("patients/1")]).await.unwrap();
        assert_eq!(text(&entries[0].value).as_deref(), Some("one"));
        assert_eq!(entries[1].value, None);
        assert_eq!(
            entries[1].error.as_ref().map(|e| e.kind),
            Some(ErrorKind::PermissionDenied)
        );

        // Scans: a wider prefix is filtered; a prefix no grant overlaps is refused.
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = eu.scan("", cursor, 100, true).await.unwrap();
            keys.extend(page.into_iter().map(|e| e.key.as_str().to_string()));
            cursor = match next {
                Some(n) => Some(n),
                None => break,
            };
        }
        keys.sort();
        assert_eq!(keys, vec!["eu/0", "eu/1"], "the scan of \"\" holds only eu/ keys");
        denied(eu.scan("patients/", None, 100, true).await, "a scan of patients/");

        // The change log: filtered the same way.
        let page = eu
            .log_read(0, &[], None, "", 1_000, Duration::from_millis(100))
            .await
            .unwrap();
        let logged: Vec<&str> = page.changes.iter().map(|l| l.change.key.as_str()).collect();
        assert!(
            !logged.is_empty() && logged.iter().all(|k| k.starts_with("eu/")),
            "{logged:?}"
        );
        let page = reader
            .log_read(0, &[], None, "", 1_000, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(page.changes.iter().any(|l| l.change.key.as_str() == "patients/1"));
        denied(
            eu.log_read(0, &[], None, "patients/", 10, Duration::ZERO).await,
            "a log read of patients/",
        );
        denied(
            eu.get_at(0, &key("patients/1"), u64::MAX / 2).await,
            "a point-in-time read",
        );

        // The audit log (every keyspace's policy) needs read on every key.
        denied(eu.request(RequestBody::Audit).await, "eu-app reads the audit log");
        assert!(matches!(
            reader.request(RequestBody::Audit).await,
            Ok(Response::Audit(_))
        ));
        // Admin actions need admin.
        let dir = c.dir.path().join("backup-by-eu-app");
        denied(eu.backup(0, dir.to_str().unwrap()).await, "eu-app backs up");
        assert!(!dir.exists());
        denied(reader.reencrypt(0, true).await, "a reader re-encrypts");

        // An unknown token is not a permission matter.
        match c
            .client_with_token(0, "governance-unknown-token-01")
            .unwrap()
            .read(&key("eu/1"))
            .await
        {
            Err(Error::Unauthorized(_)) => {}
            r => panic!("expected Unauthorized, got {r:?}"),
        }
        for c in [admin, eu, reader] {
            c.close().await;
        }
    });
    // Counted by permission.
    assert!(c.metric(0, "lattice_permission_denied_total{perm=\"write\"}").unwrap() >= 3.0);
    assert!(c.metric(0, "lattice_permission_denied_total{perm=\"read\"}").unwrap() >= 5.0);
    assert!(c.metric(0, "lattice_permission_denied_total{perm=\"admin\"}").unwrap() >= 2.0);

    // `lattice status`: the admin sees every credential, eu-app only its
    // own; never a token.
    let status = |token: &str| {
        let out = std::process::Command::new(cli())
            .arg("--config")
            .arg(c.dir.path().join("client.toml"))
            .args(["--token", token, "status"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let all = status(ADMIN);
    for name in ["eu-app", "reader", "watcher", "cert-app", "admin_tokens[0]"] {
        assert!(all.contains(name), "{name} in:\n{all}");
    }
    assert!(all.contains("\"eu/\": read,write"), "{all}");
    let own = status(EU_APP);
    assert!(
        own.contains("eu-app") && !own.contains("reader") && !own.contains("cert-app"),
        "{own}"
    );
    for secret in [ADMIN, EU_APP, READER, WATCHER, &c.defaults.token] {
        assert!(!all.contains(secret) && !own.contains(secret), "a secret in the status");
    }
}

#[test]
fn governance_watches_deliver_only_granted_keys() {
    let _g = serial();
    let c = start();
    let rt = runtime();
    rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let admin = c.client_with_token(0, ADMIN).unwrap();
        let watcher = c.client_with_token(0, WATCHER).unwrap();
        let eu = c.client_with_token(0, EU_APP).unwrap();
        // No watch grant at all, or none under the prefix: refused.
        let mut w = eu.watch(0, "eu/", None).await.unwrap();
        denied(
            tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .expect("an answer within 10 s"),
            "eu-app has no watch",
        );
        let mut w = watcher.watch(0, "patients/", None).await.unwrap();
        denied(
            tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .expect("an answer within 10 s"),
            "a watch of patients/",
        );
        // A watch of every key, resumed from a change before the writes
        // (so it sees them however late it subscribes), delivers only eu/
        // changes.
        let from = token_after_a_write(&admin, "eu/8").await;
        let mut w = watcher.watch(0, "", Some(from)).await.unwrap();
        // The check can fail: the admin's watch does get patients/.
        let mut wa = admin.watch(0, "", Some(from)).await.unwrap();
        admin.write(vec![(key("patients/9"), reg("secret"))]).await.unwrap();
        admin.write(vec![(key("eu/9"), reg("nine"))]).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("a change within 10 s")
            .unwrap()
            .expect("a change");
        assert_eq!(first.key.as_str(), "eu/9", "patients/9 was skipped");
        let all = tokio::time::timeout(Duration::from_secs(10), wa.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(all.key.as_str(), "patients/9", "the admin's watch is not filtered");
        for c in [admin, watcher, eu] {
            c.close().await;
        }
    });
}

#[test]
fn governance_client_certificates_carry_their_grants() {
    let _g = serial();
    let c = start();
    let ca_dir = c.defaults.ca.parent().unwrap().to_path_buf();
    let ca = certs::read_pem(&ca_dir, "ca").unwrap();
    let named = certs::new_client_cert(&ca, "cert-app").unwrap();
    let unnamed = certs::new_client_cert(&ca, "nobody").unwrap();
    let other_ca = certs::new_ca("other").unwrap();
    let foreign = certs::new_client_cert(&other_ca, "cert-app").unwrap();
    let ca_pem = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let with = |id: &certs::Pem| {
        Client::new(vec![c.endpoint(0)], "", &ca_pem)
            .unwrap()
            .with_client_cert(&id.cert, &id.key)
            .unwrap()
            .with_timeout(Duration::from_secs(5))
    };
    let rt = runtime();
    rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let admin = c.client_with_token(0, ADMIN).unwrap();
        admin
            .write(vec![(key("eu/c"), reg("by cert")), (key("patients/c"), reg("secret"))])
            .await
            .unwrap();
        let app = with(&named);
        assert_eq!(text(&app.read(&key("eu/c")).await.unwrap()).as_deref(), Some("by cert"));
        denied(app.read(&key("patients/c")).await, "the certificate reads patients/");
        denied(app.write(vec![(key("eu/c"), reg("x"))]).await, "the certificate writes");
        // A token still wins over the certificate.
        let app_with_token = Client::new(vec![c.endpoint(0)], EU_APP, &ca_pem)
            .unwrap()
            .with_client_cert(&named.cert, &named.key)
            .unwrap();
        app_with_token.write(vec![(key("eu/t"), reg("x"))]).await.unwrap();
        // A certificate of the CA no entry names, and none at all: unknown.
        match with(&unnamed).read(&key("eu/c")).await {
            Err(Error::Unauthorized(_)) => {}
            r => panic!("an unnamed certificate: expected Unauthorized, got {r:?}"),
        }
        match Client::new(vec![c.endpoint(0)], "", &ca_pem)
            .unwrap()
            .read(&key("eu/c"))
            .await
        {
            Err(Error::Unauthorized(_)) => {}
            r => panic!("no token and no certificate: expected Unauthorized, got {r:?}"),
        }
        // A certificate of another CA with the right name fails the handshake.
        let r = with(&foreign).read(&key("eu/c")).await;
        assert!(r.is_err(), "a foreign CA's certificate: {r:?}");
        assert!(!matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
        // The answer to a raw request names the kind.
        match app
            .request(RequestBody::Read {
                key: key("patients/c"),
                after: None,
                wait_ms: 0,
            })
            .await
        {
            Err(Error::PermissionDenied(m)) => assert!(m.contains("cert-app"), "{m}"),
            Ok(Response::Error(e)) => assert_eq!(e.kind, ErrorKind::PermissionDenied),
            r => panic!("{r:?}"),
        }
        for c in [admin, app, app_with_token] {
            c.close().await;
        }
    });
    // The CLI with --client-cert and --client-key, no token.
    let certs_out = c.dir.path().join("client-certs");
    certs::write_pem(&certs_out, "cert-app", &named).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(cli());
        cmd.args(["--config", "/nonexistent/client.toml", "--ca"])
            .arg(&c.defaults.ca)
            .args(["--endpoint", &c.defaults.endpoints[0].to_string(), "--client-cert"])
            .arg(certs_out.join("cert-app.pem"))
            .arg("--client-key")
            .arg(certs_out.join("cert-app.key"))
            .args(args);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["get", "eu/c"]);
    assert!(ok && out.contains("by cert"), "{out}{err}");
    let (ok, _, err) = run(&["get", "patients/c"]);
    assert!(!ok && err.contains("permission denied"), "{err}");
}

#[test]
fn governance_a_resumed_watch_and_the_log_follow_a_newer_read_policy() {
    let _g = serial();
    // patients/ may first be held everywhere; version 2 of the policy keeps
    // it out of eu. A watch resumed from before, and the change log, must
    // no longer hand out what eu may not serve, though it is still on disk.
    let mut c = Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
        cfg.admin_tokens = vec![ADMIN.into()];
        cfg.access = access();
        cfg.policy_version = 1;
        cfg.policy = vec![Policy::new("patients/", Regions::All, Priority::Normal)];
    })
    .unwrap();
    let rt = runtime();
    let from = rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let admin = c.client_with_token(0, ADMIN).unwrap();
        let from = Some(token_after_a_write(&admin, "eu/a").await);
        admin.write(vec![(key("patients/p"), reg("secret"))]).await.unwrap();
        admin.write(vec![(key("eu/b"), reg("b"))]).await.unwrap();
        // Under version 1 the resumed watch gets both (the check can fail).
        let mut again = admin.watch(0, "", from).await.unwrap();
        let k1 = tokio::time::timeout(Duration::from_secs(10), again.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .key;
        assert_eq!(k1.as_str(), "patients/p", "under version 1 patients/ is served");
        admin.close().await;
        from
    });
    c.stop(0).unwrap();
    c.edit_config(0, |cfg| {
        cfg.policy_version = 2;
        cfg.policy = vec![Policy::new(
            "patients/",
            Regions::Only(vec!["us".into()]),
            Priority::Normal,
        )];
    })
    .unwrap();
    c.restart(0).unwrap();
    rt.block_on(async {
        c.wait_serving(0, Duration::from_secs(30)).await.unwrap();
        let admin = c.client_with_token(0, ADMIN).unwrap();
        assert_eq!(crate_status_policy(&admin).await, 2);
        let mut w = admin.watch(0, "", from).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("a change within 10 s")
            .unwrap()
            .expect("a change");
        assert_eq!(next.key.as_str(), "eu/b", "the resumed watch skips patients/p");
        let page = admin
            .log_read(0, &[], None, "", 1_000, Duration::from_millis(100))
            .await
            .unwrap();
        let keys: Vec<&str> = page.changes.iter().map(|l| l.change.key.as_str()).collect();
        assert!(keys.contains(&"eu/b") && !keys.contains(&"patients/p"), "{keys:?}");
        let (entries, _) = admin.scan("", None, 100, false).await.unwrap();
        assert!(entries.iter().all(|e| !e.key.as_str().starts_with("patients/")));
        admin.close().await;
    });
}

/// The watch token of a write of `k`: a watch of every key is opened, then
/// `k` written, until the watch sees it (a watch request and a write on
/// another stream may reach the engine in either order).
async fn token_after_a_write(admin: &Client, k: &str) -> lattice_core::proto::client::WatchToken {
    for _ in 0..20 {
        let mut w = admin.watch(0, "", None).await.unwrap();
        admin.write(vec![(key(k), reg("x"))]).await.unwrap();
        if let Ok(change) = tokio::time::timeout(Duration::from_secs(2), w.next()).await {
            let change = change.unwrap().expect("a change");
            assert_eq!(change.key.as_str(), k);
            return change.token;
        }
    }
    panic!("no watch saw a write of {k} in 20 tries")
}

async fn crate_status_policy(c: &Client) -> u64 {
    match c.request(RequestBody::Status).await.unwrap() {
        Response::Status(s) => s.policy_version,
        r => panic!("{r:?}"),
    }
}

#[test]
fn governance_resp_commands_carry_the_tokens_grants() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    c.edit_config(0, |cfg| {
        cfg.admin_tokens = vec![ADMIN.into()];
        cfg.access = access();
    })
    .unwrap();
    let addr = c.enable_resp(0, false).unwrap();
    c.start_all().unwrap();
    runtime().block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    let mut say = |args: &[&str]| -> String {
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        out.write_all(cmd.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.starts_with('$') && !line.starts_with("$-1") {
            let mut body = String::new();
            reader.read_line(&mut body).unwrap();
            line.push_str(&body);
        }
        line
    };
    assert_eq!(say(&["AUTH", EU_APP]), "+OK\r\n");
    assert_eq!(say(&["SET", "eu/r", "resp"]), "+OK\r\n");
    assert!(say(&["GET", "eu/r"]).ends_with("resp\r\n"));
    let refused = say(&["SET", "patients/r", "x"]);
    assert!(
        refused.starts_with("-NOPERM") && refused.contains("eu-app"),
        "{refused}"
    );
    let refused = say(&["GET", "patients/r"]);
    assert!(refused.starts_with("-NOPERM"), "{refused}");
    assert_eq!(say(&["AUTH", READER]), "+OK\r\n");
    assert!(say(&["GET", "eu/r"]).ends_with("resp\r\n"));
    assert!(say(&["SET", "eu/r", "no"]).starts_with("-NOPERM"));
}
