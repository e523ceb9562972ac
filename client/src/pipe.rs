//! Pipelining: a connection's small requests share one stream
//! ([`RequestBody::Pipeline`]). Callers hand their encoded request to a
//! writer task, which sends every request waiting at that moment in one
//! frame under a tag; a reader task hands each answer to its caller by tag.
//! So many concurrent calls cost the node one stream and a few frames, not a
//! stream each, and need not go in lockstep.
//!
//! A stream that fails fails every call in flight on it with
//! [`Error::Unavailable`] (a write's caller retries it with the same op id,
//! as after a lost stream); the next call opens a new one.

use crate::Error;
use lattice_core::proto::client::{
    decode_answer, decode_pipeline_answers, encode_client, ClientRequest, RequestBody, Response, Tagged,
    MAX_PIPELINE_ANSWER_FRAME, PIPELINE_MAX_REQUESTS,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Requests encoded to at most this many bytes go through the pipeline;
/// larger ones get a stream of their own (they would hold up the small ones,
/// and the node reads large frames under its read budget).
pub const PIPELINE_INLINE_BYTES: usize = 16 << 10;

/// A pipeline frame takes waiting requests until it holds this many bytes
/// (or [`PIPELINE_MAX_REQUESTS`] of them).
const FRAME_BYTES: usize = 64 << 10;

/// Calls waiting for the writer (past it, callers wait to hand theirs over).
const QUEUE: usize = 1024;

type Reply = oneshot::Sender<Result<Response, Error>>;

struct Call {
    frame: Vec<u8>,
    reply: Reply,
}

/// The calls sent and not yet answered, by tag; once the stream failed,
/// why (every later call fails with it).
#[derive(Default)]
struct Pending {
    waiting: HashMap<u32, Reply>,
    failed: Option<String>,
}

impl Pending {
    fn fail(&mut self, why: String) {
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(Error::Unavailable(why.clone())));
        }
        self.failed.get_or_insert(why);
    }
}

/// One pipeline stream on a connection.
pub(crate) struct Pipe {
    conn: quinn::Connection,
    calls: mpsc::Sender<Call>,
    pending: Arc<Mutex<Pending>>,
    /// Dropped with the pipe (no caller is left: the client was dropped
    /// or replaced the pipe): the reader then stops the stream, so the
    /// node drops what still runs for it (a waiting read, a write waiting
    /// for its concern) instead of answering nobody.
    _gone: oneshot::Sender<()>,
}

impl Pipe {
    /// Opens a pipeline stream on `conn`, authenticating with `token`.
    pub(crate) async fn open(conn: &quinn::Connection, token: String) -> Result<Pipe, Error> {
        let (send, recv) = conn.open_bi().await.map_err(|e| Error::Unavailable(e.to_string()))?;
        let (calls, queue) = mpsc::channel(QUEUE);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (_gone, gone) = oneshot::channel();
        tokio::spawn(write_loop(send, queue, token, pending.clone()));
        tokio::spawn(read_loop(recv, pending.clone(), gone));
        Ok(Pipe {
            conn: conn.clone(),
            calls,
            pending,
            _gone,
        })
    }

    /// Whether calls may still go through this stream.
    pub(crate) fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
            && !self.calls.is_closed()
            && self.pending.lock().is_ok_and(|p| p.failed.is_none())
    }

    /// Sends one encoded request body and waits for its answer.
    pub(crate) async fn call(&self, frame: Vec<u8>) -> Result<Response, Error> {
        let (reply, answer) = oneshot::channel();
        let ended = || Error::Unavailable("the pipeline stream ended".into());
        self.calls.send(Call { frame, reply }).await.map_err(|_| ended())?;
        answer.await.map_err(|_| ended())?
    }
}

/// Sends the calls waiting at each moment as one frame, until the pipe is
/// dropped (then resets the stream: nobody waits for its answers) or the
/// stream fails.
async fn write_loop(
    mut send: quinn::SendStream,
    mut queue: mpsc::Receiver<Call>,
    token: String,
    pending: Arc<Mutex<Pending>>,
) {
    let mut next_tag: u32 = 0;
    while let Some(first) = queue.recv().await {
        let mut bytes = first.frame.len();
        let mut batch = vec![first];
        while batch.len() < PIPELINE_MAX_REQUESTS && bytes < FRAME_BYTES {
            match queue.try_recv() {
                Ok(call) => {
                    bytes += call.frame.len();
                    batch.push(call);
                }
                Err(_) => break,
            }
        }
        let mut requests = Vec::with_capacity(batch.len());
        {
            let Ok(mut p) = pending.lock() else { return };
            if let Some(why) = &p.failed {
                for call in batch {
                    let _ = call.reply.send(Err(Error::Unavailable(why.clone())));
                }
                continue;
            }
            for call in batch {
                // A tag still waiting (2^32 calls ago) is skipped.
                while p.waiting.contains_key(&next_tag) {
                    next_tag = next_tag.wrapping_add(1);
                }
                p.waiting.insert(next_tag, call.reply);
                requests.push(Tagged {
                    tag: next_tag,
                    frame: call.frame,
                });
                next_tag = next_tag.wrapping_add(1);
            }
        }
        let request = ClientRequest {
            token: token.clone(),
            body: RequestBody::Pipeline(requests),
        };
        let written = match encode_client(&request) {
            Ok(frame) => {
                let mut buf = Vec::with_capacity(4 + frame.len());
                buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                buf.extend_from_slice(&frame);
                send.write_all(&buf).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(format!("a pipeline frame did not encode: {e}")),
        };
        if let Err(why) = written {
            if let Ok(mut p) = pending.lock() {
                p.fail(why);
            }
            // Later calls fail at once (`failed`) until the pipe is replaced.
        }
    }
    let _ = send.reset(0u32.into());
}

/// Hands each answer to its caller; when the stream ends or fails, fails
/// every call still waiting. When the pipe is dropped (`gone`), stops the
/// stream.
async fn read_loop(mut recv: quinn::RecvStream, pending: Arc<Mutex<Pending>>, gone: oneshot::Receiver<()>) {
    tokio::pin!(gone);
    let why = loop {
        let mut len = [0u8; 4];
        tokio::select! {
            read = recv.read_exact(&mut len) => {
                if let Err(e) = read {
                    break format!("the pipeline stream ended: {e}");
                }
            }
            _ = &mut gone => {
                let _ = recv.stop(0u32.into());
                return;
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_PIPELINE_ANSWER_FRAME {
            let _ = recv.stop(0u32.into());
            break format!("a pipeline answer frame of {len} bytes is over the limit of {MAX_PIPELINE_ANSWER_FRAME}");
        }
        let mut frame = vec![0u8; len];
        if let Err(e) = recv.read_exact(&mut frame).await {
            break format!("the pipeline stream ended: {e}");
        }
        match decode_pipeline_answers(&frame) {
            Ok(Response::Pipeline(answers)) => {
                let Ok(mut p) = pending.lock() else { return };
                for answer in answers {
                    if let Some(reply) = p.waiting.remove(&answer.tag) {
                        let _ = reply.send(decode_answer(&answer.frame).map_err(|e| Error::Protocol(e.to_string())));
                    }
                }
            }
            // The node refused the stream: the calls it had not run fail
            // with its reason (a write among them was never applied).
            Ok(Response::Error(e)) => {
                if let Ok(mut p) = pending.lock() {
                    for (_, reply) in p.waiting.drain() {
                        let _ = reply.send(Err(Error::from_server(e.clone())));
                    }
                    p.failed.get_or_insert(e.message);
                }
                return;
            }
            Ok(other) => break format!("unexpected answer on a pipeline stream: {other:?}"),
            Err(e) => break format!("undecodable pipeline answer: {e}"),
        }
    };
    if let Ok(mut p) = pending.lock() {
        p.fail(why);
    }
}
