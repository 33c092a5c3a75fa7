//! The object-host benchmark: one Colony node against workerd, same workloads, same run.

use crate::load::{self, Target, summarize};
use crate::systems::{self, Process};
use hyper::Method;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Options {
    pub duration: Duration,
    pub runs: usize,
    pub connections: usize,
    pub objects: u64,
    pub node: PathBuf,
    pub workerd: Option<PathBuf>,
    pub workerd_config: PathBuf,
    pub rss_objects: Vec<u64>,
    pub peer_rss_objects: Option<u64>,
    /// Letters of the workloads to run (empty: all).
    pub workloads: Vec<char>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Colony,
    Workerd,
}

#[derive(Clone, Copy)]
struct Workload {
    label: &'static str,
    connections_all: bool,
    many_objects: bool,
    read: bool,
    /// Colony/workerd throughput ratio the issue asks for.
    goal: f64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        label: "(a) 1 object, 1 connection, SQL increment",
        connections_all: false,
        many_objects: false,
        read: false,
        goal: 2.0,
    },
    Workload {
        label: "(b) 1 object, 64 connections, SQL increment",
        connections_all: true,
        many_objects: false,
        read: false,
        goal: 4.0,
    },
    Workload {
        label: "(c) 1000 objects, 64 connections, SQL increment",
        connections_all: true,
        many_objects: true,
        read: false,
        goal: 4.0,
    },
    Workload {
        label: "(d) 1 object, 64 connections, SQL read",
        connections_all: true,
        many_objects: false,
        read: true,
        goal: 3.0,
    },
];

pub const INCR_SQL: &str =
    "INSERT INTO counter(id, n) VALUES (1, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1 RETURNING n";
pub const READ_SQL: &str = "SELECT n FROM counter WHERE id = 1";
pub const CREATE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS counter(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)";

pub fn sql_body(sql: &str) -> String {
    serde_json::json!({ "sql": sql }).to_string()
}

fn object_name(w: &Workload, objects: u64, conn: usize, i: u64) -> String {
    if w.many_objects {
        format!("obj-{}", (conn as u64 * 7919 + i) % objects)
    } else {
        "one".to_string()
    }
}

fn target(sys: System, p: &Process, w: Workload, objects: u64) -> Target {
    match sys {
        System::Colony => {
            let body = sql_body(if w.read { READ_SQL } else { INCR_SQL });
            Target::new(p.addr, Method::POST, &body, move |c, i| {
                format!(
                    "/v1/ns/default/names/{}/sql",
                    object_name(&w, objects, c, i)
                )
            })
        }
        System::Workerd => {
            let (method, op) = if w.read {
                (Method::GET, "read")
            } else {
                (Method::POST, "incr")
            };
            Target::new(p.addr, method, "", move |c, i| {
                format!("/obj/{}/{op}", object_name(&w, objects, c, i))
            })
        }
    }
}

/// Creates the counter tables (Colony) and instantiates every object once (both), so the
/// measurement sees warm objects on both sides.
async fn prepare(sys: System, p: &Process, objects: u64) -> Result<(), String> {
    let names = move |_: usize, i: u64| {
        if i == objects {
            "one".to_string()
        } else {
            format!("obj-{i}")
        }
    };
    if sys == System::Colony {
        let create = Target::new(p.addr, Method::POST, &sql_body(CREATE_SQL), move |c, i| {
            format!("/v1/ns/default/names/{}/sql", names(c, i))
        });
        let failed = load::drive(&create, 16, objects + 1).await;
        if failed > 0 {
            return Err(format!("{failed} table creations failed on colony"));
        }
    }
    let touch = match sys {
        System::Colony => Target::new(p.addr, Method::POST, &sql_body(INCR_SQL), move |c, i| {
            format!("/v1/ns/default/names/{}/sql", names(c, i))
        }),
        System::Workerd => Target::new(p.addr, Method::POST, "", move |c, i| {
            format!("/obj/{}/incr", names(c, i))
        }),
    };
    let failed = load::drive(&touch, 16, objects + 1).await;
    if failed > 0 {
        return Err(format!("{failed} warm-up requests failed"));
    }
    Ok(())
}

/// Touches `milestones` objects (creating each with one write) and reports RSS at each.
async fn rss_phase(
    sys: System,
    p: &Process,
    milestones: &[u64],
) -> Result<Vec<(u64, u64, f64)>, String> {
    let mut done = 0u64;
    let mut out = Vec::new();
    for &m in milestones {
        let offset = done;
        let t = match sys {
            System::Colony => {
                let body = serde_json::json!({"batch": [{"sql": CREATE_SQL}, {"sql": INCR_SQL}]})
                    .to_string();
                Target::new(p.addr, Method::POST, &body, move |_, i| {
                    format!("/v1/ns/default/names/rss-{}/sql", offset + i)
                })
            }
            System::Workerd => Target::new(p.addr, Method::POST, "", move |_, i| {
                format!("/obj/rss-{}/incr", offset + i)
            }),
        };
        let started = Instant::now();
        let failed = load::drive(&t, 64, m - done).await;
        let rate = (m - done) as f64 / started.elapsed().as_secs_f64();
        if failed > 0 {
            return Err(format!("{failed} of {} object touches failed", m - done));
        }
        done = m;
        // Let idle-object housekeeping run, as it would on a live node.
        tokio::time::sleep(Duration::from_secs(2)).await;
        out.push((m, p.rss_bytes().unwrap_or(0), rate));
    }
    Ok(out)
}

pub async fn run(opts: Options) -> Result<(), String> {
    println!(
        "Colony object-host benchmark: {} run(s) of {:?} per workload and system, medians shown",
        opts.runs, opts.duration
    );
    let colony = systems::start_colony(&opts.node, "")?;
    prepare(System::Colony, &colony, opts.objects).await?;
    let workerd = match &opts.workerd {
        Some(bin) => {
            let w = systems::start_workerd(bin, &opts.workerd_config)?;
            prepare(System::Workerd, &w, opts.objects).await?;
            Some(w)
        }
        None => None,
    };

    let mut table = Vec::new();
    for w in WORKLOADS {
        let letter = w.label.chars().nth(1).unwrap_or('?');
        if !opts.workloads.is_empty() && !opts.workloads.contains(&letter) {
            continue;
        }
        let conns = if w.connections_all {
            opts.connections
        } else {
            1
        };
        let mut colony_runs = Vec::new();
        let mut peer_runs = Vec::new();
        for _ in 0..opts.runs {
            // Alternate systems so both see the same background noise.
            colony_runs.push(
                load::run(
                    &target(System::Colony, &colony, w, opts.objects),
                    conns,
                    opts.duration,
                )
                .await,
            );
            if let Some(p) = &workerd {
                peer_runs.push(
                    load::run(
                        &target(System::Workerd, p, w, opts.objects),
                        conns,
                        opts.duration,
                    )
                    .await,
                );
            }
        }
        let c = summarize(&colony_runs);
        let p = (!peer_runs.is_empty()).then(|| summarize(&peer_runs));
        println!("  {:<48} colony {c:>9}", w.label);
        if let Some(p) = &p {
            println!("  {:<48} workerd {p:>8}", "");
        }
        table.push((w, c, p));
    }

    if workerd.is_some() {
        println!();
        println!("Colony / workerd (same run, same machine):");
        for (w, c, p) in &table {
            if let Some(p) = p {
                let ratio = c.rps / p.rps;
                let p99_ok = c.p99 <= p.p99;
                println!(
                    "  {:<48} throughput {:>6.2}x (goal >= {:.0}x: {})  p99 {:.2} vs {:.2} ms ({})",
                    w.label,
                    ratio,
                    w.goal,
                    if ratio >= w.goal { "met" } else { "NOT met" },
                    c.p99,
                    p.p99,
                    if p99_ok { "no worse" } else { "WORSE" }
                );
            }
        }
    }
    drop(workerd);
    drop(colony);

    if !opts.rss_objects.is_empty() {
        println!();
        let fresh = systems::start_colony(&opts.node, "")?;
        for (n, rss, rate) in rss_phase(System::Colony, &fresh, &opts.rss_objects).await? {
            let mb = rss as f64 / 1e6;
            let goal = if n >= 100_000 {
                format!(
                    "  (goal <= 600 MB: {})",
                    if mb <= 600.0 { "met" } else { "NOT met" }
                )
            } else {
                String::new()
            };
            println!(
                "  colony RSS after touching {n:>7} objects: {mb:>7.1} MB  ({rate:.0} new objects/s){goal}"
            );
        }
    }
    if let (Some(n), Some(bin)) = (opts.peer_rss_objects, &opts.workerd) {
        let w = systems::start_workerd(bin, &opts.workerd_config)?;
        for (n, rss, rate) in rss_phase(System::Workerd, &w, &[n]).await? {
            println!(
                "  workerd RSS after touching {n:>6} objects: {:>7.1} MB  ({rate:.0} new objects/s)",
                rss as f64 / 1e6
            );
        }
    }
    Ok(())
}
