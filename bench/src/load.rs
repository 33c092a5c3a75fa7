//! A closed-loop HTTP/1.1 load generator: each connection is kept alive and sends its next request
//! as soon as the previous answer arrived; latencies go into a histogram.

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What one request looks like; `path` picks the path for (connection, iteration).
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub method: Method,
    pub path: Arc<dyn Fn(usize, u64) -> String + Send + Sync>,
    pub body: Bytes,
    /// Where in the body each request writes its own 16 hex digits (connection and iteration),
    /// so repeated writes of a value really change it: SQLite skips writing a row whose new
    /// content equals the old, so an unchanged value would commit nothing.
    pub stamp_at: Option<usize>,
}

impl Target {
    pub fn new(
        addr: SocketAddr,
        method: Method,
        body: &str,
        path: impl Fn(usize, u64) -> String + Send + Sync + 'static,
    ) -> Self {
        Target {
            addr,
            method,
            path: Arc::new(path),
            body: Bytes::copy_from_slice(body.as_bytes()),
            stamp_at: None,
        }
    }

    /// Each request overwrites 16 bytes of the body at `offset` with a stamp of its own.
    pub fn stamped(mut self, offset: usize) -> Self {
        assert!(offset + STAMP_LEN <= self.body.len(), "stamp past the body");
        self.stamp_at = Some(offset);
        self
    }

    fn body_for(&self, connection: usize, iteration: u64) -> Bytes {
        match self.stamp_at {
            None => self.body.clone(),
            Some(at) => {
                let mut body = self.body.to_vec();
                let stamp = format!("{:016x}", ((connection as u64) << 40) ^ iteration);
                body[at..at + STAMP_LEN].copy_from_slice(stamp.as_bytes());
                Bytes::from(body)
            }
        }
    }
}

/// Bytes a stamp takes.
pub const STAMP_LEN: usize = 16;

#[derive(Clone)]
pub struct Stats {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Microseconds.
    pub latency: Histogram<u64>,
}

impl Stats {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    pub fn p50_ms(&self) -> f64 {
        self.latency.value_at_quantile(0.50) as f64 / 1000.0
    }
    pub fn p99_ms(&self) -> f64 {
        self.latency.value_at_quantile(0.99) as f64 / 1000.0
    }
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn connect(addr: SocketAddr) -> std::io::Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request (connection `c`'s `i`th) and reads the whole answer; the status code, and
/// the start of the body when the status is not 200 (to say what went wrong).
pub async fn send(
    sender: &mut Sender,
    target: &Target,
    c: usize,
    i: u64,
) -> Result<(u16, Option<String>), String> {
    let path = (target.path)(c, i);
    let req = Request::builder()
        .method(target.method.clone())
        .uri(path)
        .header(hyper::header::HOST, target.addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(target.body_for(c, i)))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let detail = (status != 200).then(|| {
        let text = String::from_utf8_lossy(&body);
        text.chars().take(300).collect()
    });
    Ok((status, detail))
}

/// Runs `connections` closed loops against `target` for `duration`.
pub async fn run(target: &Target, connections: usize, duration: Duration) -> Stats {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut first_error = None;
                let mut sender = match connect(target.addr).await {
                    Ok(s) => s,
                    Err(e) => return (hist, 0, 1, Some(format!("cannot connect: {e}"))),
                };
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let sent = send(&mut sender, &target, c, i).await;
                    i += 1;
                    match sent {
                        Ok((200, _)) => {
                            ok += 1;
                            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                        Ok((status, body)) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                format!("HTTP {status}: {}", body.unwrap_or_default())
                            });
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                            match connect(target.addr).await {
                                Ok(s) => sender = s,
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    }
                }
                (hist, ok, errors, first_error)
            })
        })
        .collect();
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ok, mut errors) = (0, 0);
    let mut first_error = None;
    for t in tasks {
        if let Ok((h, o, e, first)) = t.await {
            let _ = latency.add(&h);
            ok += o;
            errors += e;
            first_error = first_error.or(first);
        }
    }
    if let Some(e) = &first_error {
        eprintln!("  {errors} failed requests; the first: {e}");
    }
    Stats {
        ok,
        errors,
        elapsed: started.elapsed(),
        latency,
    }
}

/// Sends `count` requests over `connections` connections as fast as they are answered (for
/// setup and for touching many objects); the number that did not answer 200.
pub async fn drive(target: &Target, connections: usize, count: u64) -> u64 {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The first failure is printed: a count alone says nothing about the cause.
    let reported = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let target = target.clone();
            let next = next.clone();
            let reported = reported.clone();
            let report = move |what: String| {
                if !reported.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("colony-bench: first failed request: {what}");
                }
            };
            tokio::spawn(async move {
                let mut failed = 0u64;
                let Ok(mut sender) = connect(target.addr).await else {
                    return count;
                };
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return failed;
                    }
                    match send(&mut sender, &target, c, i).await {
                        Ok((200, _)) => {}
                        Ok((status, detail)) => {
                            failed += 1;
                            report(format!("{status} {}", detail.unwrap_or_default()));
                        }
                        Err(e) => {
                            failed += 1;
                            report(e);
                            if let Ok(s) = connect(target.addr).await {
                                sender = s;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(count);
    }
    failed
}

/// The median (NaN for none); benchmarks run more than once on shared machines and quote it.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Medians of several runs of one workload on one system.
#[derive(Clone, Copy)]
pub struct Summary {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
}

/// `  1234 req/s  p50    0.54 ms  p99    0.86 ms`, then the error count if there were errors; the
/// throughput column is `width` wide.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = f.width().unwrap_or(9);
        write!(
            f,
            "{:>width$.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.rps, self.p50, self.p99
        )?;
        if self.errors > 0 {
            write!(f, "  ({} errors)", self.errors)?;
        }
        Ok(())
    }
}

pub fn summarize(runs: &[Stats]) -> Summary {
    Summary {
        rps: median(runs.iter().map(Stats::rps).collect()),
        p50: median(runs.iter().map(Stats::p50_ms).collect()),
        p99: median(runs.iter().map(Stats::p99_ms).collect()),
        errors: runs.iter().map(|s| s.errors).sum(),
    }
}
