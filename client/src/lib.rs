//! `lattice-client`: the Lattice client SDK.
//!
//! A [`Client`] holds QUIC connections to a list of nodes (the first is
//! the home node) and offers typed handles for every CRDT type; values are
//! any serde type, encoded with rmp-serde:
//!
//! ```no_run
//! # async fn demo() -> Result<(), lattice_client::Error> {
//! let ca = std::fs::read_to_string(".lattice-dev/certs/ca.pem").unwrap_or_default();
//! let client = lattice_client::Client::builder()
//!     .endpoints(["n1@127.0.0.1:7401", "n2@127.0.0.1:7402"])
//!     .token("dev-token")
//!     .ca_cert(&ca)
//!     .connect()
//!     .await?;
//! client.counter("visits").incr(5).await?;
//! client.register::<String>("greeting").set(&"hello".to_string()).await?;
//! client.set::<u32>("primes").add(&7).await?;
//! let visits: i128 = client.counter("visits").get().await?;
//! # let _ = visits;
//! # Ok(()) }
//! ```
//!
//! Each endpoint names the node it expects (`NAME@HOST:PORT`, see
//! [`Endpoint`]): the node's certificate must carry that name, so the key of
//! one node cannot pass for another. A bare `HOST:PORT` is checked against
//! [`ClientBuilder::server_name`] (default `localhost`, which only the
//! certificates of `latticed dev` carry).
//!
//! Sessions: the client remembers, per key, the causal token of what it
//! wrote and read, and a read waits (up to `read_wait`) until the node it
//! asks has that state, or tries another node: read-your-writes and
//! monotonic reads hold across failover. Writes carry an operation id; a
//! retry of a timed-out write goes to the same node first, which applies it
//! once. Every call has a timeout.

pub mod bench;
mod handles;
pub mod json;
mod log;
mod pipe;
mod revocation;

pub use handles::{Batch, CounterHandle, MapHandle, MvRegisterHandle, RegisterHandle, SetHandle};
pub use log::{LogConsumer, LogPage, BACKUP_WAIT};
pub use pipe::PIPELINE_INLINE_BYTES;
pub use revocation::normalize_serial;

use lattice_core::proto::client::{
    decode_answer, encode_client, ClientRequest, RequestBody, Response, CLIENT_ALPN, MAX_ANSWER_FRAME,
};
pub use lattice_core::proto::client::{Entry, ScanCursor, MGET_MAX_KEYS, SCAN_MAX_KEYS};
use quinn::crypto::rustls::QuicClientConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub use lattice_core::crdt::{Op, ValueView};
pub use lattice_core::proto::client::{CausalToken, Change, ErrorKind, NodeStatus, OpId, WatchToken, WriteConcern};

/// What can go wrong talking to a cluster. Each variant is something a
/// caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client setup is invalid (no endpoint, bad CA file, ...).
    #[error("{}", with_kind("configuration", .0))]
    Config(String),
    /// No node could be reached.
    #[error("{}", with_kind("unavailable", .0))]
    Unavailable(String),
    /// The call took longer than its timeout. A write may still have been
    /// applied; retrying it with the same operation id applies it once.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The token was refused.
    #[error("{}", with_kind("unauthorized", .0))]
    Unauthorized(String),
    /// The node's queues are full: retry later, or on another node.
    #[error("{}", with_kind("overloaded", .0))]
    Overloaded(String),
    /// The key holds another type.
    #[error("{}", with_kind("type mismatch", .0))]
    TypeMismatch(String),
    /// No reachable node had caught up with this session's writes in time.
    #[error("{}", with_kind("not caught up", .0))]
    NotCaughtUp(String),
    /// The key does not exist.
    #[error("{}", with_kind("not found", .0))]
    NotFound(String),
    /// The request was refused as invalid (bad key, value too large, ...).
    #[error("{}", with_kind("invalid request", .0))]
    InvalidRequest(String),
    /// A watch cannot resume: read again and watch anew.
    #[error("{}", with_kind("watch lost", .0))]
    WatchLost(String),
    /// The watcher fell too far behind and the node cut it off: resume
    /// from [`Watch::last_token`] ([`Follow`] does so by itself).
    #[error("{}", with_kind("watch lagged", .0))]
    WatchLagged(String),
    /// The node failed internally.
    #[error("{}", with_kind("server error", .0))]
    Internal(String),
    /// A value could not be encoded or decoded with rmp-serde.
    #[error("{}", with_kind("value codec", .0))]
    Codec(String),
    /// The node's answer could not be decoded.
    #[error("{}", with_kind("protocol", .0))]
    Protocol(String),
    /// A node could not be connected to at all (the request never left).
    #[error("{}", with_kind("unreachable", .0))]
    Unreachable(String),
    /// The key's replication policy keeps it from the node's region; the
    /// regions that may serve it are named (connect to a node there).
    #[error("{message}")]
    PolicyDenied {
        /// The node's explanation.
        message: String,
        /// Regions that may serve the key (empty: none named).
        regions: Vec<String>,
    },
    /// The write is durable in the node's region but its write concern was
    /// not met in time. It is still replicating and is not rolled back.
    #[error("{0}")]
    ReplicationTimeout(String),
    /// A policy set was refused (invalid, or not newer than the one in force).
    #[error("{}", with_kind("invalid policy", .0))]
    InvalidPolicy(String),
    /// A policy set was refused for its signature: unsigned, signed by a
    /// key the node does not list in `policy_keys`, or not verifying.
    #[error("{}", with_kind("policy set signature refused", .0))]
    PolicySignature(String),
    /// A retried write reached a node that restarted since its first
    /// attempt (within `retry_window_ms`): the write may or may not have
    /// been applied. Read the key first.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// The change log no longer holds what was asked: re-read the state
    /// and go on from the log's current end.
    #[error("{}", with_kind("trimmed", .0))]
    Trimmed(String),
    /// The credential is valid but not granted this on the key or prefix
    /// (its `[[access]]` grants on the node).
    #[error("{}", with_kind("permission denied", .0))]
    PermissionDenied(String),
}

/// `message` under the name of its kind (`type mismatch: ...`), unless
/// it starts with that name already (a node's message often does: `type
/// mismatch: the key holds ...`, `type mismatch on field ...`), so an error
/// names its kind once.
fn with_kind(kind: &str, message: &str) -> String {
    let named = message
        .get(..kind.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(kind));
    if named {
        message.to_string()
    } else {
        format!("{kind}: {message}")
    }
}

impl Error {
    fn from_server(e: lattice_core::proto::client::ClientError) -> Error {
        let message = e.message;
        match e.kind {
            ErrorKind::PolicyDenied => Error::PolicyDenied {
                message,
                regions: e.regions.into_iter().map(|r| r.0).collect(),
            },
            ErrorKind::ReplicationTimeout => Error::ReplicationTimeout(message),
            ErrorKind::InvalidPolicy => Error::InvalidPolicy(message),
            ErrorKind::PolicySignature => Error::PolicySignature(message),
            ErrorKind::Unauthorized => Error::Unauthorized(message),
            ErrorKind::Overloaded => Error::Overloaded(message),
            ErrorKind::TypeMismatch => Error::TypeMismatch(message),
            ErrorKind::InvalidRequest => Error::InvalidRequest(message),
            ErrorKind::NotFound => Error::NotFound(message),
            ErrorKind::NotCaughtUp => Error::NotCaughtUp(message),
            ErrorKind::Unavailable => Error::Unavailable(message),
            ErrorKind::WatchLost => Error::WatchLost(message),
            ErrorKind::WatchLagged => Error::WatchLagged(message),
            ErrorKind::Internal => Error::Internal(message),
            ErrorKind::OutcomeUnknown => Error::OutcomeUnknown(message),
            ErrorKind::Trimmed => Error::Trimmed(message),
            ErrorKind::PermissionDenied => Error::PermissionDenied(message),
        }
    }

    /// True for failures where another node may succeed.
    fn try_elsewhere(&self) -> bool {
        matches!(
            self,
            Error::Unreachable(_)
                | Error::Unavailable(_)
                | Error::Timeout(_)
                | Error::Overloaded(_)
                | Error::NotCaughtUp(_)
        )
    }
}

/// A node to talk to: its address and the name its certificate must carry.
/// Written `NAME@HOST:PORT` (e.g. `eu-1@10.0.0.5:7401`), or `HOST:PORT`
/// to check the client's default name (`localhost` unless
/// [`ClientBuilder::server_name`] says otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The node name its certificate must carry (`None`: the default).
    pub name: Option<String>,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

impl Endpoint {
    /// The node `name` at `addr`.
    pub fn named(name: impl Into<String>, addr: SocketAddr) -> Endpoint {
        Endpoint {
            name: Some(name.into()),
            addr,
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint { name: None, addr }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = Error;

    /// Parses `NAME@HOST:PORT` or `HOST:PORT`; a host name is resolved.
    fn from_str(s: &str) -> Result<Endpoint, Error> {
        use std::net::ToSocketAddrs;
        let (name, host) = match s.split_once('@') {
            Some((n, h)) if !n.is_empty() => (Some(n.to_string()), h),
            Some(_) => return Err(Error::Config(format!("endpoint {s:?}: empty node name before '@'"))),
            None => (None, s),
        };
        let addr = host
            .to_socket_addrs()
            .map_err(|e| Error::Config(format!("endpoint {s:?}: {e}")))?
            .next()
            .ok_or_else(|| Error::Config(format!("endpoint {s:?} resolves to nothing")))?;
        Ok(Endpoint { name, addr })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n}@{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A connection to a Lattice cluster.
pub struct Client {
    endpoint: quinn::Endpoint,
    nodes: Vec<SocketAddr>,
    /// Per node: the name its certificate must carry (`None`: `server_name`).
    names: Vec<Option<String>>,
    server_name: String,
    /// The cluster CA, kept to rebuild the TLS configuration.
    ca_pem: String,
    /// The client certificate and key presented to nodes, if any.
    identity: Option<(String, String)>,
    /// Node certificate serials refused.
    revoked: std::collections::BTreeSet<String>,
    token: String,
    timeout: Duration,
    read_wait: Duration,
    conns: Mutex<Vec<Option<quinn::Connection>>>,
    /// A copy of `conns` read without waiting (`connection`).
    open: std::sync::Mutex<Vec<Option<quinn::Connection>>>,
    /// Per node: the pipeline stream small requests share
    /// ([`PIPELINE_INLINE_BYTES`]); a failed one is replaced on next use.
    pipes: std::sync::Mutex<Vec<Option<Arc<pipe::Pipe>>>>,
    /// Serialises opening pipeline streams, so concurrent calls share one.
    opening: Mutex<()>,
    session: std::sync::Mutex<Session>,
    /// Per node: until when it is skipped after failing, and the next backoff.
    health: std::sync::Mutex<Vec<(Option<std::time::Instant>, Duration)>>,
}

/// Most keys whose causal tokens a session remembers.
pub const SESSION_KEYS: usize = 10_000;

/// Per-key causal tokens of what this client has written and read.
#[derive(Default)]
struct Session {
    tokens: std::collections::BTreeMap<lattice_core::Key, CausalToken>,
}

impl Session {
    fn note(&mut self, key: &lattice_core::Key, token: &CausalToken) {
        if !self.tokens.contains_key(key) && self.tokens.len() >= SESSION_KEYS {
            self.tokens.pop_first();
        }
        self.tokens.entry(key.clone()).or_default().join(token);
    }
}

/// Builds a [`Client`].
#[derive(Default)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    token: Option<String>,
    ca: Option<String>,
    server_name: Option<String>,
    timeout: Option<Duration>,
    read_wait: Option<Duration>,
    revoked_serials: Vec<String>,
    identity: Option<(String, String)>,
}

impl ClientBuilder {
    /// Nodes as `NAME@HOST:PORT` (or `HOST:PORT`, see [`Endpoint`]), home
    /// node first.
    pub fn endpoints<I: IntoIterator<Item = S>, S: Into<String>>(mut self, e: I) -> Self {
        self.endpoints = e.into_iter().map(Into::into).collect();
        self
    }
    /// The client token.
    pub fn token(mut self, t: impl Into<String>) -> Self {
        self.token = Some(t.into());
        self
    }
    /// A client certificate of the cluster CA and its private key (PEM
    /// text; `latticed certs client NAME`), presented to every node: a node
    /// whose `[[access]]` names it (`client_cert`) serves this client with
    /// that entry's grants, with no token (see [`Client::with_client_cert`]).
    pub fn client_cert(mut self, cert_pem: &str, key_pem: &str) -> Self {
        self.identity = Some((cert_pem.to_string(), key_pem.to_string()));
        self
    }
    /// The cluster CA certificate (PEM text).
    pub fn ca_cert(mut self, pem: &str) -> Self {
        self.ca = Some(pem.to_string());
        self
    }
    /// The name to check the certificate of an endpoint given without one
    /// against (default `localhost`, which only dev certificates carry).
    pub fn server_name(mut self, n: impl Into<String>) -> Self {
        self.server_name = Some(n.into());
        self
    }
    /// Certificate serials to refuse, as the nodes' `revoked_serials`
    /// (see [`Client::with_revoked_serials`]).
    pub fn revoked_serials<I: IntoIterator<Item = S>, S: Into<String>>(mut self, s: I) -> Self {
        self.revoked_serials = s.into_iter().map(Into::into).collect();
        self
    }
    /// Timeout of each call (default 10 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// How long a node may wait to catch up with this session before a
    /// read tries another node (default 2 s).
    pub fn read_wait(mut self, t: Duration) -> Self {
        self.read_wait = Some(t);
        self
    }
    /// Builds the client and checks that a node answers.
    pub async fn connect(self) -> Result<Client, Error> {
        let nodes = self
            .endpoints
            .iter()
            .map(|e| e.parse::<Endpoint>())
            .collect::<Result<Vec<_>, _>>()?;
        let token = match (self.token, &self.identity) {
            (Some(t), _) => t,
            (None, Some(_)) => String::new(),
            (None, None) => return Err(Error::Config("no token and no client certificate".into())),
        };
        let ca = self.ca.ok_or_else(|| Error::Config("no CA certificate".into()))?;
        let mut c = Client::new(nodes, token, &ca)?.with_revoked_serials(&self.revoked_serials)?;
        if let Some((cert, key)) = &self.identity {
            c = c.with_client_cert(cert, key)?;
        }
        if let Some(n) = self.server_name {
            c.server_name = n;
        }
        c.timeout = self.timeout.unwrap_or(c.timeout);
        c.read_wait = self.read_wait.unwrap_or(c.read_wait);
        c.request(RequestBody::Status).await?;
        Ok(c)
    }
}

fn client_config(
    ca_pem: &str,
    revoked: &std::collections::BTreeSet<String>,
    identity: Option<&(String, String)>,
) -> Result<quinn::ClientConfig, Error> {
    let identity = match identity {
        None => None,
        Some((cert, key)) => {
            let chain =
                <rustls::pki_types::CertificateDer<'static> as rustls::pki_types::pem::PemObject>::pem_slice_iter(
                    cert.as_bytes(),
                )
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(format!("reading the client certificate: {e}")))?;
            if chain.is_empty() {
                return Err(Error::Config("no certificate in the client certificate file".into()));
            }
            let key = <rustls::pki_types::PrivateKeyDer<'static> as rustls::pki_types::pem::PemObject>::from_pem_slice(
                key.as_bytes(),
            )
            .map_err(|e| Error::Config(format!("reading the client key: {e}")))?;
            Some((chain, key))
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut any = false;
    for item in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        let der: rustls::pki_types::CertificateDer<'static> =
            item.map_err(|e| Error::Config(format!("reading the CA: {e}")))?;
        roots
            .add(der)
            .map_err(|e| Error::Config(format!("adding the CA: {e}")))?;
        any = true;
    }
    if !any {
        return Err(Error::Config("no certificate in the CA file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut tls = if revoked.is_empty() {
        let b = builder.with_root_certificates(roots);
        match identity {
            Some((chain, key)) => b
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Config(format!("the client certificate: {e}")))?,
            None => b.with_no_client_auth(),
        }
    } else {
        // The same webpki checks, then the deny-list.
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let verifier = revocation::RevocationVerifier::new(webpki, revoked.clone());
        let b = builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier));
        match identity {
            Some((chain, key)) => b
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Config(format!("the client certificate: {e}")))?,
            None => b.with_no_client_auth(),
        }
    };
    tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

impl Client {
    /// A client for `nodes` (tried in order; [`Endpoint`]s, or bare
    /// addresses checked against `localhost`), authenticating with `token`,
    /// trusting the cluster CA in `ca_pem`. Nodes are dialled lazily.
    pub fn new<E: Into<Endpoint>>(nodes: Vec<E>, token: impl Into<String>, ca_pem: &str) -> Result<Client, Error> {
        if nodes.is_empty() {
            return Err(Error::Config("no node address".into()));
        }
        let (names, nodes): (Vec<Option<String>>, Vec<SocketAddr>) = nodes
            .into_iter()
            .map(|e| {
                let e = e.into();
                (e.name, e.addr)
            })
            .unzip();
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| Error::Config(format!("opening a UDP socket: {e}")))?;
        endpoint.set_default_client_config(client_config(ca_pem, &Default::default(), None)?);
        let n = nodes.len();
        Ok(Client {
            endpoint,
            nodes,
            names,
            server_name: "localhost".into(),
            ca_pem: ca_pem.to_string(),
            identity: None,
            revoked: Default::default(),
            token: token.into(),
            timeout: Duration::from_secs(10),
            read_wait: Duration::from_secs(2),
            conns: Mutex::new(vec![None; n]),
            open: std::sync::Mutex::new(vec![None; n]),
            pipes: std::sync::Mutex::new(vec![None; n]),
            opening: Mutex::new(()),
            session: std::sync::Mutex::new(Session::default()),
            health: std::sync::Mutex::new(vec![(None, Duration::from_millis(100)); n]),
        })
    }

    /// The order in which to try nodes: the home node (the first endpoint)
    /// first, then the others by measured round-trip time; nodes that failed
    /// recently wait out an exponential backoff (100 ms to 5 s), unless no
    /// node is healthy.
    async fn route(&self) -> Vec<usize> {
        let rtts: Vec<Option<Duration>> = match self.open.lock() {
            Ok(conns) => conns
                .iter()
                .map(|c| c.as_ref().filter(|c| c.close_reason().is_none()).map(|c| c.rtt()))
                .collect(),
            Err(_) => vec![None; self.nodes.len()],
        };
        let now = std::time::Instant::now();
        let healthy = |i: usize| self.health.lock().map_or(true, |h| h[i].0.is_none_or(|t| t <= now));
        let mut others: Vec<usize> = (1..self.nodes.len()).collect();
        others.sort_by_key(|&i| rtts[i].unwrap_or(Duration::MAX));
        let order: Vec<usize> = std::iter::once(0).chain(others).collect();
        let (up, down): (Vec<usize>, Vec<usize>) = order.into_iter().partition(|&i| healthy(i));
        up.into_iter().chain(down).collect()
    }

    fn mark(&self, i: usize, ok: bool) {
        if let Ok(mut h) = self.health.lock() {
            if ok {
                h[i] = (None, Duration::from_millis(100));
            } else {
                let backoff = h[i].1;
                h[i] = (
                    Some(std::time::Instant::now() + backoff),
                    (backoff * 2).min(Duration::from_secs(5)),
                );
            }
        }
    }

    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Applies operations atomically (one delta-group) with a fresh
    /// operation id. A timed-out attempt is retried on the same node, which
    /// recognises the id and applies it once; the client moves to another
    /// node only when a node cannot be reached at all.
    pub async fn write(&self, ops: Vec<(lattice_core::Key, Op)>) -> Result<CausalToken, Error> {
        self.write_with(ops, WriteConcern::Local, Duration::ZERO).await
    }

    /// [`Client::write`] with a write concern: the answer comes once the
    /// write is durable in that many distinct regions. If they do not have
    /// it within `wait` (zero: the node's default), the call fails with
    /// [`Error::ReplicationTimeout`]: the write is durable in the first
    /// region and still replicating, not rolled back. The call's own
    /// timeout should exceed `wait`.
    pub async fn write_with(
        &self,
        ops: Vec<(lattice_core::Key, Op)>,
        concern: WriteConcern,
        wait: Duration,
    ) -> Result<CausalToken, Error> {
        let op_id = Client::new_op_id();
        let keys: Vec<lattice_core::Key> = ops.iter().map(|(k, _)| k.clone()).collect();
        let body = RequestBody::Write {
            op_id,
            retry: false,
            ops,
            concern,
            timeout_ms: wait.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        let mut last = None;
        for i in self.route().await {
            // Whether this node may have received the write.
            let mut reached = false;
            for attempt in 0..3 {
                let mut body = body.clone();
                if let RequestBody::Write { retry, .. } = &mut body {
                    // A node that restarted since the first attempt (within
                    // its retry window) answers OutcomeUnknown rather than
                    // applying it a second time.
                    *retry = attempt > 0;
                }
                match self.request_to(i, body).await {
                    Ok(Response::Written {
                        token, keys: per_key, ..
                    }) => {
                        self.mark(i, true);
                        if let Ok(mut s) = self.session.lock() {
                            for k in &keys {
                                // Each key's own token when the node sends
                                // them: a key's read must not wait on the
                                // dots of another key of the same write.
                                match per_key.iter().find(|(pk, _)| pk == k) {
                                    Some((_, t)) => s.note(k, t),
                                    None => s.note(k, &token),
                                }
                            }
                        }
                        return Ok(token);
                    }
                    Ok(r) => return Err(Error::Protocol(format!("unexpected answer {r:?}"))),
                    Err(Error::Unreachable(e)) => {
                        self.mark(i, false);
                        last = Some(Error::Unavailable(e));
                        break; // never reached this node: safe to go elsewhere
                    }
                    Err(e @ (Error::Timeout(_) | Error::Unavailable(_) | Error::Overloaded(_))) => {
                        reached |= !matches!(e, Error::Overloaded(_));
                        last = Some(e);
                        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            if reached {
                // The write may have been applied here: moving on could
                // apply it twice. Let the caller decide (retrying with the
                // same op id on this node is safe).
                self.mark(i, false);
                break;
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no node".into())))
    }

    /// Reads a key with the session's guarantees: the answer includes every
    /// write and read this client made of the key, from whichever node has
    /// caught up (home first).
    pub async fn read(&self, key: &lattice_core::Key) -> Result<Option<ValueView>, Error> {
        let after = self.session.lock().ok().and_then(|s| s.tokens.get(key).cloned());
        let body = RequestBody::Read {
            key: key.clone(),
            after,
            wait_ms: self.read_wait.as_millis() as u64,
        };
        let mut last = None;
        for i in self.route().await {
            match self.request_to(i, body.clone()).await {
                Ok(Response::Value { value, token }) => {
                    self.mark(i, true);
                    if let Ok(mut s) = self.session.lock() {
                        s.note(key, &token);
                    }
                    return Ok(value);
                }
                Ok(r) => return Err(Error::Protocol(format!("unexpected answer {r:?}"))),
                Err(Error::Unreachable(e)) => {
                    self.mark(i, false);
                    last = Some(Error::Unavailable(e));
                }
                Err(e) if e.try_elsewhere() => {
                    if !matches!(e, Error::NotCaughtUp(_)) {
                        self.mark(i, false);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no node".into())))
    }

    /// Reads several keys at once (at most [`MGET_MAX_KEYS`]), with the
    /// session's guarantees for each, from the first node that answers
    /// (home first). Each entry holds the key's value or why it was not
    /// read (a policy refusal, a node not caught up with the session, a
    /// value too large to share the answer); an error only when no node
    /// answered.
    pub async fn mget(&self, keys: &[lattice_core::Key]) -> Result<Vec<Entry>, Error> {
        let keys: Vec<_> = match self.session.lock() {
            Ok(s) => keys.iter().map(|k| (k.clone(), s.tokens.get(k).cloned())).collect(),
            Err(_) => keys.iter().map(|k| (k.clone(), None)).collect(),
        };
        let body = RequestBody::MGet {
            keys,
            wait_ms: self.read_wait.as_millis() as u64,
        };
        match self.request(body).await? {
            Response::Values(entries) => {
                if let Ok(mut s) = self.session.lock() {
                    for e in &entries {
                        if let Some(t) = &e.token {
                            s.note(&e.key, t);
                        }
                    }
                }
                Ok(entries)
            }
            r => Err(Error::Protocol(format!("unexpected answer {r:?}"))),
        }
    }

    /// One page of the keys starting with `prefix` (with their values when
    /// `values`), from the first node that answers: at most `limit` keys
    /// (at most [`SCAN_MAX_KEYS`]), and the cursor to pass for the next page
    /// (`None` when the scan is complete). A page may be empty while the
    /// scan goes on. Keys come in storage order (by key hash, the same on
    /// every node, so a cursor is good on any node), not sorted.
    pub async fn scan(
        &self,
        prefix: &str,
        cursor: Option<ScanCursor>,
        limit: u32,
        values: bool,
    ) -> Result<(Vec<Entry>, Option<ScanCursor>), Error> {
        let body = RequestBody::Scan {
            prefix: prefix.to_string(),
            cursor,
            limit,
            values,
        };
        match self.request(body).await? {
            Response::Scanned { entries, cursor } => Ok((entries, cursor)),
            r => Err(Error::Protocol(format!("unexpected answer {r:?}"))),
        }
    }

    /// Closes every connection and waits (up to a second) until the nodes
    /// were told. A process that exits without this leaves each node
    /// holding its connection until the idle timeout (10 s), and a script
    /// that runs the CLI in a loop reaches the node's per-address
    /// connection limit (`max_connections_per_ip`).
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// The name the certificate of an endpoint given without one is checked
    /// against (default `localhost`, which only dev certificates carry).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Refuses nodes whose certificate serial is in `serials` (hex as
    /// `latticed certs show` prints it, any case, colons allowed: the
    /// nodes' own `revoked_serials`). Checked on every handshake after the
    /// certificate verified against the CA and the node's name; a listed
    /// node fails with [`Error::Unreachable`] saying its certificate is
    /// revoked, and the client tries the other nodes. Connections already
    /// open are closed, so the next call dials again under the list.
    pub fn with_revoked_serials<S: AsRef<str>>(mut self, serials: &[S]) -> Result<Client, Error> {
        let revoked = serials
            .iter()
            .map(|s| normalize_serial(s.as_ref()).map_err(Error::Config))
            .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
        self.endpoint
            .set_default_client_config(client_config(&self.ca_pem, &revoked, self.identity.as_ref())?);
        self.revoked = revoked;
        self.reconnect("revocation list changed");
        Ok(self)
    }

    /// Presents a client certificate of the cluster CA (PEM text of the
    /// certificate and its private key, as `latticed certs client NAME`
    /// writes them) on every connection. A node whose `[[access]]` entry
    /// names the certificate (`client_cert = "NAME"`) serves requests with
    /// an empty token under that entry's grants; a non-empty token still
    /// wins. Connections already open are closed.
    pub fn with_client_cert(mut self, cert_pem: &str, key_pem: &str) -> Result<Client, Error> {
        let identity = (cert_pem.to_string(), key_pem.to_string());
        self.endpoint
            .set_default_client_config(client_config(&self.ca_pem, &self.revoked, Some(&identity))?);
        self.identity = Some(identity);
        self.reconnect("client certificate changed");
        Ok(self)
    }

    /// Closes every open connection, so the next call dials under the
    /// current TLS configuration.
    fn reconnect(&mut self, why: &'static str) {
        for c in self.conns.get_mut().iter_mut().filter_map(Option::take) {
            c.close(0u32.into(), why.as_bytes());
        }
        if let Ok(open) = self.open.get_mut() {
            open.iter_mut().for_each(|c| *c = None);
        }
        if let Ok(pipes) = self.pipes.get_mut() {
            pipes.iter_mut().for_each(|p| *p = None);
        }
    }

    /// The timeout of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Refuses a node index past the endpoint list (a caller's mistake,
    /// never a panic).
    fn check_index(&self, i: usize) -> Result<(), Error> {
        if i < self.nodes.len() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "node index {i}: the client has {} endpoints",
                self.nodes.len()
            )))
        }
    }

    async fn connection(&self, i: usize) -> Result<quinn::Connection, Error> {
        // The common case, without waiting on the lock that serialises
        // handshakes: every session's request asks for the connection.
        if let Some(c) = self.open.lock().ok().and_then(|o| o[i].clone()) {
            if c.close_reason().is_none() {
                return Ok(c);
            }
        }
        let mut conns = self.conns.lock().await;
        if let Some(c) = &conns[i] {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let name = self.names[i].as_deref().unwrap_or(&self.server_name);
        let c = self
            .endpoint
            .connect(self.nodes[i], name)
            .map_err(|e| Error::Unreachable(format!("{}: {e}", self.nodes[i])))?;
        let c = tokio::time::timeout(self.timeout.min(Duration::from_secs(3)), c)
            .await
            .map_err(|_| Error::Unreachable(format!("{}: no answer to the handshake", self.nodes[i])))?
            .map_err(|e| Error::Unreachable(format!("{}: {e}", self.nodes[i])))?;
        conns[i] = Some(c.clone());
        if let Ok(mut o) = self.open.lock() {
            o[i] = Some(c.clone());
        }
        Ok(c)
    }

    /// Node `i`'s pipeline stream, opened if it has none that works.
    async fn pipe(&self, i: usize) -> Result<Arc<pipe::Pipe>, Error> {
        let open = |pipes: &std::sync::Mutex<Vec<Option<Arc<pipe::Pipe>>>>| {
            pipes.lock().ok().and_then(|p| p[i].clone()).filter(|p| p.is_open())
        };
        if let Some(p) = open(&self.pipes) {
            return Ok(p);
        }
        let _opening = self.opening.lock().await;
        if let Some(p) = open(&self.pipes) {
            return Ok(p);
        }
        let conn = self.connection(i).await?;
        let p = Arc::new(pipe::Pipe::open(&conn, self.token.clone()).await?);
        if let Ok(mut pipes) = self.pipes.lock() {
            pipes[i] = Some(p.clone());
        }
        Ok(p)
    }

    /// Opens a stream on node `i` and sends one request frame on it.
    async fn open_request(&self, i: usize, body: RequestBody) -> Result<quinn::RecvStream, Error> {
        let req = ClientRequest {
            token: self.token.clone(),
            body,
        };
        let frame = encode_request(&req)?;
        // One write: the length prefix and the frame (at most 1 MiB).
        let mut buf = Vec::with_capacity(4 + frame.len());
        buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        buf.extend_from_slice(&frame);
        drop(frame);
        let conn = self.connection(i).await?;
        let unavailable = |e: &dyn std::fmt::Display| Error::Unavailable(e.to_string());
        let (mut send, recv) = conn.open_bi().await.map_err(|e| unavailable(&e))?;
        send.write_all(&buf).await.map_err(|e| unavailable(&e))?;
        let _ = send.finish();
        Ok(recv)
    }

    /// Sends one request to node `i` and returns its answer. A request that
    /// encodes to at most [`PIPELINE_INLINE_BYTES`] shares the node's
    /// pipeline stream with the client's other calls in flight (see
    /// [`RequestBody::Pipeline`]); a larger one, and a watch, gets a stream
    /// of its own.
    pub async fn request_to(&self, i: usize, body: RequestBody) -> Result<Response, Error> {
        self.request_within(i, body, self.timeout).await
    }

    /// [`Client::request_to`] with its own timeout (a backup's answer comes
    /// when the whole store is copied).
    pub(crate) async fn request_within(
        &self,
        i: usize,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<Response, Error> {
        self.check_index(i)?;
        let call = async {
            if !matches!(body, RequestBody::Watch { .. } | RequestBody::Pipeline(_)) {
                let frame = encode_request(&body)?;
                if frame.len() <= PIPELINE_INLINE_BYTES {
                    return self.pipe(i).await?.call(frame).await;
                }
            }
            let mut recv = self.open_request(i, body).await?;
            read_response(&mut recv)
                .await?
                .ok_or_else(|| Error::Unavailable("the node closed the stream".into()))
        };
        let response = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        match response {
            Response::Error(e) => Err(Error::from_server(e)),
            r => Ok(r),
        }
    }

    /// Sends a request to the first node that can be reached.
    pub async fn request(&self, body: RequestBody) -> Result<Response, Error> {
        let mut last = None;
        for i in self.route().await {
            match self.request_to(i, body.clone()).await {
                Err(e @ (Error::Unreachable(_) | Error::Unavailable(_) | Error::Timeout(_))) => {
                    self.mark(i, false);
                    last = Some(e);
                }
                r => {
                    self.mark(i, true);
                    return r;
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no node".into())))
    }

    /// Opens a change feed on node `i` for keys starting with `prefix`,
    /// resuming after `from` when given.
    pub async fn watch(&self, i: usize, prefix: &str, from: Option<WatchToken>) -> Result<Watch, Error> {
        self.check_index(i)?;
        let recv = self
            .open_request(
                i,
                RequestBody::Watch {
                    prefix: prefix.to_string(),
                    from,
                },
            )
            .await?;
        Ok(Watch { recv, last: from })
    }

    /// A fresh operation id (random: retries of one write reuse it).
    pub fn new_op_id() -> OpId {
        OpId(rand::random())
    }
}

/// A change feed (see [`Client::watch`]).
pub struct Watch {
    recv: quinn::RecvStream,
    last: Option<WatchToken>,
}

impl Watch {
    /// The next change; `Ok(None)` when the node ended the feed (resume
    /// from [`Watch::last_token`]).
    pub async fn next(&mut self) -> Result<Option<Change>, Error> {
        match read_response(&mut self.recv).await? {
            None => Ok(None),
            Some(Response::Change(c)) => {
                self.last = Some(c.token);
                Ok(Some(c))
            }
            Some(Response::Error(e)) => Err(Error::from_server(e)),
            Some(r) => Err(Error::Protocol(format!("unexpected frame in a watch: {r:?}"))),
        }
    }

    /// The token of the last change received: resume from it.
    pub fn last_token(&self) -> Option<WatchToken> {
        self.last
    }
}

/// A change feed that resumes by itself (see [`Client::follow`]).
pub struct Follow<'a> {
    client: &'a Client,
    node: usize,
    prefix: String,
    watch: Option<Watch>,
    last: Option<WatchToken>,
}

impl Client {
    /// Follows changes to keys starting with `prefix` on node `i`. When the
    /// feed breaks (the node restarts, the connection drops, the watcher fell
    /// behind) it reconnects to the same node and resumes after the last
    /// change seen, so nothing is lost or repeated; if the node cannot
    /// resume, `next` returns [`Error::WatchLost`] and the caller re-reads.
    /// The feed is subscribed when this returns: later changes are seen.
    pub async fn follow(&self, i: usize, prefix: &str) -> Result<Follow<'_>, Error> {
        let watch = self.watch(i, prefix, None).await?;
        Ok(Follow {
            client: self,
            node: i,
            prefix: prefix.to_string(),
            watch: Some(watch),
            last: None,
        })
    }
}

impl Follow<'_> {
    /// The next change, reconnecting (with backoff, for up to about 30 s)
    /// when the feed breaks.
    pub async fn next(&mut self) -> Result<Change, Error> {
        let mut backoff = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        loop {
            if self.watch.is_none() {
                match self.client.watch(self.node, &self.prefix, self.last).await {
                    Ok(w) => self.watch = Some(w),
                    Err(e) if e.try_elsewhere() && waited < Duration::from_secs(30) => {
                        tokio::time::sleep(backoff).await;
                        waited += backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(w) = self.watch.as_mut() else { continue };
            match w.next().await {
                Ok(Some(c)) => {
                    self.last = Some(c.token);
                    return Ok(c);
                }
                // Lagged: the node cut this watcher off; resuming from the
                // last change picks up what it still retains.
                Ok(None) | Err(Error::Unavailable(_)) | Err(Error::Unreachable(_)) | Err(Error::WatchLagged(_)) => {
                    self.watch = None;
                    if waited >= Duration::from_secs(30) {
                        return Err(Error::Unavailable("the watched node did not come back".into()));
                    }
                    tokio::time::sleep(backoff).await;
                    waited += backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Encodes a request (or a request body) for the wire, with a clear error
/// for one over the frame limit.
fn encode_request<T: serde::Serialize>(req: &T) -> Result<Vec<u8>, Error> {
    encode_client(req).map_err(|e| match e {
        lattice_core::Error::MessageTooLarge { size, limit } => Error::InvalidRequest(format!(
            "the request encodes to {size} bytes, over the limit of {limit} for one request (split a large write into several)"
        )),
        e => Error::Protocol(e.to_string()),
    })
}

/// Reads one length-prefixed response frame; `None` at the end of the stream.
async fn read_response(recv: &mut quinn::RecvStream) -> Result<Option<Response>, Error> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(Error::Unavailable(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_ANSWER_FRAME {
        return Err(Error::Protocol(format!(
            "an answer of {len} bytes is over the limit of {MAX_ANSWER_FRAME}"
        )));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    decode_answer(&buf)
        .map(Some)
        .map_err(|e| Error::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's message that names its kind is not prefixed with it twice
    /// (`type mismatch: type mismatch: ...` before); one that does not is
    /// prefixed once.
    #[test]
    fn an_error_names_its_kind_once() {
        use lattice_core::proto::client::ClientError;
        let from = |kind, message: &str| {
            Error::from_server(ClientError {
                kind,
                message: message.into(),
                regions: Vec::new(),
            })
            .to_string()
        };
        assert_eq!(
            from(
                ErrorKind::TypeMismatch,
                "type mismatch: the key holds a counter, not a set"
            ),
            "type mismatch: the key holds a counter, not a set"
        );
        assert_eq!(
            from(ErrorKind::TypeMismatch, "the key holds a counter, not a set"),
            "type mismatch: the key holds a counter, not a set"
        );
        assert_eq!(
            from(ErrorKind::TypeMismatch, "type mismatch on field \"n\": it is a Counter"),
            "type mismatch on field \"n\": it is a Counter"
        );
        assert_eq!(
            from(ErrorKind::InvalidRequest, "Invalid request: key too long"),
            "Invalid request: key too long"
        );
        assert_eq!(from(ErrorKind::Overloaded, "overloaded"), "overloaded");
        assert_eq!(from(ErrorKind::Overloaded, "queue full"), "overloaded: queue full");
        // A multi-byte character where the prefix would end is no prefix.
        assert_eq!(from(ErrorKind::NotFound, "nöt found"), "not found: nöt found");
    }

    #[test]
    fn endpoints_carry_the_node_name_they_expect() {
        let e: Endpoint = "eu-1@127.0.0.1:7401".parse().unwrap();
        assert_eq!(e, Endpoint::named("eu-1", SocketAddr::from(([127, 0, 0, 1], 7401))));
        assert_eq!(e.to_string(), "eu-1@127.0.0.1:7401");
        let bare: Endpoint = "127.0.0.1:7401".parse().unwrap();
        assert_eq!(bare.name, None);
        assert_eq!(bare.to_string(), "127.0.0.1:7401");
        assert!("@127.0.0.1:7401".parse::<Endpoint>().is_err());
        assert!("eu-1@nowhere".parse::<Endpoint>().is_err());
    }
}
