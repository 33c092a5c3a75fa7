//! Tests of the linearizability checker in `support/linearizability.rs`: hand-written histories
//! that must pass or fail, random linearizable histories and mutations of them that must fail, the
//! search budget, speed on long histories, and the concurrent recorder.

mod support;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::linearizability::{
    CheckResult, Counter, CounterOp, History, Model, ModelOp, Op, Outcome, Register, RegisterOp,
    RegisterRet, check,
};

type Reg = Register<u64>;
type RegOp = Op<RegisterOp<u64>, RegisterRet<u64>>;
type CtrOp = Op<CounterOp, u64>;

const BUDGET: u64 = 5_000_000;

fn w(client: u64, invoked: u64, responded: u64, v: u64) -> RegOp {
    Op::completed(
        client,
        invoked,
        responded,
        RegisterOp::Write(v),
        RegisterRet::Written,
    )
}

fn r(client: u64, invoked: u64, responded: u64, seen: Option<u64>) -> RegOp {
    Op::completed(
        client,
        invoked,
        responded,
        RegisterOp::Read,
        RegisterRet::Read(seen),
    )
}

fn w_unknown(client: u64, invoked: u64, v: u64) -> RegOp {
    Op::unknown(client, invoked, RegisterOp::Write(v))
}

fn inc(client: u64, invoked: u64, responded: u64, v: u64) -> CtrOp {
    Op::completed(client, invoked, responded, CounterOp::Increment, v)
}

fn get(client: u64, invoked: u64, responded: u64, v: u64) -> CtrOp {
    Op::completed(client, invoked, responded, CounterOp::Read, v)
}

fn inc_unknown(client: u64, invoked: u64) -> CtrOp {
    Op::unknown(client, invoked, CounterOp::Increment)
}

#[track_caller]
fn assert_linearizable<M: Model>(history: &[ModelOp<M>]) {
    let result = check::<M>(history, BUDGET);
    assert_eq!(result, CheckResult::Linearizable, "{result}\n{history:#?}");
}

/// Asserts the history is rejected and returns the explanation.
#[track_caller]
fn assert_not_linearizable<M: Model>(history: &[ModelOp<M>]) -> String {
    match check::<M>(history, BUDGET) {
        CheckResult::NotLinearizable { explanation } => explanation,
        other => panic!("expected not linearizable, got {other}\n{history:#?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Register histories that must pass

#[test]
fn empty_history_is_linearizable() {
    assert_linearizable::<Reg>(&[]);
    assert_linearizable::<Counter>(&[]);
}

#[test]
fn sequential_register() {
    assert_linearizable::<Reg>(&[
        r(0, 0, 1, None),
        w(0, 2, 3, 1),
        r(1, 4, 5, Some(1)),
        w(1, 6, 7, 2),
        r(0, 8, 9, Some(2)),
        w(0, 10, 11, 2),
        r(1, 12, 13, Some(2)),
    ]);
}

#[test]
fn reads_concurrent_with_a_write_may_see_either_value_once() {
    // The write spans [0, 100]: reads during it may see the old value, then the new one.
    assert_linearizable::<Reg>(&[
        w(0, 0, 100, 1),
        r(1, 10, 20, None),
        r(1, 30, 40, Some(1)),
        r(2, 50, 60, Some(1)),
    ]);
    // A read concurrent with everything may see the value written at any point.
    assert_linearizable::<Reg>(&[
        w(0, 0, 10, 1),
        r(1, 5, 100, Some(2)),
        w(0, 20, 30, 2),
        w(0, 40, 50, 3),
    ]);
}

#[test]
fn concurrent_writes_in_the_order_reads_reveal() {
    // The search would try write 1 first (invoked first); the reads need write 2 first.
    assert_linearizable::<Reg>(&[
        w(0, 0, 100, 1),
        w(1, 1, 100, 2),
        r(2, 50, 60, Some(2)),
        r(2, 110, 120, Some(1)),
        r(3, 130, 140, Some(1)),
    ]);
}

#[test]
fn touching_intervals_count_as_concurrent() {
    // The read's invocation carries the same timestamp as the write's response.
    assert_linearizable::<Reg>(&[w(0, 0, 10, 1), r(1, 10, 20, None)]);
}

#[test]
fn unknown_write_may_take_effect_later() {
    assert_linearizable::<Reg>(&[
        w_unknown(0, 0, 5),
        r(1, 10, 20, None),
        r(1, 30, 40, Some(5)),
        r(2, 50, 60, Some(5)),
    ]);
    // Long after the client gave up, and after other writes.
    assert_linearizable::<Reg>(&[
        w(0, 0, 10, 1),
        w_unknown(0, 20, 2),
        r(1, 30, 40, Some(1)),
        w(1, 50, 60, 3),
        r(1, 1000, 1010, Some(2)),
    ]);
}

#[test]
fn unknown_write_may_never_take_effect() {
    assert_linearizable::<Reg>(&[
        w(0, 0, 10, 1),
        w_unknown(0, 20, 2),
        r(1, 30, 40, Some(1)),
        r(1, 200, 210, Some(1)),
    ]);
    assert_linearizable::<Reg>(&[w_unknown(0, 0, 7), r(1, 100, 110, None)]);
}

#[test]
fn many_unobserved_unknown_writes() {
    // Each unknown write could be linearized anywhere after its invocation; none is ever
    // observed. A misordered pair of concurrent writes forces backtracking at the end.
    let mut h = Vec::new();
    let mut t = 0;
    for i in 0..60 {
        h.push(w_unknown(9, t, 1000 + i));
        h.push(w(0, t, t + 10, i));
        h.push(r(1, t + 11, t + 12, Some(i)));
        t += 20;
    }
    h.push(w(0, t, t + 100, 1));
    h.push(w(1, t, t + 100, 2));
    h.push(r(2, t + 200, t + 210, Some(1)));
    assert_linearizable::<Reg>(&h);
    // And the same with a read that no ordering explains.
    h.push(r(2, t + 300, t + 310, Some(2)));
    assert_not_linearizable::<Reg>(&h);
}

#[test]
fn unknown_reads_are_ignored() {
    assert_linearizable::<Reg>(&[
        Op::unknown(0, 0, RegisterOp::Read),
        w(1, 10, 20, 1),
        Op::unknown(0, 30, RegisterOp::Read),
        r(1, 40, 50, Some(1)),
    ]);
}

// ------------------------------------------------------------------------------------------------
// Register histories that must fail

#[test]
fn stale_read_after_completed_write() {
    let explanation =
        assert_not_linearizable::<Reg>(&[w(0, 0, 10, 1), w(0, 20, 30, 2), r(1, 40, 50, Some(1))]);
    // The explanation names the read that cannot be ordered and the state it should have seen.
    assert!(
        explanation.contains("#2 client 1 [40..50]"),
        "{explanation}"
    );
    assert!(explanation.contains("[Some(2)]"), "{explanation}");
}

#[test]
fn read_of_a_value_never_written() {
    assert_not_linearizable::<Reg>(&[r(0, 0, 10, Some(7))]);
    assert_not_linearizable::<Reg>(&[w(0, 0, 100, 1), r(1, 10, 20, Some(7))]);
}

#[test]
fn read_goes_backwards() {
    // Write 2 is concurrent with both reads but nothing writes 1 again after it.
    assert_not_linearizable::<Reg>(&[
        w(0, 0, 10, 1),
        w(0, 20, 100, 2),
        r(1, 30, 40, Some(2)),
        r(1, 50, 60, Some(1)),
    ]);
    // Two clients: one sees the new value, a later read by another sees the old one.
    assert_not_linearizable::<Reg>(&[w(0, 0, 100, 1), r(1, 10, 20, Some(1)), r(2, 30, 40, None)]);
}

#[test]
fn lost_acknowledged_write() {
    assert_not_linearizable::<Reg>(&[w(0, 0, 10, 1), r(1, 20, 30, None)]);
    // Acknowledged, then visible, then gone.
    assert_not_linearizable::<Reg>(&[
        w(0, 0, 10, 1),
        w(0, 20, 30, 2),
        r(1, 40, 50, Some(2)),
        r(1, 60, 70, Some(1)),
    ]);
}

#[test]
fn unknown_write_cannot_take_effect_before_its_invocation() {
    assert_not_linearizable::<Reg>(&[r(0, 0, 10, Some(5)), w_unknown(1, 20, 5)]);
}

#[test]
fn unknown_write_cannot_be_undone() {
    assert_not_linearizable::<Reg>(&[
        w_unknown(0, 0, 5),
        r(1, 10, 20, Some(5)),
        r(1, 30, 40, None),
    ]);
}

#[test]
fn output_of_the_wrong_kind_is_rejected() {
    assert_not_linearizable::<Reg>(&[Op::completed(
        0,
        0,
        1,
        RegisterOp::Read,
        RegisterRet::Written,
    )]);
}

// ------------------------------------------------------------------------------------------------
// Counter

#[test]
fn counter_histories_that_pass() {
    assert_linearizable::<Counter>(&[
        get(0, 0, 1, 0),
        inc(0, 2, 3, 1),
        inc(1, 4, 5, 2),
        get(1, 6, 7, 2),
    ]);
    // Concurrent increments may return their values in either order.
    assert_linearizable::<Counter>(&[
        inc(0, 0, 100, 2),
        inc(1, 10, 90, 1),
        get(2, 20, 30, 1),
        get(2, 110, 120, 2),
    ]);
    // An unknown increment that must have happened to explain the jump.
    assert_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc_unknown(1, 20), inc(0, 30, 40, 3)]);
    // One that had not happened yet, then did.
    assert_linearizable::<Counter>(&[
        inc(0, 0, 10, 1),
        inc_unknown(1, 20),
        inc(0, 30, 40, 2),
        get(0, 50, 60, 3),
    ]);
    // One that never happened.
    assert_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc_unknown(1, 20), get(0, 500, 510, 1)]);
}

#[test]
fn counter_skipping_a_value() {
    assert_not_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc(0, 20, 30, 3)]);
    // One unknown increment explains one skipped value, not two.
    assert_not_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc_unknown(1, 20), inc(0, 30, 40, 4)]);
    // A read cannot see an increment that was not yet invoked.
    assert_not_linearizable::<Counter>(&[get(0, 0, 10, 1), inc(1, 20, 30, 1)]);
}

#[test]
fn counter_duplicating_a_value() {
    assert_not_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc(0, 20, 30, 1)]);
    // Two concurrent increments both returning the same value.
    assert_not_linearizable::<Counter>(&[inc(0, 0, 100, 1), inc(1, 10, 90, 1)]);
    assert_not_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc(0, 20, 100, 2), inc(1, 30, 90, 2)]);
}

#[test]
fn counter_lost_acknowledged_increment() {
    assert_not_linearizable::<Counter>(&[inc(0, 0, 10, 1), get(1, 20, 30, 0)]);
    assert_not_linearizable::<Counter>(&[inc(0, 0, 10, 1), inc(1, 5, 15, 2), get(2, 20, 30, 1)]);
}

// ------------------------------------------------------------------------------------------------
// Budget

/// `n` concurrent writes of distinct values and a concurrent read of a value never written: the
/// search must try every order of the writes before it can give up.
fn hopeless(n: u64) -> Vec<RegOp> {
    let mut h: Vec<RegOp> = (0..n).map(|i| w(i, 0, 1000, i)).collect();
    h.push(r(n, 0, 1000, Some(n + 1)));
    h
}

#[test]
fn gives_up_when_the_budget_is_exhausted() {
    let started = Instant::now();
    let result = check::<Reg>(&hopeless(40), 10_000);
    assert_eq!(result, CheckResult::Inconclusive { steps: 10_000 });
    assert!(
        result
            .to_string()
            .starts_with("inconclusive: search budget exceeded")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // A small instance of the same shape is decided within the budget.
    assert!(matches!(
        check::<Reg>(&hopeless(6), 10_000),
        CheckResult::NotLinearizable { .. }
    ));
}

// ------------------------------------------------------------------------------------------------
// Random histories

/// Ops for a simulated object: each client runs operations one after another; each completed
/// operation takes effect at a random point inside its interval; an operation with an unknown
/// outcome takes effect at a random point after its invocation, possibly long after, or never.
struct Plan<I> {
    client: u64,
    invoked: u64,
    responded: u64,
    input: I,
    unknown: bool,
    /// When the operation takes effect, if it does.
    effect_at: Option<u64>,
}

fn random_plans<I>(
    rng: &mut StdRng,
    clients: u64,
    ops: usize,
    unknown_rate: f64,
    mut input: impl FnMut(&mut StdRng) -> I,
) -> Vec<Plan<I>> {
    let mut plans = Vec::with_capacity(ops);
    let mut clock = vec![0u64; clients as usize];
    for i in 0..ops {
        let client = (i as u64) % clients;
        let t = &mut clock[client as usize];
        let invoked = *t + rng.random_range(0..20);
        // Mostly short calls, some long ones that overlap many others.
        let duration = if rng.random_bool(0.1) {
            rng.random_range(50..400)
        } else {
            rng.random_range(0..40)
        };
        let responded = invoked + duration;
        *t = responded + 1;
        let unknown = rng.random_bool(unknown_rate);
        let effect_at = if !unknown {
            Some(rng.random_range(invoked..=responded))
        } else if rng.random_bool(0.5) {
            Some(invoked + rng.random_range(0..2000))
        } else {
            None
        };
        plans.push(Plan {
            client,
            invoked,
            responded,
            input: input(rng),
            unknown,
            effect_at,
        });
    }
    plans
}

/// Runs the plans through the model in the order they take effect and records the outputs.
fn simulate<M: Model>(
    plans: Vec<Plan<M::Input>>,
    mut apply: impl FnMut(&mut M::State, &M::Input) -> M::Output,
) -> Vec<ModelOp<M>> {
    let mut order: Vec<usize> = (0..plans.len())
        .filter(|&i| plans[i].effect_at.is_some())
        .collect();
    order.sort_by_key(|&i| (plans[i].effect_at, i));
    let mut outputs: Vec<Option<M::Output>> = vec![None; plans.len()];
    let mut state = M::init();
    for i in order {
        outputs[i] = Some(apply(&mut state, &plans[i].input));
    }
    plans
        .into_iter()
        .zip(outputs)
        .map(|(p, out)| Op {
            client: p.client,
            invoked: p.invoked,
            input: p.input,
            outcome: match (p.unknown, out) {
                (false, Some(output)) => Outcome::Completed {
                    at: p.responded,
                    output,
                },
                _ => Outcome::Unknown,
            },
        })
        .collect()
}

fn random_register_history(
    rng: &mut StdRng,
    clients: u64,
    ops: usize,
    unknown_rate: f64,
) -> Vec<RegOp> {
    let mut next_value = 0;
    let plans = random_plans(rng, clients, ops, unknown_rate, |rng| {
        if rng.random_bool(0.4) {
            next_value += 1;
            RegisterOp::Write(next_value)
        } else {
            RegisterOp::Read
        }
    });
    simulate::<Reg>(plans, |state, input| match input {
        RegisterOp::Write(v) => {
            *state = Some(*v);
            RegisterRet::Written
        }
        RegisterOp::Read => RegisterRet::Read(*state),
    })
}

fn random_counter_history(
    rng: &mut StdRng,
    clients: u64,
    ops: usize,
    unknown_rate: f64,
) -> Vec<CtrOp> {
    let plans = random_plans(rng, clients, ops, unknown_rate, |rng| {
        if rng.random_bool(0.6) {
            CounterOp::Increment
        } else {
            CounterOp::Read
        }
    });
    simulate::<Counter>(plans, |state, input| {
        if *input == CounterOp::Increment {
            *state += 1;
        }
        *state
    })
}

fn completed_output<I, O>(op: &mut Op<I, O>) -> Option<&mut O> {
    match &mut op.outcome {
        Outcome::Completed { output, .. } => Some(output),
        Outcome::Unknown => None,
    }
}

#[test]
fn random_register_histories_pass_and_mutations_fail() {
    let mut mutated = 0;
    for seed in 0..300 {
        let mut rng = StdRng::seed_from_u64(seed);
        let clients = rng.random_range(1..8);
        let len = rng.random_range(1..120);
        let history = random_register_history(&mut rng, clients, len, 0.1);
        let result = check::<Reg>(&history, BUDGET);
        assert_eq!(result, CheckResult::Linearizable, "seed {seed}: {result}");

        // A read of a value nobody wrote.
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| {
                history[i].input == RegisterOp::Read
                    && matches!(history[i].outcome, Outcome::Completed { .. })
            })
            .collect();
        if reads.is_empty() {
            continue;
        }
        let mut bad = history.clone();
        let victim = reads[rng.random_range(0..reads.len())];
        *completed_output(&mut bad[victim]).unwrap() = RegisterRet::Read(Some(u64::MAX));
        assert!(
            matches!(
                check::<Reg>(&bad, BUDGET),
                CheckResult::NotLinearizable { .. }
            ),
            "seed {seed}: read of a value never written was accepted"
        );

        // A read that sees "never written" although a write completed before it was invoked.
        let first_write_done = history
            .iter()
            .filter(|op| matches!(op.input, RegisterOp::Write(_)))
            .filter_map(|op| match op.outcome {
                Outcome::Completed { at, .. } => Some(at),
                Outcome::Unknown => None,
            })
            .min();
        if let Some(done) = first_write_done
            && let Some(&victim) = reads.iter().find(|&&i| history[i].invoked > done)
        {
            let mut bad = history.clone();
            *completed_output(&mut bad[victim]).unwrap() = RegisterRet::Read(None);
            assert!(
                matches!(
                    check::<Reg>(&bad, BUDGET),
                    CheckResult::NotLinearizable { .. }
                ),
                "seed {seed}: lost write accepted"
            );
            mutated += 1;
        }
    }
    assert!(
        mutated > 100,
        "only {mutated} histories had a lost-write mutation"
    );
}

#[test]
fn random_counter_histories_pass_and_mutations_fail() {
    for seed in 0..300 {
        let mut rng = StdRng::seed_from_u64(seed);
        let clients = rng.random_range(1..8);
        let len = rng.random_range(1..120);
        let history = random_counter_history(&mut rng, clients, len, 0.1);
        let result = check::<Counter>(&history, BUDGET);
        assert_eq!(result, CheckResult::Linearizable, "seed {seed}: {result}");

        let increments: Vec<usize> = (0..history.len())
            .filter(|&i| {
                history[i].input == CounterOp::Increment
                    && matches!(history[i].outcome, Outcome::Completed { .. })
            })
            .collect();
        if increments.len() < 2 {
            continue;
        }
        // Two completed increments returning the same value: never possible.
        let a = increments[rng.random_range(0..increments.len())];
        let b = loop {
            let b = increments[rng.random_range(0..increments.len())];
            if b != a {
                break b;
            }
        };
        let mut bad = history.clone();
        let duplicate = *completed_output(&mut bad[a]).unwrap();
        *completed_output(&mut bad[b]).unwrap() = duplicate;
        assert!(
            matches!(
                check::<Counter>(&bad, BUDGET),
                CheckResult::NotLinearizable { .. }
            ),
            "seed {seed}: duplicate increment result accepted"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Speed

#[test]
fn long_histories_are_checked_quickly() {
    let mut rng = StdRng::seed_from_u64(7);
    let register = random_register_history(&mut rng, 10, 2000, 0.02);
    let counter = random_counter_history(&mut rng, 10, 2000, 0.02);
    let started = Instant::now();
    assert_eq!(check::<Reg>(&register, BUDGET), CheckResult::Linearizable);
    let register_took = started.elapsed();
    let started = Instant::now();
    assert_eq!(
        check::<Counter>(&counter, BUDGET),
        CheckResult::Linearizable
    );
    let counter_took = started.elapsed();
    println!("2000-op register history: {register_took:?}; counter: {counter_took:?}");
    // Generous: debug builds on a loaded 2-core machine. Release builds take a few milliseconds.
    assert!(register_took < Duration::from_secs(3), "{register_took:?}");
    assert!(counter_took < Duration::from_secs(3), "{counter_took:?}");
}

// ------------------------------------------------------------------------------------------------
// Recorder

/// A register that acknowledges every third write without applying it.
struct LossyRegister {
    value: Mutex<(Option<u64>, u64)>,
    lossy: bool,
}

impl LossyRegister {
    fn write(&self, v: u64) {
        let mut g = self.value.lock().unwrap();
        g.1 += 1;
        if !(self.lossy && g.1.is_multiple_of(3)) {
            g.0 = Some(v);
        }
    }
    fn read(&self) -> Option<u64> {
        self.value.lock().unwrap().0
    }
}

/// Tasks hammer a few correct registers concurrently and record what they did.
async fn record_workload() -> History<Reg> {
    let objects: Vec<Arc<LossyRegister>> = (0..3)
        .map(|_| {
            Arc::new(LossyRegister {
                value: Mutex::new((None, 0)),
                lossy: false,
            })
        })
        .collect();
    let history = History::<Reg>::new();
    let mut tasks = Vec::new();
    for client in 0..8u64 {
        let history = history.clone();
        let objects = objects.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..60u64 {
                let k = ((client + i) % 3) as usize;
                let key = format!("obj{k}");
                let value = client * 1000 + i;
                match i % 5 {
                    0 | 1 => {
                        let call = history.invoke(client, &key, RegisterOp::Write(value));
                        tokio::task::yield_now().await;
                        objects[k].write(value);
                        tokio::task::yield_now().await;
                        history.complete(call, RegisterRet::Written);
                    }
                    2 => {
                        // Applied, but the client never learns it.
                        let call = history.invoke(client, &key, RegisterOp::Write(value));
                        objects[k].write(value);
                        history.unknown(call);
                    }
                    3 => {
                        // Rejected before doing anything.
                        let call = history.invoke(client, &key, RegisterOp::Write(value));
                        history.fail(call);
                    }
                    _ => {
                        let call = history.invoke(client, &key, RegisterOp::Read);
                        tokio::task::yield_now().await;
                        let seen = objects[k].read();
                        tokio::task::yield_now().await;
                        history.complete(call, RegisterRet::Read(seen));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recorder_histories_of_a_correct_object_pass() {
    let history = record_workload().await;
    assert_eq!(history.len(), 8 * 60);
    let objects = history.per_object();
    assert_eq!(objects.keys().collect::<Vec<_>>(), ["obj0", "obj1", "obj2"]);
    // Failed calls are left out: 8 clients × 60 calls, one in five failed.
    assert_eq!(objects.values().map(Vec::len).sum::<usize>(), 8 * 48);
    for ops in objects.values() {
        for op in ops {
            if let Outcome::Completed { at, .. } = op.outcome {
                assert!(at >= op.invoked);
            }
        }
    }
    for (key, result) in history.check_all(BUDGET) {
        assert_eq!(result, CheckResult::Linearizable, "{key}: {result}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recorder_histories_of_a_lossy_object_fail() {
    // Each client alternates writes and reads on its own lossy register: its third write is lost,
    // and the read after it sees the value before.
    let history = History::<Reg>::new();
    let mut tasks = Vec::new();
    for client in 0..8u64 {
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let register = LossyRegister {
                value: Mutex::new((None, 0)),
                lossy: true,
            };
            let key = format!("obj{client}");
            for value in 0..5 {
                let call = history.invoke(client, &key, RegisterOp::Write(value));
                tokio::task::yield_now().await;
                register.write(value);
                history.complete(call, RegisterRet::Written);
                let call = history.invoke(client, &key, RegisterOp::Read);
                tokio::task::yield_now().await;
                history.complete(call, RegisterRet::Read(register.read()));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let results = history.check_all(BUDGET);
    assert_eq!(results.len(), 8);
    for (key, result) in results {
        assert!(
            matches!(result, CheckResult::NotLinearizable { .. }),
            "{key}: {result}"
        );
    }
}

#[test]
fn unresolved_invocations_count_as_unknown() {
    let history = History::<Counter>::new();
    let first = history.invoke(1, "c", CounterOp::Increment);
    history.complete(first, 1);
    let _abandoned = history.invoke(2, "c", CounterOp::Increment);
    let read = history.invoke(1, "c", CounterOp::Read);
    history.complete(read, 2);
    let ops = &history.per_object()["c"];
    assert_eq!(ops[1].outcome, Outcome::Unknown);
    assert_eq!(check::<Counter>(ops, BUDGET), CheckResult::Linearizable);
}

// ------------------------------------------------------------------------------------------------
// Agreement with brute force

/// Tries every order: `ops[i]` may come next if no remaining completed operation responded before
/// it was invoked; unknown-outcome operations may also be left out.
fn brute_force<M: Model>(ops: &[ModelOp<M>]) -> bool {
    fn go<M: Model>(ops: &[ModelOp<M>], done: &mut Vec<bool>, state: M::State) -> bool {
        let pending_known =
            |i: usize| !done[i] && matches!(ops[i].outcome, Outcome::Completed { .. });
        if !(0..ops.len()).any(pending_known) {
            return true;
        }
        let deadline = (0..ops.len())
            .filter(|&i| pending_known(i))
            .filter_map(|i| match ops[i].outcome {
                Outcome::Completed { at, .. } => Some(at),
                Outcome::Unknown => None,
            })
            .min()
            .unwrap();
        for i in 0..ops.len() {
            if done[i] || ops[i].invoked > deadline {
                continue;
            }
            let output = match &ops[i].outcome {
                Outcome::Completed { output, .. } => Some(output),
                Outcome::Unknown => None,
            };
            if let Some(next) = M::step(&state, &ops[i].input, output) {
                done[i] = true;
                let ok = go::<M>(ops, done, next);
                done[i] = false;
                if ok {
                    return true;
                }
            }
        }
        false
    }
    go::<M>(ops, &mut vec![false; ops.len()], M::init())
}

fn random_small_history<I, O>(
    rng: &mut StdRng,
    mut input: impl FnMut(&mut StdRng) -> (I, O),
) -> Vec<Op<I, O>> {
    let len = rng.random_range(1..=8);
    (0..len)
        .map(|i| {
            let invoked = rng.random_range(0..20);
            let (input, output) = input(rng);
            if rng.random_bool(0.25) {
                Op::unknown(i, invoked, input)
            } else {
                Op::completed(i, invoked, invoked + rng.random_range(0..10), input, output)
            }
        })
        .collect()
}

#[test]
fn agrees_with_brute_force_on_small_random_histories() {
    let mut rng = StdRng::seed_from_u64(42);
    let mut verdicts = [0usize; 2];
    for case in 0..20_000 {
        let history = random_small_history(&mut rng, |rng| {
            if rng.random_bool(0.5) {
                (
                    RegisterOp::Write(rng.random_range(1..4)),
                    RegisterRet::Written,
                )
            } else {
                let seen = rng.random_range(0..4);
                (
                    RegisterOp::Read,
                    RegisterRet::Read((seen > 0).then_some(seen)),
                )
            }
        });
        let expected = brute_force::<Reg>(&history);
        let result = check::<Reg>(&history, BUDGET);
        assert_eq!(
            result.is_linearizable(),
            expected,
            "case {case}: {result}\n{history:#?}"
        );
        assert!(!matches!(result, CheckResult::Inconclusive { .. }));
        verdicts[expected as usize] += 1;

        let history = random_small_history(&mut rng, |rng| {
            if rng.random_bool(0.6) {
                (CounterOp::Increment, rng.random_range(1..5))
            } else {
                (CounterOp::Read, rng.random_range(0..5))
            }
        });
        let expected = brute_force::<Counter>(&history);
        let result = check::<Counter>(&history, BUDGET);
        assert_eq!(
            result.is_linearizable(),
            expected,
            "case {case}: {result}\n{history:#?}"
        );
        verdicts[expected as usize] += 1;
    }
    // Both verdicts must be well represented for the comparison to mean anything.
    assert!(verdicts[0] > 5_000 && verdicts[1] > 5_000, "{verdicts:?}");
}
