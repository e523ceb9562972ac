//! Reads waiting for a causal token: indexed by key and by deadline, so a
//! change re-checks only the reads of the key that changed and a turn finds
//! expired reads without touching the others. Bounded per connection and in
//! total.

use lattice_core::proto::client::CausalToken;
use lattice_core::Key;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// Limits on waiting reads (`max_waiting_reads*` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitLimits {
    /// Waiting reads on the node.
    pub total: usize,
    /// Waiting reads from one client connection.
    pub per_conn: usize,
    /// Writes of one client connection waiting for their write concern
    /// (all connections together are bounded by the engine's pending
    /// writes, 10,000).
    pub concerns_per_conn: usize,
    /// Bytes the waiting reads hold on the node, all together: a token is
    /// the client's to make, and one may take most of a 1 MiB request
    /// ([`token_cost`]).
    pub bytes: usize,
}

impl Default for WaitLimits {
    fn default() -> Self {
        WaitLimits {
            total: 10_000,
            per_conn: 128,
            concerns_per_conn: 128,
            bytes: 64 << 20,
        }
    }
}

/// Why a read cannot wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `total` waiting reads already.
    Total(usize),
    /// The connection holds `per_conn` waiting reads already.
    PerConn(usize),
    /// The waiting reads hold this many bytes already.
    Bytes(usize),
}

struct Waiter<R> {
    key: Key,
    token: Arc<CausalToken>,
    deadline: Instant,
    conn: u64,
    /// What it is charged ([`token_cost`] and its key).
    bytes: usize,
    reply: R,
}

/// Bytes a waiting read is charged besides its token and key: its indexes'
/// entries and its reply channel.
const WAITER_OVERHEAD: usize = 256;

/// An estimate of the memory a decoded token holds: each run of dots of a
/// context is two u64s, each replica an entry of a map (also one with no
/// run: a client's token need not be canonical, and such an entry is a
/// couple of bytes on the wire), each counter total an entry with two u64s.
/// Linear in the token's size, as its decoding was.
pub fn token_cost(t: &CausalToken) -> usize {
    let context = |c: &lattice_core::clock::CausalContext| c.range_count() * 16 + c.replica_count() * 64;
    64 + context(&t.context)
        + t.parts
            .values()
            .map(|p| 64 + context(&p.dots) + p.totals.len() * 64)
            .sum::<usize>()
}

/// The waiting reads; `R` is where each one's answer goes.
pub struct Waits<R> {
    limits: WaitLimits,
    next_id: u64,
    waiters: BTreeMap<u64, Waiter<R>>,
    by_key: BTreeMap<Key, BTreeSet<u64>>,
    by_deadline: BTreeSet<(Instant, u64)>,
    per_conn: BTreeMap<u64, usize>,
    /// What the waiting reads are charged, in all.
    bytes: usize,
}

impl<R> Waits<R> {
    /// No waiting reads.
    pub fn new(limits: WaitLimits) -> Self {
        Waits {
            limits,
            next_id: 0,
            waiters: BTreeMap::new(),
            by_key: BTreeMap::new(),
            by_deadline: BTreeSet::new(),
            per_conn: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Bytes the waiting reads are charged, in all.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Waiting reads.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// No read is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// Adds a read, unless a limit refuses it (the reply comes back).
    pub fn add(
        &mut self,
        key: Key,
        token: Arc<CausalToken>,
        deadline: Instant,
        conn: u64,
        reply: R,
    ) -> Result<(), (Refused, R)> {
        if self.waiters.len() >= self.limits.total {
            return Err((Refused::Total(self.limits.total), reply));
        }
        let on_conn = self.per_conn.get(&conn).copied().unwrap_or(0);
        if on_conn >= self.limits.per_conn {
            return Err((Refused::PerConn(self.limits.per_conn), reply));
        }
        let bytes = token_cost(&token) + key.as_str().len() + WAITER_OVERHEAD;
        if self.bytes + bytes > self.limits.bytes {
            return Err((Refused::Bytes(self.limits.bytes), reply));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += bytes;
        self.per_conn.insert(conn, on_conn + 1);
        self.by_key.entry(key.clone()).or_default().insert(id);
        self.by_deadline.insert((deadline, id));
        self.waiters.insert(
            id,
            Waiter {
                key,
                token,
                deadline,
                conn,
                bytes,
                reply,
            },
        );
        Ok(())
    }

    /// [`Waits::add`], but at a limit the reads whose client went away
    /// (`gone`) give their slots up first: a client that left is not
    /// noticed before the next periodic prune otherwise, and its reads
    /// would refuse a live client's meanwhile.
    pub fn add_or_prune(
        &mut self,
        key: Key,
        token: Arc<CausalToken>,
        deadline: Instant,
        conn: u64,
        reply: R,
        gone: impl Fn(&R) -> bool,
    ) -> Result<(), (Refused, R)> {
        self.add(key.clone(), token.clone(), deadline, conn, reply)
            .or_else(|(_, reply)| {
                self.prune(gone);
                self.add(key, token, deadline, conn, reply)
            })
    }

    fn remove(&mut self, id: u64) -> Option<Waiter<R>> {
        let w = self.waiters.remove(&id)?;
        self.bytes -= w.bytes;
        if let Some(ids) = self.by_key.get_mut(&w.key) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_key.remove(&w.key);
            }
        }
        self.by_deadline.remove(&(w.deadline, id));
        if let Some(n) = self.per_conn.get_mut(&w.conn) {
            *n -= 1;
            if *n == 0 {
                self.per_conn.remove(&w.conn);
            }
        }
        Some(w)
    }

    /// Drops the reads whose client went away (`gone` says so of a reply:
    /// its receiver was dropped), freeing their slots at once rather than
    /// at their deadline. Returns how many were dropped.
    pub fn prune(&mut self, gone: impl Fn(&R) -> bool) -> usize {
        let ids: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| gone(&w.reply))
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter(|id| self.remove(**id).is_some()).count()
    }

    /// Whether any read waits on `key`.
    pub fn waits_on(&self, key: &Key) -> bool {
        self.by_key.contains_key(key)
    }

    /// The reads of `key` whose token `included` accepts, removed.
    pub fn ready(&mut self, key: &Key, included: impl Fn(&CausalToken) -> bool) -> Vec<R> {
        let ids: Vec<u64> = match self.by_key.get(key) {
            Some(ids) => ids.iter().copied().collect(),
            None => return Vec::new(),
        };
        let ready: Vec<u64> = ids
            .into_iter()
            .filter(|id| self.waiters.get(id).is_some_and(|w| included(&w.token)))
            .collect();
        ready
            .into_iter()
            .filter_map(|id| self.remove(id).map(|w| w.reply))
            .collect()
    }

    /// The reads whose deadline passed by `now`, removed.
    pub fn expired(&mut self, now: Instant) -> Vec<R> {
        let mut out = Vec::new();
        while let Some(&(d, id)) = self.by_deadline.first() {
            if d > now {
                break;
            }
            match self.remove(id) {
                Some(w) => out.push(w.reply),
                None => {
                    self.by_deadline.pop_first();
                }
            }
        }
        out
    }
}

/// The tokens of the keys that changed lately, by the flush that made each
/// change readable beside the engine. A read is checked against the store
/// beside the engine first, and comes to wait only if that store (as of
/// some flush, its `seen`) lacked its token; the engine decides from these
/// tokens alone whether a change since then includes it, without reading
/// and decoding the value (a set of 10^5 elements takes a few hundred ms).
///
/// Bounded: the changes of the oldest flushes are forgotten first, keeping
/// at most [`RECENT_KEYS`] keys (changes not yet flushed are never
/// forgotten; the engine's pending writes bound them). A read that saw the
/// store before a forgotten change cannot be decided here and is checked
/// beside the engine again ([`Seen::Recheck`]).
pub struct Recent {
    /// Successful flushes so far.
    epoch: u64,
    /// The changes readable at this epoch or earlier are forgotten.
    floor: u64,
    /// Each key's last change: the epoch that makes it readable, its token.
    by_key: HashMap<Key, (u64, CausalToken)>,
    /// The keys changed per epoch, oldest first; a key changed again since
    /// stays listed under its older epoch too (`by_key` says which is its
    /// last), so that a change costs no removal here.
    by_epoch: VecDeque<(u64, Vec<Key>)>,
    /// Keys listed in `by_epoch`.
    listed: usize,
}

/// Keys whose last change's token [`Recent`] keeps at most.
pub const RECENT_KEYS: usize = 16_384;

/// What [`Recent`] can tell of a read that found its token missing in the
/// store as of some flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The store beside the engine includes the token now.
    Ready,
    /// A change not yet flushed includes it: ready after the next flush.
    AfterFlush,
    /// No change since includes it: the read waits.
    Wait,
    /// The read saw the store before changes forgotten since: check again.
    Recheck,
}

impl Default for Recent {
    fn default() -> Self {
        Recent::new()
    }
}

impl Recent {
    /// Nothing changed yet; no flush yet.
    pub fn new() -> Self {
        Recent {
            epoch: 0,
            floor: 0,
            by_key: HashMap::new(),
            by_epoch: VecDeque::new(),
            listed: 0,
        }
    }

    /// Successful flushes so far: a store read after this many flushes
    /// includes every change recorded before the last of them.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Keys whose tokens are kept.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// No token is kept.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// `key` changed (not flushed yet); `token` is its state's token now.
    pub fn changed(&mut self, key: Key, token: CausalToken) {
        let readable = self.epoch + 1;
        match self.by_key.get_mut(&key) {
            // Changed again before the flush: listed already.
            Some(last) if last.0 == readable => last.1 = token,
            _ => {
                match self.by_epoch.back_mut() {
                    Some((e, keys)) if *e == readable => keys.push(key.clone()),
                    _ => self.by_epoch.push_back((readable, vec![key.clone()])),
                }
                self.listed += 1;
                self.by_key.insert(key, (readable, token));
            }
        }
    }

    /// The token of `key`'s last change, if kept.
    pub fn token(&self, key: &Key) -> Option<&CausalToken> {
        self.by_key.get(key).map(|(_, t)| t)
    }

    /// A flush succeeded: every change recorded so far is readable beside
    /// the engine.
    pub fn flushed(&mut self) {
        self.epoch += 1;
    }

    /// Forgets the oldest flushes' changes past [`RECENT_KEYS`] keys (or
    /// twice as many listed, when the same keys keep changing).
    pub fn forget_old(&mut self) {
        while self.by_key.len() > RECENT_KEYS || self.listed > 2 * RECENT_KEYS {
            let Some(&(oldest, _)) = self.by_epoch.front() else {
                break;
            };
            if oldest > self.epoch {
                break;
            }
            if let Some((_, keys)) = self.by_epoch.pop_front() {
                self.listed -= keys.len();
                for k in keys {
                    if self.by_key.get(&k).is_some_and(|(e, _)| *e == oldest) {
                        self.by_key.remove(&k);
                    }
                }
            }
            self.floor = oldest;
        }
    }

    /// What to do with a read of `key` for `token` that the store as of
    /// flush `seen` did not include.
    pub fn check(&self, key: &Key, token: &CausalToken, seen: u64) -> Seen {
        match self.by_key.get(key) {
            Some((readable, now)) if now.includes(token) => {
                if *readable <= self.epoch {
                    Seen::Ready
                } else {
                    Seen::AfterFlush
                }
            }
            // The state the read saw holds every change forgotten here.
            Some(_) => Seen::Wait,
            None if seen >= self.floor => Seen::Wait,
            None => Seen::Recheck,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reads_are_capped_indexed_by_key_and_expire_in_order() {
        let mut w: Waits<u32> = Waits::new(WaitLimits {
            total: 3,
            per_conn: 2,
            concerns_per_conn: 1,
            bytes: 1 << 20,
        });
        let now = Instant::now();
        let (a, b) = (Key::new("a").unwrap(), Key::new("b").unwrap());
        let t = Arc::new(CausalToken::default());
        w.add(a.clone(), t.clone(), now + Duration::from_secs(2), 1, 1).unwrap();
        w.add(b.clone(), t.clone(), now + Duration::from_secs(1), 1, 2).unwrap();
        assert_eq!(w.add(a.clone(), t.clone(), now, 1, 3), Err((Refused::PerConn(2), 3)));
        w.add(a.clone(), t.clone(), now + Duration::from_secs(3), 2, 4).unwrap();
        assert_eq!(w.add(a.clone(), t.clone(), now, 3, 5), Err((Refused::Total(3), 5)));
        assert_eq!(w.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(w.ready(&a, |_| false), Vec::<u32>::new());
        assert_eq!(w.ready(&a, |_| true), vec![1, 4]);
        assert!(!w.waits_on(&a));
        assert_eq!(w.expired(now), Vec::<u32>::new());
        assert_eq!(w.expired(now + Duration::from_secs(5)), vec![2]);
        assert!(w.is_empty());
        // Freed slots are reusable.
        w.add(a, t, now, 1, 6).unwrap();
    }

    #[test]
    fn reads_whose_client_went_away_are_dropped_and_free_their_slots() {
        let mut w: Waits<u32> = Waits::new(WaitLimits {
            total: 3,
            per_conn: 2,
            concerns_per_conn: 1,
            bytes: 1 << 20,
        });
        let now = Instant::now();
        let (a, b) = (Key::new("a").unwrap(), Key::new("b").unwrap());
        let t = Arc::new(CausalToken::default());
        let later = now + Duration::from_secs(60);
        w.add(a.clone(), t.clone(), later, 1, 1).unwrap();
        w.add(b.clone(), t.clone(), later, 1, 2).unwrap();
        w.add(a.clone(), t.clone(), later, 2, 3).unwrap();
        assert_eq!(w.add(a.clone(), t.clone(), later, 3, 4), Err((Refused::Total(3), 4)));
        // Connection 1's client is gone: its two reads go, long before
        // their deadline, from every index.
        assert_eq!(w.prune(|r| *r <= 2), 2);
        assert_eq!(w.len(), 1);
        assert!(!w.waits_on(&b));
        assert_eq!(w.next_deadline(), Some(later));
        w.add(a.clone(), t.clone(), later, 1, 5).unwrap();
        w.add(b, t, later, 1, 6).unwrap();
        assert_eq!(w.ready(&a, |_| true), vec![3, 5]);
    }

    #[test]
    fn at_a_limit_the_reads_of_clients_that_left_give_their_slots_up_first() {
        let mut w: Waits<u32> = Waits::new(WaitLimits {
            total: 2,
            per_conn: 2,
            concerns_per_conn: 1,
            bytes: 1 << 20,
        });
        let later = Instant::now() + Duration::from_secs(60);
        let (a, t) = (Key::new("a").unwrap(), Arc::new(CausalToken::default()));
        w.add(a.clone(), t.clone(), later, 1, 1).unwrap();
        w.add(a.clone(), t.clone(), later, 2, 2).unwrap();
        // Nobody left: still refused, and nothing was dropped.
        assert_eq!(
            w.add_or_prune(a.clone(), t.clone(), later, 3, 3, |_| false),
            Err((Refused::Total(2), 3))
        );
        assert_eq!(w.len(), 2);
        // The client of read 1 left: its slot goes to the new read.
        w.add_or_prune(a.clone(), t.clone(), later, 3, 4, |r| *r == 1).unwrap();
        assert_eq!(w.ready(&a, |_| true), vec![2, 4]);
    }

    fn dot_token(n: u64) -> CausalToken {
        use lattice_core::clock::{CausalContext, Dot, ReplicaId};
        CausalToken {
            context: CausalContext::from_dots((1..=n).map(|c| Dot {
                replica: ReplicaId(1),
                counter: c,
            })),
            ..CausalToken::default()
        }
    }

    #[test]
    fn attack_forgetting_an_older_flush_keeps_a_key_changed_since() {
        let mut r = Recent::new();
        let (a, x) = (Key::new("a").unwrap(), Key::new("x").unwrap());
        // Flush 1 lists `a` and `x`; flush 2 lists `a` again (its last change).
        r.changed(a.clone(), dot_token(1));
        r.changed(x.clone(), dot_token(1));
        r.flushed();
        r.changed(a.clone(), dot_token(2));
        r.flushed();
        // One key over the bound: forgetting flush 1 (x) is enough.
        for i in 0..RECENT_KEYS - 1 {
            r.changed(Key::new(format!("k{i}")).unwrap(), dot_token(1));
        }
        r.flushed();
        r.forget_old();
        assert_eq!(r.len(), RECENT_KEYS);
        // A read that saw flush 1 and lacks `a`'s second change: the store
        // holds it now, the read must not wait for another change.
        assert_eq!(r.check(&a, &dot_token(2), 1), Seen::Ready);
        assert_eq!(r.check(&x, &dot_token(1), 0), Seen::Recheck);
    }

    #[test]
    fn recent_changes_decide_reads_until_forgotten() {
        let mut r = Recent::new();
        let (a, b) = (Key::new("a").unwrap(), Key::new("b").unwrap());
        // A read that saw flush 0 and lacks dot 1 of `a`.
        assert_eq!(r.check(&a, &dot_token(1), 0), Seen::Wait);
        r.changed(a.clone(), dot_token(1));
        assert_eq!(r.check(&a, &dot_token(1), 0), Seen::AfterFlush);
        assert_eq!(r.check(&a, &dot_token(2), 0), Seen::Wait);
        r.flushed();
        assert_eq!(r.epoch(), 1);
        assert_eq!(r.check(&a, &dot_token(1), 0), Seen::Ready);
        // A change of `a` again moves it to the next flush.
        r.changed(a.clone(), dot_token(2));
        assert_eq!(r.check(&a, &dot_token(2), 1), Seen::AfterFlush);
        r.flushed();
        assert_eq!(r.len(), 1);
        // Past the bound the oldest flushes' changes go: a read that saw
        // the store before them is sent back, a later one waits.
        for i in 0..RECENT_KEYS {
            r.changed(Key::new(format!("k{i}")).unwrap(), dot_token(1));
            if i % 1000 == 0 {
                r.flushed();
            }
        }
        r.changed(b.clone(), dot_token(1));
        r.flushed();
        r.forget_old();
        assert!(r.len() <= RECENT_KEYS, "{} kept", r.len());
        assert!(r.check(&a, &dot_token(2), 2) != Seen::Ready, "`a` was forgotten");
        assert_eq!(r.check(&a, &dot_token(3), 1), Seen::Recheck);
        assert_eq!(r.check(&a, &dot_token(3), r.epoch()), Seen::Wait);
        assert_eq!(r.check(&b, &dot_token(1), 0), Seen::Ready);
        // The same few keys changing in every flush are listed once per
        // flush: the list stays bounded too, and the keys' last changes
        // stay known.
        let one_dot = |counter: u64| CausalToken {
            context: lattice_core::clock::CausalContext::from_dots([lattice_core::clock::Dot {
                replica: lattice_core::clock::ReplicaId(2),
                counter,
            }]),
            ..CausalToken::default()
        };
        let few: Vec<Key> = (0..10).map(|i| Key::new(format!("hot{i}")).unwrap()).collect();
        let rounds = 3 * RECENT_KEYS as u64;
        for round in 0..rounds {
            let k = &few[(round % 10) as usize];
            r.changed(k.clone(), one_dot(round + 1));
            r.changed(k.clone(), one_dot(round + 2));
            r.flushed();
            r.forget_old();
            assert!(r.listed <= 2 * RECENT_KEYS + 1, "{} listed", r.listed);
        }
        let (last, hot) = (rounds - 1, &few[((rounds - 1) % 10) as usize]);
        assert_eq!(r.check(hot, &one_dot(last + 2), 0), Seen::Ready);
        assert_eq!(r.check(hot, &one_dot(last + 3), r.epoch()), Seen::Wait);
    }

    /// A client makes its token, and its contexts need not be canonical: a
    /// replica with no run of dots is a couple of bytes on the wire and a
    /// map entry (some 50 bytes) in memory. Such entries were charged
    /// nothing (only runs and replicas with a largest dot were), so a token
    /// of one request could hold megabytes while charged a few hundred
    /// bytes, and the bound on waiting reads held nothing back.
    #[test]
    fn a_token_of_replicas_without_dots_is_charged_for_them() {
        use lattice_core::clock::CausalContext;
        // Few: a test of the peak RSS may run beside it (one request may
        // hold over 200,000 such entries, more than 10 MB decoded).
        let n = 20_000u64;
        let empty: BTreeMap<u64, Vec<(u64, u64)>> = (0..n).map(|r| (r, Vec::new())).collect();
        let context: CausalContext =
            lattice_core::proto::from_bytes(&lattice_core::proto::to_bytes(&empty).unwrap()).unwrap();
        assert_eq!((context.range_count(), context.replica_count()), (0, n as usize));
        let token = CausalToken {
            context,
            ..CausalToken::default()
        };
        let wire = lattice_core::proto::to_bytes(&token).unwrap().len();
        assert!(
            wire < lattice_core::proto::client::MAX_CLIENT_FRAME,
            "{wire} bytes fit a request"
        );
        let cost = token_cost(&token);
        assert!(cost >= n as usize * 32, "{n} replica entries are charged {cost} bytes");
    }

    #[test]
    fn waiting_reads_are_bounded_by_the_bytes_of_their_tokens() {
        let small = Arc::new(dot_token(1));
        // 3,000 replicas of 10 dots each, no two in a row: 30,000 runs.
        let huge = Arc::new(CausalToken {
            context: lattice_core::clock::CausalContext::from_dots((0..30_000u64).map(|i| lattice_core::clock::Dot {
                replica: lattice_core::clock::ReplicaId(1_000 + i % 3_000),
                counter: 2 * (i / 3_000) + 2,
            })),
            ..CausalToken::default()
        });
        let cost = token_cost(&huge);
        assert!(cost >= 30_000 * 16, "a token of 30,000 runs is charged {cost} bytes");
        assert!(token_cost(&small) < 1_000);
        let limits = WaitLimits {
            bytes: 3 * cost,
            ..WaitLimits::default()
        };
        let mut w: Waits<u32> = Waits::new(limits);
        let (a, later) = (Key::new("a").unwrap(), Instant::now() + Duration::from_secs(60));
        w.add(a.clone(), huge.clone(), later, 1, 1).unwrap();
        w.add(a.clone(), huge.clone(), later, 2, 2).unwrap();
        assert_eq!(
            w.add(a.clone(), huge.clone(), later, 3, 3),
            Err((Refused::Bytes(3 * cost), 3))
        );
        // Small tokens still fit beside them.
        w.add(a.clone(), small.clone(), later, 3, 4).unwrap();
        assert!(w.bytes() <= 3 * cost);
        // Their bytes are given back when they leave.
        assert_eq!(w.ready(&a, |_| true), vec![1, 2, 4]);
        assert_eq!(w.bytes(), 0);
        w.add(a, huge, later, 3, 5).unwrap();
    }
}
