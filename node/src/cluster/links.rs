//! Outgoing replication connections: one per follower node, shared by every slot this node owns
//! and that node follows.
//!
//! A link connects to the follower's API port and upgrades the connection
//! (`Upgrade: colony-replication`). Frames sent while it is down are dropped: on (re)connect the
//! owner probes each shared slot and resends from its recent entries, or asks for a snapshot sync.
//!
//! Frames normally queue for the link's task, which writes everything queued with one write.
//! The entry of a lone request (nothing else in flight on the owner) is written to the socket by
//! the thread that sends it instead, when nothing is queued: it reaches the followers before the
//! owner starts its own fsync, with no hand-off to the link's task (a hand-off wakes a thread,
//! tens of microseconds on a VM, and here it delays the write's acknowledgement). That is done
//! only for the followers the owner counts on for its quorum; the others' copies go to their
//! links' tasks. Under concurrency the task's batching is worth more than that, and the task
//! lets the other ready tasks run before it writes, so their entries go out in the same write.
//! Frames keep their order either way.

use super::Cluster;
use super::wire::{Frame, PROTOCOL_VERSION, SYNC_NOW_SINCE, VERSION_HEADER};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

pub const UPGRADE_PROTOCOL: &str = "colony-replication";
pub const REPLICATE_PATH: &str = "/v1/internal/replicate";

#[derive(Default)]
pub struct Links {
    links: Mutex<HashMap<String, Arc<Link>>>,
    cluster: OnceLock<Weak<Cluster>>,
    runtime: OnceLock<tokio::runtime::Handle>,
}

/// The sending side of one link.
#[derive(Default)]
struct Link {
    out: Mutex<Outgoing>,
    /// Wakes the link's task when bytes are queued for it.
    queued: Notify,
}

#[derive(Default)]
struct Outgoing {
    /// The connection, while up.
    socket: Option<Arc<OwnedWriteHalf>>,
    /// Bytes the socket did not take yet; the link's task writes them.
    queue: BytesMut,
    /// The link's task is writing (queued bytes, or bytes it took from the queue): senders queue
    /// behind it instead of writing themselves, so frames keep their order.
    task_writes: bool,
    /// The follower knows [`Frame::SyncNow`] (stated in its upgrade response).
    takes_sync_now: bool,
}

impl Link {
    fn out(&self) -> MutexGuard<'_, Outgoing> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `bytes` (whole frames) for the link's task.
    fn queue(&self, bytes: &[u8]) {
        let out = self.out();
        if out.socket.is_none() {
            return; // down: dropped (see the module comment)
        }
        self.queue_locked(out, bytes);
    }

    fn queue_locked(&self, mut out: MutexGuard<'_, Outgoing>, bytes: &[u8]) {
        out.queue.extend_from_slice(bytes);
        if !out.task_writes {
            out.task_writes = true;
            drop(out);
            self.queued.notify_one();
        }
    }

    /// Sends an entry's frame followed by a [`Frame::SyncNow`] (`bytes`, the entry's frame being
    /// the first `append_len`), or the entry alone to a follower that does not know `SyncNow`;
    /// written by this thread (`now`) or queued for the link's task.
    fn send_counted_on(&self, bytes: &[u8], append_len: usize, now: bool) {
        let out = self.out();
        if out.socket.is_none() {
            return; // down: dropped (see the module comment)
        }
        let bytes = if out.takes_sync_now {
            bytes
        } else {
            &bytes[..append_len]
        };
        if now {
            self.write_now_locked(out, bytes);
        } else {
            self.queue_locked(out, bytes);
        }
    }

    /// Writes `bytes` (whole frames) now if nothing is queued and the socket takes them; queues
    /// what it does not take.
    #[cfg(test)]
    fn write_now(&self, bytes: &[u8]) {
        self.write_now_locked(self.out(), bytes);
    }

    fn write_now_locked(&self, mut out: MutexGuard<'_, Outgoing>, bytes: &[u8]) {
        let Some(socket) = out.socket.clone() else {
            return; // down: dropped (see the module comment)
        };
        if out.task_writes {
            out.queue.extend_from_slice(bytes);
            return;
        }
        // Nothing written on an error (WouldBlock, or a broken socket: the link's task meets
        // that too and reconnects).
        let written: usize = socket.try_write(bytes).unwrap_or_default();
        if written < bytes.len() {
            out.queue.extend_from_slice(&bytes[written..]);
            out.task_writes = true;
            drop(out);
            self.queued.notify_one();
        }
    }
}

impl Links {
    pub fn bind(&self, cluster: &Arc<Cluster>, runtime: tokio::runtime::Handle) {
        let _ = self.cluster.set(Arc::downgrade(cluster));
        let _ = self.runtime.set(runtime);
    }

    /// Sends a frame to `node`, starting its link if there is none.
    pub fn send(&self, node: &str, frame: Frame) {
        let mut bytes = BytesMut::new();
        frame.encode(&mut bytes);
        self.link(node).queue(&bytes);
    }

    /// Tells `node` to commit what it was sent ([`Frame::SyncNow`]), if it knows how.
    pub fn send_sync_now(&self, node: &str) {
        let link = self.link(node);
        let out = link.out();
        if out.socket.is_some() && out.takes_sync_now {
            let mut bytes = BytesMut::new();
            Frame::SyncNow.encode(&mut bytes);
            link.queue_locked(out, &bytes);
        }
    }

    /// Sends an append frame to several nodes, encoding it once, followed by a
    /// [`Frame::SyncNow`] to those marked `true` (see [`crate::storage::log::NodeLog::urge`])
    /// that know it; `now`: written by this thread where nothing is queued (for a lone request,
    /// see the module comment).
    pub fn send_append(&self, nodes: &[(&str, bool)], frame: &Frame, now: bool) {
        if nodes.is_empty() {
            return;
        }
        let mut bytes = BytesMut::new();
        frame.encode(&mut bytes);
        let append_len = bytes.len();
        Frame::SyncNow.encode(&mut bytes);
        // Those counted on first: on a lone request this thread writes to their sockets before
        // it logs the entry itself, and the others' bytes go to their links' tasks, off the
        // request's path.
        for &(node, _) in nodes.iter().filter(|(_, urgent)| *urgent) {
            self.link(node).send_counted_on(&bytes, append_len, now);
        }
        for &(node, _) in nodes.iter().filter(|(_, urgent)| !*urgent) {
            self.link(node).queue(&bytes[..append_len]);
        }
    }

    fn link(&self, node: &str) -> Arc<Link> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = links.get(node) {
            return link.clone();
        }
        let link = Arc::new(Link::default());
        links.insert(node.to_string(), link.clone());
        if let (Some(cluster), Some(rt)) = (self.cluster.get().cloned(), self.runtime.get()) {
            rt.spawn(run_link(cluster, node.to_string(), link.clone()));
        }
        link
    }
}

/// The protocol version a follower states in its upgrade response head (1 when it does not).
fn version_in(head: &str) -> u8 {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(VERSION_HEADER))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(1)
}

/// Connects to a follower and upgrades the connection; returns it with the follower's protocol
/// version.
async fn connect(
    addr: &str,
    source: Option<IpAddr>,
    me: &str,
    token: Option<&str>,
) -> std::io::Result<(TcpStream, u8)> {
    let target: SocketAddr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} does not resolve")))?;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "GET {REPLICATE_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\nX-Colony-Node: {me}\r\n{auth}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Read the response head byte by byte: frames may follow it in the same packet.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await? == 0 || head.len() > 8192 {
                return Err(std::io::Error::other("connection closed during upgrade"));
            }
            head.push(byte[0]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upgrade timed out"))??;
    let status = String::from_utf8_lossy(&head);
    if !status.starts_with("HTTP/1.1 101") {
        return Err(std::io::Error::other(format!(
            "upgrade refused: {}",
            status.lines().next().unwrap_or_default()
        )));
    }
    Ok((stream, version_in(&status)))
}

/// The first wait before connecting again after a failed attempt; it doubles up to
/// [`MAX_BACKOFF`] while attempts keep failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A link lost sooner than this after it came up counts as a failed attempt: the next one waits
/// the backoff. Without that, a follower that took the upgrade and then dropped the connection
/// at once (or an owner that met a frame it could not read) reconnected in a tight loop, through
/// hundreds of connections a second. A link that lived longer reconnects at once.
const STABLE_LINK: Duration = Duration::from_secs(1);

async fn run_link(cluster: Weak<Cluster>, node: String, link: Arc<Link>) {
    let mut backoff = FIRST_BACKOFF;
    let backoff_after = |backoff: &mut Duration| {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        wait
    };
    loop {
        let Some(cl) = cluster.upgrade() else { return };
        let Some(addr) = cl.address_of(&node) else {
            drop(cl);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (stream, version) =
            match connect(&addr, cl.source_address, &cl.me, cl.peers.token()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(node, error = %e, "replication link down");
                    drop(cl);
                    tokio::time::sleep(backoff_after(&mut backoff)).await;
                    continue;
                }
            };
        let up_since = std::time::Instant::now();
        let (mut reader, mut writer) = stream.into_split();
        let mut hello = BytesMut::new();
        Frame::Hello {
            node: cl.me.clone(),
            version: PROTOCOL_VERSION,
        }
        .encode(&mut hello);
        if writer.write_all(&hello).await.is_err() {
            drop(cl);
            tokio::time::sleep(backoff_after(&mut backoff)).await;
            continue;
        }
        let socket = Arc::new(writer);
        {
            let mut out = link.out();
            out.socket = Some(socket.clone());
            out.queue.clear();
            out.task_writes = false;
            out.takes_sync_now = version >= SYNC_NOW_SINCE;
        }
        tracing::debug!(node, version, "replication link up");
        cl.on_link_up(&node);
        let cl_reader = cl.clone();
        let from = node.clone();
        drop(cl);
        let mut read_task = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 << 10);
            loop {
                loop {
                    match Frame::decode(&mut buf) {
                        Ok(Some(f)) => cl_reader.on_frame_from_follower(&from, f),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(node = from, error = %e, "bad frame from follower; reconnecting");
                            cl_reader.metrics_corrupt_frame();
                            return;
                        }
                    }
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        tokio::select! {
            _ = write_queued(&link, &socket) => {}
            _ = &mut read_task => {}
        }
        read_task.abort();
        {
            let mut out = link.out();
            out.socket = None;
            out.queue.clear();
            out.task_writes = false;
        }
        drop(socket);
        if up_since.elapsed() < STABLE_LINK {
            let wait = backoff_after(&mut backoff);
            tracing::debug!(node, ?wait, "replication link lost soon after it came up");
            tokio::time::sleep(wait).await;
        } else {
            backoff = FIRST_BACKOFF;
            tracing::debug!(node, "replication link lost; reconnecting");
        }
    }
}

/// Writes what senders queued, until the socket fails.
async fn write_queued(link: &Link, socket: &OwnedWriteHalf) {
    loop {
        link.queued.notified().await;
        // Let the tasks ready on this worker run first: under load they are requests whose
        // entries join this write. Each write to a loopback or LAN socket costs the sender the
        // receiver's TCP processing too; with 64 clients on 5 nodes this cut the socket sends per
        // replicated write from 2.1 to 1.3. When nothing else is ready the yield returns at once.
        tokio::task::yield_now().await;
        loop {
            let mut bytes = {
                let mut out = link.out();
                if out.queue.is_empty() {
                    out.task_writes = false;
                    break;
                }
                out.queue.split()
            };
            while !bytes.is_empty() {
                if socket.writable().await.is_err() {
                    return;
                }
                match socket.try_write(&bytes) {
                    Ok(n) => {
                        let _ = bytes.split_to(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Frames written directly and frames queued for the task, mixed, with the receiver slow
    /// enough that the socket buffer fills (direct writes then queue their rest): the peer gets
    /// every frame, whole, in the order sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_frames_arrive_whole_and_in_order() {
        let (link, mut peer, writer) = connected_link().await;
        const FRAMES: u64 = 400;
        // Frames of a few KiB each, of varying length: the socket fills within the first few
        // hundred and writes end mid-frame.
        let frame = |i: u64| Frame::Append {
            entry: bytes::Bytes::from(vec![i as u8; 3000 + i as usize % 7]),
            kind: crate::storage::record::RecordKind::PageSet,
            epoch: i,
        };
        let sender = std::thread::spawn({
            let link = link.clone();
            move || {
                for i in 0..FRAMES {
                    let mut bytes = BytesMut::new();
                    frame(i).encode(&mut bytes);
                    if i % 3 == 0 {
                        link.queue(&bytes);
                    } else {
                        link.write_now(&bytes);
                    }
                }
            }
        });
        let mut buf = BytesMut::new();
        let mut received = Vec::new();
        while received.len() < FRAMES as usize {
            // Read slowly at first, so that the sender meets a full socket buffer.
            if received.len() < 20 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), peer.read_buf(&mut buf))
                .await
                .expect("frames keep arriving")
                .expect("read");
            assert!(n > 0, "the link closed");
            while let Some(f) = Frame::decode(&mut buf).expect("whole frames") {
                received.push(f);
            }
        }
        sender.join().expect("sender");
        // Compared by epoch (each frame's number) first, for a readable failure.
        let epochs: Vec<u64> = received
            .iter()
            .map(|f| match f {
                Frame::Append { epoch, .. } => *epoch,
                _ => u64::MAX,
            })
            .collect();
        assert_eq!(epochs, (0..FRAMES).collect::<Vec<_>>());
        assert!(
            received == (0..FRAMES).map(frame).collect::<Vec<_>>(),
            "frames arrive whole"
        );
        assert!(buf.is_empty(), "nothing but the frames sent");
        writer.abort();
    }

    /// A follower states its version in the upgrade response; one that does not (or states
    /// something unreadable) speaks version 1.
    #[test]
    fn a_followers_version_is_read_from_its_upgrade_response() {
        let head = |extra: &str| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n{extra}Upgrade: colony-replication\r\n\r\n"
            )
        };
        assert_eq!(version_in(&head("X-Colony-Replication-Version: 2\r\n")), 2);
        assert_eq!(version_in(&head("x-colony-replication-version:7\r\n")), 7);
        assert_eq!(version_in(&head("")), 1);
        assert_eq!(
            version_in(&head("x-colony-replication-version: two\r\n")),
            1
        );
    }

    /// A link whose socket is connected to a local peer (of the current protocol version), and
    /// that peer's end.
    async fn connected_link() -> (Arc<Link>, TcpStream, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_read_half, write_half) = client.expect("connect").into_split();
        let (peer, _) = accepted.expect("accept");
        let socket = Arc::new(write_half);
        let link = Arc::new(Link::default());
        {
            let mut out = link.out();
            out.socket = Some(socket.clone());
            out.takes_sync_now = true;
        }
        let writer = tokio::spawn({
            let link = link.clone();
            async move { write_queued(&link, &socket).await }
        });
        (link, peer, writer)
    }

    /// Reads `n` frames from `peer`, then checks that nothing else arrives shortly after.
    async fn frames_from(peer: &mut TcpStream, n: usize) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut received = Vec::new();
        loop {
            while let Some(f) = Frame::decode(&mut buf).expect("whole frames") {
                received.push(f);
            }
            let wait = if received.len() < n {
                Duration::from_secs(10)
            } else {
                Duration::from_millis(100)
            };
            match tokio::time::timeout(wait, peer.read_buf(&mut buf)).await {
                Ok(read) => assert!(read.expect("read") > 0, "the link closed"),
                Err(_) if received.len() >= n => return received,
                Err(_) => panic!("only {} of {n} frames arrived", received.len()),
            }
        }
    }

    /// An entry reaches every follower it is sent to; those the owner counts on get a
    /// `SyncNow` after it, written directly or queued alike, and the others none — nor does a
    /// follower of protocol version 1, which would drop the connection on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_followers_counted_on_are_told_to_sync_now() {
        let links = Links::default();
        let mut peers = Vec::new();
        let mut writers = Vec::new();
        for node in ["counted", "lazy", "old"] {
            let (link, peer, writer) = connected_link().await;
            link.out().takes_sync_now = node != "old";
            links
                .links
                .lock()
                .expect("links")
                .insert(node.to_string(), link);
            peers.push(peer);
            writers.push(writer);
        }
        let entry = |epoch| Frame::Append {
            entry: bytes::Bytes::from_static(b"entry"),
            kind: crate::storage::record::RecordKind::PageSet,
            epoch,
        };
        let nodes = [("lazy", false), ("counted", true), ("old", true)];
        links.send_append(&nodes, &entry(1), true);
        links.send_append(&nodes, &entry(2), false);
        // As after a resend.
        links.send_sync_now("counted");
        links.send_sync_now("old");
        assert_eq!(
            frames_from(&mut peers[0], 5).await,
            vec![
                entry(1),
                Frame::SyncNow,
                entry(2),
                Frame::SyncNow,
                Frame::SyncNow
            ]
        );
        assert_eq!(
            frames_from(&mut peers[1], 2).await,
            vec![entry(1), entry(2)]
        );
        assert_eq!(
            frames_from(&mut peers[2], 2).await,
            vec![entry(1), entry(2)]
        );
        for w in writers {
            w.abort();
        }
    }
}
