//! Algebraic properties of every CRDT of `lattice_core::crdt`, checked on
//! *reachable* states: three replicas run a random script of operations,
//! delta deliveries (a random subset, in random order, with duplicates) and
//! full-state merges, and the properties are checked on the states and
//! deltas the script produced. Arbitrary structs are not valid CRDT states,
//! so no state is generated any other way.
//!
//! For every type:
//! 1. `join` is commutative, associative and idempotent (and an upper bound);
//! 2. the delta law: `x.join(&d)` for the delta `d` of a mutation at `x` is
//!    the state the mutation intends (checked against a plain model of the
//!    type), and `d` joined into any replica that has seen `x` gives the same
//!    state as shipping the full state `x.join(&d)`;
//! 3. the `novel` law: `a.join(novel(a, b)) == a.join(b)`, and
//!    `novel(a, b).is_none()` iff `a.join(b) == a`;
//! 4. convergence: once every delta has reached every replica (any order,
//!    duplicates allowed), all replicas are equal, equal to the join of the
//!    full states and to the join of all deltas.

// Clippy's `allow-unwrap-in-tests` covers `#[test]` functions only, not
// the helpers of an integration test crate.
#![allow(clippy::unwrap_used)]

use lattice_core::clock::{CausalContext, Dot, Hlc, ReplicaId};
use lattice_core::crdt::{
    Bytes, CCounter, Causal, Crdt, DotMap, DotSet, DotStore, Field, FieldKind, GCounter, Kind, LwwRegister, MvRegister,
    NestedView, Op, OrMap, OrSet, PNCounter, Value, ValueView, WriteStamp, MAX_NESTING,
};
use lattice_core::Error;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;
use proptest::test_runner::TestCaseError;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

const REPLICAS: usize = 3;
const CASES: u32 = 256;
const MAX_STEPS: usize = 40;
const SEED: u64 = 0x1a77_1ce5_eed5;

fn rid(i: usize) -> ReplicaId {
    ReplicaId(i as u64 + 1)
}

/// Joins `d` into an optional state (`None` is bottom), the way a replica
/// stores a key it may not have yet.
fn join_into<S: Crdt>(slot: &mut Option<S>, d: &S) {
    match slot {
        Some(s) => s.join(d),
        None => *slot = Some(d.clone()),
    }
}

fn joined<S: Crdt>(a: &S, b: &S) -> S {
    let mut x = a.clone();
    x.join(b);
    x
}

/// One CRDT type under test: how to generate and run its operations and
/// what each operation is meant to do.
trait Harness {
    type S: Crdt + Debug;
    type Op: Clone + Debug + 'static;

    /// A per-case parameter of the operation generator (e.g. which kinds
    /// the replicas favour).
    fn palette() -> BoxedStrategy<u8> {
        Just(0).boxed()
    }
    fn op(palette: u8) -> BoxedStrategy<Self::Op>;
    /// The delta of `op` at state `cur` (`None`: nothing there yet).
    fn mutate(cur: Option<&Self::S>, op: &Self::Op, stamp: WriteStamp) -> Result<Self::S, Error>;
    /// Asserts that `after` (`before` joined with the delta) is what `op`
    /// intends, and that an error was expected.
    fn check(
        before: Option<&Self::S>,
        op: &Self::Op,
        _stamp: WriteStamp,
        outcome: &Result<Self::S, Error>,
        after: Option<&Self::S>,
    ) -> Result<(), TestCaseError>;
    /// The invariants a state must keep (the checks applied to input from
    /// the network).
    fn well_formed(_s: &Self::S) -> bool {
        true
    }
}

#[derive(Clone, Debug)]
enum Step<O> {
    /// Replica `.0` performs an operation.
    Op(usize, O),
    /// Replica `.0` receives one of the deltas produced so far.
    Deliver(usize, Index),
    /// Replica `.1` joins the full state of replica `.0`.
    Merge(usize, usize),
}

fn script<H: Harness>(merges: bool) -> impl Strategy<Value = Vec<Step<H::Op>>> {
    H::palette().prop_flat_map(move |p| {
        let op = (0..REPLICAS, H::op(p)).prop_map(|(at, o)| Step::Op(at, o));
        let deliver = (0..REPLICAS, any::<Index>()).prop_map(|(to, i)| Step::Deliver(to, i));
        let step = if merges {
            let merge = (0..REPLICAS, 0..REPLICAS).prop_map(|(a, b)| Step::Merge(a, b));
            prop_oneof![5 => op, 3 => deliver, 1 => merge].boxed()
        } else {
            prop_oneof![5 => op, 3 => deliver].boxed()
        };
        proptest::collection::vec(step, 1..MAX_STEPS)
    })
}

/// Three replicas running a script.
struct Run<H: Harness> {
    states: Vec<Option<H::S>>,
    hlcs: Vec<Hlc>,
    /// Every delta produced, in order.
    deltas: Vec<H::S>,
    /// States right after full-state merges.
    snapshots: Vec<H::S>,
    wall: u64,
}

impl<H: Harness> Run<H> {
    fn new() -> Self {
        Run {
            states: vec![None; REPLICAS],
            hlcs: vec![Hlc::new(1_000); REPLICAS],
            deltas: Vec::new(),
            snapshots: Vec::new(),
            wall: 0,
        }
    }

    fn exec(script: &[Step<H::Op>], check: bool) -> Result<Self, TestCaseError> {
        let mut run = Self::new();
        for step in script {
            run.step(step, check)?;
        }
        Ok(run)
    }

    fn step(&mut self, step: &Step<H::Op>, check: bool) -> Result<(), TestCaseError> {
        match step {
            Step::Op(at, op) => {
                self.wall += 1;
                // A coarse wall clock, so that concurrent LWW stamps tie.
                let time = self.hlcs[*at].now(self.wall / 3);
                let stamp = WriteStamp {
                    replica: rid(*at),
                    time,
                };
                let before = self.states[*at].clone();
                let outcome = H::mutate(before.as_ref(), op, stamp);
                if let Ok(d) = &outcome {
                    join_into(&mut self.states[*at], d);
                }
                if check {
                    H::check(before.as_ref(), op, stamp, &outcome, self.states[*at].as_ref())?;
                    if let Ok(d) = &outcome {
                        self.check_delta(*at, before.as_ref(), d)?;
                    }
                }
                if let Ok(d) = outcome {
                    self.deltas.push(d);
                }
            }
            Step::Deliver(to, i) => {
                if !self.deltas.is_empty() {
                    let d = self.deltas[i.index(self.deltas.len())].clone();
                    join_into(&mut self.states[*to], &d);
                }
            }
            Step::Merge(from, to) => {
                if let Some(s) = self.states[*from].clone() {
                    join_into(&mut self.states[*to], &s);
                    self.snapshots.push(s);
                }
            }
        }
        Ok(())
    }

    /// The delta `d` of a mutation at replica `at` whose state was `x`
    /// (the replica's state is now `x ⊔ d`).
    fn check_delta(&self, at: usize, x: Option<&H::S>, d: &H::S) -> Result<(), TestCaseError> {
        let after = self.states[at]
            .as_ref()
            .ok_or_else(|| TestCaseError::fail("no state after a write"))?;
        prop_assert!(H::well_formed(d), "malformed delta {d:?}");
        prop_assert!(H::well_formed(after), "malformed state {after:?}");
        // The state includes its delta.
        prop_assert!(after.novel(d).is_none(), "{after:?} lacks part of its own delta {d:?}");
        // Shipping d or the full state to any replica that has seen x.
        for j in 0..REPLICAS {
            let mut y = self.states[j].clone();
            if let Some(x) = x {
                join_into(&mut y, x);
            }
            let mut by_delta = y.clone();
            join_into(&mut by_delta, d);
            let mut by_state = y;
            join_into(&mut by_state, after);
            prop_assert_eq!(
                by_delta,
                by_state,
                "replica {} (which has seen x) gets different states from d and x ⊔ d",
                j
            );
        }
        Ok(())
    }

    /// Final states, merge snapshots and deltas: a pool of reachable states
    /// of which some include others.
    fn pool(&self) -> Vec<H::S> {
        let mut pool: Vec<H::S> = self.states.iter().flatten().cloned().collect();
        let n = self.snapshots.len();
        pool.extend(self.snapshots[n.saturating_sub(4)..].iter().cloned());
        let n = self.deltas.len();
        pool.extend(self.deltas.iter().step_by(n / 4 + 1).cloned());
        pool
    }
}

fn check_lattice_laws<H: Harness>(
    script: &[Step<H::Op>],
    picks: &[(Index, Index, Index)],
) -> Result<(), TestCaseError> {
    let run = Run::<H>::exec(script, false)?;
    let pool = run.pool();
    if pool.is_empty() {
        return Ok(());
    }
    for (i, j, k) in picks {
        let a = &pool[i.index(pool.len())];
        let b = &pool[j.index(pool.len())];
        let c = &pool[k.index(pool.len())];
        prop_assert!(H::well_formed(a), "malformed reachable state {a:?}");
        // Idempotent.
        prop_assert_eq!(&joined(a, a), a);
        // Commutative.
        let ab = joined(a, b);
        prop_assert_eq!(&ab, &joined(b, a));
        prop_assert!(H::well_formed(&ab), "malformed join {ab:?}");
        // An upper bound of both.
        prop_assert_eq!(&joined(&ab, a), &ab);
        prop_assert_eq!(&joined(&ab, b), &ab);
        // Associative.
        prop_assert_eq!(joined(&ab, c), joined(a, &joined(b, c)));
    }
    Ok(())
}

fn check_delta_law<H: Harness>(script: &[Step<H::Op>]) -> Result<(), TestCaseError> {
    Run::<H>::exec(script, true).map(|_| ())
}

fn novel_pair<H: Harness>(a: &H::S, b: &H::S) -> Result<(), TestCaseError> {
    let ab = joined(a, b);
    match a.novel(b) {
        None => prop_assert_eq!(&ab, a, "novel is None but b adds to a; b = {:?}", b),
        Some(n) => {
            prop_assert!(ab != *a, "novel is Some({:?}) but b is included in a = {:?}", n, a);
            prop_assert!(H::well_formed(&n), "malformed novel part {n:?}");
            prop_assert_eq!(
                joined(a, &n),
                ab.clone(),
                "a ⊔ novel(a, b) != a ⊔ b for a = {:?}, b = {:?}",
                a,
                b
            );
        }
    }
    // The join includes both sides.
    prop_assert!(ab.novel(a).is_none() && ab.novel(b).is_none());
    Ok(())
}

fn check_novel_law<H: Harness>(script: &[Step<H::Op>], picks: &[(Index, Index, Index)]) -> Result<(), TestCaseError> {
    let run = Run::<H>::exec(script, false)?;
    let pool = run.pool();
    if pool.is_empty() {
        return Ok(());
    }
    for (i, j, _) in picks {
        novel_pair::<H>(&pool[i.index(pool.len())], &pool[j.index(pool.len())])?;
    }
    // Each final state against each delta (some included, some not).
    for s in run.states.iter().flatten() {
        for d in run.deltas.iter().rev().take(6) {
            novel_pair::<H>(s, d)?;
            novel_pair::<H>(d, s)?;
        }
    }
    Ok(())
}

fn shuffle(v: &mut [usize], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn check_convergence<H: Harness>(script: &[Step<H::Op>], seed: u64) -> Result<(), TestCaseError> {
    let mut run = Run::<H>::exec(script, false)?;
    // What a full-state exchange would give.
    let mut full = None;
    for s in run.states.iter().flatten() {
        join_into(&mut full, s);
    }
    // Every delta to every replica, in a random order with duplicates.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = run.deltas.len();
    for r in 0..REPLICAS {
        let mut order: Vec<usize> = (0..n).collect();
        if n > 0 {
            for _ in 0..(rng.next_u64() % 4) {
                order.push((rng.next_u64() % n as u64) as usize);
            }
        }
        shuffle(&mut order, &mut rng);
        for i in order {
            let d = run.deltas[i].clone();
            join_into(&mut run.states[r], &d);
        }
    }
    prop_assert_eq!(&run.states[0], &run.states[1]);
    prop_assert_eq!(&run.states[1], &run.states[2]);
    prop_assert_eq!(&run.states[0], &full, "delta exchange and full-state exchange differ");
    let mut all = None;
    for d in &run.deltas {
        join_into(&mut all, d);
    }
    prop_assert_eq!(&run.states[0], &all, "converged state is not the join of all deltas");
    if let Some(s) = &run.states[0] {
        prop_assert!(H::well_formed(s), "malformed converged state {s:?}");
    }
    Ok(())
}

fn config() -> ProptestConfig {
    // Deterministic: a fixed seed and case count unless PROPTEST_RNG_SEED or
    // PROPTEST_CASES say otherwise (to explore further); no regression files.
    let base = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            base.cases
        } else {
            CASES
        },
        rng_seed: match base.rng_seed {
            RngSeed::Random => RngSeed::Fixed(SEED),
            fixed => fixed,
        },
        failure_persistence: None,
        ..base
    }
}

fn picks() -> impl Strategy<Value = Vec<(Index, Index, Index)>> {
    proptest::collection::vec(any::<(Index, Index, Index)>(), 12)
}

macro_rules! crdt_laws {
    ($name:ident, $h:ty) => {
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn join_is_commutative_associative_idempotent(s in script::<$h>(true), p in picks()) {
                    check_lattice_laws::<$h>(&s, &p)?;
                }

                #[test]
                fn delta_law(s in script::<$h>(true)) {
                    check_delta_law::<$h>(&s)?;
                }

                #[test]
                fn novel_law(s in script::<$h>(true), p in picks()) {
                    check_novel_law::<$h>(&s, &p)?;
                }

                #[test]
                fn replicas_converge(s in script::<$h>(false), seed in any::<u64>()) {
                    check_convergence::<$h>(&s, seed)?;
                }
            }
        }
    };
}

// ---------------------------------------------------------------- counters

struct GCounterH;
impl Harness for GCounterH {
    type S = GCounter;
    type Op = u64;
    fn op(_: u8) -> BoxedStrategy<u64> {
        prop_oneof![1 => Just(0u64), 6 => 1u64..10, 1 => Just(u64::MAX / 4)].boxed()
    }
    fn mutate(cur: Option<&GCounter>, op: &u64, stamp: WriteStamp) -> Result<GCounter, Error> {
        Ok(cur.cloned().unwrap_or_default().inc(stamp.replica, *op))
    }
    fn check(
        before: Option<&GCounter>,
        op: &u64,
        stamp: WriteStamp,
        _outcome: &Result<GCounter, Error>,
        after: Option<&GCounter>,
    ) -> Result<(), TestCaseError> {
        let before = before.cloned().unwrap_or_default();
        let after = after.cloned().unwrap_or_default();
        // The writer's entry grows by `op`, saturating at u64::MAX.
        let r = stamp.replica;
        let entry = before.get(r).saturating_add(*op);
        prop_assert_eq!(after.get(r), entry);
        prop_assert_eq!(
            after.value(),
            before.value() - u128::from(before.get(r)) + u128::from(entry)
        );
        Ok(())
    }
}
crdt_laws!(gcounter, GCounterH);

struct PnCounterH;
impl Harness for PnCounterH {
    type S = PNCounter;
    type Op = i64;
    fn op(_: u8) -> BoxedStrategy<i64> {
        prop_oneof![6 => -9i64..10, 1 => Just(i64::MIN), 1 => Just(i64::MAX)].boxed()
    }
    fn mutate(cur: Option<&PNCounter>, op: &i64, stamp: WriteStamp) -> Result<PNCounter, Error> {
        Ok(cur.cloned().unwrap_or_default().add(stamp.replica, *op))
    }
    fn check(
        before: Option<&PNCounter>,
        op: &i64,
        _stamp: WriteStamp,
        outcome: &Result<PNCounter, Error>,
        after: Option<&PNCounter>,
    ) -> Result<(), TestCaseError> {
        let before = before.cloned().unwrap_or_default();
        let after = after.cloned().unwrap_or_default();
        let d = outcome.as_ref().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let change = after.value() - before.value();
        if d.value().unsigned_abs() == u128::from(u64::MAX) {
            // The writer's half saturated at u64::MAX: part of `op` counts.
            prop_assert!(change.signum() != -i128::from(op.signum()) && change.abs() <= i128::from(*op).abs());
        } else {
            prop_assert_eq!(change, i128::from(*op));
        }
        Ok(())
    }
}
crdt_laws!(pncounter, PnCounterH);

#[derive(Clone, Debug)]
enum CounterOp {
    Add(i64),
    Reset,
}

struct CCounterH;
impl Harness for CCounterH {
    type S = CCounter;
    type Op = CounterOp;
    fn op(_: u8) -> BoxedStrategy<CounterOp> {
        prop_oneof![5 => (-9i64..10).prop_map(CounterOp::Add), 1 => Just(CounterOp::Reset)].boxed()
    }
    fn mutate(cur: Option<&CCounter>, op: &CounterOp, stamp: WriteStamp) -> Result<CCounter, Error> {
        let c = cur.cloned().unwrap_or_default();
        match op {
            CounterOp::Add(n) => c.try_add(stamp.replica, *n).ok_or(Error::CounterOverflow),
            CounterOp::Reset => Ok(c.reset()),
        }
    }
    fn check(
        before: Option<&CCounter>,
        op: &CounterOp,
        _stamp: WriteStamp,
        outcome: &Result<CCounter, Error>,
        after: Option<&CCounter>,
    ) -> Result<(), TestCaseError> {
        prop_assert!(outcome.is_ok());
        let before = before.cloned().unwrap_or_default();
        let after = after.cloned().unwrap_or_default();
        match op {
            CounterOp::Add(n) => prop_assert_eq!(after.value(), before.value() + i128::from(*n)),
            CounterOp::Reset => {
                prop_assert_eq!(after.value(), 0);
                prop_assert!(after.causal().store().is_empty());
            }
        }
        Ok(())
    }
    fn well_formed(s: &CCounter) -> bool {
        s.causal().is_well_formed()
    }
}
crdt_laws!(ccounter, CCounterH);

// --------------------------------------------------------------- registers

struct LwwH;
impl Harness for LwwH {
    type S = LwwRegister<u8>;
    type Op = u8;
    fn op(_: u8) -> BoxedStrategy<u8> {
        (0u8..4).boxed()
    }
    fn mutate(cur: Option<&LwwRegister<u8>>, op: &u8, stamp: WriteStamp) -> Result<LwwRegister<u8>, Error> {
        let r = cur.cloned().unwrap_or_default();
        Ok(r.set(r.stamp_after(stamp.time), stamp.replica, *op))
    }
    fn check(
        before: Option<&LwwRegister<u8>>,
        op: &u8,
        stamp: WriteStamp,
        outcome: &Result<LwwRegister<u8>, Error>,
        after: Option<&LwwRegister<u8>>,
    ) -> Result<(), TestCaseError> {
        let after = after.ok_or_else(|| TestCaseError::fail("no state"))?;
        // The local write wins over everything its writer had seen: the
        // state becomes the delta itself.
        prop_assert_eq!(Some(after), outcome.as_ref().ok());
        prop_assert_eq!(after.get(), Some(op));
        prop_assert_eq!(after.stamp().map(|(_, r)| r), Some(stamp.replica));
        if let Some((t, _)) = before.and_then(LwwRegister::stamp) {
            prop_assert!(after.stamp().is_some_and(|(t2, _)| t2 > t));
        }
        Ok(())
    }
}
crdt_laws!(lww_u8, LwwH);

/// The same register holding byte strings, written with stamps that often
/// tie (the HLC is only consulted through `stamp_after`).
struct LwwBytesH;
impl Harness for LwwBytesH {
    type S = LwwRegister<Bytes>;
    type Op = (u8, Bytes);
    fn op(_: u8) -> BoxedStrategy<(u8, Bytes)> {
        (
            0u8..3,
            prop_oneof![Just(Bytes::from("x")), Just(Bytes::from("y")), Just(Bytes(vec![0xff]))],
        )
            .boxed()
    }
    fn mutate(
        cur: Option<&LwwRegister<Bytes>>,
        op: &(u8, Bytes),
        stamp: WriteStamp,
    ) -> Result<LwwRegister<Bytes>, Error> {
        let r = cur.cloned().unwrap_or_default();
        let mut t = stamp.time;
        t.wall_ms = u64::from(op.0);
        t.logical = 0;
        Ok(r.set(r.stamp_after(t), stamp.replica, op.1.clone()))
    }
    fn check(
        _before: Option<&LwwRegister<Bytes>>,
        op: &(u8, Bytes),
        _stamp: WriteStamp,
        _outcome: &Result<LwwRegister<Bytes>, Error>,
        after: Option<&LwwRegister<Bytes>>,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(after.and_then(LwwRegister::get), Some(&op.1));
        Ok(())
    }
}
crdt_laws!(lww_bytes, LwwBytesH);

#[derive(Clone, Debug)]
enum MvOp {
    Write(u8),
    Clear,
}

struct MvH;
impl Harness for MvH {
    type S = MvRegister<u8>;
    type Op = MvOp;
    fn op(_: u8) -> BoxedStrategy<MvOp> {
        prop_oneof![5 => (0u8..4).prop_map(MvOp::Write), 1 => Just(MvOp::Clear)].boxed()
    }
    fn mutate(cur: Option<&MvRegister<u8>>, op: &MvOp, stamp: WriteStamp) -> Result<MvRegister<u8>, Error> {
        let r = cur.cloned().unwrap_or_default();
        Ok(match op {
            MvOp::Write(v) => r.write(stamp.replica, *v),
            MvOp::Clear => r.clear(),
        })
    }
    fn check(
        _before: Option<&MvRegister<u8>>,
        op: &MvOp,
        _stamp: WriteStamp,
        _outcome: &Result<MvRegister<u8>, Error>,
        after: Option<&MvRegister<u8>>,
    ) -> Result<(), TestCaseError> {
        let after = after.cloned().unwrap_or_default();
        match op {
            MvOp::Write(v) => prop_assert_eq!(after.values(), vec![v]),
            MvOp::Clear => prop_assert!(after.values().is_empty()),
        }
        Ok(())
    }
    fn well_formed(s: &MvRegister<u8>) -> bool {
        s.causal().is_well_formed()
    }
}
crdt_laws!(mvregister, MvH);

// -------------------------------------------------------------------- sets

#[derive(Clone, Debug)]
enum SetOp {
    Add(u8),
    Remove(u8),
    Clear,
}

struct OrSetH;
impl Harness for OrSetH {
    type S = OrSet<u8>;
    type Op = SetOp;
    fn op(_: u8) -> BoxedStrategy<SetOp> {
        prop_oneof![
            5 => (0u8..5).prop_map(SetOp::Add),
            3 => (0u8..5).prop_map(SetOp::Remove),
            1 => Just(SetOp::Clear),
        ]
        .boxed()
    }
    fn mutate(cur: Option<&OrSet<u8>>, op: &SetOp, stamp: WriteStamp) -> Result<OrSet<u8>, Error> {
        let s = cur.cloned().unwrap_or_default();
        Ok(match op {
            SetOp::Add(e) => s.add(stamp.replica, *e),
            SetOp::Remove(e) => s.remove(e),
            SetOp::Clear => s.clear(),
        })
    }
    fn check(
        before: Option<&OrSet<u8>>,
        op: &SetOp,
        _stamp: WriteStamp,
        _outcome: &Result<OrSet<u8>, Error>,
        after: Option<&OrSet<u8>>,
    ) -> Result<(), TestCaseError> {
        let mut model: BTreeSet<u8> = before.map(|s| s.iter().copied().collect()).unwrap_or_default();
        match op {
            SetOp::Add(e) => {
                model.insert(*e);
            }
            SetOp::Remove(e) => {
                model.remove(e);
            }
            SetOp::Clear => model.clear(),
        }
        let got: BTreeSet<u8> = after.map(|s| s.iter().copied().collect()).unwrap_or_default();
        prop_assert_eq!(got, model);
        Ok(())
    }
    fn well_formed(s: &OrSet<u8>) -> bool {
        s.causal().is_well_formed() && s.causal().store().iter().all(|(_, d)| !DotStore::is_empty(d))
    }
}
crdt_laws!(orset, OrSetH);

// -------------------------------------------------------------------- maps

/// A map of sets: `OrMap<u8, DotMap<u8, DotSet>>`.
type MapOfSets = OrMap<u8, DotMap<u8, DotSet>>;

#[derive(Clone, Debug)]
enum MapOp {
    Add(u8, u8),
    RemoveElem(u8, u8),
    RemoveKey(u8),
}

fn map_view(m: Option<&MapOfSets>) -> BTreeMap<u8, BTreeSet<u8>> {
    m.map(|m| {
        m.iter()
            .map(|(k, s)| (*k, s.iter().map(|(e, _)| *e).collect()))
            .collect()
    })
    .unwrap_or_default()
}

struct OrMapH;
impl Harness for OrMapH {
    type S = MapOfSets;
    type Op = MapOp;
    fn op(_: u8) -> BoxedStrategy<MapOp> {
        prop_oneof![
            5 => (0u8..3, 0u8..3).prop_map(|(k, e)| MapOp::Add(k, e)),
            2 => (0u8..3, 0u8..3).prop_map(|(k, e)| MapOp::RemoveElem(k, e)),
            2 => (0u8..3).prop_map(MapOp::RemoveKey),
        ]
        .boxed()
    }
    fn mutate(cur: Option<&MapOfSets>, op: &MapOp, stamp: WriteStamp) -> Result<MapOfSets, Error> {
        let m = cur.cloned().unwrap_or_default();
        Ok(match op {
            MapOp::Add(k, e) => m.update(*k, |set, ctx| OrSet::<u8>::add_to(set, ctx, stamp.replica, *e)),
            MapOp::RemoveElem(k, e) => m.update(*k, |set, _| {
                let mut dots = Vec::new();
                if let Some(d) = set.get(e) {
                    d.for_each_dot(&mut |dot: Dot| dots.push(dot));
                }
                Causal::from_parts(DotMap::empty(), CausalContext::from_dots(dots))
            }),
            MapOp::RemoveKey(k) => m.remove(k),
        })
    }
    fn check(
        before: Option<&MapOfSets>,
        op: &MapOp,
        _stamp: WriteStamp,
        _outcome: &Result<MapOfSets, Error>,
        after: Option<&MapOfSets>,
    ) -> Result<(), TestCaseError> {
        let mut model = map_view(before);
        match op {
            MapOp::Add(k, e) => {
                model.entry(*k).or_default().insert(*e);
            }
            MapOp::RemoveElem(k, e) => {
                if let Some(s) = model.get_mut(k) {
                    s.remove(e);
                    if s.is_empty() {
                        model.remove(k);
                    }
                }
            }
            MapOp::RemoveKey(k) => {
                model.remove(k);
            }
        }
        prop_assert_eq!(map_view(after), model);
        Ok(())
    }
    fn well_formed(m: &MapOfSets) -> bool {
        m.causal().is_well_formed()
            && m.iter()
                .all(|(_, s)| !DotStore::is_empty(s) && s.iter().all(|(_, d)| !DotStore::is_empty(d)))
    }
}
crdt_laws!(ormap, OrMapH);

// ---------------------------------------------------------- keyspace Value

const KINDS: [Kind; 7] = [
    Kind::GCounter,
    Kind::PnCounter,
    Kind::Counter,
    Kind::Lww,
    Kind::MvRegister,
    Kind::Set,
    Kind::Map,
];
const FIELD_KINDS: [FieldKind; 4] = [FieldKind::Counter, FieldKind::Register, FieldKind::Set, FieldKind::Map];

fn elem() -> impl Strategy<Value = Bytes> {
    prop_oneof![Just(Bytes::from("a")), Just(Bytes::from("b")), Just(Bytes::from("c"))]
}

fn elems() -> impl Strategy<Value = Vec<Bytes>> {
    proptest::collection::vec(elem(), 0..3)
}

fn field() -> impl Strategy<Value = Field> {
    (prop_oneof![Just("x"), Just("y")], 0..FIELD_KINDS.len()).prop_map(|(n, k)| Field::new(n, FIELD_KINDS[k]))
}

/// An operation for a map field of kind `kind`; `depth` bounds how many
/// further `MapApply` levels it may hold.
fn field_op_for(kind: FieldKind, depth: u32) -> BoxedStrategy<Op> {
    match kind {
        FieldKind::Counter => (-3i64..4).prop_map(Op::CounterAdd).boxed(),
        FieldKind::Register => elem().prop_map(Op::MvSet).boxed(),
        FieldKind::Set => prop_oneof![3 => elems().prop_map(Op::SetAdd), 2 => elems().prop_map(Op::SetRemove)].boxed(),
        FieldKind::Map if depth == 0 => field().prop_map(Op::MapRemove).boxed(),
        FieldKind::Map => prop_oneof![
            3 => map_apply(depth - 1),
            1 => field().prop_map(Op::MapRemove),
        ]
        .boxed(),
    }
}

/// `Op::MapApply` on a random field, usually with an operation of the
/// field's kind, sometimes a delete, sometimes a deliberately wrong one.
fn map_apply(depth: u32) -> BoxedStrategy<Op> {
    field()
        .prop_flat_map(move |f| {
            let wrong = prop_oneof![
                (-3i64..4).prop_map(Op::CounterAdd),
                elem().prop_map(Op::MvSet),
                elems().prop_map(Op::SetAdd),
                field().prop_map(Op::MapRemove),
                elem().prop_map(Op::LwwSet),
                (0u64..3).prop_map(Op::GCounterInc),
            ];
            let op = prop_oneof![12 => field_op_for(f.kind, depth), 1 => Just(Op::Delete), 1 => wrong];
            (Just(f), op)
        })
        .prop_map(|(field, op)| Op::MapApply {
            field,
            op: Box::new(op),
        })
        .boxed()
}

fn value_op_of(kind: Kind) -> BoxedStrategy<Op> {
    match kind {
        Kind::GCounter => (0u64..4).prop_map(Op::GCounterInc).boxed(),
        Kind::PnCounter => (-3i64..4).prop_map(Op::PnCounterAdd).boxed(),
        Kind::Counter => (-3i64..4).prop_map(Op::CounterAdd).boxed(),
        Kind::Lww => elem().prop_map(Op::LwwSet).boxed(),
        Kind::MvRegister => elem().prop_map(Op::MvSet).boxed(),
        Kind::Set => prop_oneof![3 => elems().prop_map(Op::SetAdd), 2 => elems().prop_map(Op::SetRemove)].boxed(),
        Kind::Map => prop_oneof![5 => map_apply(2), 1 => field().prop_map(Op::MapRemove)].boxed(),
    }
}

struct ValueH;
impl Harness for ValueH {
    type S = Value;
    type Op = Op;
    /// Two favoured kinds (maps most often), so that replicas create the
    /// same key with different kinds and conflicts arise.
    fn palette() -> BoxedStrategy<u8> {
        (prop_oneof![3 => Just(6u8), 4 => 0u8..7], 0u8..7)
            .prop_map(|(a, b)| a * 8 + b)
            .boxed()
    }
    fn op(palette: u8) -> BoxedStrategy<Op> {
        let (a, b) = (KINDS[usize::from(palette / 8)], KINDS[usize::from(palette % 8)]);
        let any_kind = (0..KINDS.len()).prop_flat_map(|k| value_op_of(KINDS[k]));
        prop_oneof![
            8 => value_op_of(a),
            5 => value_op_of(b),
            1 => any_kind,
            1 => Just(Op::Delete),
        ]
        .boxed()
    }
    fn mutate(cur: Option<&Value>, op: &Op, stamp: WriteStamp) -> Result<Value, Error> {
        Value::apply(cur, op, stamp)
    }
    fn check(
        before: Option<&Value>,
        op: &Op,
        _stamp: WriteStamp,
        outcome: &Result<Value, Error>,
        after: Option<&Value>,
    ) -> Result<(), TestCaseError> {
        check_value_op(before, op, outcome, after)
    }
    fn well_formed(v: &Value) -> bool {
        v.is_well_formed()
    }
}
crdt_laws!(value, ValueH);

// A plain model of `Value::apply`, on views.

fn parts(v: &Value) -> Vec<&Value> {
    match v {
        Value::Conflict(ps) => ps.iter().collect(),
        v => vec![v],
    }
}

fn part_views(v: Option<&Value>) -> BTreeMap<Kind, ValueView> {
    v.map(|v| {
        parts(v)
            .into_iter()
            .filter_map(|p| Some((p.kind()?, p.view())))
            .collect()
    })
    .unwrap_or_default()
}

fn field_kind_of(op: &Op) -> Option<FieldKind> {
    match op {
        Op::CounterAdd(_) => Some(FieldKind::Counter),
        Op::MvSet(_) => Some(FieldKind::Register),
        Op::SetAdd(_) | Op::SetRemove(_) => Some(FieldKind::Set),
        Op::MapApply { .. } | Op::MapRemove(_) => Some(FieldKind::Map),
        _ => None,
    }
}

fn set_union(s: &[Bytes], add: &[Bytes]) -> Vec<Bytes> {
    s.iter()
        .chain(add)
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn set_minus(s: &[Bytes], rm: &[Bytes]) -> Vec<Bytes> {
    s.iter().filter(|e| !rm.contains(e)).cloned().collect()
}

/// The model of an operation on a map field at `depth` (the top-level map
/// is depth 1): the field's view afterwards, `None` when it is gone.
fn model_field(cur: Option<&NestedView>, field: &Field, op: &Op, depth: usize) -> Result<Option<NestedView>, Error> {
    if matches!(op, Op::Delete) {
        return Ok(None);
    }
    let Some(want) = field_kind_of(op) else {
        return Err(Error::InvalidOp(String::new()));
    };
    if want != field.kind {
        return Err(Error::FieldTypeMismatch {
            field: field.name.clone(),
            expected: field.kind,
            found: want,
        });
    }
    let base = cur.cloned().unwrap_or(match field.kind {
        FieldKind::Counter => NestedView::Counter(0),
        FieldKind::Register => NestedView::Values(Vec::new()),
        FieldKind::Set => NestedView::Set(Vec::new()),
        FieldKind::Map => NestedView::Map(BTreeMap::new()),
    });
    let out = match (base, op) {
        (NestedView::Counter(n), Op::CounterAdd(d)) => NestedView::Counter(n + i128::from(*d)),
        (NestedView::Values(_), Op::MvSet(v)) => NestedView::Values(vec![v.clone()]),
        (NestedView::Set(s), Op::SetAdd(es)) => NestedView::Set(set_union(&s, es)),
        (NestedView::Set(s), Op::SetRemove(es)) => NestedView::Set(set_minus(&s, es)),
        (
            NestedView::Map(mut m),
            Op::MapApply {
                field: inner,
                op: inner_op,
            },
        ) => {
            if depth + 1 >= MAX_NESTING {
                return Err(Error::NestingTooDeep { limit: MAX_NESTING });
            }
            match model_field(m.get(inner), inner, inner_op, depth + 1)? {
                Some(v) => m.insert(inner.clone(), v),
                None => m.remove(inner),
            };
            NestedView::Map(m)
        }
        (NestedView::Map(mut m), Op::MapRemove(inner)) => {
            m.remove(inner);
            NestedView::Map(m)
        }
        (b, op) => return Err(Error::InvalidOp(format!("model: {op:?} on {b:?}"))),
    };
    let empty = match &out {
        NestedView::Counter(_) => false,
        NestedView::Values(v) | NestedView::Set(v) => v.is_empty(),
        NestedView::Map(m) => m.is_empty(),
    };
    Ok((!empty).then_some(out))
}

/// The model of a (non-delete) operation on a value of its kind.
fn model_value(view: ValueView, op: &Op) -> Result<ValueView, Error> {
    Ok(match (view, op) {
        (ValueView::Counter(n), Op::GCounterInc(d)) => ValueView::Counter(n + i128::from(*d)),
        (ValueView::Counter(n), Op::PnCounterAdd(d) | Op::CounterAdd(d)) => ValueView::Counter(n + i128::from(*d)),
        (ValueView::Register(_), Op::LwwSet(v)) => ValueView::Register(Some(v.clone())),
        (ValueView::Values(_), Op::MvSet(v)) => ValueView::Values(vec![v.clone()]),
        (ValueView::Set(s), Op::SetAdd(es)) => ValueView::Set(set_union(&s, es)),
        (ValueView::Set(s), Op::SetRemove(es)) => ValueView::Set(set_minus(&s, es)),
        (ValueView::Map(mut m), Op::MapApply { field, op }) => {
            match model_field(m.get(field), field, op, 1)? {
                Some(v) => m.insert(field.clone(), v),
                None => m.remove(field),
            };
            ValueView::Map(m)
        }
        (ValueView::Map(mut m), Op::MapRemove(f)) => {
            m.remove(f);
            ValueView::Map(m)
        }
        (v, op) => return Err(Error::InvalidOp(format!("model: {op:?} on {v:?}"))),
    })
}

fn is_counter_only(k: Kind) -> bool {
    matches!(k, Kind::GCounter | Kind::PnCounter)
}

/// The model of `Value::apply` followed by the join: the view of each part
/// (by kind) afterwards, or the error `apply` must return.
fn model_apply(before: Option<&Value>, op: &Op) -> Result<BTreeMap<Kind, ValueView>, Error> {
    let mut views = part_views(before);
    match op.kind() {
        None => {
            if before.is_none() {
                return Err(Error::NotFound);
            }
            let deletable: Vec<Kind> = views.keys().copied().filter(|k| !is_counter_only(*k)).collect();
            if deletable.is_empty() {
                // Only grow-only and PN counters: nothing can be deleted.
                let kind = views.keys().next().copied().unwrap_or(Kind::GCounter);
                return Err(Error::Unsupported { op: "delete", kind });
            }
            for k in deletable {
                views.insert(k, Value::empty(k).view());
            }
        }
        Some(k) => {
            if let Some(vk) = before.and_then(Value::kind) {
                if vk != k {
                    return Err(Error::TypeMismatch { expected: vk, found: k });
                }
            }
            // A conflict takes operations of the kinds it holds, no new one.
            if matches!(before, Some(Value::Conflict(_))) && !views.contains_key(&k) {
                let expected = views.keys().next().copied().unwrap_or(k);
                return Err(Error::TypeMismatch { expected, found: k });
            }
            let base = views.get(&k).cloned().unwrap_or_else(|| Value::empty(k).view());
            views.insert(k, model_value(base, op)?);
        }
    }
    Ok(views)
}

fn same_error(a: &Error, b: &Error) -> bool {
    match (a, b) {
        (Error::InvalidOp(_), Error::InvalidOp(_)) => true,
        _ => a == b,
    }
}

fn check_value_op(
    before: Option<&Value>,
    op: &Op,
    outcome: &Result<Value, Error>,
    after: Option<&Value>,
) -> Result<(), TestCaseError> {
    match (model_apply(before, op), outcome) {
        (Err(want), Err(got)) => {
            prop_assert!(
                same_error(&want, got),
                "{op:?} on {before:?}: expected {want:?}, got {got:?}"
            );
            prop_assert_eq!(before, after, "a refused op changed the value");
        }
        (Err(want), Ok(d)) => {
            return Err(TestCaseError::fail(format!(
                "{op:?} on {before:?}: expected {want:?}, got delta {d:?}"
            )))
        }
        (Ok(_), Err(got)) => return Err(TestCaseError::fail(format!("{op:?} on {before:?}: unexpected {got:?}"))),
        (Ok(want), Ok(_)) => {
            prop_assert_eq!(part_views(after), want, "{:?} on {:?}", op, before);
            // Parts of other kinds are untouched (a delete leaves only the
            // counters that cannot be deleted).
            let touched = |p: &Value| match op.kind() {
                Some(k) => p.kind() == Some(k),
                None => !p.kind().is_some_and(is_counter_only),
            };
            let untouched = |v: Option<&Value>| -> Vec<Value> {
                v.map(|v| parts(v).into_iter().filter(|p| !touched(p)).cloned().collect())
                    .unwrap_or_default()
            };
            prop_assert_eq!(untouched(before), untouched(after));
            let after = after.ok_or_else(|| TestCaseError::fail("no value after a write"))?;
            prop_assert!(after.depth() < MAX_NESTING);
        }
    }
    Ok(())
}
