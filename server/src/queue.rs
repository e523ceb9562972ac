//! The engine's input queue and the per-peer frame queues, bounded by bytes
//! (a count limit on 4 MiB frames is no limit).
//!
//! The engine queue has two classes with separate budgets: peer traffic
//! (frames, reachability) and client requests. The engine takes from them
//! in turn, so a flood of client requests can neither use up the peers'
//! budget nor delay their frames by more than one client input each.
//!
//! Within a class, inputs are queued per source (a client connection, a
//! peer) and the sources take turns: a client that pipelines a hundred
//! large adds delays another client's write by one of them, not by all.
//! Each source's own inputs keep their order.

use crate::node::Input;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Bytes charged for an input on top of its payload (the channel slot, the
/// reply channel, the request's own fields).
pub const INPUT_OVERHEAD: usize = 256;

/// What a peer frame costs in the engine queue per byte of it: frames are
/// queued decoded (decoding is done beside the engine), and a decoded
/// message takes several times its encoded size (a set of short elements
/// about 5× as `BTreeMap` entries, each element and its dots allocated on
/// their own). So the peer budget bounds the memory of what is queued, not
/// only its bytes on the wire.
pub const DECODED_COST: usize = 6;

/// Budgets of the engine queue (`engine_queue*` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Bytes of client requests queued; past it clients get `Overloaded`.
    pub client_bytes: usize,
    /// Bytes of peer frames queued; past it frames are dropped (the peer
    /// retransmits, anti-entropy repairs).
    pub peer_bytes: usize,
    /// Inputs of either class queued (a floor on the cost of tiny inputs).
    pub items: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            client_bytes: 32 << 20,
            peer_bytes: 64 << 20,
            items: 8_192,
        }
    }
}

/// One class's inputs, queued per source; the sources take turns.
#[derive(Default)]
struct Class {
    by_source: HashMap<u64, VecDeque<(Input, usize)>>,
    /// The sources with queued inputs, in turn order (each once).
    turns: VecDeque<u64>,
    items: usize,
    bytes: usize,
}

impl Class {
    fn is_empty(&self) -> bool {
        self.items == 0
    }

    fn push(&mut self, source: u64, input: Input, cost: usize) {
        let q = self.by_source.entry(source).or_default();
        if q.is_empty() {
            self.turns.push_back(source);
        }
        q.push_back((input, cost));
        self.items += 1;
        self.bytes += cost;
    }

    /// The size ([`size`]) of the next input [`Class::pop`] gives.
    fn next_size(&self) -> Option<usize> {
        let source = self.turns.front()?;
        self.by_source.get(source)?.front().map(|(i, cost)| size(i, *cost))
    }

    /// The oldest input of the source whose turn it is, and its size.
    fn pop(&mut self) -> Option<(Input, usize)> {
        let source = self.turns.pop_front()?;
        let q = self.by_source.get_mut(&source)?;
        let (input, cost) = q.pop_front()?;
        if q.is_empty() {
            self.by_source.remove(&source);
        } else {
            self.turns.push_back(source);
        }
        self.items -= 1;
        self.bytes -= cost;
        let size = size(&input, cost);
        Some((input, size))
    }
}

/// An input's size in bytes: its request's or frame's length, plus
/// [`INPUT_OVERHEAD`] (a frame is charged [`DECODED_COST`] times that in
/// the queue's budget; its size is its length).
fn size(input: &Input, cost: usize) -> usize {
    match input {
        Input::Frame { .. } => (cost - INPUT_OVERHEAD) / DECODED_COST + INPUT_OVERHEAD,
        _ => cost,
    }
}

/// The source of a peer's inputs: its name, hashed (a collision only
/// makes two peers share turns).
fn peer_source(peer: &lattice_core::proto::NodeId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    peer.0.hash(&mut h);
    h.finish()
}

struct State {
    peer: Class,
    client: Class,
    control: VecDeque<Input>,
    senders: usize,
    /// Whose turn it is when both classes have input.
    peer_next: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    limits: QueueLimits,
}

/// The sending side (cloneable).
pub struct EngineTx(Arc<Shared>);

/// The engine's side.
pub struct EngineRx(Arc<Shared>);

/// A new engine queue.
pub fn engine_queue(limits: QueueLimits) -> (EngineTx, EngineRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            peer: Class::default(),
            client: Class::default(),
            control: VecDeque::new(),
            senders: 1,
            peer_next: true,
        }),
        ready: Condvar::new(),
        limits,
    });
    (EngineTx(shared.clone()), EngineRx(shared))
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock leaves the queues consistent (every
    // update is a single push or pop), so the state stays usable.
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Clone for EngineTx {
    fn clone(&self) -> Self {
        lock(&self.0).senders += 1;
        EngineTx(self.0.clone())
    }
}

impl Drop for EngineTx {
    fn drop(&mut self) {
        lock(&self.0).senders -= 1;
        self.0.ready.notify_all();
    }
}

impl EngineTx {
    /// Queues `input` from client connection `conn`, charged `payload`
    /// bytes (its request's frame length) plus [`INPUT_OVERHEAD`]; a peer
    /// frame is charged its own length at least, times [`DECODED_COST`],
    /// and takes its turn as its peer's input whatever `conn` says. A
    /// shutdown is always taken. Refused (and dropped) if its class's
    /// budget is used up.
    pub fn try_send_from(&self, mut input: Input, payload: usize, conn: u64) -> Result<(), QueueFull> {
        let mut s = lock(&self.0);
        let limits = self.0.limits;
        // Results prepared beside the engine (`Prepared`) are charged too;
        // when they would not fit, the input goes without them (the engine
        // does the work itself), so it is queued exactly when it was before
        // they existed.
        let prepared = match &input {
            Input::Frame { frame, .. } => frame.prepared_bytes(),
            Input::Write { prepared, .. } => prepared.bytes(),
            _ => 0,
        };
        match &input {
            Input::Shutdown => s.control.push_back(input),
            Input::Frame { frame, from } => {
                let base = payload.max(frame.len()).saturating_mul(DECODED_COST) + INPUT_OVERHEAD;
                if s.peer.bytes + base > limits.peer_bytes || s.peer.items >= limits.items {
                    return Err(QueueFull);
                }
                let source = peer_source(from);
                let cost = if s.peer.bytes + base + prepared > limits.peer_bytes {
                    if let Input::Frame { frame, .. } = &mut input {
                        frame.unprepare();
                    }
                    base
                } else {
                    base + prepared
                };
                s.peer.push(source, input, cost);
            }
            _ => {
                let (class, limit, source) = match &input {
                    Input::Reachable(peer) => (&mut s.peer, limits.peer_bytes, peer_source(peer)),
                    _ => (&mut s.client, limits.client_bytes, conn),
                };
                let base = payload + INPUT_OVERHEAD;
                if class.bytes + base > limit || class.items >= limits.items {
                    return Err(QueueFull);
                }
                let cost = if class.bytes + base + prepared > limit {
                    if let Input::Write { prepared, .. } = &mut input {
                        *prepared = lattice_core::replica::Prepared::default();
                    }
                    base
                } else {
                    base + prepared
                };
                class.push(source, input, cost);
            }
        }
        drop(s);
        self.0.ready.notify_one();
        Ok(())
    }

    /// Whether a peer frame of `len` bytes would fit the peer budget now
    /// (charged as [`EngineTx::try_send_from`] charges it, before any
    /// merges are prepared for it): checked before the frame is decoded, so
    /// a full queue costs no decoding. Sending it may still be refused.
    pub fn peer_room(&self, len: usize) -> bool {
        let s = lock(&self.0);
        let cost = len.saturating_mul(DECODED_COST) + INPUT_OVERHEAD;
        s.peer.bytes + cost <= self.0.limits.peer_bytes && s.peer.items < self.0.limits.items
    }

    /// [`EngineTx::try_send_from`] for the node's own inputs (metrics,
    /// watch streams): they share one turn.
    pub fn try_send_sized(&self, input: Input, payload: usize) -> Result<(), QueueFull> {
        self.try_send_from(input, payload, u64::MAX)
    }

    /// [`EngineTx::try_send_sized`] for inputs with no payload of their own.
    pub fn try_send(&self, input: Input) -> Result<(), QueueFull> {
        self.try_send_sized(input, 0)
    }
}

/// The input's class has used up its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull;

/// Why no input was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing arrived in time.
    Timeout,
    /// Every sender is gone and the queue is empty.
    Disconnected,
}

impl State {
    /// The next input and its size, if its size is at most `room` bytes
    /// (the next in turn: a larger one is not skipped, it waits for a call
    /// with room).
    fn pop(&mut self, room: usize) -> Option<(Input, usize)> {
        if let Some(i) = self.control.pop_front() {
            return Some((i, 0));
        }
        let take_peer = match (self.peer.is_empty(), self.client.is_empty()) {
            (true, true) => return None,
            (false, true) => true,
            (true, false) => false,
            (false, false) => self.peer_next,
        };
        let class = if take_peer { &mut self.peer } else { &mut self.client };
        if class.next_size()? > room {
            return None;
        }
        self.peer_next = !take_peer;
        let class = if take_peer { &mut self.peer } else { &mut self.client };
        class.pop()
    }
}

impl EngineRx {
    /// The next input, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Input, RecvError> {
        self.recv_timeout_sized(timeout).map(|(i, _)| i)
    }

    /// [`EngineRx::recv_timeout`], with the input's size in bytes.
    pub fn recv_timeout_sized(&self, timeout: Duration) -> Result<(Input, usize), RecvError> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.0);
        loop {
            if let Some(taken) = s.pop(usize::MAX) {
                return Ok(taken);
            }
            if s.senders == 0 {
                return Err(RecvError::Disconnected);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            s = self
                .0
                .ready
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The next input if one is queued: peers and clients in turn.
    pub fn try_recv(&self) -> Option<Input> {
        lock(&self.0).pop(usize::MAX).map(|(i, _)| i)
    }

    /// The next input and its size, if one is queued and its size (its
    /// request's or frame's length plus [`INPUT_OVERHEAD`]) is at most
    /// `room` bytes. An input over `room` stays first in its turn.
    pub fn try_recv_within(&self, room: usize) -> Option<(Input, usize)> {
        lock(&self.0).pop(room)
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        let s = lock(&self.0);
        s.control.is_empty() && s.peer.is_empty() && s.client.is_empty()
    }

    /// Bytes queued: (peers, clients).
    pub fn queued_bytes(&self) -> (usize, usize) {
        let s = lock(&self.0);
        (s.peer.bytes, s.client.bytes)
    }
}

/// The engine's end of one peer's frame queue, bounded by bytes.
#[derive(Clone)]
pub struct PeerTx {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The dial task's end of one peer's frame queue.
pub struct PeerRx {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// A frame queue to one peer holding at most `limit` bytes of frames.
pub fn peer_queue(limit: usize) -> (PeerTx, PeerRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        PeerTx {
            tx,
            queued: queued.clone(),
            limit,
        },
        PeerRx { rx, queued },
    )
}

impl PeerTx {
    /// Queues a frame if it fits; false if it was dropped.
    pub fn try_send(&self, frame: Vec<u8>) -> bool {
        let cost = frame.len();
        if self.queued.load(Ordering::Relaxed) + cost > self.limit {
            return false;
        }
        self.queued.fetch_add(cost, Ordering::Relaxed);
        self.tx.send(frame).is_ok()
    }

    /// Bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

impl PeerRx {
    /// The next frame; `None` once the engine is gone.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(f.len(), Ordering::Relaxed);
        Some(f)
    }

    /// The engine is gone (shutting down).
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::proto::NodeId;

    /// A frame charged `n` bytes in the queue.
    fn frame(n: usize) -> Input {
        Input::Frame {
            from: NodeId("p".into()),
            frame: lattice_core::replica::Decoded::new(&vec![0; n / DECODED_COST], usize::MAX),
        }
    }

    fn status() -> Input {
        Input::Status {
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    #[test]
    fn budgets_are_bytes_per_class_and_the_engine_alternates() {
        let limits = QueueLimits {
            client_bytes: 4 << 20,
            peer_bytes: 8 << 20,
            items: 1_000,
        };
        let (tx, rx) = engine_queue(limits);
        // Four 1 MiB client requests fill the client budget ...
        let mut taken = 0;
        while tx.try_send_sized(status(), 1 << 20).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, 3, "3 MiB plus overheads fit in 4 MiB, a fourth does not");
        // ... and peers still get in, up to their own budget.
        assert!(tx.try_send(frame(3 << 20)).is_ok());
        assert!(tx.try_send(frame(3 << 20)).is_ok());
        assert!(tx.try_send(frame(3 << 20)).is_err());
        let order: Vec<bool> = std::iter::from_fn(|| rx.try_recv())
            .map(|i| matches!(i, Input::Frame { .. }))
            .collect();
        assert_eq!(order, vec![true, false, true, false, false]);
        assert_eq!(rx.queued_bytes(), (0, 0));
        assert!(tx.try_send(Input::Shutdown).is_ok());
        drop(tx);
        assert!(matches!(rx.recv_timeout(Duration::ZERO), Ok(Input::Shutdown)));
        assert_eq!(rx.recv_timeout(Duration::ZERO).err(), Some(RecvError::Disconnected));
    }

    /// A write input from connection `conn`, told apart by its op id.
    fn write(tx: &EngineTx, conn: u64, n: u64) {
        let input = Input::Write {
            op_id: lattice_core::proto::client::OpId(n as u128),
            retry: false,
            ops: Vec::new(),
            prepared: lattice_core::replica::Prepared::default(),
            concern: lattice_core::proto::client::WriteConcern::Local,
            timeout_ms: 0,
            conn,
            reply: tokio::sync::oneshot::channel().0,
        };
        assert!(tx.try_send_from(input, 1_000, conn).is_ok());
    }

    #[test]
    fn connections_take_turns_and_each_keeps_its_order() {
        let (tx, rx) = engine_queue(QueueLimits::default());
        // Connection 1 pipelines five requests before 2 and 3 send theirs.
        (0..5).for_each(|n| write(&tx, 1, 10 + n));
        write(&tx, 2, 20);
        write(&tx, 2, 21);
        write(&tx, 3, 30);
        let order: Vec<u128> = std::iter::from_fn(|| rx.try_recv())
            .map(|i| match i {
                Input::Write { op_id, .. } => op_id.0,
                _ => unreachable!("only writes were queued"),
            })
            .collect();
        assert_eq!(order, vec![10, 20, 30, 11, 21, 12, 13, 14]);
        assert_eq!(rx.queued_bytes(), (0, 0));
    }

    #[test]
    fn an_input_over_the_room_left_waits_its_turn() {
        let (tx, rx) = engine_queue(QueueLimits::default());
        write(&tx, 1, 10);
        write(&tx, 2, 20);
        let size = 1_000 + INPUT_OVERHEAD;
        assert!(rx.try_recv_within(size - 1).is_none(), "over the room: not taken");
        let (first, taken) = rx.try_recv_within(size).unwrap();
        assert!(matches!(first, Input::Write { op_id, .. } if op_id.0 == 10));
        assert_eq!(taken, size);
        // Connection 2's turn is not skipped for a smaller room either.
        assert!(rx.try_recv_within(0).is_none());
        assert!(matches!(rx.try_recv(), Some(Input::Write { op_id, .. }) if op_id.0 == 20));
        // A peer frame's size is its length, not its 6x charge.
        assert!(tx.try_send(frame(6 << 10)).is_ok());
        let (_, taken) = rx.try_recv_within(usize::MAX).unwrap();
        assert_eq!(taken, (1 << 10) + INPUT_OVERHEAD);
    }

    /// A frame from peer `from`, `len` bytes long.
    fn frame_from(from: &str, len: usize) -> Input {
        Input::Frame {
            from: NodeId(from.into()),
            frame: lattice_core::replica::Decoded::new(&vec![0; len], usize::MAX),
        }
    }

    /// A peer frame whose merges were prepared beside the engine into keys
    /// holding large states (each result holds its key's new record, charged
    /// twice) is still queued into an empty queue, as it was before
    /// preparation: charged for results that can never fit, it was dropped
    /// on every retransmission and the peer's deltas stalled.
    #[test]
    fn a_frame_prepared_against_large_records_is_still_queued() {
        use lattice_core::clock::{HlcTimestamp, ReplicaId};
        use lattice_core::crdt::{Op, Value, WriteStamp};
        use lattice_core::proto::{encode, Message, PolicyStamp, Section};
        use lattice_core::replica::Decoded;
        use lattice_core::store::seal_record;
        use lattice_core::Key;
        let stamp = |r| WriteStamp {
            replica: ReplicaId(r),
            time: HlcTimestamp::default(),
        };
        // A set of about 2 MiB, held here by each of 24 keys.
        let elems = (0..60_000)
            .map(|i| format!("element-{i:024}").as_str().into())
            .collect();
        let big = Value::apply(None, &Op::SetAdd(elems), stamp(1)).unwrap();
        let keys: Vec<Key> = (0..24).map(|i| Key::new(format!("k{i}")).unwrap()).collect();
        let records: std::collections::BTreeMap<Key, Vec<u8>> = keys
            .iter()
            .map(|k| (k.clone(), seal_record(k, &big).unwrap()))
            .collect();
        // The frame adds a few elements of another replica to each.
        let entries = keys
            .iter()
            .map(|k| {
                let add = (0..50).map(|i| format!("new-{i}").as_str().into()).collect();
                (
                    k.clone(),
                    Arc::new(Value::apply(Some(&big), &Op::SetAdd(add), stamp(2)).unwrap()),
                )
            })
            .collect();
        let msg = Message::Delta {
            sender: ReplicaId(2),
            base_from: None,
            time: HlcTimestamp::default(),
            policy: PolicyStamp::default(),
            sections: vec![Section {
                class: 0,
                base: 0,
                from: 0,
                to: 1,
                entries,
                written: None,
            }],
            ack: None,
        };
        let bytes = encode(&msg).unwrap();
        let mut frame = Decoded::new(&bytes, usize::MAX);
        frame.prepare(ReplicaId(3), usize::MAX, |k| Ok(records.get(k).cloned()));
        let limits = QueueLimits::default();
        assert!(frame.prepared_bytes() > limits.peer_bytes, "{}", frame.prepared_bytes());
        let (tx, rx) = engine_queue(limits);
        assert!(tx
            .try_send(Input::Frame {
                from: NodeId("a".into()),
                frame,
            })
            .is_ok());
        match rx.try_recv() {
            Some(Input::Frame { frame, .. }) => assert_eq!(frame.prepared_bytes(), 0, "sent without its results"),
            _ => panic!("the frame was not queued"),
        }
    }

    #[test]
    fn peer_room_is_what_sending_the_frame_would_be_charged() {
        let limits = QueueLimits {
            peer_bytes: 1 << 20,
            ..QueueLimits::default()
        };
        let (tx, _rx) = engine_queue(limits);
        let fits = ((1 << 20) - INPUT_OVERHEAD) / DECODED_COST;
        assert!(tx.peer_room(fits));
        assert!(!tx.peer_room(fits + 1));
        assert!(tx.try_send(frame_from("a", fits + 1)).is_err());
        assert!(tx.try_send(frame_from("a", 1_000)).is_ok());
        assert!(!tx.peer_room(fits), "a queued frame takes room");
        assert!(tx.peer_room(fits - 1_000 - INPUT_OVERHEAD / DECODED_COST - 1));
    }

    #[test]
    fn a_frame_fits_the_room_by_its_length_not_its_charge() {
        let (tx, rx) = engine_queue(QueueLimits::default());
        // 10 KiB long, charged 60 KiB: a step with 10 KiB of room left
        // takes it (else every frame past 43 KiB would get a step of its own).
        assert!(tx.try_send(frame_from("a", 10 << 10)).is_ok());
        let size = (10 << 10) + INPUT_OVERHEAD;
        assert!(rx.try_recv_within(size - 1).is_none());
        assert_eq!(rx.try_recv_within(size).map(|(_, s)| s), Some(size));
    }

    #[test]
    fn peers_take_turns_and_reachable_keeps_its_place_among_its_peers_frames() {
        let (tx, rx) = engine_queue(QueueLimits::default());
        assert!(tx.try_send(frame_from("a", 1)).is_ok());
        assert!(tx.try_send(frame_from("a", 2)).is_ok());
        assert!(tx.try_send(Input::Reachable(NodeId("a".into()))).is_ok());
        assert!(tx.try_send(frame_from("b", 3)).is_ok());
        let order: Vec<String> = std::iter::from_fn(|| rx.try_recv())
            .map(|i| match i {
                Input::Frame { from, frame } => format!("{}{}", from.0, frame.len()),
                Input::Reachable(p) => format!("{}!", p.0),
                _ => unreachable!("only peer inputs were queued"),
            })
            .collect();
        assert_eq!(order, vec!["a1", "b3", "a2", "a!"]);
        assert_eq!(rx.queued_bytes(), (0, 0));
    }

    #[test]
    fn a_shutdown_is_taken_before_queued_input_whatever_the_room() {
        let (tx, rx) = engine_queue(QueueLimits::default());
        write(&tx, 1, 10);
        assert!(tx.try_send(frame_from("a", 1)).is_ok());
        assert!(tx.try_send(Input::Shutdown).is_ok());
        assert!(matches!(rx.try_recv_within(0), Some((Input::Shutdown, 0))));
        assert!(!rx.is_empty());
    }

    #[test]
    fn a_class_whose_next_input_does_not_fit_keeps_its_turn() {
        let (tx, rx) = engine_queue(QueueLimits::default());
        // The peers' turn first; their frame is over the room left.
        assert!(tx.try_send(frame_from("a", 100 << 10)).is_ok());
        write(&tx, 1, 10);
        write(&tx, 1, 11);
        assert!(rx.try_recv_within(10 << 10).is_none());
        // The next step starts with the frame, not with the clients'
        // input: else a class of small inputs would starve a large one.
        assert!(matches!(rx.try_recv(), Some(Input::Frame { .. })));
        assert!(matches!(rx.try_recv(), Some(Input::Write { op_id, .. }) if op_id.0 == 10));
    }

    #[test]
    fn a_peer_queue_is_bounded_by_bytes() {
        let (tx, mut rx) = peer_queue(5 << 20);
        assert!(tx.try_send(vec![0; 3 << 20]));
        assert!(!tx.try_send(vec![0; 3 << 20]));
        assert!(tx.try_send(vec![0; 2 << 20]));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(rx.recv()).map(|f| f.len()), Some(3 << 20));
        assert!(tx.try_send(vec![0; 3 << 20]));
        assert_eq!(tx.queued_bytes(), 5 << 20);
    }
}
