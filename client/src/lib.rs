//! `lattice-client`: the Lattice client SDK (issue #5 builds the typed
//! handles, sessions and the CLI on top of this connection layer).
//!
//! A [`Client`] holds QUIC connections to a list of nodes and sends one
//! request per bidirectional stream, with the protocol types of
//! `lattice-core`. It fails over to the next node when one cannot be
//! reached, and every call has a timeout.

use lattice_core::proto::client::{
    decode_client, encode_client, ClientRequest, RequestBody, Response, CLIENT_ALPN, MAX_CLIENT_FRAME,
};
use quinn::crypto::rustls::QuicClientConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub use lattice_core::crdt::{Op, ValueView};
pub use lattice_core::proto::client::{CausalToken, Change, ErrorKind, NodeStatus, OpId, WatchToken};

/// What can go wrong talking to a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS or QUIC setup is invalid (bad CA file, ...).
    #[error("configuration: {0}")]
    Config(String),
    /// No node could be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The call took longer than its timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The node answered with an error.
    #[error("{kind:?}: {message}")]
    Server {
        /// What kind of failure.
        kind: ErrorKind,
        /// The node's explanation.
        message: String,
    },
    /// The node's answer could not be decoded.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A connection to a Lattice cluster.
pub struct Client {
    endpoint: quinn::Endpoint,
    nodes: Vec<SocketAddr>,
    server_name: String,
    token: String,
    timeout: Duration,
    conns: Mutex<Vec<Option<quinn::Connection>>>,
}

fn client_config(ca_pem: &str) -> Result<quinn::ClientConfig, Error> {
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
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

impl Client {
    /// A client for `nodes` (tried in order), authenticating with `token`,
    /// trusting the cluster CA in `ca_pem`. Nodes are dialled lazily.
    pub fn new(nodes: Vec<SocketAddr>, token: impl Into<String>, ca_pem: &str) -> Result<Client, Error> {
        if nodes.is_empty() {
            return Err(Error::Config("no node address".into()));
        }
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| Error::Config(format!("opening a UDP socket: {e}")))?;
        endpoint.set_default_client_config(client_config(ca_pem)?);
        let n = nodes.len();
        Ok(Client {
            endpoint,
            nodes,
            server_name: "localhost".into(),
            token: token.into(),
            timeout: Duration::from_secs(10),
            conns: Mutex::new(vec![None; n]),
        })
    }

    /// The TLS name node certificates are checked against (default
    /// `localhost`, which dev certificates carry).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// The timeout of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn connection(&self, i: usize) -> Result<quinn::Connection, Error> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = &conns[i] {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let c = self
            .endpoint
            .connect(self.nodes[i], &self.server_name)
            .map_err(|e| Error::Unavailable(format!("{}: {e}", self.nodes[i])))?
            .await
            .map_err(|e| Error::Unavailable(format!("{}: {e}", self.nodes[i])))?;
        conns[i] = Some(c.clone());
        Ok(c)
    }

    /// Sends one request to node `i` and returns its answer.
    pub async fn request_to(&self, i: usize, body: RequestBody) -> Result<Response, Error> {
        let req = ClientRequest {
            token: self.token.clone(),
            body,
        };
        let frame = encode_client(&req).map_err(|e| Error::Protocol(e.to_string()))?;
        let call = async {
            let conn = self.connection(i).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Error::Unavailable(e.to_string()))?;
            send.write_all(&(frame.len() as u32).to_be_bytes())
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            send.write_all(&frame)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            let _ = send.finish();
            let mut len = [0u8; 4];
            recv.read_exact(&mut len)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_CLIENT_FRAME {
                return Err(Error::Protocol(format!("answer of {len} bytes is over the limit")));
            }
            let mut buf = vec![0u8; len];
            recv.read_exact(&mut buf)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            decode_client::<Response>(&buf).map_err(|e| Error::Protocol(e.to_string()))
        };
        let response = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| Error::Timeout(self.timeout))??;
        match response {
            Response::Error(e) => Err(Error::Server {
                kind: e.kind,
                message: e.message,
            }),
            r => Ok(r),
        }
    }

    /// Sends a request to the first node that can be reached.
    pub async fn request(&self, body: RequestBody) -> Result<Response, Error> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            match self.request_to(i, body.clone()).await {
                Err(e @ (Error::Unavailable(_) | Error::Timeout(_))) => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no node".into())))
    }

    /// Opens a change feed on node `i` for keys starting with `prefix`,
    /// resuming after `from` when given.
    pub async fn watch(&self, i: usize, prefix: &str, from: Option<WatchToken>) -> Result<Watch, Error> {
        let req = ClientRequest {
            token: self.token.clone(),
            body: RequestBody::Watch {
                prefix: prefix.to_string(),
                from,
            },
        };
        let frame = encode_client(&req).map_err(|e| Error::Protocol(e.to_string()))?;
        let conn = self.connection(i).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| Error::Unavailable(e.to_string()))?;
        send.write_all(&(frame.len() as u32).to_be_bytes())
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let _ = send.finish();
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
        let mut len = [0u8; 4];
        match self.recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(Error::Unavailable(e.to_string())),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_CLIENT_FRAME {
            return Err(Error::Protocol(format!("frame of {len} bytes is over the limit")));
        }
        let mut buf = vec![0u8; len];
        self.recv
            .read_exact(&mut buf)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        match decode_client::<Response>(&buf).map_err(|e| Error::Protocol(e.to_string()))? {
            Response::Change(c) => {
                self.last = Some(c.token);
                Ok(Some(c))
            }
            Response::Error(e) => Err(Error::Server {
                kind: e.kind,
                message: e.message,
            }),
            r => Err(Error::Protocol(format!("unexpected frame in a watch: {r:?}"))),
        }
    }

    /// The token of the last change received: resume from it.
    pub fn last_token(&self) -> Option<WatchToken> {
        self.last
    }
}
