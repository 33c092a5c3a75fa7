//! A linearizability checker for recorded histories, one object at a time.
//!
//! Linearizability is compositional (Herlihy & Wing; Horn & Kroening call the per-key split
//! P-compositionality): a history over many independent objects is linearizable iff each object's
//! sub-history is. So histories are recorded and checked per object.
//!
//! The search is Wing & Gong's, with Lowe's memoization ("Testing for linearizability", 2017):
//! the history is a time-ordered list of call and return events; the search repeatedly picks an
//! operation whose call comes before the first remaining return (no pending operation responded
//! before it was invoked), applies it to the sequential model, and removes its events from the
//! list. Reaching a configuration where no candidate applies is a dead end and the search
//! backtracks. Each configuration (set of linearized operations as a bitset, model state) is
//! explored at most once: a second visit would explore exactly the same subtree.
//!
//! Operations whose outcome is unknown (timeout, connection error) may take effect at any point
//! after their invocation or never. They have no return event (response time = infinity) and the
//! search succeeds once every completed operation is linearized: the ones left over "never
//! happened" (equivalently, took effect after everything else).
//!
//! Orderings that cannot change the verdict are not explored:
//! - candidates are tried in order of response (the most urgent first), except that when the most
//!   urgent one does not apply, those after which it would apply come first; unknown-outcome ones
//!   come only after the completed ones;
//! - a read-only candidate consistent with the current state is linearized at once without
//!   trying alternatives: it can be moved to the front of any linearization of the rest;
//! - an unknown-outcome operation is not linearized if it changes nothing, or erases the effect
//!   of the unknown-outcome operation linearized just before it, or another one with the same
//!   input invoked later is also available (using that one leaves more options);
//! - a configuration is hopeless if one with the same completed operations and state but a subset
//!   of its unknown-outcome operations already failed.
//!
//! Without the last two, every unknown write that nobody observed would multiply the work after
//! each backtrack.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Debug, Write as _};
use std::hash::{BuildHasherDefault, DefaultHasher, Hash, Hasher};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// A sequential specification. Models are deterministic: an input applied to a state leads to at
/// most one next state.
pub trait Model {
    type State: Clone + Eq + Hash + Debug;
    type Input: Clone + Debug + PartialEq;
    type Output: Clone + Debug;

    fn init() -> Self::State;

    /// The state after applying `input` to `state`, or `None` if the model cannot produce
    /// `output` from `state`. `output` is `None` for an operation whose outcome is unknown: any
    /// output is accepted.
    fn step(
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;

    /// True if `input` never changes the state, whatever the state (it must be exact: the search
    /// relies on it). Such operations with an unknown outcome are dropped before checking, and
    /// completed ones are linearized as early as they can be.
    fn is_read_only(_input: &Self::Input) -> bool {
        false
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<O> {
    /// The response arrived at `at` (same clock as the invocation) carrying `output`.
    Completed { at: u64, output: O },
    /// No response: the operation may have taken effect at any point after its invocation, or
    /// never.
    Unknown,
}

/// One operation on one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op<I, O> {
    pub client: u64,
    /// Invocation time (nanoseconds on a monotonic clock; any unit works if consistent).
    pub invoked: u64,
    pub input: I,
    pub outcome: Outcome<O>,
}

impl<I, O> Op<I, O> {
    pub fn completed(client: u64, invoked: u64, responded: u64, input: I, output: O) -> Self {
        Op {
            client,
            invoked,
            input,
            outcome: Outcome::Completed {
                at: responded,
                output,
            },
        }
    }

    pub fn unknown(client: u64, invoked: u64, input: I) -> Self {
        Op {
            client,
            invoked,
            input,
            outcome: Outcome::Unknown,
        }
    }

    fn output(&self) -> Option<&O> {
        match &self.outcome {
            Outcome::Completed { output, .. } => Some(output),
            Outcome::Unknown => None,
        }
    }
}

/// An operation on an object of model `M`.
pub type ModelOp<M> = Op<<M as Model>::Input, <M as Model>::Output>;

/// The operations of each object, by object name.
pub type Histories<M> = BTreeMap<String, Vec<ModelOp<M>>>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    /// `explanation` names the operation that could not be ordered and what the search knew at
    /// that point.
    NotLinearizable {
        explanation: String,
    },
    /// The search explored `steps` steps without deciding.
    Inconclusive {
        steps: u64,
    },
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckResult::Linearizable)
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Linearizable => write!(f, "linearizable"),
            CheckResult::NotLinearizable { explanation } => {
                write!(f, "not linearizable: {explanation}")
            }
            CheckResult::Inconclusive { steps } => write!(
                f,
                "inconclusive: search budget exceeded ({steps} steps explored)"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Models

/// A read/write register, initially `None` (never written).
pub struct Register<V>(PhantomData<V>);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegisterOp<V> {
    Write(V),
    Read,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegisterRet<V> {
    /// A write was acknowledged.
    Written,
    /// A read saw this value (`None`: never written).
    Read(Option<V>),
}

impl<V: Clone + Eq + Hash + Debug> Model for Register<V> {
    type State = Option<V>;
    type Input = RegisterOp<V>;
    type Output = RegisterRet<V>;

    fn init() -> Option<V> {
        None
    }

    fn step(
        state: &Option<V>,
        input: &RegisterOp<V>,
        output: Option<&RegisterRet<V>>,
    ) -> Option<Option<V>> {
        match (input, output) {
            (RegisterOp::Write(v), None | Some(RegisterRet::Written)) => Some(Some(v.clone())),
            (RegisterOp::Read, None) => Some(state.clone()),
            (RegisterOp::Read, Some(RegisterRet::Read(seen))) => {
                (seen == state).then(|| state.clone())
            }
            // An output of the wrong kind for the input: no state produces it.
            _ => None,
        }
    }

    fn is_read_only(input: &RegisterOp<V>) -> bool {
        matches!(input, RegisterOp::Read)
    }
}

/// A counter starting at 0. `Increment` returns the value after incrementing (the first returns
/// 1), `Read` returns the current value. Both outputs are the `u64` value.
pub struct Counter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CounterOp {
    Increment,
    Read,
}

impl Model for Counter {
    type State = u64;
    type Input = CounterOp;
    type Output = u64;

    fn init() -> u64 {
        0
    }

    fn step(state: &u64, input: &CounterOp, output: Option<&u64>) -> Option<u64> {
        let next = match input {
            CounterOp::Increment => state + 1,
            CounterOp::Read => *state,
        };
        match output {
            Some(&seen) if seen != next => None,
            _ => Some(next),
        }
    }

    fn is_read_only(input: &CounterOp) -> bool {
        matches!(input, CounterOp::Read)
    }
}

// ---------------------------------------------------------------------------------------------
// The search

/// A search budget for [`check`]: a few seconds at most on hopeless histories, even in a debug
/// build, and under 100 MB of memo.
pub const DEFAULT_BUDGET: u64 = 2_000_000;

/// Checks one object's history. `budget` bounds the number of search steps (a step tries one
/// candidate operation or backtracks once); past it the result is `Inconclusive`. The memo grows
/// by at most one entry per step (tens of bytes, more with high concurrency).
///
/// Panics if a completed operation responded before it was invoked.
pub fn check<M: Model>(history: &[ModelOp<M>], budget: u64) -> CheckResult {
    Search::<M>::new(history).run(budget)
}

/// Checks every object of a per-object history (see [`History::per_object`]).
pub fn check_all<M: Model>(objects: &Histories<M>, budget: u64) -> BTreeMap<String, CheckResult> {
    objects
        .iter()
        .map(|(key, ops)| (key.clone(), check::<M>(ops, budget)))
        .collect()
}

/// A node of the search tree: a configuration (the operations linearized so far and the model
/// state) and the exploration of its children.
struct Node<S> {
    /// How the search got here; `None` at the root.
    arrival: Option<Arrival<S>>,
    /// The first return event left in the list: the pending completed operation that responded
    /// earliest. Only operations invoked no later than it can come next.
    barrier: usize,
    /// Operations to try next, in order; unknown-outcome ones are appended once the completed
    /// ones are exhausted.
    candidates: Vec<usize>,
    tried: usize,
    unknown_added: bool,
}

struct Arrival<S> {
    op: usize,
    state_before: S,
    /// This configuration's memo entry: (key, index in the bucket).
    visited: (u64, usize),
}

/// A configuration the search has entered: linearized operations (completed and unknown-outcome
/// ones as separate bitsets) and the model state. `failed` once its whole subtree was explored.
///
/// Completed operations are numbered in order of invocation, and all those before the earliest
/// one not linearized are linearized: only the words of the bitset from that one's to the last
/// nonzero word are stored, so an entry's size depends on the concurrency, not the history length.
struct Visited<S> {
    known_from: usize,
    known: Box<[u64]>,
    unknown: Box<[u64]>,
    state: S,
    failed: bool,
}

fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x & !y == 0)
}

fn flip(bits: &mut [u64], i: usize) {
    bits[i / 64] ^= 1 << (i % 64);
}

/// The furthest dead end: no continuation linearizes the barrier operation.
struct Blocked<S> {
    /// Return event that stopped the search (events are numbered in time order).
    event: usize,
    states: Vec<S>,
    linearized: usize,
    path_tail: Vec<usize>,
    pending: Vec<usize>,
}

/// A hasher for keys that already are good 64-bit hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Per-operation random keys: the hash of a set of operations is the XOR of its members' keys, so
/// adding or removing one operation updates it in O(1).
fn op_key(i: usize) -> u64 {
    // splitmix64
    let mut z = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn state_hash<S: Hash>(s: &S) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

const DEAD_END_STATES: usize = 4;
const PATH_TAIL: usize = 10;
const PENDING_SHOWN: usize = 8;

type Memo<S> = HashMap<u64, Vec<Visited<S>>, BuildHasherDefault<PassThrough>>;

struct Search<'h, M: Model> {
    /// Operations to linearize: completed ones first (`0..known`), then unknown-outcome ones, each
    /// group in order of invocation.
    ops: Vec<&'h ModelOp<M>>,
    /// Index of each operation in the caller's slice, for messages.
    original: Vec<usize>,
    known: usize,

    // Circular doubly-linked list of the completed operations' events; 0 is the sentinel, the
    // events 1.. are in time order (calls before returns at equal times: such operations count
    // as concurrent).
    ev_op: Vec<usize>,
    ev_time: Vec<u64>,
    ev_is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_ev: Vec<usize>,
    ret_ev: Vec<usize>,

    // Circular list of the unknown-outcome operations by invocation time; 0 is the sentinel and
    // node `k` (1-based) holds operation `known + k - 1`.
    unext: Vec<usize>,
    uprev: Vec<usize>,

    // The current configuration.
    state: M::State,
    known_bits: Vec<u64>,
    unknown_bits: Vec<u64>,
    /// XOR of the keys of the linearized completed operations.
    known_hash: u64,
    remaining: usize,
    memo: Memo<M::State>,
    blocked: Option<Blocked<M::State>>,
}

impl<'h, M: Model> Search<'h, M> {
    fn new(history: &'h [ModelOp<M>]) -> Self {
        let mut known_ops = Vec::new();
        let mut unknown_ops = Vec::new();
        for (i, op) in history.iter().enumerate() {
            match &op.outcome {
                Outcome::Completed { at, .. } => {
                    assert!(
                        *at >= op.invoked,
                        "operation #{i} responded ({at}) before it was invoked ({})",
                        op.invoked
                    );
                    known_ops.push(i);
                }
                Outcome::Unknown if M::is_read_only(&op.input) => {}
                Outcome::Unknown => unknown_ops.push(i),
            }
        }
        known_ops.sort_by_key(|&i| (history[i].invoked, i));
        unknown_ops.sort_by_key(|&i| (history[i].invoked, i));
        let known = known_ops.len();
        let original: Vec<usize> = known_ops.into_iter().chain(unknown_ops).collect();
        let ops: Vec<_> = original.iter().map(|&i| &history[i]).collect();

        // (time, is_return, op): calls sort before returns at equal times.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * known);
        for (op, o) in ops.iter().enumerate().take(known) {
            let Outcome::Completed { at, .. } = o.outcome else {
                unreachable!("completed operations come first")
            };
            events.push((o.invoked, false, op));
            events.push((at, true, op));
        }
        events.sort_unstable();
        let n_ev = events.len() + 1;
        let mut ev_op = vec![usize::MAX; n_ev];
        let mut ev_time = vec![0; n_ev];
        let mut ev_is_call = vec![false; n_ev];
        let mut call_ev = vec![0; known];
        let mut ret_ev = vec![0; known];
        for (e, &(time, is_return, op)) in events.iter().enumerate() {
            let e = e + 1;
            ev_op[e] = op;
            ev_time[e] = time;
            ev_is_call[e] = !is_return;
            if is_return {
                ret_ev[op] = e;
            } else {
                call_ev[op] = e;
            }
        }
        let n_u = ops.len() - known + 1;
        Search {
            known_bits: vec![0; known.div_ceil(64)],
            unknown_bits: vec![0; (ops.len() - known).div_ceil(64)],
            ops,
            original,
            known,
            ev_op,
            ev_time,
            ev_is_call,
            next: (0..n_ev).map(|e| (e + 1) % n_ev).collect(),
            prev: (0..n_ev).map(|e| (e + n_ev - 1) % n_ev).collect(),
            call_ev,
            ret_ev,
            unext: (0..n_u).map(|e| (e + 1) % n_u).collect(),
            uprev: (0..n_u).map(|e| (e + n_u - 1) % n_u).collect(),
            state: M::init(),
            known_hash: 0,
            remaining: known,
            memo: HashMap::default(),
            blocked: None,
        }
    }

    fn unode(&self, op: usize) -> usize {
        op - self.known + 1
    }

    fn step(&self, state: &M::State, op: usize) -> Option<M::State> {
        M::step(state, &self.ops[op].input, self.ops[op].output())
    }

    /// Removes the operation's events from the lists.
    fn lift(&mut self, op: usize) {
        if op < self.known {
            for e in [self.call_ev[op], self.ret_ev[op]] {
                self.next[self.prev[e]] = self.next[e];
                self.prev[self.next[e]] = self.prev[e];
            }
        } else {
            let u = self.unode(op);
            self.unext[self.uprev[u]] = self.unext[u];
            self.uprev[self.unext[u]] = self.uprev[u];
        }
    }

    /// Undoes `lift(op)`; lifts must be undone in reverse order.
    fn unlift(&mut self, op: usize) {
        if op < self.known {
            for e in [self.ret_ev[op], self.call_ev[op]] {
                self.next[self.prev[e]] = e;
                self.prev[self.next[e]] = e;
            }
        } else {
            let u = self.unode(op);
            self.unext[self.uprev[u]] = u;
            self.uprev[self.unext[u]] = u;
        }
    }

    /// A node for the current configuration, with the completed operations that may come next:
    /// those invoked before the first remaining return event. They are tried in order of
    /// response, most urgent first. If one of them is read-only and consistent with the current
    /// state, it alone is tried: moving such an operation to the front of any linearization of
    /// the rest yields a linearization, so nothing is lost.
    fn node(&self, arrival: Option<Arrival<M::State>>) -> Node<M::State> {
        let mut candidates = Vec::new();
        let mut e = self.next[0];
        while self.ev_is_call[e] {
            candidates.push(self.ev_op[e]);
            e = self.next[e];
        }
        assert!(e != 0, "a pending completed operation has a return event");
        let barrier = e;
        let neutral = candidates.iter().copied().find(|&op| {
            M::is_read_only(&self.ops[op].input)
                && self.step(&self.state, op).as_ref() == Some(&self.state)
        });
        if let Some(op) = neutral {
            return Node {
                arrival,
                barrier,
                candidates: vec![op],
                tried: 0,
                unknown_added: true,
            };
        }
        candidates.sort_by_key(|&op| (self.ev_time[self.ret_ev[op]], op));
        // If the most urgent operation does not apply yet, first try the operations after which it
        // would (the write of the value a pending read saw), unknown-outcome ones included.
        let urgent = self.ev_op[barrier];
        if self.step(&self.state, urgent).is_none() {
            let enables = |&op: &usize| {
                op != urgent
                    && self
                        .step(&self.state, op)
                        .is_some_and(|next| self.step(&next, urgent).is_some())
            };
            let (mut first, rest): (Vec<usize>, Vec<usize>) =
                candidates.iter().partition(|op| enables(op));
            first.extend(self.unknown_candidates(barrier).into_iter().filter(enables));
            first.extend(rest);
            candidates = first;
        }
        Node {
            arrival,
            barrier,
            candidates,
            tried: 0,
            unknown_added: false,
        }
    }

    /// The unknown-outcome operations that may come next: those invoked before the barrier.
    /// Among several with equal inputs only the latest-invoked is tried: using it leaves the
    /// others, which are available whenever it is, for later.
    fn unknown_candidates(&self, barrier: usize) -> Vec<usize> {
        let mut available = Vec::new();
        let mut u = self.unext[0];
        while u != 0 && self.ops[self.known + u - 1].invoked <= self.ev_time[barrier] {
            available.push(self.known + u - 1);
            u = self.unext[u];
        }
        let mut candidates = Vec::new();
        for (i, &op) in available.iter().enumerate().rev() {
            let input = &self.ops[op].input;
            if !available[i + 1..]
                .iter()
                .any(|&later| self.ops[later].input == *input)
            {
                candidates.push(op);
            }
        }
        candidates
    }

    fn run(mut self, budget: u64) -> CheckResult {
        if self.remaining == 0 {
            return CheckResult::Linearizable;
        }
        let mut stack = vec![self.node(None)];
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > budget {
                return CheckResult::Inconclusive { steps: budget };
            }
            let node = stack.last_mut().expect("the root stays until the end");
            if node.tried == node.candidates.len() && !node.unknown_added {
                node.unknown_added = true;
                let unknown = self.unknown_candidates(node.barrier);
                // Some may have been tried first, as enabling the most urgent operation.
                let tried = node.candidates.len();
                for op in unknown {
                    if !node.candidates[..tried].contains(&op) {
                        node.candidates.push(op);
                    }
                }
            }
            if node.tried < node.candidates.len() {
                let op = node.candidates[node.tried];
                node.tried += 1;
                let from_unknown = match &node.arrival {
                    Some(a) if a.op >= self.known => Some(&a.state_before),
                    _ => None,
                };
                if let Some((visited, new_state)) = self.try_enter(op, from_unknown) {
                    let state_before = self.advance(op, new_state);
                    if self.remaining == 0 {
                        return CheckResult::Linearizable;
                    }
                    let arrival = Arrival {
                        op,
                        state_before,
                        visited,
                    };
                    stack.push(self.node(Some(arrival)));
                }
                continue;
            }

            // Every child failed: so does this configuration.
            let node = stack.pop().expect("checked above");
            self.note_dead_end(&node, &stack);
            let Some(arrival) = node.arrival else {
                let blocked = self.blocked.take().expect("a dead end was noted");
                return CheckResult::NotLinearizable {
                    explanation: self.explain(blocked),
                };
            };
            let (key, index) = arrival.visited;
            self.memo.get_mut(&key).expect("entered")[index].failed = true;
            self.retreat(arrival.op, arrival.state_before);
        }
    }

    /// Checks whether linearizing `op` next leads to a configuration worth exploring; if so
    /// records it in the memo and returns its memo entry and state. `from_unknown`: the state
    /// before the unknown-outcome operation that led to the current configuration, if it was one.
    fn try_enter(
        &mut self,
        op: usize,
        from_unknown: Option<&M::State>,
    ) -> Option<((u64, usize), M::State)> {
        let new_state = self.step(&self.state, op)?;
        if op >= self.known {
            // An optional operation that changes nothing, or that erases the effect of the
            // optional operation just before it: linearizing it alone (tried from the parent)
            // leaves more options.
            if new_state == self.state {
                return None;
            }
            if let Some(before) = from_unknown
                && self.step(before, op).as_ref() == Some(&new_state)
            {
                return None;
            }
        }
        let set_hash = if op < self.known {
            self.known_hash ^ op_key(op)
        } else {
            self.known_hash
        };
        let key = set_hash ^ state_hash(&new_state);
        self.toggle(op);
        // The known words worth storing: those before are all ones.
        let first_pending = self.ev_op[self.next[0]];
        let mut from = first_pending / 64;
        while from < self.known_bits.len() && self.known_bits[from] == u64::MAX {
            from += 1;
        }
        let to = self
            .known_bits
            .iter()
            .rposition(|&w| w != 0)
            .map_or(from, |w| w + 1);
        let window = &self.known_bits[from..to.max(from)];
        let bucket = self.memo.entry(key).or_default();
        // Seen before, or hopeless: a configuration with the same completed operations and state
        // but fewer unknown-outcome ones already failed (it had every option this one has).
        let dominated = bucket.iter().any(|v| {
            v.state == new_state
                && v.known_from == from
                && *v.known == *window
                && (*v.unknown == *self.unknown_bits
                    || (v.failed && is_subset(&v.unknown, &self.unknown_bits)))
        });
        let entered = (!dominated).then(|| {
            bucket.push(Visited {
                known_from: from,
                known: window.into(),
                unknown: self.unknown_bits.clone().into_boxed_slice(),
                state: new_state.clone(),
                failed: false,
            });
            ((key, bucket.len() - 1), new_state)
        });
        self.toggle(op);
        entered
    }

    fn toggle(&mut self, op: usize) {
        if op < self.known {
            flip(&mut self.known_bits, op);
        } else {
            flip(&mut self.unknown_bits, op - self.known);
        }
    }

    /// Linearizes `op`, returning the state before it.
    fn advance(&mut self, op: usize, new_state: M::State) -> M::State {
        self.toggle(op);
        self.lift(op);
        if op < self.known {
            self.known_hash ^= op_key(op);
            self.remaining -= 1;
        }
        std::mem::replace(&mut self.state, new_state)
    }

    /// Undoes `advance(op, _)`.
    fn retreat(&mut self, op: usize, state_before: M::State) {
        self.toggle(op);
        self.unlift(op);
        if op < self.known {
            self.known_hash ^= op_key(op);
            self.remaining += 1;
        }
        self.state = state_before;
    }

    /// Remembers the dead end that got furthest in time, for the explanation.
    fn note_dead_end(&mut self, node: &Node<M::State>, stack: &[Node<M::State>]) {
        let event = node.barrier;
        match &mut self.blocked {
            Some(b) if b.event > event => {}
            Some(b) if b.event == event => {
                if b.states.len() < DEAD_END_STATES && !b.states.contains(&self.state) {
                    b.states.push(self.state.clone());
                }
            }
            _ => {
                let path: Vec<usize> = stack
                    .iter()
                    .chain([node])
                    .filter_map(|n| n.arrival.as_ref().map(|a| a.op))
                    .collect();
                self.blocked = Some(Blocked {
                    event,
                    states: vec![self.state.clone()],
                    linearized: path.len(),
                    path_tail: path[path.len().saturating_sub(PATH_TAIL)..].to_vec(),
                    pending: node
                        .candidates
                        .iter()
                        .copied()
                        .take(PENDING_SHOWN)
                        .collect(),
                });
            }
        }
    }

    fn describe(&self, op: usize) -> String {
        let o = self.ops[op];
        match &o.outcome {
            Outcome::Completed { at, output } => format!(
                "#{} client {} [{}..{}] {:?} -> {:?}",
                self.original[op], o.client, o.invoked, at, o.input, output
            ),
            Outcome::Unknown => format!(
                "#{} client {} [{}..?] {:?} -> unknown outcome",
                self.original[op], o.client, o.invoked, o.input
            ),
        }
    }

    fn explain(&self, b: Blocked<M::State>) -> String {
        let blocked_op = self.ev_op[b.event];
        let mut s = format!(
            "operation {} cannot be linearized: no ordering of the operations invoked before its \
             response explains it.",
            self.describe(blocked_op)
        );
        let _ = write!(
            s,
            "\n  model states reachable just before it: {:?}",
            b.states
        );
        s.push_str(
            "\n  candidates at that point (invoked before its response, not yet linearized):",
        );
        for &op in &b.pending {
            let _ = write!(s, "\n    {}", self.describe(op));
        }
        let _ = write!(
            s,
            "\n  the furthest partial linearization ({} of {} operations) ends with:",
            b.linearized,
            self.ops.len()
        );
        if b.path_tail.is_empty() {
            s.push_str(" (nothing)");
        }
        for &op in &b.path_tail {
            let _ = write!(s, "\n    {}", self.describe(op));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Recording

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on the monotonic clock shared by every recorder in the process.
pub fn now() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A history under construction, shared by many tasks (clone it: clones record into the same
/// history). Timestamps come from [`now`].
pub struct History<M: Model> {
    inner: Arc<Mutex<Recorded<M::Input, M::Output>>>,
}

struct Recorded<I, O> {
    objects: Vec<String>,
    object_ids: HashMap<String, usize>,
    entries: Vec<Entry<I, O>>,
}

struct Entry<I, O> {
    object: usize,
    op: Op<I, O>,
    /// The call definitely had no effect (e.g. rejected before doing anything): left out.
    failed: bool,
}

/// An invocation awaiting its outcome: pass it to [`History::complete`], [`History::unknown`] or
/// [`History::fail`]. One never resolved counts as unknown outcome.
#[must_use = "record the outcome with complete, unknown or fail"]
#[derive(Debug)]
pub struct Invocation {
    index: usize,
}

impl<M: Model> Clone for History<M> {
    fn clone(&self) -> Self {
        History {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Model> Default for History<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Model> History<M> {
    pub fn new() -> Self {
        History {
            inner: Arc::new(Mutex::new(Recorded {
                objects: Vec::new(),
                object_ids: HashMap::new(),
                entries: Vec::new(),
            })),
        }
    }

    /// Records an invocation; call it just before sending the request.
    pub fn invoke(&self, client: u64, object: &str, input: M::Input) -> Invocation {
        let mut r = self.inner.lock().unwrap();
        let object = match r.object_ids.get(object) {
            Some(&id) => id,
            None => {
                let id = r.objects.len();
                r.objects.push(object.to_string());
                r.object_ids.insert(object.to_string(), id);
                id
            }
        };
        // Timestamped under the lock so that entries are in invocation order.
        let op = Op::unknown(client, now(), input);
        r.entries.push(Entry {
            object,
            op,
            failed: false,
        });
        Invocation {
            index: r.entries.len() - 1,
        }
    }

    /// Records the response; call it just after receiving it.
    pub fn complete(&self, call: Invocation, output: M::Output) {
        let at = now();
        let mut r = self.inner.lock().unwrap();
        r.entries[call.index].op.outcome = Outcome::Completed { at, output };
    }

    /// Records that the outcome is unknown (timeout, connection lost after sending).
    pub fn unknown(&self, call: Invocation) {
        // Entries start out with an unknown outcome: nothing to change.
        let Invocation { index: _ } = call;
    }

    /// Records that the call certainly had no effect; it is left out of the history.
    pub fn fail(&self, call: Invocation) {
        self.inner.lock().unwrap().entries[call.index].failed = true;
    }

    /// Number of recorded invocations (including failed ones).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The operations of each object, in invocation order.
    pub fn per_object(&self) -> Histories<M> {
        let r = self.inner.lock().unwrap();
        let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for e in r.entries.iter().filter(|e| !e.failed) {
            out.entry(r.objects[e.object].clone())
                .or_default()
                .push(e.op.clone());
        }
        out
    }

    /// Checks every object; see [`check`].
    pub fn check_all(&self, budget: u64) -> BTreeMap<String, CheckResult> {
        check_all::<M>(&self.per_object(), budget)
    }
}
