//! The change feed: a ring of recent change notices (key, origin, watch
//! token; never values), kept in memory and bounded by bytes, and the
//! watchers subscribed to it, each with a queue bounded by bytes.
//!
//! The ring outlives the process through the change log: a change is
//! published with its node-wide log number once the flush that logged it is
//! done, so the log holds every change a watcher was told of, and at start
//! the ring is rebuilt from the log's newest changes under the same epoch,
//! after a clean shutdown or a crash alike. Only an `async` node that
//! crashed takes a new epoch (its log may have lost flushes watchers saw),
//! and old tokens then fail with `WatchLost` rather than skip changes.
//!
//! Values are not kept: a watcher's stream task reads a changed key's value
//! beside the engine, from the store as of the last flush, when it is about
//! to send the change (see [`crate::node::watch_frames`]); a change is
//! published only once the flush that stored it is done. So a watcher sees
//! the *latest* value of a changed key at send time, not the value right
//! after that change;
//! two changes of one key in quick succession may both show the second
//! value. What it never misses is that the key changed.

use lattice_core::proto::client::{ClientError, ErrorKind, WatchToken};
use lattice_core::proto::RegionId;
use lattice_core::Key;
use lattice_core::MAX_KEY_LEN;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// One change as the ring and the watchers' queues carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The key that changed.
    pub key: Key,
    /// The region the change came from (this node's for local writes).
    pub origin: RegionId,
    /// Resume after this change with this token.
    pub token: WatchToken,
}

impl Notice {
    /// Bytes this notice is charged for in the ring and in a queue: its
    /// strings plus the fixed part and the containers' overhead.
    pub fn cost(&self) -> usize {
        self.key.as_str().len() + self.origin.0.len() + NOTICE_OVERHEAD
    }
}

/// Fixed bytes charged per notice (token, string headers, deque slot).
const NOTICE_OVERHEAD: usize = 96;

/// What a watcher's stream task receives: a notice, or the reason its feed
/// ends (it fell behind, or it could not resume).
pub type WatchItem = Result<Notice, ClientError>;

/// The feed's limits (`watch_*` in the node's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedLimits {
    /// Bytes of notices retained for watchers to resume from.
    pub retained_bytes: usize,
    /// Bytes of notices queued for one watcher; past it the watcher is
    /// told it lagged and its feed ends (it resumes from its last token).
    pub queue_bytes: usize,
    /// Watchers on the node.
    pub max_watchers: usize,
    /// Watchers on one client connection.
    pub max_watchers_per_conn: usize,
    /// Longest watch prefix, in bytes.
    pub max_prefix_bytes: usize,
}

impl Default for FeedLimits {
    fn default() -> Self {
        FeedLimits {
            retained_bytes: 8 << 20,
            queue_bytes: 1 << 20,
            max_watchers: 4_096,
            max_watchers_per_conn: 64,
            max_prefix_bytes: MAX_KEY_LEN,
        }
    }
}

/// The receiving end of a watcher's queue, held by its stream task.
pub struct WatchRx {
    rx: mpsc::UnboundedReceiver<WatchItem>,
    queued: Arc<AtomicUsize>,
}

impl WatchRx {
    /// The next item; `None` once the engine dropped the watcher.
    pub async fn recv(&mut self) -> Option<WatchItem> {
        let item = self.rx.recv().await?;
        if let Ok(n) = &item {
            self.queued.fetch_sub(n.cost(), Ordering::Relaxed);
        }
        Some(item)
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<WatchItem> {
        let item = self.rx.try_recv().ok()?;
        if let Ok(n) = &item {
            self.queued.fetch_sub(n.cost(), Ordering::Relaxed);
        }
        Some(item)
    }
}

/// The engine's end of a watcher's queue.
pub struct WatchTx {
    tx: mpsc::UnboundedSender<WatchItem>,
    queued: Arc<AtomicUsize>,
}

/// A new watcher queue: the engine's end and the stream task's end. Its
/// bytes are counted on both sides, so the engine's limit holds however
/// slowly the stream task drains it.
pub fn watch_queue() -> (WatchTx, WatchRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        WatchTx {
            tx,
            queued: queued.clone(),
        },
        WatchRx { rx, queued },
    )
}

impl WatchTx {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Queues `n` if it fits in `limit` bytes. Returns false if it did not
    /// (the caller ends the feed) or the stream task is gone.
    fn offer(&self, n: &Notice, limit: usize) -> bool {
        let cost = n.cost();
        if self.queued.load(Ordering::Relaxed) + cost > limit {
            return false;
        }
        self.queued.fetch_add(cost, Ordering::Relaxed);
        self.tx.send(Ok(n.clone())).is_ok()
    }

    /// Ends the feed with `e` (always delivered: one item past the limit).
    fn end(&self, e: ClientError) {
        let _ = self.tx.send(Err(e));
    }
}

fn client_error(kind: ErrorKind, message: String) -> ClientError {
    ClientError {
        kind,
        message,
        regions: Vec::new(),
    }
}

fn lagged(limit: usize) -> ClientError {
    client_error(
        ErrorKind::WatchLagged,
        format!(
            "this watcher fell more than {limit} bytes of changes behind and was cut off: resume from the last change received (or read the keys again if that fails)"
        ),
    )
}

struct Subscriber {
    prefix: String,
    conn: u64,
    tx: WatchTx,
}

/// The change feed: a ring of recent notices and the subscribers.
pub struct Feed {
    epoch: u64,
    next: u64,
    ring: VecDeque<Notice>,
    ring_bytes: usize,
    subscribers: Vec<Subscriber>,
    tree: Option<sled::Tree>,
    limits: FeedLimits,
}

impl Feed {
    /// A feed with nothing retained, kept in memory only.
    pub fn new(limits: FeedLimits) -> Feed {
        Feed {
            epoch: rand::random(),
            next: 0,
            ring: VecDeque::new(),
            ring_bytes: 0,
            subscribers: Vec::new(),
            tree: None,
            limits,
        }
    }

    /// Loads the feed of a node whose change log holds every change it
    /// published (a change is published once the flush that logged it is
    /// done), so the ring is rebuilt from the log's newest changes at every
    /// start, a crash included, and watchers resume across any restart.
    /// The exception is a crash of an `async` node (`durable` false): its
    /// last flushes may be lost from the log though watchers saw them, so
    /// it takes a new epoch and old tokens fail with `WatchLost`. `newest`
    /// hands the log's changes newest first to the closure until it
    /// refuses one; `next` is the log's next node-wide number.
    pub fn open_from_log(
        tree: sled::Tree,
        limits: FeedLimits,
        durable: bool,
        next: u64,
        newest: impl FnOnce(&mut dyn FnMut(u64, Key, RegionId) -> bool),
    ) -> Feed {
        let clean = tree.remove(b"clean").ok().flatten().is_some();
        let epoch = tree
            .get(b"epoch")
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes));
        // Rings of older builds are no longer kept in this tree.
        let old: Vec<sled::IVec> = tree.scan_prefix(b"c").keys().flatten().collect();
        for k in old {
            let _ = tree.remove(k);
        }
        let mut f = Feed {
            epoch: rand::random(),
            next,
            ring: VecDeque::new(),
            ring_bytes: 0,
            subscribers: Vec::new(),
            tree: Some(tree.clone()),
            limits,
        };
        match epoch {
            Some(e) if clean || durable => f.epoch = e,
            _ => {
                let _ = tree.insert(b"epoch", &f.epoch.to_be_bytes()[..]);
            }
        }
        let mut newest_first = Vec::new();
        let mut bytes = 0;
        let budget = f.limits.retained_bytes;
        newest(&mut |seq, key, origin| {
            let n = Notice {
                key,
                origin,
                token: WatchToken { epoch: f.epoch, seq },
            };
            bytes += n.cost();
            if bytes > budget && !newest_first.is_empty() {
                return false;
            }
            newest_first.push(n);
            true
        });
        for n in newest_first.into_iter().rev() {
            f.retain(n);
        }
        f
    }

    /// Marks a clean shutdown (after the last flush).
    pub fn close_marker(&self) {
        let Some(t) = &self.tree else { return };
        if let Err(e) = t.insert(b"clean", &[1u8][..]).and_then(|_| t.flush().map(|_| ())) {
            tracing::warn!(error = %e, "marking the watch feed clean at close failed");
        }
    }

    /// Bytes of notices retained.
    pub fn retained_bytes(&self) -> usize {
        self.ring_bytes
    }

    /// Notices retained.
    pub fn retained(&self) -> usize {
        self.ring.len()
    }

    /// Subscribed watchers (closed ones included until the next prune).
    pub fn watchers(&self) -> usize {
        self.subscribers.len()
    }

    /// Appends to the ring, dropping the oldest notices past the limit.
    fn retain(&mut self, n: Notice) {
        self.ring_bytes += n.cost();
        self.ring.push_back(n);
        while self.ring_bytes > self.limits.retained_bytes && self.ring.len() > 1 {
            let Some(old) = self.ring.pop_front() else { break };
            self.ring_bytes -= old.cost();
        }
    }

    /// Records that `key` changed and tells the watchers whose prefix
    /// matches it. A watcher whose queue is full is cut off with a
    /// `WatchLagged` error; one whose stream task is gone is dropped.
    pub fn publish(&mut self, key: Key, origin: RegionId) {
        self.publish_at(self.next, key, origin);
    }

    /// [`Feed::publish`] of the change numbered `seq` (the change log's
    /// node-wide number; increasing).
    pub fn publish_at(&mut self, seq: u64, key: Key, origin: RegionId) {
        let n = Notice {
            key,
            origin,
            token: WatchToken { epoch: self.epoch, seq },
        };
        self.next = self.next.max(seq + 1);
        let limit = self.limits.queue_bytes;
        self.subscribers.retain(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if !n.key.as_str().starts_with(s.prefix.as_str()) || s.tx.offer(&n, limit) {
                return true;
            }
            s.tx.end(lagged(limit));
            false
        });
        self.retain(n);
    }

    /// Drops the subscribers whose stream task ended (the client reset the
    /// stream or closed the connection). Called every engine turn that has
    /// time for it and before a new subscription is counted.
    pub fn prune(&mut self) {
        self.subscribers.retain(|s| !s.tx.is_closed());
    }

    /// Subscribes a watcher of `prefix` on connection `conn`: replays the
    /// retained notices after `from` (as far as its queue allows), then
    /// follows live changes. Refusals and a lost resume point end the
    /// feed with an error.
    pub fn subscribe(&mut self, prefix: String, from: Option<WatchToken>, conn: u64, tx: WatchTx) {
        if prefix.len() > self.limits.max_prefix_bytes {
            tx.end(client_error(
                ErrorKind::InvalidRequest,
                format!(
                    "a watch prefix of {} bytes is longer than the limit of {} (the longest key)",
                    prefix.len(),
                    self.limits.max_prefix_bytes
                ),
            ));
            return;
        }
        self.prune();
        if self.subscribers.len() >= self.limits.max_watchers {
            tx.end(client_error(
                ErrorKind::Overloaded,
                format!(
                    "this node already serves {} watchers (watch_max_watchers): try another node or later",
                    self.subscribers.len()
                ),
            ));
            return;
        }
        let on_conn = self.subscribers.iter().filter(|s| s.conn == conn).count();
        if on_conn >= self.limits.max_watchers_per_conn {
            tx.end(client_error(
                ErrorKind::Overloaded,
                format!("this connection already has {on_conn} watchers (watch_max_per_connection): end one first"),
            ));
            return;
        }
        if let Some(t) = from {
            let oldest = self.ring.front().map_or(self.next, |n| n.token.seq);
            if t.epoch != self.epoch || t.seq + 1 < oldest || t.seq >= self.next {
                tx.end(client_error(
                    ErrorKind::WatchLost,
                    "cannot resume from this token (node restarted or change no longer retained): read again and watch anew".into(),
                ));
                return;
            }
            let limit = self.limits.queue_bytes;
            for n in self
                .ring
                .iter()
                .filter(|n| n.token.seq > t.seq && n.key.as_str().starts_with(prefix.as_str()))
            {
                if !tx.offer(n, limit) {
                    tx.end(lagged(limit));
                    return;
                }
            }
        }
        self.subscribers.push(Subscriber { prefix, conn, tx });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FeedLimits {
        FeedLimits {
            retained_bytes: 10 * (NOTICE_OVERHEAD + 4),
            queue_bytes: 3 * (NOTICE_OVERHEAD + 4),
            max_watchers: 4,
            max_watchers_per_conn: 2,
            max_prefix_bytes: 8,
        }
    }

    fn key(i: usize) -> Key {
        Key::new(format!("k{i:03}")).unwrap()
    }

    fn region() -> RegionId {
        RegionId(String::new())
    }

    #[test]
    fn the_ring_is_bounded_by_bytes_and_keeps_no_values() {
        let mut feed = Feed::new(limits());
        for i in 0..1_000 {
            feed.publish(key(i), region());
        }
        assert_eq!(feed.retained(), 10);
        assert!(feed.retained_bytes() <= limits().retained_bytes);
    }

    /// The log's newest changes, newest first, as `LogReader::newest`
    /// hands them: `n` of them, numbered up to `next - 1`.
    fn history(n: u64, next: u64) -> impl FnOnce(&mut dyn FnMut(u64, Key, RegionId) -> bool) {
        move |take| {
            for seq in (next - n..next).rev() {
                if !take(seq, key(seq as usize), region()) {
                    break;
                }
            }
        }
    }

    #[test]
    fn the_ring_is_rebuilt_from_the_log_and_the_epoch_kept_unless_an_async_node_crashed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = || db.open_tree("feed").unwrap();
        let feed = Feed::open_from_log(tree(), limits(), true, 500, history(100, 500));
        // The newest that fit the budget, oldest first, numbered as logged.
        assert_eq!(feed.retained(), 10);
        let seqs: Vec<u64> = feed.ring.iter().map(|n| n.token.seq).collect();
        assert_eq!(seqs, (490..500).collect::<Vec<_>>());
        assert_eq!(feed.next, 500);
        let epoch = feed.epoch;
        // A durable node keeps its epoch across a crash (no close marker).
        let feed = Feed::open_from_log(tree(), limits(), true, 600, history(100, 600));
        assert_eq!(feed.epoch, epoch);
        // An async node keeps it after a clean close only.
        feed.close_marker();
        let feed = Feed::open_from_log(tree(), limits(), false, 600, history(100, 600));
        assert_eq!(feed.epoch, epoch);
        let feed = Feed::open_from_log(tree(), limits(), false, 600, history(100, 600));
        assert_ne!(feed.epoch, epoch, "an async crash must change the epoch");
        // A token of the new epoch resumes from the rebuilt ring.
        let mut feed = Feed::open_from_log(tree(), limits(), true, 600, history(100, 600));
        let (tx, mut rx) = watch_queue();
        let from = WatchToken {
            epoch: feed.epoch,
            seq: 597,
        };
        feed.subscribe(String::new(), Some(from), 1, tx);
        let got: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
            .map(|n| n.unwrap().token.seq)
            .collect();
        assert_eq!(got, vec![598, 599]);
    }

    #[test]
    fn a_watcher_that_never_reads_is_cut_off_with_lagged() {
        let mut feed = Feed::new(limits());
        let (tx, mut rx) = watch_queue();
        feed.subscribe(String::new(), None, 1, tx);
        for i in 0..100 {
            feed.publish(key(i), region());
        }
        assert_eq!(feed.watchers(), 0);
        let mut got = Vec::new();
        while let Some(item) = rx.try_recv() {
            got.push(item);
        }
        assert_eq!(got.len(), 4, "three notices fit, then the lagged signal");
        assert!(matches!(got.last(), Some(Err(e)) if e.kind == ErrorKind::WatchLagged));
    }

    #[test]
    fn closed_watchers_are_pruned_and_counts_and_prefixes_are_capped() {
        let mut feed = Feed::new(limits());
        for _ in 0..1_000 {
            let (tx, rx) = watch_queue();
            feed.subscribe("never/".into(), None, 1, tx);
            drop(rx); // the client reset the stream
        }
        feed.prune();
        assert_eq!(feed.watchers(), 0);
        let refused = |mut rx: WatchRx| match rx.try_recv() {
            Some(Err(e)) => e.kind,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let mut keep = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = watch_queue();
            feed.subscribe(String::new(), None, 0, tx);
            keep.push(rx);
        }
        let (tx, rx) = watch_queue();
        feed.subscribe(String::new(), None, 0, tx);
        assert_eq!(refused(rx), ErrorKind::Overloaded, "the per-connection cap");
        for conn in 1..3 {
            let (tx, rx) = watch_queue();
            feed.subscribe(String::new(), None, conn, tx);
            keep.push(rx);
        }
        assert_eq!(feed.watchers(), 4);
        let (tx, rx) = watch_queue();
        feed.subscribe(String::new(), None, 3, tx);
        assert_eq!(refused(rx), ErrorKind::Overloaded, "the global cap");
        // A watcher that goes away frees its slot.
        drop(keep.pop());
        let (tx, _rx) = watch_queue();
        feed.subscribe(String::new(), None, 3, tx);
        assert_eq!(feed.watchers(), 4);
        let (tx, rx) = watch_queue();
        feed.subscribe("123456789".into(), None, 9, tx);
        assert_eq!(refused(rx), ErrorKind::InvalidRequest, "the prefix cap");
    }

    /// Keys near the longest allowed: the ring, its sled mirror and a
    /// watcher's queue must each hold about `limit / (key + overhead)`
    /// notices, not `limit / overhead` (what charging a notice without its
    /// key's length would let in: 10× more memory at 1 KiB keys).
    #[test]
    fn long_keys_are_charged_their_length_in_the_ring_and_the_queues() {
        let long = |i: usize| Key::new(format!("{i:0>width$}", width = MAX_KEY_LEN)).unwrap();
        let per = MAX_KEY_LEN + NOTICE_OVERHEAD;
        let limits = FeedLimits {
            retained_bytes: 64 << 10,
            queue_bytes: 16 << 10,
            ..FeedLimits::default()
        };
        let mut feed = Feed::new(limits);
        let (tx, mut rx) = watch_queue();
        feed.subscribe(String::new(), None, 1, tx);
        for i in 0..1_000 {
            feed.publish(long(i), region());
        }
        // The ring: what its notices really hold, not what they were charged.
        let held: usize = feed.ring.iter().map(|n| n.key.as_str().len() + NOTICE_OVERHEAD).sum();
        assert!(held <= limits.retained_bytes, "the ring holds {held} bytes");
        assert_eq!(feed.retained(), limits.retained_bytes / per);
        // The watcher that never read: cut off after its queue's worth.
        let mut notices = 0;
        let mut last = None;
        while let Some(item) = rx.try_recv() {
            notices += usize::from(item.is_ok());
            last = Some(item);
        }
        assert_eq!(notices, limits.queue_bytes / per);
        assert!(matches!(last, Some(Err(e)) if e.kind == ErrorKind::WatchLagged));
    }
}
