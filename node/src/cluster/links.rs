//! Outgoing replication connections: one per follower node, shared by every slot this node owns
//! and that node follows.
//!
//! A link connects to the follower's API port and upgrades the connection
//! (`Upgrade: colony-replication`). Frames queued while it is down are dropped: on (re)connect the
//! owner probes each shared slot and resends from its recent entries, or asks for a snapshot sync.

use super::Cluster;
use super::wire::Frame;
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

pub const UPGRADE_PROTOCOL: &str = "colony-replication";
pub const REPLICATE_PATH: &str = "/v1/internal/replicate";

#[derive(Default)]
pub struct Links {
    senders: Mutex<HashMap<String, UnboundedSender<Frame>>>,
    cluster: OnceLock<Weak<Cluster>>,
    runtime: OnceLock<tokio::runtime::Handle>,
}

impl Links {
    pub fn bind(&self, cluster: &Arc<Cluster>, runtime: tokio::runtime::Handle) {
        let _ = self.cluster.set(Arc::downgrade(cluster));
        let _ = self.runtime.set(runtime);
    }

    /// Queues a frame to `node`, starting its link if there is none.
    pub fn send(&self, node: &str, frame: Frame) {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = senders.get(node)
            && tx.send(frame.clone()).is_ok()
        {
            return;
        }
        let (tx, rx) = unbounded_channel();
        let _ = tx.send(frame);
        senders.insert(node.to_string(), tx);
        let (Some(cluster), Some(rt)) = (self.cluster.get().cloned(), self.runtime.get()) else {
            return;
        };
        rt.spawn(run_link(cluster, node.to_string(), rx));
    }
}

async fn connect(
    addr: &str,
    source: Option<IpAddr>,
    me: &str,
    token: Option<&str>,
) -> std::io::Result<TcpStream> {
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
    Ok(stream)
}

async fn run_link(cluster: Weak<Cluster>, node: String, mut rx: UnboundedReceiver<Frame>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(cl) = cluster.upgrade() else { return };
        let Some(addr) = cl.address_of(&node) else {
            drop(cl);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let stream = match connect(&addr, cl.source_address, &cl.me, cl.peers.token()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(node, error = %e, "replication link down");
                drop(cl);
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // Frames queued while down are stale: probes resend what matters.
        while rx.try_recv().is_ok() {}
        let (mut reader, mut writer) = stream.into_split();
        let mut out = BytesMut::new();
        Frame::Hello {
            node: cl.me.clone(),
        }
        .encode(&mut out);
        if writer.write_all(&out).await.is_err() {
            continue;
        }
        out.clear();
        tracing::debug!(node, "replication link up");
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
        loop {
            tokio::select! {
                frame = rx.recv() => {
                    let Some(frame) = frame else {
                        read_task.abort();
                        return;
                    };
                    frame.encode(&mut out);
                    while out.len() < (1 << 20) {
                        match rx.try_recv() {
                            Ok(f) => f.encode(&mut out),
                            Err(_) => break,
                        }
                    }
                    if writer.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                }
                _ = &mut read_task => break,
            }
        }
        read_task.abort();
        out.clear();
        tracing::debug!(node, "replication link lost; reconnecting");
    }
}
