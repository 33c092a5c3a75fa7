//! The replication benchmark:
//! 1. the cost of replication — the object-host workloads plus 1 KiB and 64 KiB writes on one node
//!    and on 5 nodes at write quorum 3;
//! 2. Colony against a 3-member etcd cluster (replicated, fsyncing) on the same write workloads,
//!    with Colony at 3 replicas / quorum 2 (etcd's shape) and at 5 / 3;
//! 3. failover time: kill -9 of an owner under load until the first acknowledged write on its
//!    successor, at the default lease and at a 2 s lease.
//!
//! Clients talk to each object's owner (a client that knows placement, as Durable Objects routes
//! to the colo): forwarding through another node would add a hop that is not replication's cost.

use crate::etcd::{self, EtcdCluster};
use crate::load::{self, Stats, Summary, Target, median, summarize};
use crate::single::{CREATE_SQL, INCR_SQL, READ_SQL, sql_body};
use crate::systems::{self, ColonyCluster, Process};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Options {
    pub duration: Duration,
    pub runs: usize,
    pub node: PathBuf,
    pub etcd: Option<PathBuf>,
    pub failover_trials: usize,
    pub leases: Vec<Duration>,
    pub sections: Vec<String>,
    /// Letters of the replication-cost workloads to run (empty: all).
    pub workloads: Vec<char>,
}

/// One JSON request (setup, lookups): status and body.
pub async fn request_json(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<(u16, Value), String> {
    let mut sender = load::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    request_on(&mut sender, addr, method, path, body).await
}

/// Like [`request_json`], on an open keep-alive connection.
async fn request_on(
    sender: &mut load::Sender,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<(u16, Value), String> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .map_err(|_| format!("{addr}{path}: timed out"))?
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, v))
}

async fn wait_ready(c: &ColonyCluster) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &c.nodes {
        while request_json(n.addr, Method::GET, "/readyz", "")
            .await
            .map(|r| r.0)
            != Ok(200)
        {
            if Instant::now() > deadline {
                return Err(format!("node {} never became ready", n.addr));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Waits until the control plane reports every node healthy and nothing left to hand back, so a
/// measurement or a failover trial starts from the balanced placement (not in the middle of a
/// hand-back).
async fn wait_balanced(c: &ColonyCluster) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = request_json(c.control_addr(), Method::GET, "/v1/control/status", "").await;
        if let Ok((200, v)) = &status
            && v["balanced"] == true
            && v["nodes"].as_array().map(|n| n.len()) == Some(c.nodes.len())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the placement never settled: {status:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The address of the node that owns a named object now.
async fn owner_addr(c: &ColonyCluster, name: &str) -> Result<SocketAddr, String> {
    let any = c.nodes[0].addr;
    let (_, v) = request_json(
        any,
        Method::POST,
        "/v1/ns/default/ids",
        &serde_json::json!({"name": name}).to_string(),
    )
    .await?;
    let id = v["id"].as_str().ok_or("no id")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in &c.nodes {
            if let Ok((200, v)) = request_json(
                n.addr,
                Method::GET,
                &format!("/v1/admin/locate/default/{id}"),
                "",
            )
            .await
                && let Some(owner) = v["owner"].as_str()
                && let Some(i) = c.index_of(owner)
            {
                return Ok(c.nodes[i].addr);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("nobody knows where {name} lives"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where each object's requests go: the owner in a cluster, the one node otherwise.
enum Deployment<'a> {
    Single(&'a Process),
    Cluster(&'a ColonyCluster),
}

impl Deployment<'_> {
    async fn addr_of(&self, name: &str) -> Result<SocketAddr, String> {
        match self {
            Deployment::Single(p) => Ok(p.addr),
            Deployment::Cluster(c) => owner_addr(c, name).await,
        }
    }
}

#[derive(Clone, Copy)]
enum Work {
    Incr,
    Read,
    /// KV put of a value of this many bytes.
    Put(usize),
}

#[derive(Clone, Copy)]
struct Workload {
    label: &'static str,
    work: Work,
    connections: usize,
    /// Distinct objects (spread over the connections).
    objects: usize,
}

const REPLICATION: [Workload; 8] = [
    Workload {
        label: "(a) 1 object, 1 connection, SQL increment",
        work: Work::Incr,
        connections: 1,
        objects: 1,
    },
    Workload {
        label: "(b) 1 object, 64 connections, SQL increment",
        work: Work::Incr,
        connections: 64,
        objects: 1,
    },
    Workload {
        label: "(c) 1000 objects, 64 connections, SQL increment",
        work: Work::Incr,
        connections: 64,
        objects: 1000,
    },
    Workload {
        label: "(d) 1 object, 64 connections, SQL read",
        work: Work::Read,
        connections: 64,
        objects: 1,
    },
    Workload {
        label: "(e) 1 KiB writes, 1 connection",
        work: Work::Put(1024),
        connections: 1,
        objects: 1,
    },
    Workload {
        label: "(f) 1 KiB writes, 64 connections (own objects)",
        work: Work::Put(1024),
        connections: 64,
        objects: 64,
    },
    Workload {
        label: "(g) 64 KiB writes, 1 connection",
        work: Work::Put(65536),
        connections: 1,
        objects: 1,
    },
    Workload {
        label: "(h) 64 KiB writes, 64 connections (own objects)",
        work: Work::Put(65536),
        connections: 64,
        objects: 64,
    },
];

/// The write workloads compared with etcd (etcd puts of the same size).
const VERSUS_ETCD: [Workload; 4] = [
    Workload {
        label: "sequential small writes (1 connection)",
        work: Work::Put(16),
        connections: 1,
        objects: 1,
    },
    Workload {
        label: "concurrent small writes (64 connections)",
        work: Work::Put(16),
        connections: 64,
        objects: 64,
    },
    Workload {
        label: "concurrent 1 KiB writes (64 connections)",
        work: Work::Put(1024),
        connections: 64,
        objects: 64,
    },
    Workload {
        label: "concurrent 64 KiB writes (64 connections)",
        work: Work::Put(65536),
        connections: 64,
        objects: 64,
    },
];

fn object_name(w: &Workload, i: usize) -> String {
    format!("bench-{}-{}", w.objects, i)
}

/// A JSON string of `len` bytes (at least a stamp's).
fn value_body(len: usize) -> String {
    let len = len.max(load::STAMP_LEN);
    let v: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    serde_json::json!(v).to_string()
}

/// One target per object, at its owner.
async fn targets(d: &Deployment<'_>, w: &Workload) -> Result<Vec<Target>, String> {
    let mut out = Vec::with_capacity(w.objects);
    for i in 0..w.objects {
        let name = object_name(w, i);
        let addr = d.addr_of(&name).await?;
        let t = match w.work {
            Work::Incr => Target::new(addr, Method::POST, &sql_body(INCR_SQL), move |_, _| {
                format!("/v1/ns/default/names/{name}/sql")
            }),
            Work::Read => Target::new(addr, Method::POST, &sql_body(READ_SQL), move |_, _| {
                format!("/v1/ns/default/names/{name}/sql")
            }),
            // Stamped: every put changes the value (an unchanged one would commit nothing).
            Work::Put(len) => Target::new(addr, Method::PUT, &value_body(len), move |c, _| {
                format!("/v1/ns/default/names/{name}/kv/k{c}")
            })
            .stamped(1),
        };
        out.push(t);
    }
    Ok(out)
}

/// Touches every object once (creating the counter tables, or the key/value table), so that
/// measurements see objects in their steady state. Without this the put workloads' first run
/// also measured 64 databases being created at once under load: its first few hundred
/// milliseconds had a p99 of 130-150 ms on both deployments, against 15-35 ms afterwards.
async fn prepare(d: &Deployment<'_>, w: &Workload) -> Result<(), String> {
    for i in 0..w.objects {
        let name = object_name(w, i);
        let addr = d.addr_of(&name).await?;
        let (s, v) = match w.work {
            Work::Put(len) => {
                request_json(
                    addr,
                    Method::PUT,
                    &format!("/v1/ns/default/names/{name}/kv/warm"),
                    &value_body(len),
                )
                .await?
            }
            Work::Incr | Work::Read => {
                let batch = serde_json::json!({"batch": [{"sql": CREATE_SQL}, {"sql": INCR_SQL}]})
                    .to_string();
                request_json(
                    addr,
                    Method::POST,
                    &format!("/v1/ns/default/names/{name}/sql"),
                    &batch,
                )
                .await?
            }
        };
        if s != 200 {
            return Err(format!("preparing {name}: {s} {v}"));
        }
    }
    Ok(())
}

async fn measure(d: &Deployment<'_>, w: &Workload, duration: Duration) -> Result<Stats, String> {
    let t = targets(d, w).await?;
    Ok(etcd::run_spread(&t, w.connections, duration).await)
}

fn line(label: &str, who: &str, s: &Summary) {
    println!("  {label:<46} {who:<14} {s}");
}

async fn replication_cost(opts: &Options) -> Result<(), String> {
    println!(
        "\n1. The cost of replication: 1 node vs 5 nodes at write quorum 3 (medians of {} x {:?})",
        opts.runs, opts.duration
    );
    let single = systems::start_colony(&opts.node, "")?;
    let cluster = ColonyCluster::start(&opts.node, 5, 5, 3, Duration::from_secs(10))?;
    wait_ready(&cluster).await?;
    // Measured from the settled placement: a hand-back under way would move owners (and the
    // requests sent to them) in the middle of a workload, and take CPU from both phases.
    wait_balanced(&cluster).await?;
    let s = Deployment::Single(&single);
    let c = Deployment::Cluster(&cluster);
    for w in REPLICATION {
        let letter = w.label.chars().nth(1).unwrap_or('?');
        if !opts.workloads.is_empty() && !opts.workloads.contains(&letter) {
            continue;
        }
        prepare(&s, &w).await?;
        prepare(&c, &w).await?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..opts.runs {
            a.push(measure(&s, &w, opts.duration).await?);
            b.push(measure(&c, &w, opts.duration).await?);
        }
        let (sa, sb) = (summarize(&a), summarize(&b));
        line(w.label, "1 node", &sa);
        line("", "5 nodes (5/3)", &sb);
        let p99_ratio = sb.p99 / sa.p99;
        println!(
            "  {:<46} replicated/single: throughput {:.2}x, p99 {:.2}x (goal p99 <= 2x: {})",
            "",
            sb.rps / sa.rps,
            p99_ratio,
            if matches!(w.work, Work::Read) {
                "n/a (reads)".to_string()
            } else if p99_ratio <= 2.0 {
                "met".into()
            } else {
                "NOT met".into()
            }
        );
    }
    Ok(())
}

async fn versus_etcd(opts: &Options) -> Result<(), String> {
    let Some(bin) = &opts.etcd else {
        println!("\n2. Colony vs etcd: skipped (no --etcd binary)");
        return Ok(());
    };
    println!(
        "\n2. Colony vs a 3-member etcd cluster, same write workloads (medians of {} x {:?})",
        opts.runs, opts.duration
    );
    let etcd = EtcdCluster::start(bin)?;
    let leader = etcd.leader_client_addr();
    let three = ColonyCluster::start(&opts.node, 3, 3, 2, Duration::from_secs(10))?;
    let five = ColonyCluster::start(&opts.node, 5, 5, 3, Duration::from_secs(10))?;
    wait_ready(&three).await?;
    wait_ready(&five).await?;
    wait_balanced(&three).await?;
    wait_balanced(&five).await?;
    for w in VERSUS_ETCD {
        let Work::Put(len) = w.work else { continue };
        let etcd_targets = etcd::put_targets(leader, &format!("k{len}-"), w.objects as u64, len);
        // Both systems warm: Colony's objects exist, etcd has written this workload's keys.
        prepare(&Deployment::Cluster(&three), &w).await?;
        prepare(&Deployment::Cluster(&five), &w).await?;
        etcd::run_spread(&etcd_targets, w.connections, WARM_UP).await;
        let (mut e, mut c3, mut c5) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..opts.runs {
            e.push(etcd::run_spread(&etcd_targets, w.connections, opts.duration).await);
            c3.push(measure(&Deployment::Cluster(&three), &w, opts.duration).await?);
            c5.push(measure(&Deployment::Cluster(&five), &w, opts.duration).await?);
            etcd.compact()?;
        }
        let (se, s3, s5) = (summarize(&e), summarize(&c3), summarize(&c5));
        line(w.label, "etcd (3)", &se);
        line("", "colony 3/2", &s3);
        line("", "colony 5/3", &s5);
        let goal3 = if w.connections == 1 { 1.0 } else { 1.5 };
        let r3 = s3.rps / se.rps;
        let r5 = s5.rps / se.rps;
        println!(
            "  {:<46} colony/etcd: 3/2 {:.2}x (goal >= {goal3}x: {}), 5/3 {:.2}x (goal >= 1x: {})",
            "",
            r3,
            if r3 >= goal3 { "met" } else { "NOT met" },
            r5,
            if r5 >= 1.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// How long etcd takes this section's load before it is measured.
const WARM_UP: Duration = Duration::from_secs(1);

/// Writes to `name` through `via` until one is acknowledged.
async fn first_ack(via: SocketAddr, name: &str) -> Result<(), String> {
    let path = format!("/v1/ns/default/names/{name}/kv/tick");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = request_json(via, Method::PUT, &path, "1").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no write to {name} was acknowledged within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Load on one object while its owner dies: `WRITERS` loops write to it through another node
/// and note when each write was sent and when it was acknowledged.
const WRITERS: usize = 4;

struct Writers {
    acks: std::sync::Arc<std::sync::Mutex<Vec<(Instant, Instant)>>>,
    /// The last failed attempt of each writer, to say why when no write gets through.
    last_error: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(via: SocketAddr, name: &str) -> Writers {
        let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let last_error = std::sync::Arc::new(std::sync::Mutex::new(vec![String::new(); WRITERS]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|w| {
                let (acks, last_error, stop) = (acks.clone(), last_error.clone(), stop.clone());
                let path = format!("/v1/ns/default/names/{name}/kv/w{w}");
                tokio::spawn(async move {
                    let mut n = 0u64;
                    // A keep-alive connection, like a real client's; a new one after a failure.
                    let mut conn: Option<load::Sender> = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 1;
                        let sent = Instant::now();
                        let outcome = match conn.as_mut() {
                            Some(c) => request_on(c, via, Method::PUT, &path, &n.to_string()).await,
                            None => match load::connect(via).await {
                                Ok(mut c) => {
                                    let r =
                                        request_on(&mut c, via, Method::PUT, &path, &n.to_string())
                                            .await;
                                    conn = Some(c);
                                    r
                                }
                                Err(e) => Err(format!("connect {via}: {e}")),
                            },
                        };
                        let failure = match outcome {
                            Ok((200, _)) => {
                                if let Ok(mut a) = acks.lock() {
                                    a.push((sent, Instant::now()));
                                }
                                continue;
                            }
                            Ok((status, body)) => format!("{status} {body}"),
                            Err(e) => {
                                conn = None;
                                e
                            }
                        };
                        if let Ok(mut l) = last_error.lock() {
                            l[w] = failure;
                        }
                        // Refused or unanswered while the slot fails over: try again soon.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Writers {
            acks,
            last_error,
            stop,
            tasks,
        }
    }

    /// When the first write sent after `t` was acknowledged, if one was.
    fn first_ack_sent_after(&self, t: Instant) -> Option<Instant> {
        let acks = self.acks.lock().ok()?;
        acks.iter()
            .filter(|(sent, _)| *sent >= t)
            .map(|(_, acked)| *acked)
            .min()
    }

    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn failover(opts: &Options) -> Result<(), String> {
    println!(
        "\n3. Failover: kill -9 of an owner under load -> first acknowledged write on its successor"
    );
    for &lease in &opts.leases {
        let mut cluster = ColonyCluster::start(&opts.node, 5, 5, 3, lease)?;
        wait_ready(&cluster).await?;
        let mut times = Vec::new();
        for t in 0..opts.failover_trials {
            let name = format!("failover-{t}");
            wait_balanced(&cluster).await?;
            let owner = owner_addr(&cluster, &name).await?;
            let victim = cluster
                .nodes
                .iter()
                .position(|n| n.addr == owner)
                .ok_or("owner not found")?;
            let via = cluster.nodes[(victim + 1) % cluster.nodes.len()].addr;
            first_ack(via, &name).await?;
            let writers = Writers::start(via, &name);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let killed = Instant::now();
            cluster.kill(victim);
            let deadline = killed + lease + Duration::from_secs(60);
            let acked = loop {
                if let Some(t) = writers.first_ack_sent_after(killed) {
                    break Some(t);
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let last_errors = writers
                .last_error
                .lock()
                .map(|l| l.join(" | "))
                .unwrap_or_default();
            writers.stop().await;
            let Some(acked) = acked else {
                if std::env::var_os("COLONY_BENCH_HOLD_ON_FAILURE").is_some() {
                    eprintln!(
                        "holding the cluster for 15 minutes to look at: control {}, nodes {:?}, via {via}",
                        cluster.control_addr(),
                        cluster
                            .nodes
                            .iter()
                            .map(|n| (n.addr, n.child.id()))
                            .collect::<Vec<_>>()
                    );
                    tokio::time::sleep(Duration::from_secs(900)).await;
                }
                return Err(format!(
                    "no write to {name} was acknowledged within {:?} of killing its owner (last failures: {last_errors})",
                    lease + Duration::from_secs(60)
                ));
            };
            let took = acked.duration_since(killed);
            times.push(took.as_secs_f64());
            cluster.restart(victim)?;
            wait_ready(&cluster).await?;
            eprintln!(
                "  lease {:?}, trial {}: {:.2} s",
                lease,
                t + 1,
                took.as_secs_f64()
            );
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let p50 = median(times.clone());
        let max = times.last().copied().unwrap_or(f64::NAN);
        let l = lease.as_secs_f64();
        println!(
            "  lease {:>4.1} s: {} trials, p50 {:.2} s (goal <= {:.0} s: {}), max {:.2} s (goal <= {:.0} s: {})",
            l,
            times.len(),
            p50,
            l + 2.0,
            if p50 <= l + 2.0 { "met" } else { "NOT met" },
            max,
            l + 5.0,
            if max <= l + 5.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

pub async fn run(opts: Options) -> Result<(), String> {
    println!("Colony replication benchmark");
    let want = |s: &str| opts.sections.is_empty() || opts.sections.iter().any(|x| x == s);
    if want("replication") {
        replication_cost(&opts).await?;
    }
    if want("etcd") {
        versus_etcd(&opts).await?;
    }
    if want("failover") {
        failover(&opts).await?;
    }
    Ok(())
}
