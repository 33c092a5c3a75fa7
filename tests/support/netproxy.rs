//! A TCP proxy for partitioning nodes that run on loopback.
//!
//! Each node `i` listens on its own loopback address ([`loopback_ip`]) and binds that address as
//! the source of its outgoing connections. Nobody reaches a node directly: other parties connect
//! to the node's forwarder (see [`NetProxy::forward`]), which sees the source address of each
//! connection and so knows which party is calling. Addresses not registered with
//! [`NetProxy::add_party`] (such as 127.0.0.1, where test clients usually connect from) belong to
//! the party [`CLIENT`].
//!
//! Rules act on connections, identified by (initiating party, party behind the forwarder):
//!
//! - [`Mode::Reset`]: new connections are reset as soon as they are accepted, existing ones are
//!   reset at once. Peers see connection resets, like a refused connection.
//! - [`Mode::Blackhole`]: nothing is forwarded, in either direction, on the connections the rule
//!   covers; new ones are accepted and left silent. Peers see timeouts. When the rule is lifted,
//!   stalled connections resume (like a partition that healed before TCP gave up) and silent new
//!   connections are connected through.
//!
//! A one-way rule `from -> to` covers the connections `from` opens to `to`, with the data flowing
//! both ways on them; connections `to` opens to `from` are not affected. (Dropping only the packets
//! of one direction would break TCP connections both ways; the connection level is where an
//! asymmetric fault is meaningful.) [`NetProxy::block`] sets both directions, [`NetProxy::isolate`]
//! cuts a party from every other party, including [`CLIENT`] and any control-plane party.
//!
//! Forwarding is plain bytes, so protocol upgrades (HTTP/1.1 `Upgrade`, WebSocket) pass through.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

/// The party of every address not registered with [`NetProxy::add_party`].
pub const CLIENT: &str = "client";

const BUFFER: usize = 64 * 1024;

/// The loopback address of node `i`: 127.0.0.(10 + i). Linux routes all of 127.0.0.0/8 to `lo`.
pub fn loopback_ip(i: usize) -> IpAddr {
    assert!(i <= 245, "loopback_ip({i}): only 246 node addresses");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8))
}

/// Connects to `to` from the address `from` (port chosen by the kernel).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Checks that each address can be listened on and connected from (each one connects to the
/// next), and that the listener sees the bound source address.
pub async fn check_loopback(ips: &[IpAddr]) -> io::Result<()> {
    let unusable = |ip: IpAddr, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "loopback address {ip} is unusable ({e}); Linux routes 127.0.0.0/8 to lo, \
                 elsewhere add an alias for it"
            ),
        )
    };
    for (k, &ip) in ips.iter().enumerate() {
        let listener = TcpListener::bind((ip, 0))
            .await
            .map_err(|e| unusable(ip, e))?;
        let from = ips[(k + 1) % ips.len()];
        let addr = listener.local_addr()?;
        let (connected, accepted) = tokio::join!(connect_from(from, addr), listener.accept());
        connected.map_err(|e| unusable(from, e))?;
        let (_, peer) = accepted?;
        if peer.ip() != from {
            return Err(io::Error::other(format!(
                "connection from {from} arrived from {}",
                peer.ip()
            )));
        }
    }
    Ok(())
}

/// What happens to the connections a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Silently drop everything: peers time out.
    Blackhole,
    /// Reset at once: peers see connection resets.
    Reset,
}

#[derive(Clone, Default, Debug)]
struct Rules {
    /// (initiator, acceptor) pairs.
    oneway: HashMap<(String, String), Mode>,
    isolated: HashMap<String, Mode>,
}

impl Rules {
    /// The strongest rule covering connections from `from` to `to`, `None` if they flow.
    fn verdict(&self, from: &str, to: &str) -> Option<Mode> {
        let pair = self.oneway.get(&(from.to_string(), to.to_string()));
        let isolated = [from, to]
            .into_iter()
            .filter(|_| from != to)
            .filter_map(|p| self.isolated.get(p));
        pair.into_iter().chain(isolated).copied().max()
    }
}

struct Shared {
    parties: Mutex<HashMap<IpAddr, String>>,
    rules: watch::Sender<Rules>,
    active: AtomicUsize,
    /// (from, to) -> bytes to let through before flipping one (see [`NetProxy::corrupt_after`]).
    corrupt: Mutex<HashMap<(String, String), usize>>,
    corrupted: AtomicUsize,
}

impl Shared {
    fn party_of(&self, ip: IpAddr) -> String {
        let parties = self.parties.lock().unwrap();
        parties.get(&ip).cloned().unwrap_or_else(|| CLIENT.into())
    }
}

/// Forwarders sharing one rule table. Dropping it stops every forwarder and closes every
/// connection.
pub struct NetProxy {
    shared: Arc<Shared>,
    forwarders: Mutex<Vec<AbortHandle>>,
}

impl Default for NetProxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetProxy {
    fn drop(&mut self) {
        for forwarder in self.forwarders.lock().unwrap().drain(..) {
            forwarder.abort();
        }
    }
}

impl NetProxy {
    pub fn new() -> Self {
        NetProxy {
            shared: Arc::new(Shared {
                parties: Mutex::new(HashMap::new()),
                rules: watch::Sender::new(Rules::default()),
                active: AtomicUsize::new(0),
                corrupt: Mutex::new(HashMap::new()),
                corrupted: AtomicUsize::new(0),
            }),
            forwarders: Mutex::new(Vec::new()),
        }
    }

    /// Names the party connecting from `ip`. Takes effect for connections accepted afterwards.
    pub fn add_party(&self, name: &str, ip: IpAddr) {
        self.shared
            .parties
            .lock()
            .unwrap()
            .insert(ip, name.to_string());
    }

    /// The party connecting from `ip`: a registered name or [`CLIENT`].
    pub fn party_of(&self, ip: IpAddr) -> String {
        self.shared.party_of(ip)
    }

    /// Listens on `listen` (port 0: any) and forwards connections to `target`, on behalf of
    /// `party` (the party behind `target`). Returns the address listened on. Must be called
    /// inside a tokio runtime; forwarding runs until the proxy is dropped.
    pub async fn forward(
        &self,
        party: &str,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(
            listener,
            party.to_string(),
            target,
            Arc::clone(&self.shared),
        ));
        self.forwarders.lock().unwrap().push(task.abort_handle());
        Ok(addr)
    }

    /// Cuts the connections `from` opens to `to` (see the module documentation).
    /// Flips one byte of what `from` sends to `to` on its connections through the proxy, after
    /// letting `skip` bytes pass (counted from now, over all such connections).
    pub fn corrupt_after(&self, from: &str, to: &str, skip: usize) {
        self.shared
            .corrupt
            .lock()
            .unwrap()
            .insert((from.to_string(), to.to_string()), skip);
    }

    /// How many bytes were flipped so far.
    pub fn corrupted(&self) -> usize {
        self.shared.corrupted.load(Ordering::SeqCst)
    }

    pub fn block_oneway_with(&self, from: &str, to: &str, mode: Mode) {
        self.shared.rules.send_modify(|r| {
            r.oneway.insert((from.to_string(), to.to_string()), mode);
        });
    }

    /// Cuts the connections between `a` and `b`, whoever opens them.
    pub fn block_with(&self, a: &str, b: &str, mode: Mode) {
        self.shared.rules.send_modify(|r| {
            r.oneway.insert((a.to_string(), b.to_string()), mode);
            r.oneway.insert((b.to_string(), a.to_string()), mode);
        });
    }

    /// Cuts `a` from every other party, [`CLIENT`] included.
    pub fn isolate_with(&self, a: &str, mode: Mode) {
        self.shared.rules.send_modify(|r| {
            r.isolated.insert(a.to_string(), mode);
        });
    }

    /// [`block_with`](Self::block_with) resetting connections.
    pub fn block(&self, a: &str, b: &str) {
        self.block_with(a, b, Mode::Reset);
    }

    /// [`block_oneway_with`](Self::block_oneway_with) resetting connections.
    pub fn block_oneway(&self, from: &str, to: &str) {
        self.block_oneway_with(from, to, Mode::Reset);
    }

    /// [`isolate_with`](Self::isolate_with) resetting connections.
    pub fn isolate(&self, a: &str) {
        self.isolate_with(a, Mode::Reset);
    }

    /// [`block_with`](Self::block_with) silently dropping traffic.
    pub fn blackhole(&self, a: &str, b: &str) {
        self.block_with(a, b, Mode::Blackhole);
    }

    /// [`block_oneway_with`](Self::block_oneway_with) silently dropping traffic.
    pub fn blackhole_oneway(&self, from: &str, to: &str) {
        self.block_oneway_with(from, to, Mode::Blackhole);
    }

    /// [`isolate_with`](Self::isolate_with) silently dropping traffic.
    pub fn isolate_blackhole(&self, a: &str) {
        self.isolate_with(a, Mode::Blackhole);
    }

    /// Lifts the rules between `a` and `b` (both directions); isolation rules stay.
    pub fn heal(&self, a: &str, b: &str) {
        self.shared.rules.send_modify(|r| {
            r.oneway.remove(&(a.to_string(), b.to_string()));
            r.oneway.remove(&(b.to_string(), a.to_string()));
        });
    }

    /// Lifts the isolation of `a`; rules naming `a` and another party stay.
    pub fn rejoin(&self, a: &str) {
        self.shared.rules.send_modify(|r| {
            r.isolated.remove(a);
        });
    }

    /// Lifts every rule.
    pub fn heal_all(&self) {
        self.shared.rules.send_modify(|r| {
            r.oneway.clear();
            r.isolated.clear();
        });
    }

    /// What happens now to connections opened by `from` to `to`: `None` if they flow.
    pub fn verdict(&self, from: &str, to: &str) -> Option<Mode> {
        self.shared.rules.borrow().verdict(from, to)
    }

    /// Connections accepted and not yet closed, over all forwarders.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

async fn accept_loop(listener: TcpListener, to: String, target: SocketAddr, shared: Arc<Shared>) {
    // Connection tasks live in the set: aborting this task (the proxy is dropped) aborts them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let from = shared.party_of(peer.ip());
                    connections.spawn(connection(stream, from, to.clone(), target, Arc::clone(&shared)));
                }
                // Out of file descriptors and the like: wait for connections to close.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Counts a connection as active while it lives.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes with a reset rather than the orderly FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(
    mut client: TcpStream,
    from: String,
    to: String,
    target: SocketAddr,
    shared: Arc<Shared>,
) {
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard(Arc::clone(&shared));
    let mut rules = shared.rules.subscribe();
    let _ = client.set_nodelay(true);

    // A blackholed connection stays silent until the rule changes (even if the client gives up:
    // nothing reads from it).
    loop {
        match rules.borrow_and_update().verdict(&from, &to) {
            None => break,
            Some(Mode::Reset) => return reset(client),
            Some(Mode::Blackhole) => {}
        }
        if rules.changed().await.is_err() {
            return reset(client);
        }
    }
    // Connecting can take long (a stopped node's backlog is full); a reset rule interrupts it.
    let connecting = TcpStream::connect(target);
    tokio::pin!(connecting);
    let mut upstream = loop {
        tokio::select! {
            connected = &mut connecting => match connected {
                Ok(upstream) => break upstream,
                // Nothing listening: the client sees what it would see connecting directly.
                Err(_) => return reset(client),
            },
            changed = rules.changed() => {
                let verdict = rules.borrow_and_update().verdict(&from, &to);
                if changed.is_err() || verdict == Some(Mode::Reset) {
                    return reset(client);
                }
            }
        }
    };
    let _ = upstream.set_nodelay(true);
    let orderly = pump(&mut client, &mut upstream, &from, &to, &mut rules, &shared).await;
    if !orderly {
        reset(client);
        reset(upstream);
    }
}

/// One direction of a connection: bytes read but not yet written, and how far it got.
struct Pipe {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    shut: bool,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            shut: false,
        }
    }

    /// Does one read, one write or the final shutdown. Cancel-safe: each await is a single
    /// operation and the state is updated only once it completes. `tap` sees (and may alter)
    /// every chunk read before it is written on.
    async fn step(
        &mut self,
        r: &mut ReadHalf<'_>,
        w: &mut WriteHalf<'_>,
        tap: &(dyn Fn(&mut [u8]) + Sync),
    ) -> io::Result<()> {
        if self.start < self.end {
            let n = w.write(&self.buf[self.start..self.end]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.start += n;
        } else if self.eof {
            w.shutdown().await?;
            self.shut = true;
        } else {
            let n = r.read(&mut self.buf).await?;
            tap(&mut self.buf[..n]);
            (self.start, self.end, self.eof) = (0, n, n == 0);
        }
        Ok(())
    }
}

/// Copies both ways until both sides have closed (true) or the connection must be reset: an
/// error on either side, or a reset rule (false). Blackhole rules pause copying.
async fn pump(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    from: &str,
    to: &str,
    rules: &mut watch::Receiver<Rules>,
    shared: &Arc<Shared>,
) -> bool {
    let (mut client_r, mut client_w) = client.split();
    let key = (from.to_string(), to.to_string());
    let corrupt_up = |chunk: &mut [u8]| {
        let mut rules = shared.corrupt.lock().unwrap();
        if let Some(skip) = rules.get_mut(&key) {
            if *skip < chunk.len() {
                chunk[*skip] ^= 0x5a;
                rules.remove(&key);
                shared.corrupted.fetch_add(1, Ordering::SeqCst);
            } else {
                *skip -= chunk.len();
            }
        }
    };
    let pass = |_: &mut [u8]| {};
    let (mut upstream_r, mut upstream_w) = upstream.split();
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    let mut verdict = rules.borrow_and_update().verdict(from, to);
    loop {
        if verdict == Some(Mode::Reset) {
            return false;
        }
        if up.shut && down.shut {
            return true;
        }
        let open = verdict.is_none();
        tokio::select! {
            changed = rules.changed() => {
                if changed.is_err() {
                    return false;
                }
                verdict = rules.borrow_and_update().verdict(from, to);
            }
            done = up.step(&mut client_r, &mut upstream_w, &corrupt_up), if open && !up.shut => {
                if done.is_err() {
                    return false;
                }
            }
            done = down.step(&mut upstream_r, &mut client_w, &pass), if open && !down.shut => {
                if done.is_err() {
                    return false;
                }
            }
        }
    }
}
