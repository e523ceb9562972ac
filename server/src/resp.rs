//! The Redis-protocol (RESP2 and RESP3) front door: an optional TCP
//! listener (`resp = "ADDR"`, TLS with `resp_tls = true`) whose commands are
//! translated into client requests and served by the node's one request
//! path, `net::serve`, exactly as QUIC clients' are: same tokens,
//! same engine, same limits and errors. No engine logic lives here.
//!
//! A connection reads commands into a buffer bounded in bytes (the command
//! being read, at most [`MAX_COMMAND`], plus one read of at most 16 KiB; it
//! shrinks back once a large command is answered), answers them one at
//! a time in order (so a pipeline's writes apply in the order sent, and its
//! reads see its writes), and writes the replies of the commands it already
//! holds together. A command larger than [`SMALL_COMMAND`] takes its bytes
//! from the node's read budget (`[limits] read_budget_bytes`, shared with
//! QUIC clients) before they are read.

mod commands;
mod info;
mod scan;
mod wire;

use crate::edge::BudgetShare;
use crate::net::{authorized, ClientSession, Inbound};
use commands::{Ctx, Seen};
use info::{command_info, config_get, REDIS_VERSION};
use lattice_core::proto::client::MAX_CLIENT_FRAME;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wire::{Limits, Parsed, Reply};

/// Largest bulk string (a key, field or value): a native request frame's
/// limit, so that what one protocol can write the other can too.
pub const MAX_BULK: usize = MAX_CLIENT_FRAME;
/// Largest command on the wire: one bulk string at the limit and room for
/// a few small ones. An `MSET` of many values is bounded by this in all.
pub const MAX_COMMAND: usize = MAX_CLIENT_FRAME + (64 << 10);
/// Most arguments of one command.
pub const MAX_ARGS: usize = 4_096;
/// Longest inline command (a line typed into telnet or nc).
pub const MAX_INLINE: usize = 64 << 10;
/// Before `AUTH`: commands are small (Redis's own limits for clients that
/// have not authenticated), so an unknown client holds little.
const UNAUTHENTICATED: Limits = Limits {
    max_args: 16,
    max_bulk: 16 << 10,
    max_command: 64 << 10,
    max_inline: 16 << 10,
};
const AUTHENTICATED: Limits = Limits {
    max_args: MAX_ARGS,
    max_bulk: MAX_BULK,
    max_command: MAX_COMMAND,
    max_inline: MAX_INLINE,
};
/// Commands up to this long are read without a share of the read budget
/// (a connection's own buffer of this size is bounded by the connection
/// limit).
pub const SMALL_COMMAND: usize = 64 << 10;
/// Bytes asked of the socket at once.
const READ_CHUNK: usize = 16 << 10;
/// Replies are written once this many bytes are ready (or when no further
/// command is buffered).
const FLUSH_BYTES: usize = 64 << 10;

/// The RESP listener's shared state.
pub struct Resp {
    inbound: Arc<Inbound>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    next_id: AtomicU64,
    cursors: std::sync::Mutex<scan::Cursors>,
}

impl Resp {
    /// The listener's state: `tls` serves the node's certificate;
    /// at most `max_connections` connections are open at once.
    pub fn new(inbound: Arc<Inbound>, tls: Option<rustls::ServerConfig>, max_connections: usize) -> Arc<Resp> {
        Arc::new(Resp {
            inbound,
            tls: tls.map(|t| tokio_rustls::TlsAcceptor::from(Arc::new(t))),
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            max_connections,
            // Connection ids share the engine's per-connection accounting
            // with QUIC's (`stable_id`s, addresses): the top bit keeps them
            // apart.
            next_id: AtomicU64::new(1 << 63),
            cursors: Default::default(),
        })
    }

    fn connected(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }
}

/// Accepts RESP connections on `listener` until the task is dropped.
pub async fn accept_loop(listener: tokio::net::TcpListener, resp: Arc<Resp>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause, not spin.
                tracing::warn!(error = %e, "RESP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let resp = resp.clone();
        tokio::spawn(async move {
            let Ok(slot) = resp.slots.clone().try_acquire_owned() else {
                resp.inbound.metrics.resp_connections_refused.inc();
                let mut stream = stream;
                let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
                return;
            };
            let metrics = resp.inbound.metrics.clone();
            metrics.resp_connections.inc();
            match &resp.tls {
                Some(acceptor) => {
                    let within = crate::edge::HANDSHAKE_TIMEOUT;
                    match tokio::time::timeout(within, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(tls, addr, &resp).await,
                        Ok(Err(e)) => tracing::debug!(remote = %addr, error = %e, "RESP TLS handshake failed"),
                        Err(_) => tracing::debug!(remote = %addr, "no RESP TLS handshake within {within:?}"),
                    }
                }
                None => connection(stream, addr, &resp).await,
            }
            metrics.resp_connections.dec();
            drop(slot);
        });
    }
}

/// What a command's handling asks of the connection.
enum Then {
    Continue,
    Close,
}

/// Serves one connection until it closes, breaks the protocol or goes
/// quiet in the middle of a command for longer than `frame_ms`.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(stream: S, addr: SocketAddr, resp: &Resp) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let inbound = &resp.inbound;
    let mut conn = Conn {
        resp,
        session: ClientSession::detached(),
        token: None,
        resp3: false,
        name: None,
        id: resp.next_id.fetch_add(1, Ordering::Relaxed),
        seen: Seen::default(),
    };
    let frame = Duration::from_millis(inbound.limits.frame_ms);
    let (mut buf, mut out) = (Vec::with_capacity(READ_CHUNK), Vec::new());
    // Read-budget shares of the command being read, and their bytes.
    let (mut shares, mut held): (Vec<BudgetShare<'_>>, usize) = (Vec::new(), 0);
    let mut deadline = None;
    loop {
        let mut used = 0;
        let need = loop {
            match wire::parse(&buf[used..], conn.limits()) {
                Ok(Parsed::Command(args, n)) => {
                    used += n;
                    let (reply, then) = conn.command(args, n).await;
                    inbound.metrics.resp_commands.inc();
                    reply.encode(conn.resp3, &mut out);
                    if matches!(then, Then::Close) {
                        let _ = flush(&mut wr, &mut out, frame).await;
                        return;
                    }
                    if out.len() >= FLUSH_BYTES && !flush(&mut wr, &mut out, frame).await {
                        return;
                    }
                }
                Ok(Parsed::Empty(n)) => used += n,
                Ok(Parsed::Incomplete { need }) => break need,
                Err(e) => {
                    inbound.metrics.resp_protocol_errors.inc();
                    tracing::debug!(remote = %addr, error = %e, "RESP protocol error: closing");
                    Reply::error("ERR", e.to_string()).encode(conn.resp3, &mut out);
                    let _ = flush(&mut wr, &mut out, frame).await;
                    return;
                }
            }
        };
        buf.drain(..used);
        if buf.capacity() > 4 * READ_CHUNK && buf.len() <= READ_CHUNK {
            // A large command does not keep its buffer for the connection's life.
            buf.shrink_to(READ_CHUNK);
        }
        if used > 0 || buf.is_empty() {
            // The commands the shares were for are answered.
            (shares, held) = (Vec::new(), 0);
        }
        if buf.is_empty() {
            deadline = None;
        } else if used > 0 || deadline.is_none() {
            // A command started: it must be complete within `frame_ms`.
            deadline = Some(tokio::time::Instant::now() + frame);
        }
        if !flush(&mut wr, &mut out, frame).await {
            return;
        }
        if need > SMALL_COMMAND && need > held {
            let until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + frame);
            match inbound.budget.take(need - held, until).await {
                Some(share) => {
                    shares.push(share);
                    held = need;
                }
                None => {
                    inbound.metrics.overloaded.inc();
                    let busy = Reply::error(
                        "BUSY",
                        "the node is reading too many large requests at once; retry later",
                    );
                    busy.encode(conn.resp3, &mut out);
                    let _ = flush(&mut wr, &mut out, frame).await;
                    return;
                }
            }
        }
        match read_until(&mut rd, &mut buf, need, &mut deadline, frame).await {
            Ok(()) => {}
            Err(Stalled::Gone) => return,
            Err(Stalled::TimedOut) => {
                tracing::debug!(remote = %addr, "a RESP command did not arrive within frame_ms: closing");
                inbound.metrics.frames_timed_out.inc();
                Reply::error("ERR", "the command did not arrive in time").encode(conn.resp3, &mut out);
                let _ = flush(&mut wr, &mut out, frame).await;
                return;
            }
        }
    }
}

/// Why reading stopped short of a command.
enum Stalled {
    /// The client closed the connection, or it failed.
    Gone,
    /// A command started and did not complete by its deadline.
    TimedOut,
}

/// Reads until `buf` holds the `need` bytes the command being read is known
/// to take (at least one more byte). Each read asks for at most
/// [`READ_CHUNK`], so at most the command plus one chunk is ever buffered;
/// once the command has started, it must complete by `deadline` (set here,
/// `frame` from its first byte, if it was not).
async fn read_until<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    need: usize,
    deadline: &mut Option<tokio::time::Instant>,
    frame: Duration,
) -> Result<(), Stalled> {
    loop {
        buf.reserve_exact(READ_CHUNK.min(need.saturating_sub(buf.len()).max(READ_CHUNK / 4)));
        let read = match *deadline {
            Some(d) => tokio::time::timeout_at(d, rd.read_buf(buf))
                .await
                .map_err(|_| Stalled::TimedOut)?,
            None => rd.read_buf(buf).await,
        };
        match read {
            Ok(0) | Err(_) => return Err(Stalled::Gone),
            Ok(_) => {}
        }
        if buf.len() >= need {
            return Ok(());
        }
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + frame);
    }
}

/// Writes the replies ready so far within `within`; false if the client
/// is gone or did not read them in time.
async fn flush<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut Vec<u8>, within: Duration) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = matches!(tokio::time::timeout(within, wr.write_all(out)).await, Ok(Ok(())));
    out.clear();
    if out.capacity() > FLUSH_BYTES * 4 {
        // One large reply does not keep its buffer for the connection's life.
        *out = Vec::new();
    }
    ok
}

/// One connection's state.
struct Conn<'a> {
    resp: &'a Resp,
    session: ClientSession,
    /// The token shown with `AUTH` (or `HELLO .. AUTH`).
    token: Option<String>,
    resp3: bool,
    name: Option<String>,
    id: u64,
    seen: Seen,
}

fn upper(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).to_ascii_uppercase()
}

/// At most `max` characters of `raw`, for an error message.
fn shown(raw: &[u8], max: usize) -> String {
    String::from_utf8_lossy(raw).chars().take(max).collect()
}

fn arity(name: &str) -> Reply {
    Reply::error(
        "ERR",
        format!("wrong number of arguments for '{}' command", name.to_ascii_lowercase()),
    )
}

impl Conn<'_> {
    fn limits(&self) -> &'static Limits {
        if self.token.is_some() {
            &AUTHENTICATED
        } else {
            &UNAUTHENTICATED
        }
    }

    /// Answers one command of `bytes` bytes on the wire.
    async fn command(&mut self, mut args: Vec<Vec<u8>>, bytes: usize) -> (Reply, Then) {
        let name = upper(&args[0]);
        let rest = args.split_off(1);
        let cont = |r: Reply| (r, Then::Continue);
        match name.as_str() {
            "AUTH" => return cont(self.auth(&rest)),
            "HELLO" => return cont(self.hello(&rest)),
            "QUIT" => return (Reply::ok(), Then::Close),
            _ if self.token.is_none() => return cont(Reply::error("NOAUTH", "Authentication required.")),
            _ => {}
        }
        let reply = match name.as_str() {
            "PING" => match rest.as_slice() {
                [] => Reply::Simple("PONG".into()),
                [m] => Reply::Bulk(m.clone()),
                _ => arity(&name),
            },
            "ECHO" => match rest.as_slice() {
                [m] => Reply::Bulk(m.clone()),
                _ => arity(&name),
            },
            "SELECT" => match rest.as_slice() {
                [db] if db.as_slice() == b"0" => Reply::ok(),
                [_] => Reply::error("ERR", "DB index is out of range (Lattice has one keyspace: SELECT 0)"),
                _ => arity(&name),
            },
            "CLIENT" => self.client(&rest),
            "COMMAND" => command_info(&rest),
            "CONFIG" => config_get(&rest),
            "INFO" => self.info(&rest, bytes).await,
            _ => {
                let token = self.token.clone().unwrap_or_default();
                let mut ctx = Ctx {
                    inbound: &self.resp.inbound,
                    session: &self.session,
                    token: &token,
                    conn: self.id,
                    bytes,
                    seen: &mut self.seen,
                    cursors: &self.resp.cursors,
                };
                match ctx.run(&name, &rest).await {
                    Some(r) => r,
                    None => unknown(&args[0], &rest),
                }
            }
        };
        cont(reply)
    }

    /// Checks a token as the native API does ([`authorized`]); the user
    /// name, if given, is not checked (Lattice has tokens, not users).
    fn login(&mut self, token: &[u8]) -> bool {
        if authorized(&self.resp.inbound, token) {
            self.token = Some(String::from_utf8_lossy(token).into_owned());
            true
        } else {
            false
        }
    }

    fn auth(&mut self, args: &[Vec<u8>]) -> Reply {
        let token = match args {
            [t] | [_, t] => t,
            _ => return arity("AUTH"),
        };
        if self.login(token) {
            Reply::ok()
        } else {
            Reply::error("WRONGPASS", "invalid username-password pair or user is disabled.")
        }
    }

    /// `HELLO [protover [AUTH user token] [SETNAME name]]`.
    fn hello(&mut self, args: &[Vec<u8>]) -> Reply {
        let mut version = None;
        if let Some(v) = args.first() {
            match v.as_slice() {
                b"2" => version = Some(false),
                b"3" => version = Some(true),
                _ => return Reply::error("NOPROTO", "unsupported protocol version"),
            }
        }
        let mut i = 1;
        let (mut token, mut name) = (None, None);
        while i < args.len() {
            match (upper(&args[i]).as_str(), args.len() - i) {
                ("AUTH", n) if n >= 3 => {
                    token = Some(&args[i + 2]);
                    i += 3;
                }
                ("SETNAME", n) if n >= 2 => {
                    name = Some(String::from_utf8_lossy(&args[i + 1]).into_owned());
                    i += 2;
                }
                _ => return Reply::error("ERR", format!("syntax error in HELLO option '{}'", shown(&args[i], 64))),
            }
        }
        if let Some(t) = token {
            if !self.login(t) {
                return Reply::error("WRONGPASS", "invalid username-password pair or user is disabled.");
            }
        }
        if self.token.is_none() {
            return Reply::error(
                "NOAUTH",
                "HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH \
                 <user> <pass> option can be used to authenticate the client and select the RESP protocol \
                 version at the same time",
            );
        }
        if let Some(v) = version {
            self.resp3 = v;
        }
        if name.is_some() {
            self.name = name;
        }
        Reply::Map(vec![
            (Reply::text("server"), Reply::text("redis")),
            (Reply::text("version"), Reply::text(REDIS_VERSION)),
            (Reply::text("proto"), Reply::Int(if self.resp3 { 3 } else { 2 })),
            (Reply::text("id"), Reply::Int((self.id & !(1 << 63)) as i64)),
            (Reply::text("mode"), Reply::text("standalone")),
            (Reply::text("role"), Reply::text("master")),
            (Reply::text("modules"), Reply::Array(Vec::new())),
        ])
    }
}

/// What Redis answers to a command it does not know.
fn unknown(name: &[u8], args: &[Vec<u8>]) -> Reply {
    let shown_args: Vec<String> = args.iter().take(3).map(|a| format!("'{}'", shown(a, 32))).collect();
    Reply::error(
        "ERR",
        format!(
            "unknown command '{}', with args beginning with: {}",
            shown(name, 64),
            shown_args.join(" ")
        ),
    )
}
