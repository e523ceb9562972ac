//! The causal context: the set of dots a state has seen, kept compact as
//! ranges of contiguous counters per replica.

use super::{Dot, ReplicaId, VersionVector};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The set of dots a causal CRDT has observed.
///
/// Stored per replica as sorted, disjoint, non-adjacent inclusive ranges of
/// counters, so contiguous dots compact into one range: a context that has
/// seen `1..=1_000_000` of a replica costs one range, and the common case
/// (everything from 1 up to n) is a version vector. Gaps survive exactly as
/// long as a dot is missing, which is what lets a replica ignore a stale
/// delta and accept a late one. The representation is canonical, so two
/// contexts with the same dots are equal and encode to the same bytes.
///
/// ```
/// use lattice_core::clock::{CausalContext, Dot, ReplicaId};
/// let a = ReplicaId(7);
/// let mut cc = CausalContext::default();
/// cc.insert(Dot::new(a, 1));
/// cc.insert(Dot::new(a, 3));
/// assert_eq!(cc.range_count(), 2);
/// cc.insert(Dot::new(a, 2)); // fills the gap: one range again
/// assert_eq!(cc.range_count(), 1);
/// assert_eq!(cc.next_dot(a), Dot::new(a, 4));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CausalContext(BTreeMap<ReplicaId, Vec<(u64, u64)>>);

impl CausalContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context holding exactly these dots, in any order: O(k log k) for k
    /// dots (sorted once, then appended range by range), where inserting
    /// them one by one in an arbitrary order would shift the range list for
    /// each dot.
    pub fn from_dots(dots: impl IntoIterator<Item = Dot>) -> Self {
        let mut dots: Vec<Dot> = dots.into_iter().filter(|d| d.counter != 0).collect();
        dots.sort_unstable();
        let mut cc = Self::default();
        let mut i = 0;
        while i < dots.len() {
            let replica = dots[i].replica;
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            while i < dots.len() && dots[i].replica == replica {
                let c = dots[i].counter;
                match ranges.last_mut() {
                    Some(last) if c <= last.1.saturating_add(1) => last.1 = last.1.max(c),
                    _ => ranges.push((c, c)),
                }
                i += 1;
            }
            cc.0.insert(replica, ranges);
        }
        cc
    }

    /// Whether `dot` has been observed.
    pub fn contains(&self, dot: Dot) -> bool {
        let Some(ranges) = self.0.get(&dot.replica) else {
            return false;
        };
        // First range whose end is >= counter.
        let i = ranges.partition_point(|&(_, hi)| hi < dot.counter);
        i < ranges.len() && ranges[i].0 <= dot.counter
    }

    /// Adds one dot, merging it with adjacent ranges: O(log r) for r ranges
    /// when the dot extends or follows the last range (a replica's new
    /// dots), O(r) elsewhere. Add many dots with [`Extend`] instead.
    pub fn insert(&mut self, dot: Dot) {
        if dot.counter == 0 {
            return;
        }
        self.insert_range(dot.replica, dot.counter, dot.counter);
    }

    /// Adds the `len` consecutive dots of `first.replica` from `first` on
    /// (up to the largest counter) as one range: what an operation that
    /// creates `len` dots at once has seen.
    pub fn insert_run(&mut self, first: Dot, len: u64) {
        if len == 0 || first.counter == 0 {
            return;
        }
        let last = first.counter.saturating_add(len - 1);
        self.insert_range(first.replica, first.counter, last);
    }

    fn insert_range(&mut self, replica: ReplicaId, lo: u64, hi: u64) {
        debug_assert!(1 <= lo && lo <= hi);
        let ranges = self.0.entry(replica).or_default();
        // Ranges that overlap or touch [lo, hi] are merged into it.
        let start = ranges.partition_point(|&(_, h)| h.saturating_add(1) < lo);
        let end = ranges.partition_point(|&(l, _)| l <= hi.saturating_add(1));
        let (mut nlo, mut nhi) = (lo, hi);
        if start < end {
            nlo = nlo.min(ranges[start].0);
            nhi = nhi.max(ranges[end - 1].1);
        }
        crate::work::visit(ranges.len() - end);
        ranges.splice(start..end, std::iter::once((nlo, nhi)));
    }

    /// Union with another context: a linear merge of the range lists.
    pub fn join(&mut self, other: &CausalContext) {
        crate::work::visit(self.range_count() + other.range_count());
        for (r, theirs) in &other.0 {
            let merged = match self.0.get(r) {
                None => theirs.clone(),
                Some(mine) => merge_ranges(mine, theirs),
            };
            self.0.insert(*r, merged);
        }
    }

    /// The dots of `self` that `other` lacks, as a context: a linear walk.
    pub fn difference(&self, other: &CausalContext) -> CausalContext {
        let mut out = CausalContext::default();
        for (r, ranges) in &self.0 {
            let theirs = other.0.get(r).map(Vec::as_slice).unwrap_or(&[]);
            let mut kept = Vec::new();
            let mut j = 0;
            for &(lo, hi) in ranges {
                while j < theirs.len() && theirs[j].1 < lo {
                    j += 1;
                }
                let (mut cur, mut k) = (lo, j);
                loop {
                    if k >= theirs.len() || theirs[k].0 > hi {
                        kept.push((cur, hi));
                        break;
                    }
                    if theirs[k].0 > cur {
                        kept.push((cur, theirs[k].0 - 1));
                    }
                    if theirs[k].1 >= hi {
                        break;
                    }
                    cur = theirs[k].1 + 1;
                    k += 1;
                }
            }
            if !kept.is_empty() {
                out.0.insert(*r, kept);
            }
        }
        out
    }

    /// Whether every dot of `other` is in `self`.
    pub fn includes(&self, other: &CausalContext) -> bool {
        other.difference(self).is_empty()
    }

    /// The next fresh dot for `replica`: one past the highest counter seen.
    ///
    /// Counters are per state, so the dot is fresh for this state as long
    /// as the replica id is never reused after its state was lost.
    pub fn next_dot(&self, replica: ReplicaId) -> Dot {
        let max = self.0.get(&replica).and_then(|r| r.last()).map_or(0, |&(_, hi)| hi);
        Dot::new(replica, max.saturating_add(1))
    }

    /// Each replica's ranges of dots, in order.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (ReplicaId, &[(u64, u64)])> + '_ {
        self.0.iter().map(|(r, v)| (*r, v.as_slice()))
    }

    /// The highest dot counter of each replica in this context.
    pub fn maxima(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.0
            .iter()
            .filter_map(|(r, ranges)| ranges.last().map(|&(_, hi)| (*r, hi)))
    }

    /// The largest version vector contained in this context (the prefix
    /// `1..=n` of each replica).
    pub fn version_vector(&self) -> VersionVector {
        let mut vv = VersionVector::default();
        for (r, ranges) in &self.0 {
            if let Some(&(1, hi)) = ranges.first() {
                vv.advance(*r, hi);
            }
        }
        vv
    }

    /// Number of dots included (saturating).
    pub fn dot_count(&self) -> u64 {
        self.0.values().flatten().fold(0u64, |n, &(lo, hi)| {
            n.saturating_add(hi.saturating_sub(lo).saturating_add(1))
        })
    }

    /// Number of stored ranges: a measure of fragmentation.
    pub fn range_count(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    /// Replicas with an entry, each a map entry in memory: a decoded context
    /// (a client's token) may hold replicas with no range at all, which
    /// [`CausalContext::range_count`] and [`CausalContext::maxima`] skip.
    pub fn replica_count(&self) -> usize {
        self.0.len()
    }

    /// True when no dot is included.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the `n` dots `each` yields are exactly this context's dots,
    /// told without building a context from them: each is inside it and
    /// none comes twice, and there are as many as it holds. O(n log r) with
    /// one bit per dot; `false` when that cannot be told this way (a
    /// non-canonical context, a count that differs). Matches
    /// `CausalContext::from_dots(dots) == *self` whenever it says `true`.
    pub(crate) fn holds_exactly(&self, n: u64, each: impl FnOnce(&mut dyn FnMut(Dot))) -> bool {
        if n != self.dot_count() || !self.is_canonical() {
            return false;
        }
        let Ok(bits) = usize::try_from(n) else { return false };
        // Per replica: its ranges and the rank of each range's first dot.
        type Ranked<'a> = (&'a [(u64, u64)], Vec<u64>);
        let mut ranks: BTreeMap<ReplicaId, Ranked<'_>> = BTreeMap::new();
        let mut next = 0u64;
        for (r, ranges) in &self.0 {
            let mut starts = Vec::with_capacity(ranges.len());
            for &(lo, hi) in ranges {
                starts.push(next);
                next += hi - lo + 1;
            }
            ranks.insert(*r, (ranges, starts));
        }
        let mut seen = vec![0u64; bits.div_ceil(64)];
        let mut exact = true;
        each(&mut |d| {
            if !exact {
                return;
            }
            let Some((ranges, starts)) = ranks.get(&d.replica) else {
                exact = false;
                return;
            };
            let i = ranges.partition_point(|&(_, hi)| hi < d.counter);
            if i == ranges.len() || ranges[i].0 > d.counter {
                exact = false;
                return;
            }
            let rank = (starts[i] + (d.counter - ranges[i].0)) as usize;
            let (word, bit) = (rank / 64, 1u64 << (rank % 64));
            if seen[word] & bit != 0 {
                exact = false;
            }
            seen[word] |= bit;
        });
        exact
    }

    /// Checks the representation invariant (sorted, disjoint, non-adjacent,
    /// counters from 1). Used on decoded input from peers.
    pub fn is_canonical(&self) -> bool {
        self.0.values().all(|ranges| {
            !ranges.is_empty()
                && ranges.iter().all(|&(lo, hi)| 1 <= lo && lo <= hi)
                && ranges.windows(2).all(|w| w[0].1.saturating_add(1) < w[1].0)
        })
    }
}

/// Adds many dots in one batch: O(k log k + r) for k dots and r ranges,
/// whatever their order.
impl Extend<Dot> for CausalContext {
    fn extend<I: IntoIterator<Item = Dot>>(&mut self, dots: I) {
        let batch = CausalContext::from_dots(dots);
        if self.is_empty() {
            *self = batch;
        } else {
            self.join(&batch);
        }
    }
}

/// Merges two canonical range lists into one.
fn merge_ranges(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = if j >= b.len() || (i < a.len() && a[i].0 <= b[j].0) {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        match out.last_mut() {
            Some(last) if next.0 <= last.1.saturating_add(1) => last.1 = last.1.max(next.1),
            _ => out.push(next),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn dots() -> impl Strategy<Value = BTreeSet<Dot>> {
        proptest::collection::btree_set((0u64..3, 1u64..40).prop_map(|(r, c)| Dot::new(ReplicaId(r), c)), 0..40)
    }

    fn members(cc: &CausalContext) -> BTreeSet<Dot> {
        (0..3)
            .flat_map(|r| (1..40).map(move |c| Dot::new(ReplicaId(r), c)))
            .filter(|d| cc.contains(*d))
            .collect()
    }

    proptest! {
        /// The fast check that lets a state's encoding leave out its context
        /// never says yes where building the context would say no, and says
        /// yes to a context made of exactly the dots given (a delta's).
        #[test]
        fn holds_exactly_agrees_with_building_the_context(
            given in proptest::collection::vec((0u64..3, 0u64..12).prop_map(|(r, c)| Dot::new(ReplicaId(r), c)), 0..30),
            other in dots(),
            mode in 0u8..3,
        ) {
            let built = CausalContext::from_dots(given.iter().copied());
            let distinct: BTreeSet<Dot> = given.iter().copied().collect();
            let cc = match mode {
                0 => built.clone(),
                1 => CausalContext::from_dots(other.iter().copied()),
                // As many dots as given, counting repeats: only the repeats
                // tell it from the given dots.
                _ => {
                    let extra = (given.len() - distinct.len()) as u64;
                    CausalContext::from_dots(given.iter().copied().chain((1..=extra).map(|c| Dot::new(ReplicaId(7), c))))
                }
            };
            let n = given.len() as u64;
            let fast = cc.holds_exactly(n, |f| given.iter().for_each(|d| f(*d)));
            if fast {
                prop_assert_eq!(&built, &cc);
            }
            if mode == 0 && distinct.len() == given.len() && given.iter().all(|d| d.counter != 0) {
                prop_assert!(fast, "a context of exactly the given dots: {:?}", given);
            }
        }

        #[test]
        fn behaves_like_a_set(a in dots(), b in dots()) {
            let ca = CausalContext::from_dots(a.iter().copied());
            let cb = CausalContext::from_dots(b.iter().copied());
            prop_assert!(ca.is_canonical());
            prop_assert_eq!(members(&ca), a.clone());
            let mut u = ca.clone();
            u.join(&cb);
            prop_assert!(u.is_canonical());
            prop_assert_eq!(members(&u), a.union(&b).copied().collect::<BTreeSet<_>>());
            let d = ca.difference(&cb);
            prop_assert!(d.is_canonical());
            prop_assert_eq!(members(&d), a.difference(&b).copied().collect::<BTreeSet<_>>());
            // Canonical: the same set always has the same representation.
            prop_assert_eq!(u, CausalContext::from_dots(a.union(&b).copied()));
        }
    }

    proptest! {
        #[test]
        fn batches_equal_one_by_one_inserts(a in dots(), b in dots(), run in (0u64..3, 1u64..40, 0u64..10)) {
            let shuffled: Vec<Dot> = b.iter().rev().copied().collect();
            let mut one_by_one = CausalContext::from_dots(a.iter().copied());
            for d in &shuffled {
                one_by_one.insert(*d);
            }
            let mut batched = CausalContext::from_dots(a.iter().copied());
            batched.extend(shuffled);
            prop_assert!(batched.is_canonical());
            prop_assert_eq!(&batched, &one_by_one);

            let (r, first, len) = run;
            let first = Dot::new(ReplicaId(r), first);
            batched.insert_run(first, len);
            for c in first.counter..first.counter + len {
                one_by_one.insert(Dot::new(first.replica, c));
            }
            prop_assert!(batched.is_canonical());
            prop_assert_eq!(batched, one_by_one);
        }
    }

    #[test]
    fn contiguous_dots_compact() {
        let r = ReplicaId(1);
        let cc = CausalContext::from_dots((1..=1000).map(|c| Dot::new(r, c)));
        assert_eq!(cc.range_count(), 1);
        assert_eq!(cc.version_vector().get(r), 1000);
    }
}
