//! QUIC transport (quinn). One endpoint; the ALPN separates peer gossip from
//! client traffic. Frames are a 4-byte big-endian length then the frame; the
//! length is checked against the limit before anything is read.

use crate::access::{denied, Access, Principal};
use crate::certs::{self, DenyList, Pem, CLIENT_OU, NODE_OU};
use crate::config::{NetLimits, Perm};
use crate::edge::{
    read_exact_by, token_of, Admission, BudgetShare, Decision, ReadBudget, ReadError, HANDSHAKE_TIMEOUT,
    TOKEN_PREFIX_MAX,
};
use crate::feed::{watch_queue, Notice, WatchItem, WatchRx};
use crate::metrics::Metrics;
use crate::node::{watch_frames, Input, ReadAnswer, WatchFrame, WATCH_BATCH_BYTES};
use crate::queue::{EngineTx, PeerRx};
use anyhow::{Context, Result};
use lattice_core::proto::client::{
    decode_client, encode_answer, encode_pipeline_answers, entry_size, AnswerPack, ClientError, ClientRequest, Entry,
    ErrorKind, RequestBody, Response, Tagged, WatchToken, CLIENT_ALPN, ENTRIES_MAX_BYTES, MAX_ANSWER_FRAME,
    MAX_CLIENT_FRAME, MGET_MAX_KEYS, PEER_ALPN, PIPELINE_MAX_REQUESTS,
};
use lattice_core::proto::{NodeId, DEFAULT_MAX_MESSAGE_BYTES};
use lattice_core::replica::{Decoded, Prepared};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rand::Rng;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Application error codes on QUIC connections and streams.
pub mod code {
    /// Orderly shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The peer is not a node of this cluster.
    pub const NOT_A_PEER: u32 = 1;
    /// A frame was larger than allowed.
    pub const FRAME_TOO_LARGE: u32 = 2;
    /// A frame could not be decoded.
    pub const MALFORMED: u32 = 3;
    /// The other side's certificate is revoked.
    pub const REVOKED: u32 = 4;
    /// A frame did not arrive in time.
    pub const TIMEOUT: u32 = 5;
    /// Not allowed here (a unidirectional stream on a client connection).
    pub const REFUSED: u32 = 6;
    /// No request with a valid token arrived in time.
    pub const UNAUTHENTICATED: u32 = 7;
}

/// Reads served beside the engine at once; more wait for a slot. Each
/// holds its value read from sled, decoded, and its view (at most about
/// four times the 4 MiB value limit): 4 of them hold at most 64 MiB, and
/// keep both cores busy while the engine has work.
pub const DIRECT_READS: usize = 4;

/// One client frame with its length prefix.
const CLIENT_FRAME_WINDOW: u32 = MAX_CLIENT_FRAME as u32 + 4;
/// The connection window a client has before it shows a token: its first
/// request, however large, fits, and a connection without a token holds at
/// most this much of the node's memory in QUIC buffers.
const UNAUTHENTICATED_WINDOW: u32 = CLIENT_FRAME_WINDOW + (64 << 10);
/// Requests in flight on a client connection that showed a valid token.
const CLIENT_STREAMS: u32 = 256;
/// Requests in flight on a connection before it showed a token (its first
/// requests; the rest wait a round trip for the token to be seen).
const UNAUTHENTICATED_STREAMS: u32 = 16;
/// The connection window of a client that showed a valid token.
const CLIENT_WINDOW: u32 = 4 * CLIENT_FRAME_WINDOW;
/// The connection window of an authenticated peer: a few full frames.
const PEER_WINDOW: u32 = 4 * (DEFAULT_MAX_MESSAGE_BYTES as u32 + 4);
/// A peer frame, once started, must be complete within this time (peer
/// links may be slow and rate-limited, and peers hold a certificate).
const PEER_FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// Peer frames larger than this are decoded on the blocking pool.
const DECODE_APART_BYTES: usize = 64 << 10;

/// Deliberate transport limits (quinn's defaults are for the open web).
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Clients issue one request per bidirectional stream: this bounds the
    // requests in flight per connection.
    t.max_concurrent_bidi_streams(CLIENT_STREAMS.into());
    // Peers use one long-lived unidirectional stream per direction.
    t.max_concurrent_uni_streams(4u32.into());
    // A stream may hold one full frame in flight, a connection a few.
    t.stream_receive_window(((DEFAULT_MAX_MESSAGE_BYTES + 4) as u32).into());
    t.receive_window((4 * (DEFAULT_MAX_MESSAGE_BYTES as u32 + 4)).into());
    t.send_window(4 * (DEFAULT_MAX_MESSAGE_BYTES as u64 + 4));
    // A peer that vanished without a word is noticed within 10 s (one that
    // restarts is noticed at once: see the stable reset key in `endpoint`).
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    Arc::new(t)
}

/// The transport of accepted connections. The ALPN (client or peer) is
/// known only after the handshake, so the receive windows start at what a
/// client without a token may hold (one request frame per stream, a little
/// more per connection, 16 streams) and are raised once it shows a token,
/// or proves to be a peer. A peer's stream window stays one client frame, so a 4 MiB
/// peer frame takes a few round trips of credit.
fn accepted_transport() -> Arc<quinn::TransportConfig> {
    let mut t = Arc::try_unwrap(transport()).unwrap_or_default();
    t.stream_receive_window(CLIENT_FRAME_WINDOW.into());
    t.receive_window(UNAUTHENTICATED_WINDOW.into());
    t.max_concurrent_bidi_streams(UNAUTHENTICATED_STREAMS.into());
    Arc::new(t)
}

/// Builds the node's endpoint (server side, both ALPNs).
pub fn endpoint(listen: SocketAddr, ca_pem: &str, node: &Pem, limits: &NetLimits) -> Result<quinn::Endpoint> {
    let tls = certs::server_tls(ca_pem, node)?;
    let crypto = QuicServerConfig::try_from(tls).context("QUIC server TLS")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(accepted_transport());
    // Attempts not yet decided on; `accept_loop` decides at once, and
    // `Admission` bounds the connections it accepts.
    server.max_incoming(limits.max_connections);
    // The stateless-reset key is derived from the node's private key, so it
    // survives a restart: packets of connections from before a crash get a
    // valid reset at once, and peers redial instead of waiting for the idle
    // timeout.
    let seed = blake3::derive_key("lattice stateless reset key v1", node.key.as_bytes());
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    // Connection ids are validated with a key: keep it stable too, or a
    // restarted node would not recognise its old ids and drop their packets
    // silently instead of resetting them.
    let cid_key = u64::from_le_bytes(
        blake3::derive_key("lattice cid key v1", node.key.as_bytes())[..8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let socket = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    quinn::Endpoint::new(config, Some(server), socket, runtime).with_context(|| format!("starting QUIC on {listen}"))
}

/// Client config for dialling a peer with this node's certificate.
pub fn peer_client_config(ca_pem: &str, node: &Pem) -> Result<quinn::ClientConfig> {
    let tls = certs::client_tls(ca_pem, Some(node), PEER_ALPN)?;
    let mut c = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).context("QUIC client TLS")?));
    let mut t = Arc::try_unwrap(transport()).unwrap_or_default();
    // Every frame to a peer travels on the connection this node dialled.
    // After a partition the backlog (all deltas since) goes at once on a
    // fresh connection: the internet default of a 14.7 KB first window
    // would take several round trips of slow start to move it.
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(PEER_INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(cubic));
    c.transport_config(Arc::new(t));
    Ok(c)
}

/// The congestion window a new connection to a peer starts with. Links
/// between regions are private, long and wide (40 ms at 1 Gbit/s holds
/// 5 MB in flight); loss still shrinks the window as usual.
const PEER_INITIAL_WINDOW: u64 = 512 * 1024;

/// Reads one length-prefixed frame of at most `max` bytes; `None` at the
/// end of the stream.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError::Io(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(Some(buf))
}

/// [`read_frame`], where a frame, once its length prefix arrived, must be
/// complete within `within` (the wait for the prefix is not bounded: a
/// peer's stream idles between frames).
pub async fn read_frame_within(
    recv: &mut quinn::RecvStream,
    max: usize,
    within: Duration,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError::Io(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    match read_exact_by(recv, &mut buf, tokio::time::Instant::now() + within).await {
        Ok(()) => Ok(Some(buf)),
        Err(ReadError::TimedOut) => Err(FrameError::TimedOut),
        Err(ReadError::Stream(e)) => Err(FrameError::Io(e)),
    }
}

/// Writes one length-prefixed frame: a small one (every answer to a
/// small request) in one write, since each write takes the connection's
/// lock and wakes its driver.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), quinn::WriteError> {
    let len = (frame.len() as u32).to_be_bytes();
    if frame.len() <= ONE_WRITE_BYTES {
        let mut buf = Vec::with_capacity(4 + frame.len());
        buf.extend_from_slice(&len);
        buf.extend_from_slice(frame);
        return send.write_all(&buf).await;
    }
    send.write_all(&len).await?;
    send.write_all(frame).await
}

/// Frames up to this long are copied behind their length prefix and
/// written at once ([`write_frame`]).
const ONE_WRITE_BYTES: usize = 64 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Larger than allowed.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The stream failed.
    #[error("stream: {0}")]
    Io(String),
    /// The frame did not arrive in time.
    #[error("the frame did not arrive in time")]
    TimedOut,
}

/// Signals from the accept side to one peer's dial task.
#[derive(Default)]
pub struct DialSignals {
    /// The peer restarted (its boot id changed): a connection to its
    /// previous process may not fail until the idle timeout, so redial.
    pub restarted: tokio::sync::Notify,
    /// The peer just connected to us, so it is reachable again: if the dial
    /// task is waiting to retry, it retries now.
    pub reachable: tokio::sync::Notify,
}

/// Dial attempts overlap: a new one starts every probe interval while older
/// ones still wait for their handshake, up to this many.
const MAX_ATTEMPTS: usize = 8;
/// The longest one attempt waits for its handshake, so a path that became
/// slow still connects.
const MAX_HANDSHAKE: Duration = Duration::from_secs(5);
/// The first retry comes this soon (peers starting together), and the
/// interval doubles from there up to the probe interval.
const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// How often a lost peer is probed with a new attempt (one Initial datagram,
/// plus quinn's own resends while it waits): four round trips of its last
/// connection plus 200 ms, at most 2 s, or 1 s for a peer never reached.
/// A healed partition is noticed within about one interval, whatever the
/// older attempts' resend timers have backed off to.
fn probe_interval(rtt: Option<Duration>) -> Duration {
    rtt.map_or(Duration::from_secs(1), |rtt| {
        (rtt * 4 + Duration::from_millis(200)).min(Duration::from_secs(2))
    })
}

/// Keeps a connection to one peer and writes its queued frames. While the
/// peer cannot be reached, overlapping attempts probe it (see
/// `probe_interval`); the first handshake to complete wins and the others
/// are dropped. Every stream opens with this process's boot id. `signals`
/// cut a stale connection short (`restarted`) or start an attempt at once
/// (`reachable`). A new connection is reported to the engine as
/// [`Input::Reachable`].
#[allow(clippy::too_many_arguments)]
pub async fn dial_peer(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    peer: NodeId,
    addr: SocketAddr,
    mut queue: PeerRx,
    boot: u64,
    signals: Arc<DialSignals>,
    engine: EngineTx,
    deny: Arc<DenyList>,
) {
    let mut rtt = None;
    loop {
        let Some(conn) = connect(&endpoint, &config, &peer, addr, rtt, &signals, &queue).await else {
            return; // shutting down
        };
        if let Some(serial) = revoked(&conn, &deny) {
            // Nothing is sent to a node whose certificate was revoked: its
            // key may be in someone else's hands.
            tracing::error!(peer = %peer, %serial, "the peer's certificate is revoked: not sending to it");
            conn.close(code::REVOKED.into(), b"certificate revoked");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        tracing::info!(peer = %peer, %addr, "connected to peer");
        // Best effort: if the engine is saturated, the peer's next frame
        // tells it the same.
        let _ = engine.try_send(Input::Reachable(peer.clone()));
        // A restart signalled before this connection is not about it.
        let _ = tokio::time::timeout(Duration::ZERO, signals.restarted.notified()).await;
        let run = async {
            let mut send = conn.open_uni().await?;
            write_frame(&mut send, &boot.to_be_bytes()).await?;
            let result = tokio::select! {
                r = send_loop(&mut send, &mut queue) => r,
                () = signals.restarted.notified() => {
                    conn.close(code::SHUTDOWN.into(), b"peer restarted: redialling");
                    Err(anyhow::anyhow!("the peer restarted"))
                }
            };
            if result.is_ok() {
                // Shutting down: let the last frames reach the peer.
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            }
            result
        };
        match run.await {
            Ok(()) => return, // queue closed: shutting down
            Err(e) => tracing::warn!(peer = %peer, error = %e, "peer stream failed"),
        }
        rtt = Some(conn.rtt());
        if queue.is_closed() {
            return;
        }
    }
}

/// Dials until a handshake completes; `None` once the queue is closed.
async fn connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    peer: &NodeId,
    addr: SocketAddr,
    rtt: Option<Duration>,
    signals: &DialSignals,
    queue: &PeerRx,
) -> Option<quinn::Connection> {
    let mut attempts = tokio::task::JoinSet::new();
    let (mut backoff, mut next) = (MIN_BACKOFF, tokio::time::Instant::now());
    loop {
        if queue.is_closed() {
            return None;
        }
        if tokio::time::Instant::now() >= next {
            if attempts.len() < MAX_ATTEMPTS {
                match endpoint.connect_with(config.clone(), addr, &peer.0) {
                    Ok(connecting) => {
                        attempts.spawn(tokio::time::timeout(MAX_HANDSHAKE, connecting));
                    }
                    Err(e) => tracing::warn!(peer = %peer, error = %e, "cannot dial peer"),
                }
            }
            let interval = backoff.min(probe_interval(rtt));
            let jitter = rand::thread_rng().gen_range(0..=interval.as_millis() as u64 / 4);
            next = tokio::time::Instant::now() + interval + Duration::from_millis(jitter);
            backoff = backoff.saturating_mul(2);
        }
        tokio::select! {
            Some(joined) = attempts.join_next() => match joined {
                Ok(Ok(Ok(conn))) => return Some(conn),
                Ok(Ok(Err(e))) => tracing::debug!(peer = %peer, error = %e, "cannot reach peer"),
                Ok(Err(_)) => tracing::debug!(peer = %peer, "no handshake within {MAX_HANDSHAKE:?}"),
                Err(_) => {}
            },
            () = tokio::time::sleep_until(next) => {}
            // The peer reached us, so the path is back: the pending
            // attempts' Initials were probably lost and their resend timers
            // have backed off. Probe at once.
            () = signals.reachable.notified() => next = tokio::time::Instant::now(),
        }
    }
}

async fn send_loop(send: &mut quinn::SendStream, queue: &mut PeerRx) -> Result<()> {
    while let Some(frame) = queue.recv().await {
        write_frame(send, &frame).await?;
    }
    Ok(())
}

/// The revoked serial of the certificate `conn`'s other side presented.
fn revoked(conn: &quinn::Connection, deny: &DenyList) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    deny.revoked(&chain)
}

/// Shared state of the accept loop.
pub struct Inbound {
    /// The engine's queue.
    pub engine: EngineTx,
    /// Values in flight from the engine to watch streams, in KiB
    /// (`memory.watch_values_bytes`).
    pub watch_budget: tokio::sync::Semaphore,
    /// The budget's size, in KiB.
    pub watch_budget_kib: usize,
    /// Answers encoded and not yet written to their clients, in KiB
    /// (`memory.answer_bytes`).
    pub answer_budget: tokio::sync::Semaphore,
    /// Reads served beside the engine.
    pub reads: Arc<crate::node::Reads>,
    /// Reads beside the engine at once (each decodes a value of up to
    /// 4 MiB on a blocking thread): [`DIRECT_READS`].
    pub direct_reads: Arc<tokio::sync::Semaphore>,
    /// Scan pages decoded at once (each up to 16 MiB of records), apart
    /// from `direct_reads` so queued scans never hold up ordinary reads.
    pub scan_slots: Arc<tokio::sync::Semaphore>,
    /// Configured peer names.
    pub peers: BTreeSet<String>,
    /// The credentials clients may show (tokens, client certificates)
    /// and what each may do.
    pub access: Access,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per peer: the signals of its dial task.
    pub dial: std::collections::BTreeMap<String, Arc<DialSignals>>,
    /// Per peer: the last boot id seen.
    pub boots: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Limits of the network edge.
    pub limits: NetLimits,
    /// Connections counted against `limits`.
    pub admission: Arc<Admission>,
    /// Bytes of client request bodies being read.
    pub budget: ReadBudget,
    /// Revoked certificate serials.
    pub deny: Arc<DenyList>,
}

/// Accepts connections until the endpoint closes: an address that is not
/// validated gets a Retry while many handshakes are in progress; over
/// `max_connections` or `max_connections_per_ip` an attempt is refused
/// before any handshake state exists.
pub async fn accept_loop(endpoint: quinn::Endpoint, inbound: Arc<Inbound>) {
    while let Some(incoming) = endpoint.accept().await {
        let addr = incoming.remote_address();
        let mut slot = match inbound.admission.admit(addr, incoming.remote_address_validated()) {
            Decision::Accept(slot) => slot,
            Decision::Retry if incoming.may_retry() => {
                inbound.metrics.connections_retried.inc();
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            // A Retry is not allowed for this packet (it already carried a
            // token): decide on the limits alone.
            Decision::Retry => match inbound.admission.admit(addr, true) {
                Decision::Accept(slot) => slot,
                _ => {
                    inbound.metrics.connections_refused.inc();
                    incoming.refuse();
                    continue;
                }
            },
            Decision::Refuse(limit) => {
                inbound.metrics.connections_refused.inc();
                tracing::debug!(remote = %addr, limit, "connection refused");
                incoming.refuse();
                continue;
            }
        };
        let inbound = inbound.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => {
                    slot.established();
                    handle_connection(conn, inbound).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "handshake failed"),
                Err(_) => tracing::debug!(remote = %addr, "no handshake within {HANDSHAKE_TIMEOUT:?}"),
            }
            drop(slot);
        });
    }
}

fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The node name of a peer connection, if its certificate is a node
/// certificate of the cluster CA naming a configured peer.
fn peer_name(conn: &quinn::Connection, peers: &BTreeSet<String>) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let (cn, ou) = certs::subject_of(certs.first()?).ok()?;
    (ou == NODE_OU && peers.contains(&cn)).then_some(cn)
}

/// The principal of a client connection's certificate, if it presented a
/// client certificate of the cluster CA (rustls verified the chain) whose
/// name an `[[access]]` entry names.
fn client_principal(conn: &quinn::Connection, access: &Access) -> Option<Arc<Principal>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let (cn, ou) = certs::subject_of(certs.first()?).ok()?;
    if ou != CLIENT_OU {
        return None;
    }
    access.by_cert(&cn)
}

/// Serves one connection until it closes.
async fn handle_connection(conn: quinn::Connection, inbound: Arc<Inbound>) {
    if let Some(serial) = revoked(&conn, &inbound.deny) {
        tracing::warn!(remote = %conn.remote_address(), %serial, "refused a revoked certificate");
        inbound.metrics.connections_revoked.inc();
        conn.close(code::REVOKED.into(), b"certificate revoked");
        return;
    }
    match alpn(&conn).as_deref() {
        Some(p) if p == PEER_ALPN => peer_connection(conn, inbound).await,
        Some(p) if p == CLIENT_ALPN => client_connection(conn, inbound).await,
        _ => conn.close(code::NOT_A_PEER.into(), b"unknown protocol"),
    }
}

/// Receives a peer's frames: one task per unidirectional stream.
async fn peer_connection(conn: quinn::Connection, inbound: Arc<Inbound>) {
    let Some(name) = peer_name(&conn, &inbound.peers) else {
        tracing::warn!(remote = %conn.remote_address(), "refused a peer without a node certificate of this cluster");
        conn.close(code::NOT_A_PEER.into(), b"not a node of this cluster");
        return;
    };
    conn.set_receive_window(PEER_WINDOW.into());
    let peer = NodeId(name);
    if let Some(s) = inbound.dial.get(&peer.0) {
        s.reachable.notify_one();
    }
    let first_frame = Duration::from_millis(inbound.limits.first_frame_ms);
    while let Ok(mut recv) = conn.accept_uni().await {
        let (peer, inbound) = (peer.clone(), inbound.clone());
        tokio::spawn(async move {
            // The first frame is the peer's boot id: a new one means
            // it restarted, and our own connection to it is stale.
            let boot = match tokio::time::timeout(first_frame, read_frame(&mut recv, 8)).await {
                Ok(r) => r,
                Err(_) => {
                    inbound.metrics.frames_timed_out.inc();
                    let _ = recv.stop(code::TIMEOUT.into());
                    return;
                }
            };
            match boot {
                Ok(Some(b)) if b.len() == 8 => {
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&b);
                    let boot = u64::from_be_bytes(id);
                    let previous = inbound
                        .boots
                        .lock()
                        .ok()
                        .and_then(|mut m| m.insert(peer.0.clone(), boot));
                    if previous.is_some_and(|p| p != boot) {
                        tracing::info!(peer = %peer, "peer restarted: redialling it");
                        if let Some(s) = inbound.dial.get(&peer.0) {
                            s.restarted.notify_one();
                        }
                    }
                }
                _ => {
                    let _ = recv.stop(code::MALFORMED.into());
                    return;
                }
            }
            loop {
                match read_frame_within(&mut recv, DEFAULT_MAX_MESSAGE_BYTES, PEER_FRAME_TIMEOUT).await {
                    Ok(Some(bytes)) => {
                        if !inbound.engine.peer_room(bytes.len()) {
                            // The engine is saturated: drop before decoding;
                            // the peer retransmits.
                            inbound.metrics.peer_frames_dropped.inc();
                            continue;
                        }
                        // Decoded here, not on the engine thread: a large
                        // frame (a 10^5-element set is 2.5 MB) takes tens
                        // of ms to decode, which is pure work. Large ones go
                        // to the blocking pool so this runtime's workers stay
                        // free; one at a time per stream, so order is kept.
                        // There its merges are prepared too (`Prepared`):
                        // the engine takes each whose key did not change.
                        let frame = if bytes.len() > DECODE_APART_BYTES {
                            let reads = inbound.reads.clone();
                            match tokio::task::spawn_blocking(move || {
                                let mut frame = Decoded::new(&bytes, DEFAULT_MAX_MESSAGE_BYTES);
                                reads.prepare_frame(&mut frame);
                                frame
                            })
                            .await
                            {
                                Ok(f) => f,
                                Err(_) => return, // the runtime is shutting down
                            }
                        } else {
                            Decoded::new(&bytes, DEFAULT_MAX_MESSAGE_BYTES)
                        };
                        if inbound
                            .engine
                            .try_send(Input::Frame {
                                from: peer.clone(),
                                frame,
                            })
                            .is_err()
                        {
                            // The engine is saturated: drop; the peer retransmits.
                            inbound.metrics.peer_frames_dropped.inc();
                        }
                    }
                    Ok(None) => return,
                    Err(FrameError::TooLarge(n)) => {
                        tracing::warn!(peer = %peer, bytes = n, "oversized frame: closing the stream");
                        inbound.metrics.peer_frames_rejected.inc();
                        let _ = recv.stop(code::FRAME_TOO_LARGE.into());
                        return;
                    }
                    Err(FrameError::TimedOut) => {
                        tracing::warn!(peer = %peer, "a frame did not complete in {PEER_FRAME_TIMEOUT:?}: closing the stream");
                        inbound.metrics.frames_timed_out.inc();
                        let _ = recv.stop(code::TIMEOUT.into());
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "peer stream ended");
                        return;
                    }
                }
            }
        });
    }
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(ClientError {
        kind,
        message: message.into(),
        regions: Vec::new(),
    })
}

/// What a client connection has shown so far.
pub(crate) struct ClientSession {
    /// Its QUIC connection (none for a RESP connection, whose transport
    /// has no windows to raise).
    conn: Option<quinn::Connection>,
    /// Slots of the requests in flight on its pipeline streams ([`PIPELINED`]).
    pipelined: Arc<tokio::sync::Semaphore>,
    authenticated: std::sync::atomic::AtomicBool,
    shown: tokio::sync::Notify,
    /// Who its client certificate names (requests with an empty token act
    /// as this principal).
    cert: Option<Arc<Principal>>,
}

impl ClientSession {
    /// The session of a connection that is not QUIC's (the RESP listener's).
    pub(crate) fn detached() -> ClientSession {
        ClientSession {
            conn: None,
            pipelined: Arc::new(tokio::sync::Semaphore::new(0)),
            authenticated: false.into(),
            shown: tokio::sync::Notify::new(),
            cert: None,
        }
    }

    /// A request with a valid token arrived: the connection stays, and gets
    /// the full window.
    fn authenticate(&self) {
        if !self.authenticated.swap(true, std::sync::atomic::Ordering::Relaxed) {
            if let Some(conn) = &self.conn {
                conn.set_receive_window(CLIENT_WINDOW.into());
                conn.set_max_concurrent_bi_streams(CLIENT_STREAMS.into());
            }
            self.shown.notify_one();
        }
    }
}

/// Serves a client connection: one request per bidirectional stream.
/// Unidirectional streams are refused (clients have no use for them), and
/// the connection is closed if no request with a valid token arrives within
/// `auth_ms`.
async fn client_connection(conn: quinn::Connection, inbound: Arc<Inbound>) {
    // No new ones; the few the handshake already allowed are stopped as
    // they come, so QUIC buffers nothing for them.
    conn.set_max_concurrent_uni_streams(0u32.into());
    let refuse_uni = {
        let (conn, metrics) = (conn.clone(), inbound.metrics.clone());
        async move {
            while let Ok(mut recv) = conn.accept_uni().await {
                metrics.client_uni_refused.inc();
                let _ = recv.stop(code::REFUSED.into());
            }
        }
    };
    let session = Arc::new(ClientSession {
        conn: Some(conn.clone()),
        pipelined: Arc::new(tokio::sync::Semaphore::new(PIPELINED as usize)),
        authenticated: false.into(),
        shown: tokio::sync::Notify::new(),
        cert: client_principal(&conn, &inbound.access),
    });
    let deadline = {
        let (session, inbound) = (session.clone(), inbound.clone());
        async move {
            let auth = Duration::from_millis(inbound.limits.auth_ms);
            tokio::select! {
                () = session.shown.notified() => {}
                () = tokio::time::sleep(auth) => {
                    if !session.authenticated.load(std::sync::atomic::Ordering::Relaxed) {
                        inbound.metrics.connections_unauthenticated.inc();
                        if let Some(conn) = &session.conn {
                            conn.close(code::UNAUTHENTICATED.into(), b"no request with a valid token in time");
                        }
                    }
                }
            }
        }
    };
    // Watchers and waiting reads are capped per connection.
    let id = conn.stable_id() as u64;
    let streams = async {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (inbound, session) = (inbound.clone(), session.clone());
            tokio::spawn(async move { client_stream(send, recv, id, inbound, session).await });
        }
    };
    // `streams` ends with the connection; the others with it.
    tokio::select! {
        () = streams => {}
        () = async { tokio::join!(refuse_uni, deadline); std::future::pending::<()>().await } => {}
    }
}

/// How reading a request ended, short of a request.
enum Refusal {
    /// The stream ended or failed: nothing to answer. `finished`: the
    /// client finished its side cleanly between frames (a pipeline's client
    /// then still reads its answers); otherwise it reset the stream or the
    /// connection went away.
    Gone { finished: bool },
    /// The request did not arrive in time: the stream is reset.
    TimedOut,
    /// Answer this, and stop reading the request.
    Answer(Box<Response>, u32),
}

/// Reads one request frame: its length prefix within `first_frame_ms`,
/// then the rest within `frame_ms`. A frame longer than
/// [`TOKEN_PREFIX_MAX`] has its token checked on its first bytes, before
/// its body takes a share of the read budget and is read.
///
/// A pipeline stream's later frames (`first` false) may be as far apart as
/// the client likes: the connection's idle timeout bounds the wait.
async fn read_request<'a>(
    recv: &mut quinn::RecvStream,
    inbound: &'a Inbound,
    session: &ClientSession,
    first: bool,
) -> Result<(Vec<u8>, Option<BudgetShare<'a>>), Refusal> {
    let limits = &inbound.limits;
    let mut len = [0u8; 4];
    let prefix = if first {
        tokio::time::timeout(Duration::from_millis(limits.first_frame_ms), recv.read_exact(&mut len)).await
    } else {
        Ok(recv.read_exact(&mut len).await)
    };
    match prefix {
        Err(_) => return Err(Refusal::TimedOut),
        Ok(Err(e)) => {
            return Err(Refusal::Gone {
                finished: e == quinn::ReadExactError::FinishedEarly(0),
            })
        }
        Ok(Ok(())) => {}
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CLIENT_FRAME {
        return Err(Refusal::Answer(
            Box::new(error(
                ErrorKind::InvalidRequest,
                format!("request of {len} bytes is over the limit of {MAX_CLIENT_FRAME}"),
            )),
            code::FRAME_TOO_LARGE,
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(limits.frame_ms);
    let read = |e: ReadError| match e {
        ReadError::TimedOut => Refusal::TimedOut,
        ReadError::Stream(_) => Refusal::Gone { finished: false },
    };
    let mut frame = vec![0u8; len.min(TOKEN_PREFIX_MAX)];
    read_exact_by(recv, &mut frame, deadline).await.map_err(read)?;
    if len == frame.len() {
        return Ok((frame, None)); // small: decoded, then its token checked
    }
    let Some(token) = token_of(&frame) else {
        return Err(Refusal::Answer(
            Box::new(error(ErrorKind::InvalidRequest, "undecodable request")),
            code::MALFORMED,
        ));
    };
    if principal(inbound, token, session).is_none() {
        return Err(Refusal::Answer(
            Box::new(error(ErrorKind::Unauthorized, "unknown client token")),
            code::MALFORMED,
        ));
    }
    session.authenticate();
    let head = frame.len();
    let Some(share) = inbound.budget.take(len - head, deadline).await else {
        inbound.metrics.overloaded.inc();
        return Err(Refusal::Answer(
            Box::new(error(
                ErrorKind::Overloaded,
                "the node is reading too many requests at once",
            )),
            code::REFUSED,
        ));
    };
    frame.resize(len, 0);
    read_exact_by(recv, &mut frame[head..], deadline).await.map_err(read)?;
    Ok((frame, Some(share)))
}

/// One client request per bidirectional stream.
async fn client_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    conn: u64,
    inbound: Arc<Inbound>,
    session: Arc<ClientSession>,
) {
    let response = match read_request(&mut recv, &inbound, &session, true).await {
        Ok((frame, share)) => {
            let request = decode_client::<ClientRequest>(&frame);
            let bytes = frame.len();
            // The decoded request is the engine's to bound from here (the
            // engine queue charges it its frame's length).
            drop((frame, share));
            match request {
                Ok(ClientRequest {
                    token,
                    body: RequestBody::Pipeline(first),
                }) => {
                    return pipeline(send, recv, (token, first), conn, inbound.clone(), session).await;
                }
                Ok(ClientRequest {
                    token,
                    body: RequestBody::Watch { prefix, from },
                }) => match principal(&inbound, token.as_bytes(), &session) {
                    None => error(ErrorKind::Unauthorized, "unknown client token"),
                    Some(who) if !who.overlaps(Perm::Watch, &prefix) => {
                        session.authenticate();
                        refuse(&inbound, &who, Perm::Watch, format_args!("watch {prefix:?}"))
                    }
                    Some(who) => {
                        session.authenticate();
                        return watch(send, prefix, from, Request { bytes, conn }, &inbound, who).await;
                    }
                },
                Ok(ClientRequest { token, body }) => {
                    // A client that goes away (resets the stream or closes
                    // the connection) gives up its answer: dropping the
                    // request drops its reply channel, and the engine then
                    // drops what waits on it (a waiting read and its slot).
                    let gone = send.stopped();
                    tokio::select! {
                        r = serve(&token, body, Request { bytes, conn }, &inbound, &session) => r,
                        _ = gone => return,
                    }
                }
                Err(e) => error(ErrorKind::InvalidRequest, format!("undecodable request: {e}")),
            }
        }
        Err(Refusal::Gone { .. }) => return,
        Err(Refusal::TimedOut) => {
            inbound.metrics.frames_timed_out.inc();
            let _ = recv.stop(code::TIMEOUT.into());
            let _ = send.reset(code::TIMEOUT.into());
            return;
        }
        Err(Refusal::Answer(response, stop)) => {
            let _ = recv.stop(stop.into());
            *response
        }
    };
    let (frame, _permit) = answer_frame(&response, &inbound);
    if let Some(frame) = frame {
        // A client that does not read its answer does not hold it forever.
        let within = Duration::from_millis(inbound.limits.frame_ms);
        if tokio::time::timeout(within, write_frame(&mut send, &frame))
            .await
            .is_err()
        {
            inbound.metrics.frames_timed_out.inc();
            let _ = send.reset(code::TIMEOUT.into());
            return;
        }
    }
    let _ = send.finish();
}

/// An answer's frame, and its share of the answer budget. An answer too
/// large for a client frame (only a state grown by remote merges can be:
/// writes refuse values that could not be read back) becomes a clear error,
/// never an empty stream the client would take for a dead node. Answers
/// waiting for slow clients hold the node's memory under one budget: past
/// it the answer is an `Overloaded` error (the client retries), never queued.
fn answer_frame<'a>(
    response: &Response,
    inbound: &'a Inbound,
) -> (Option<Vec<u8>>, Option<tokio::sync::SemaphorePermit<'a>>) {
    let frame = encode_answer(response).or_else(|e| {
        encode_answer(&error(
            ErrorKind::InvalidRequest,
            format!("the answer is too large for one client frame: {e}"),
        ))
    });
    let kib = frame.as_ref().map_or(0, |f| f.len().div_ceil(1024)) as u32;
    match inbound.answer_budget.try_acquire_many(kib) {
        Ok(permit) => (frame.ok(), Some(permit)),
        Err(_) => {
            inbound.metrics.overloaded.inc();
            let message = "answers not yet read by their clients fill the node's answer budget";
            (encode_answer(&error(ErrorKind::Overloaded, message)).ok(), None)
        }
    }
}

/// What a pipeline stream's reader hands to the task that runs its requests.
enum Piped {
    /// A frame's requests under its token, each with its slot among the
    /// connection's pipelined requests.
    Batch(Arc<str>, Vec<(Tagged, tokio::sync::OwnedSemaphorePermit)>),
    /// The stream is refused with this answer (a frame over the limits,
    /// undecodable, or with a bad token): the requests already running are
    /// answered first, then the refusal, and nothing after it runs.
    Refused(Response, u32),
    /// The client reset its side: the requests still running are dropped.
    Abandoned,
}

/// Requests of one connection's pipeline streams in flight at once (the
/// same bound as its request streams): past it the streams read no further
/// frame until answers went out, and QUIC flow control holds the client back.
pub const PIPELINED: u32 = CLIENT_STREAMS;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A share of the answer budget held by an answer on a pipeline stream
/// until it is written (owned, so the task that made the answer can hand
/// it over).
struct AnswerCharge {
    inbound: Arc<Inbound>,
    kib: u32,
}

impl Drop for AnswerCharge {
    fn drop(&mut self) {
        self.inbound.answer_budget.add_permits(self.kib as usize);
    }
}

/// A pipelined request's answer, ready to send: its tag, its frame, its
/// share of the answer budget and its slot among the connection's
/// pipelined requests (both given back once the frame is written).
type Ready = (
    u32,
    Option<Vec<u8>>,
    Option<AnswerCharge>,
    tokio::sync::OwnedSemaphorePermit,
);

/// Runs one pipelined request to its charged answer.
async fn run_pipelined(
    request: Tagged,
    slot: tokio::sync::OwnedSemaphorePermit,
    token: Arc<str>,
    conn: u64,
    inbound: Arc<Inbound>,
    session: Arc<ClientSession>,
) -> Ready {
    let bytes = request.frame.len();
    let response = match decode_client::<RequestBody>(&request.frame) {
        Ok(body) => serve(&token, body, Request { bytes, conn }, &inbound, &session).await,
        Err(e) => error(ErrorKind::InvalidRequest, format!("undecodable request: {e}")),
    };
    let (frame, permit) = answer_frame(&response, &inbound);
    let charge = permit.map(|p| {
        let kib = p.num_permits() as u32;
        p.forget();
        AnswerCharge {
            inbound: inbound.clone(),
            kib,
        }
    });
    (request.tag, frame, charge, slot)
}

/// Serves a pipeline stream (see [`RequestBody::Pipeline`]). A reader task
/// reads and decodes its frames one at a time and hands each frame's
/// requests over once the connection's [`PIPELINED`] slots have room for
/// them; each request runs as a task of its own to its answer, charged to
/// the answer budget (so no request waits on another's, or on a client
/// slow to read); this task sends the answers as they complete, packed
/// several to a frame ([`AnswerPack`]), and gives back their slots once
/// written. A client that finishes its side gets the answers of what it
/// sent; one that stops reading, or resets its side, gives them up (the
/// requests are aborted, which drops what waits on them in the engine). A frame that
/// breaks the limits ends the stream: the requests already running are
/// answered, then the refusal is sent as a plain answer frame, and nothing
/// after it runs.
async fn pipeline(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    first: (String, Vec<Tagged>),
    conn: u64,
    inbound: Arc<Inbound>,
    session: Arc<ClientSession>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let reader = tokio::spawn(read_pipeline(recv, first, inbound.clone(), session.clone(), tx));
    let _reader = AbortOnDrop(reader.abort_handle());
    // Dropped with this task: the requests still running are aborted.
    let mut running = tokio::task::JoinSet::new();
    let (mut pack, mut held) = (AnswerPack::default(), Vec::new());
    let (mut reading, mut refused) = (true, None);
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let within = Duration::from_millis(inbound.limits.frame_ms);
    loop {
        if !reading && running.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut stopped => return,
            piped = rx.recv(), if reading => match piped {
                Some(Piped::Batch(token, requests)) => {
                    inbound.metrics.pipelined_requests.inc_by(requests.len() as u64);
                    for (request, slot) in requests {
                        let (token, inbound, session) = (token.clone(), inbound.clone(), session.clone());
                        running.spawn(run_pipelined(request, slot, token, conn, inbound, session));
                    }
                }
                Some(Piped::Refused(response, code)) => {
                    tracing::debug!(code, "pipeline stream refused: {response:?}");
                    refused = Some(response);
                    reading = false;
                }
                Some(Piped::Abandoned) => return,
                None => reading = false,
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                if !running.is_empty() {
                    // Let the requests that are about to finish finish, so
                    // their answers share this frame.
                    tokio::task::yield_now().await;
                }
                let mut done = Some(done);
                // Every answer ready now goes in this round's frames.
                while let Some(joined) = done.take() {
                    match joined {
                        Ok((tag, Some(frame), charge, slot)) => {
                            held.push((charge, slot));
                            if let Some(full) = pack.push(Tagged { tag, frame }) {
                                if !send_pack(&mut send, full, within, &inbound).await {
                                    return;
                                }
                            }
                        }
                        Ok((_, None, _, _)) => {}
                        Err(e) => tracing::error!("a pipelined request failed: {e}"),
                    }
                    done = running.try_join_next();
                }
                if !send_pack(&mut send, pack.take(), within, &inbound).await {
                    return;
                }
                held.clear();
            }
        }
    }
    // The requests that ran are answered; the client fails the rest with
    // the refusal, as an answer frame of its own.
    if let Some(frame) = refused.and_then(|r| encode_answer(&r).ok()) {
        let _ = tokio::time::timeout(within, write_frame(&mut send, &frame)).await;
    }
    let _ = send.finish();
}

/// Writes one pipeline answer frame within `within`; false when the stream
/// is gone or the client did not read it in time (the stream is reset).
async fn send_pack(send: &mut quinn::SendStream, answers: Vec<Tagged>, within: Duration, inbound: &Inbound) -> bool {
    if answers.is_empty() {
        return true; // every request of the round failed without an answer
    }
    let frame = match encode_pipeline_answers(answers) {
        Ok(f) => f,
        Err(e) => {
            // The packer keeps every pack within the limit.
            tracing::error!("a pipeline answer frame did not encode: {e}");
            let _ = send.reset(code::MALFORMED.into());
            return false;
        }
    };
    inbound.metrics.pipelined_frames.inc();
    match tokio::time::timeout(within, write_frame(send, &frame)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            inbound.metrics.frames_timed_out.inc();
            let _ = send.reset(code::TIMEOUT.into());
            false
        }
    }
}

/// Reads a pipeline stream's frames (the first one already read), checks
/// each against the pipeline's limits, and hands its requests to
/// [`pipeline`] once the connection has slots for them.
async fn read_pipeline(
    mut recv: quinn::RecvStream,
    first: (String, Vec<Tagged>),
    inbound: Arc<Inbound>,
    session: Arc<ClientSession>,
    tx: tokio::sync::mpsc::Sender<Piped>,
) {
    let refuse = |message: String, code: u32| Piped::Refused(error(ErrorKind::InvalidRequest, message), code);
    let mut next = Some(first);
    loop {
        let (token, requests) = match next.take() {
            Some(first) => first,
            None => match read_request(&mut recv, &inbound, &session, false).await {
                Ok((frame, share)) => {
                    let request = decode_client::<ClientRequest>(&frame);
                    drop((frame, share));
                    match request {
                        Ok(ClientRequest {
                            token,
                            body: RequestBody::Pipeline(requests),
                        }) => (token, requests),
                        Ok(_) => {
                            let _ = tx
                                .send(refuse(
                                    "a pipeline stream carries only pipeline frames".into(),
                                    code::MALFORMED,
                                ))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx
                                .send(refuse(format!("undecodable request: {e}"), code::MALFORMED))
                                .await;
                            return;
                        }
                    }
                }
                // The client finished its side: what it sent is answered.
                Err(Refusal::Gone { finished: true }) => return,
                // It reset it (or left): it gives up its answers.
                Err(Refusal::Gone { finished: false }) => {
                    let _ = tx.send(Piped::Abandoned).await;
                    return;
                }
                Err(Refusal::TimedOut) => {
                    inbound.metrics.frames_timed_out.inc();
                    let _ = tx
                        .send(refuse("a frame did not arrive in time".into(), code::TIMEOUT))
                        .await;
                    return;
                }
                Err(Refusal::Answer(response, code)) => {
                    let _ = tx.send(Piped::Refused(*response, code)).await;
                    return;
                }
            },
        };
        if requests.len() > PIPELINE_MAX_REQUESTS {
            let message = format!(
                "a pipeline frame of {} requests is over the limit of {PIPELINE_MAX_REQUESTS}",
                requests.len()
            );
            let _ = tx.send(refuse(message, code::FRAME_TOO_LARGE)).await;
            return;
        }
        // A slot per request, as they free up: the requests that have one
        // run while the rest wait (a frame waiting for all its slots at
        // once waits for the slowest requests of the connection).
        let token: Arc<str> = token.into();
        let mut batch = Vec::with_capacity(requests.len());
        for request in requests {
            let slot = match session.pipelined.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    let ready = std::mem::take(&mut batch);
                    if !ready.is_empty() && tx.send(Piped::Batch(token.clone(), ready)).await.is_err() {
                        return;
                    }
                    let Ok(slot) = session.pipelined.clone().acquire_owned().await else {
                        return;
                    };
                    slot
                }
            };
            batch.push((request, slot));
        }
        if tx.send(Piped::Batch(token, batch)).await.is_err() {
            return;
        }
    }
}

/// Whether `token` is a configured token (compared in constant time); a
/// miss counts in `client_unauthorized`.
pub(crate) fn authorized(inbound: &Inbound, token: &[u8]) -> bool {
    let ok = inbound.access.by_token(token).is_some();
    if !ok {
        inbound.metrics.unauthorized.inc();
    }
    ok
}

/// Who a request acts as: its token's principal, or, with an empty token,
/// the connection's client certificate's. `None` (counted in
/// `client_unauthorized`) for an unknown token, or an empty one without a
/// certificate an `[[access]]` entry names.
pub(crate) fn principal(inbound: &Inbound, token: &[u8], session: &ClientSession) -> Option<Arc<Principal>> {
    let who = if token.is_empty() {
        session.cert.clone()
    } else {
        inbound.access.by_token(token)
    };
    if who.is_none() {
        inbound.metrics.unauthorized.inc();
    }
    who
}

/// The `PermissionDenied` answer to `who` for `what`, counted by `perm`.
fn refuse(inbound: &Inbound, who: &Principal, perm: Perm, what: std::fmt::Arguments<'_>) -> Response {
    inbound.metrics.permission_denied(perm.name());
    tracing::debug!(principal = %who.name, perm = perm.name(), "permission denied: {what}");
    Response::Error(denied(who, what))
}

/// Streams a change feed on one bidirectional stream, a frame per change,
/// until the client goes away (a reset or a closed connection is noticed
/// at once, and the engine drops the watcher), falls too far behind (a
/// `WatchLagged` error ends the feed), or the node stops. Each change's
/// value is read from the engine when the change is about to be sent: the
/// watcher sees the key's latest value (see [`crate::feed`]).
async fn watch(
    mut send: quinn::SendStream,
    prefix: String,
    from: Option<WatchToken>,
    meta: Request,
    inbound: &Inbound,
    who: Arc<Principal>,
) {
    // Refused here, before it is queued: the engine queue charges a request
    // its frame's length, and a prefix longer than any key can match nothing.
    if prefix.len() > lattice_core::MAX_KEY_LEN {
        let message = format!(
            "a watch prefix of {} bytes is longer than the limit of {} (the longest key)",
            prefix.len(),
            lattice_core::MAX_KEY_LEN
        );
        if let Ok(f) = encode_answer(&error(ErrorKind::InvalidRequest, message)) {
            let _ = write_frame(&mut send, &f).await;
        }
        let _ = send.finish();
        return;
    }
    let (tx, mut rx) = watch_queue();
    let conn = meta.conn;
    if inbound
        .engine
        .try_send_from(Input::Watch { prefix, from, conn, tx }, meta.bytes, conn)
        .is_err()
    {
        inbound.metrics.overloaded.inc();
        if let Ok(f) = encode_answer(&error(ErrorKind::Overloaded, "the node's request queue is full")) {
            let _ = write_frame(&mut send, &f).await;
        }
        let _ = send.finish();
        return;
    }
    let mut stopped = std::pin::pin!(send.stopped());
    loop {
        let batch = tokio::select! {
            b = next_batch(&mut rx) => b,
            // The client reset the stream or its connection closed.
            _ = &mut stopped => return,
        };
        let Some((mut notices, end)) = batch else { break };
        // One batch (at most about 1 MiB of frames) at a time, written
        // before the next is read, under the node-wide budget of values in
        // flight to watchers.
        while !notices.is_empty() {
            // Only the keys it may watch (a prefix may be wider than its
            // grants); the others are never read.
            notices.retain(|n| who.allows(Perm::Watch, n.key.as_str()));
            if notices.is_empty() {
                break;
            }
            let got = tokio::select! {
                g = change_frames(&mut notices, inbound) => g,
                _ = &mut stopped => return,
            };
            let Some((frames, _permit)) = got else { return };
            for f in &frames {
                if write_frame(&mut send, &f.bytes).await.is_err() {
                    return;
                }
            }
            if frames.iter().any(|f| f.last) {
                let _ = send.finish();
                return;
            }
        }
        if let Some(e) = end {
            if let Ok(f) = encode_answer(&Response::Error(e)) {
                let _ = write_frame(&mut send, &f).await;
            }
            break;
        }
    }
    // The engine dropped us (we fell behind, or it stopped): the client
    // resumes from its last token.
    let _ = send.finish();
}

/// Notices queued for a watcher, at most [`WATCH_NOTICES`], waiting for the
/// first; the error that ends the feed, if it is among them. `None` once
/// the engine dropped the watcher and everything was taken.
async fn next_batch(rx: &mut WatchRx) -> Option<(Vec<Notice>, Option<ClientError>)> {
    let mut notices = Vec::new();
    let mut item: Option<WatchItem> = Some(rx.recv().await?);
    while let Some(i) = item.take() {
        match i {
            Ok(n) => notices.push(n),
            Err(e) => return Some((notices, Some(e))),
        }
        if notices.len() < WATCH_NOTICES {
            item = rx.try_recv();
        }
    }
    Some((notices, None))
}

/// Changes a watch stream asks the engine about at once.
const WATCH_NOTICES: usize = 64;

/// The frames of the first of `notices` with their keys' values, read
/// beside the engine (at most about 1 MiB, at least one change), removed
/// from `notices`, and the share of the watch budget they hold until
/// written. `None` if the node is stopping. A notice is published once the
/// flush that stored its change is done, so the value read includes it.
async fn change_frames<'a>(
    notices: &mut Vec<Notice>,
    inbound: &'a Inbound,
) -> Option<(Vec<WatchFrame>, tokio::sync::SemaphorePermit<'a>)> {
    // A batch holds up to WATCH_BATCH_BYTES plus one change, whose value
    // may take a whole answer frame.
    let want = ((WATCH_BATCH_BYTES + MAX_ANSWER_FRAME) / 1024).min(inbound.watch_budget_kib) as u32;
    let permit = inbound.watch_budget.acquire_many(want).await.ok()?;
    // Decoding values shares the slots of reads beside the engine.
    let _slot = inbound.direct_reads.acquire().await.ok()?;
    let reads = inbound.reads.clone();
    let batch = notices.clone();
    let (frames, used) = tokio::task::spawn_blocking(move || watch_frames(&reads, &batch))
        .await
        .ok()?;
    notices.drain(..used.min(notices.len()));
    Some((frames, permit))
}

/// `None` when `who` may administer the node; otherwise the refusal of
/// `what` (`PermissionDenied`, counted).
fn require_admin(inbound: &Inbound, who: &Principal, what: &str) -> Option<Response> {
    if who.is_admin() {
        return None;
    }
    Some(refuse(
        inbound,
        who,
        Perm::Admin,
        format_args!("{what}: it needs an admin token (admin_tokens, or admin on \"\" in [[access]])"),
    ))
}

/// The refusal of `body` for `who` if a key or prefix it names is not
/// granted (mget keys are checked one by one as they are read; scans, log
/// reads and watches of a wider prefix are filtered instead).
fn check_body(inbound: &Inbound, who: &Principal, body: &RequestBody) -> Option<Response> {
    let (perm, what, prefix) = match body {
        RequestBody::Write { ops, .. } => {
            let key = ops
                .iter()
                .map(|(k, _)| k)
                .find(|k| !who.allows(Perm::Write, k.as_str()))?;
            return Some(refuse(
                inbound,
                who,
                Perm::Write,
                format_args!("write {:?}", key.as_str()),
            ));
        }
        RequestBody::Read { key, .. } | RequestBody::ReadAt { key, .. } => {
            if who.allows(Perm::Read, key.as_str()) {
                return None;
            }
            return Some(refuse(
                inbound,
                who,
                Perm::Read,
                format_args!("read {:?}", key.as_str()),
            ));
        }
        RequestBody::Scan { prefix, .. } => (Perm::Read, "scan", prefix),
        RequestBody::LogRead { prefix, .. } => (Perm::Read, "read the change log under", prefix),
        _ => return None,
    };
    if who.overlaps(perm, prefix) {
        None
    } else {
        Some(refuse(inbound, who, perm, format_args!("{what} {prefix:?}")))
    }
}
/// A read served beside the engine, from the store as of the last flush:
/// the flush it saw, and its answer if that state includes `after` (or
/// there is no token). `None` if the node is stopping.
async fn read_beside(
    inbound: &Inbound,
    key: &lattice_core::Key,
    after: Option<Arc<lattice_core::proto::client::CausalToken>>,
) -> Option<(u64, Option<Result<Response, lattice_core::Error>>)> {
    // The slot is held while the value is read, decoded and turned into
    // its answer, and given back before a read that must wait goes to the
    // engine (a waiting read holding it would keep every other read out
    // for its whole wait).
    let _slot = inbound.direct_reads.acquire().await.ok()?;
    // Taken before the read: the state read holds at least this flush.
    let seen = inbound.reads.epoch();
    let record = match inbound.reads.read_record(key) {
        Ok(r) => r,
        Err(e) => return Some((seen, Some(Err(e)))),
    };
    let small = record_len_at_most(&record, INLINE_READ_BYTES);
    let answer = move |k: &lattice_core::Key| {
        let v = match record.map(|r| lattice_core::store::open_record(k, &r)).transpose() {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        if !after.as_ref().is_none_or(|t| t.is_included_in(v.as_ref())) {
            return None;
        }
        Some(Ok(Response::Value {
            token: lattice_core::proto::client::CausalToken::of(v.as_ref()),
            value: v.as_ref().map(|v| v.view()),
        }))
    };
    // A small value is decoded and answered here: handing it to the
    // blocking pool costs more than the work (two thread wake-ups). A
    // large one (up to 4 MiB: hundreds of ms) is not, so the async
    // workers keep serving.
    if small {
        return Some((seen, answer(key)));
    }
    let k = key.clone();
    let answer = tokio::task::spawn_blocking(move || answer(&k)).await.ok()?;
    Some((seen, answer))
}

/// Reads whose stored record is at most this long are decoded on the
/// async worker that serves them ([`read_beside`]).
const INLINE_READ_BYTES: usize = 16 << 10;

fn record_len_at_most(record: &Option<sled::IVec>, max: usize) -> bool {
    record.as_ref().is_none_or(|r| r.len() <= max)
}

/// What the transport knows of a request besides its body.
pub(crate) struct Request {
    /// Its frame's length (what it is charged in the engine queue).
    pub(crate) bytes: usize,
    /// Its connection.
    pub(crate) conn: u64,
}

/// The node's one request path: checks the token, then serves `body` (from
/// a QUIC client or the RESP listener) through the engine or beside it.
pub(crate) async fn serve(
    token: &str,
    body: RequestBody,
    meta: Request,
    inbound: &Inbound,
    session: &ClientSession,
) -> Response {
    let span = tracing::debug_span!("client_request");
    let _g = span.enter();
    let Some(who) = principal(inbound, token.as_bytes(), session) else {
        return error(ErrorKind::Unauthorized, "unknown client token");
    };
    session.authenticate();
    if let Some(refused) = check_body(inbound, &who, &body) {
        return refused;
    }
    match body {
        RequestBody::Write {
            op_id,
            retry,
            ops,
            concern,
            timeout_ms,
        } => {
            // A large add or merge's work on its key's whole state is done
            // here, beside the engine, which takes it if the key did not
            // change meanwhile (`Prepared`); small writes are left to it.
            // At most `PREPARING` at once: past that, the engine does it.
            static PREPARING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(crate::node::PREPARING);
            let large = ops.iter().map(|(_, op)| op.elements()).sum::<usize>() >= crate::node::PREPARE_MIN_ELEMENTS;
            let slot = if large { PREPARING.try_acquire().ok() } else { None };
            let (ops, prepared) = if let Some(slot) = slot {
                let reads = inbound.reads.clone();
                match tokio::task::spawn_blocking(move || {
                    let prepared = reads.prepare_write(&ops);
                    drop(slot);
                    (ops, prepared)
                })
                .await
                {
                    Ok(done) => done,
                    Err(_) => return error(ErrorKind::Unavailable, "the node is shutting down"),
                }
            } else {
                (ops, Prepared::default())
            };
            let (tx, rx) = oneshot::channel();
            let input = Input::Write {
                op_id,
                retry,
                ops,
                prepared,
                concern,
                timeout_ms,
                conn: meta.conn,
                reply: tx,
            };
            // Charged for the request; the queue adds the prepared states
            // (or drops them when they do not fit: the engine redoes them).
            if inbound.engine.try_send_from(input, meta.bytes, meta.conn).is_err() {
                return overloaded(&inbound.metrics);
            }
            match rx.await {
                Ok(Ok((keys, duplicate))) => {
                    let mut token = lattice_core::proto::client::CausalToken::default();
                    keys.iter().for_each(|(_, t)| token.join(t));
                    Response::Written { token, keys, duplicate }
                }
                Ok(Err(e)) => Response::Error(ClientError::from(&e)),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::Read { key, after, wait_ms } => read(key, after, wait_ms, &meta, inbound).await,
        RequestBody::MGet { keys, wait_ms } => {
            if keys.len() > MGET_MAX_KEYS {
                return error(
                    ErrorKind::InvalidRequest,
                    format!("an mget of {} keys is over the limit of {MGET_MAX_KEYS}", keys.len()),
                );
            }
            // One at a time: a read is a lookup in the flushed state (unless
            // it must wait for its token), and the answer's size is known
            // before the next value is decoded.
            let mut entries = Vec::with_capacity(keys.len());
            let mut bytes = 0;
            let deadline = Instant::now() + Duration::from_millis(wait_ms.min(30_000));
            let mut full = false;
            for (key, after) in keys {
                // Once a value did not fit, the rest are not read at all: an
                // mget of 1,000 keys of 4 MiB decodes at most about two of them.
                if full {
                    entries.push(Entry {
                        key,
                        value: None,
                        token: None,
                        error: Some(ClientError {
                            kind: ErrorKind::InvalidRequest,
                            message: "the mget answer filled up before this key: read it in another request".into(),
                            regions: Vec::new(),
                        }),
                    });
                    continue;
                }
                let wait = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
                let answer = if who.allows(Perm::Read, key.as_str()) {
                    read(key.clone(), after, wait, &meta, inbound).await
                } else {
                    refuse(inbound, &who, Perm::Read, format_args!("read {:?}", key.as_str()))
                };
                let mut entry = match answer {
                    Response::Value { value, token } => Entry {
                        key,
                        value,
                        token: Some(token),
                        error: None,
                    },
                    Response::Error(e) => Entry {
                        key,
                        value: None,
                        token: None,
                        error: Some(e),
                    },
                    other => Entry {
                        key,
                        value: None,
                        token: None,
                        error: Some(ClientError {
                            kind: ErrorKind::Internal,
                            message: format!("unexpected read answer {other:?}"),
                            regions: Vec::new(),
                        }),
                    },
                };
                let mut size = entry_size(&entry).unwrap_or(usize::MAX);
                if bytes + size > ENTRIES_MAX_BYTES {
                    full = true;
                    entry.value = None;
                    entry.token = None;
                    entry.error = Some(ClientError {
                        kind: ErrorKind::InvalidRequest,
                        message: "this value does not fit in the mget answer beside the others: read it alone".into(),
                        regions: Vec::new(),
                    });
                    size = entry_size(&entry).unwrap_or(0);
                }
                bytes += size;
                entries.push(entry);
            }
            Response::Values(entries)
        }
        RequestBody::Scan {
            prefix,
            cursor,
            limit,
            values,
        } => {
            if prefix.len() > lattice_core::MAX_KEY_LEN {
                return error(ErrorKind::InvalidRequest, "the scan prefix is longer than a key may be");
            }
            inbound.metrics.reads.inc_by(1);
            // Under the scan slots: at most DIRECT_READS / 2 pages (each up
            // to 16 MiB of records decoded) at once, beside the reads.
            // Owned by the page's blocking work: a request dropped while the
            // page is decoded (its client went away) keeps the slot until then.
            let Ok(slot) = inbound.scan_slots.clone().acquire_owned().await else {
                return error(ErrorKind::Unavailable, "the node is shutting down");
            };
            let reads = inbound.reads.clone();
            let reader = who.clone();
            let page = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                // A prefix wider than the grants: only what it may read (the
                // page may then hold fewer than `limit`), and a cursor that
                // names none of the rest.
                let may_read = |k: &str| reader.allows(Perm::Read, k);
                reads.scan(&prefix, cursor.as_ref(), limit, values, &may_read)
            })
            .await;
            match page {
                Ok(Ok((entries, cursor))) => Response::Scanned { entries, cursor },
                Ok(Err(e)) => Response::Error(ClientError::from(&e)),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::LogRead {
            partitions,
            from,
            prefix,
            limit,
            wait_ms,
        } => {
            if prefix.len() > lattice_core::MAX_KEY_LEN {
                return error(ErrorKind::InvalidRequest, "the log prefix is longer than a key may be");
            }
            if partitions.len() > lattice_core::log::MAX_PARTITIONS as usize {
                return error(ErrorKind::InvalidRequest, "too many partitions asked");
            }
            inbound.metrics.reads.inc_by(1);
            // An empty page waits for a flush that may bring a change (at
            // most 30 s), polling the log after each 50 ms.
            let deadline = Instant::now() + Duration::from_millis(wait_ms.min(30_000));
            let mut from = from;
            loop {
                let Ok(slot) = inbound.scan_slots.clone().acquire_owned().await else {
                    return error(ErrorKind::Unavailable, "the node is shutting down");
                };
                let reads = inbound.reads.clone();
                let (parts, at, pre) = (partitions.clone(), from.clone(), prefix.clone());
                let page = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    reads.log_page(&parts, at.as_ref(), &pre, limit)
                })
                .await;
                match page {
                    Ok(Ok((mut changes, next, partitions))) => {
                        changes.retain(|c| who.allows(Perm::Read, c.change.key.as_str()));
                        if !changes.is_empty() || Instant::now() >= deadline {
                            return Response::Log {
                                changes,
                                next,
                                partitions,
                            };
                        }
                        from = Some(next);
                    }
                    Ok(Err(e)) => return Response::Error(ClientError::from(&e)),
                    Err(_) => return error(ErrorKind::Unavailable, "the node is shutting down"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        RequestBody::ReadAt { key, at_ms } => {
            inbound.metrics.reads.inc_by(1);
            let Ok(slot) = inbound.scan_slots.clone().acquire_owned().await else {
                return error(ErrorKind::Unavailable, "the node is shutting down");
            };
            let reads = inbound.reads.clone();
            let read = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                reads.read_at(&key, at_ms)
            })
            .await;
            match read {
                Ok(Ok(value)) => Response::Value {
                    value: value.map(|v| v.view()),
                    token: lattice_core::proto::client::CausalToken::default(),
                },
                Ok(Err(e)) => Response::Error(ClientError::from(&e)),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::Backup { dir } => {
            if let Some(refused) = require_admin(inbound, &who, "back up the node") {
                return refused;
            }
            let dir = std::path::PathBuf::from(dir);
            if !dir.is_absolute() {
                return error(
                    ErrorKind::InvalidRequest,
                    "the backup directory must be an absolute path on the node's host",
                );
            }
            let (store, region, policy) = match inbound.reads.backup_source() {
                Ok(s) => s,
                Err(e) => return Response::Error(ClientError::from(&e)),
            };
            // Reads the whole store: off the async workers.
            let done = tokio::task::spawn_blocking(move || {
                let source = crate::backup::Source {
                    region: Some(region),
                    policy: (*policy).clone(),
                    online: true,
                };
                crate::backup::write(&store, &source, &dir)
            })
            .await;
            match done {
                Ok(Ok(summary)) => {
                    tracing::info!(dir = %summary.dir, keys = summary.keys, bytes = summary.bytes, "backup written");
                    Response::BackedUp(summary)
                }
                Ok(Err(crate::backup::BackupError::Store(e))) => Response::Error(ClientError::from(&e)),
                Ok(Err(e)) => error(ErrorKind::InvalidRequest, format!("backup failed: {e}")),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::Reencrypt { rotate } => {
            if let Some(refused) = require_admin(inbound, &who, "re-encrypt the data dir") {
                return refused;
            }
            let (store, _, _) = match inbound.reads.backup_source() {
                Ok(s) => s,
                Err(e) => return Response::Error(ClientError::from(&e)),
            };
            // Walks the whole store: off the async workers.
            let done = tokio::task::spawn_blocking(move || {
                let dir = store.data_dir().map(|d| d.to_path_buf()).unwrap_or_default();
                crate::reencrypt::run(&store, &dir, rotate)
            })
            .await;
            match done {
                Ok(Ok(s)) => {
                    tracing::info!(
                        rewritten = s.rewritten,
                        raced = s.raced,
                        passes = s.passes,
                        retired = s.retired,
                        current = s.current,
                        complete = s.complete,
                        "re-encryption done"
                    );
                    Response::Reencrypted(lattice_core::proto::client::ReencryptSummary {
                        rewritten: s.rewritten,
                        raced: s.raced,
                        passes: s.passes,
                        retired: s.retired as u32,
                        current: s.current,
                        complete: s.complete,
                    })
                }
                Ok(Err(e)) => error(ErrorKind::InvalidRequest, format!("re-encryption failed: {e}")),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::Watch { .. } | RequestBody::Pipeline(_) => error(
            ErrorKind::InvalidRequest,
            "watch and pipeline requests need their own stream (see RequestBody::Pipeline)",
        ),
        RequestBody::SetPolicy(set) => {
            if let Some(refused) = require_admin(inbound, &who, "change the policy") {
                return refused;
            }
            let (tx, rx) = oneshot::channel();
            if inbound
                .engine
                .try_send_from(Input::SetPolicy { set, reply: tx }, meta.bytes, meta.conn)
                .is_err()
            {
                return overloaded(&inbound.metrics);
            }
            match rx.await {
                Ok(Ok(version)) => Response::PolicySet { version },
                Ok(Err(e)) => Response::Error(ClientError::from(&e)),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::Audit => {
            // The log holds every policy set whole: every keyspace's name
            // and regions. Not for a credential scoped to some keyspaces.
            if !who.allows(Perm::Read, "") {
                return refuse(
                    inbound,
                    &who,
                    Perm::Read,
                    format_args!("read the policy audit log: it needs read on every key (the prefix \"\")"),
                );
            }
            let (tx, rx) = oneshot::channel();
            if inbound
                .engine
                .try_send_from(Input::Audit { reply: tx }, 0, meta.conn)
                .is_err()
            {
                return overloaded(&inbound.metrics);
            }
            match rx.await {
                Ok(Ok(entries)) => {
                    let r = Response::Audit(entries);
                    match lattice_core::proto::client::encode_answer(&r) {
                        Ok(_) => r,
                        Err(_) => error(
                            ErrorKind::Internal,
                            "the audit log is too large for one answer: verify it on the node with `latticed audit verify`",
                        ),
                    }
                }
                Ok(Err(e)) => Response::Error(ClientError::from(&e)),
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
        RequestBody::Status => {
            let (tx, rx) = oneshot::channel();
            if inbound
                .engine
                .try_send_from(Input::Status { reply: tx }, 0, meta.conn)
                .is_err()
            {
                return overloaded(&inbound.metrics);
            }
            match rx.await {
                Ok(mut s) => {
                    // Names and grants, never secrets; another client's
                    // only to an admin.
                    s.access = if who.is_admin() {
                        inbound.access.infos()
                    } else {
                        vec![who.info()]
                    };
                    // A scoped credential sees the keyspaces it may read.
                    if !who.allows(Perm::Read, "") {
                        s.policies.retain(|p| who.overlaps(Perm::Read, &p.keyspace));
                        s.conflicts.retain(|c| who.overlaps(Perm::Read, &c.keyspace));
                    }
                    Response::Status(s)
                }
                Err(_) => error(ErrorKind::Unavailable, "the node is shutting down"),
            }
        }
    }
}

/// Serves one read ([`RequestBody::Read`]).
async fn read(
    key: lattice_core::Key,
    after: Option<lattice_core::proto::client::CausalToken>,
    wait_ms: u64,
    meta: &Request,
    inbound: &Inbound,
) -> Response {
    // Keys are decoded unchecked; a write's are checked by the
    // engine, a read's here (before, an over-long key read as absent).
    if !key.is_valid() {
        let why = lattice_core::Key::new(key.as_str()).err().map(|e| e.to_string());
        return error(ErrorKind::InvalidRequest, why.unwrap_or_else(|| "invalid key".into()));
    }
    inbound.metrics.reads.inc_by(1);
    let deadline = Instant::now() + Duration::from_millis(wait_ms.min(30_000));
    // Shared with the engine while the read waits, not copied.
    let after = after.map(Arc::new);
    // Served beside the engine from the flushed state: a read
    // without a token, or one whose token it includes. A read that
    // must wait for its token goes to the engine, which tells it
    // when a flushed state includes the token (it never reads the
    // value itself); then it is served here. Each round trip is a
    // flush or more later, so few are needed; the bound only keeps
    // a fault from spinning.
    for _ in 0..8 {
        let (seen, direct) = match read_beside(inbound, &key, after.clone()).await {
            Some(d) => d,
            None => return error(ErrorKind::Unavailable, "the node is shutting down"),
        };
        if let Some(answer) = direct {
            return answer.unwrap_or_else(|e| {
                if matches!(e, lattice_core::Error::PolicyDenied { .. }) {
                    inbound.metrics.policy_denied.inc_by(1);
                }
                Response::Error(ClientError::from(&e))
            });
        }
        if Instant::now() >= deadline {
            break;
        }
        let (tx, rx) = oneshot::channel();
        let input = Input::Read {
            key: key.clone(),
            after: after.clone(),
            seen,
            deadline,
            conn: meta.conn,
            reply: tx,
        };
        if inbound.engine.try_send_from(input, meta.bytes, meta.conn).is_err() {
            return overloaded(&inbound.metrics);
        }
        match rx.await {
            Ok(Ok(ReadAnswer::Ready | ReadAnswer::Recheck)) => continue,
            Ok(Err(Some(e))) => return Response::Error(ClientError::from(&e)),
            Ok(Err(None)) => break,
            Err(_) => return error(ErrorKind::Unavailable, "the node is shutting down"),
        }
    }
    error(
        ErrorKind::NotCaughtUp,
        "this node has not caught up with the session's writes in time",
    )
}

/// The answer to a request the engine's queue had no room for, counted.
fn overloaded(m: &Metrics) -> Response {
    m.overloaded.inc();
    error(ErrorKind::Overloaded, "the node's request queue is full")
}

/// Compares secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
