//! Tests of the partitioning proxy in `support/netproxy.rs`, with real echo servers on loopback
//! addresses and real connections from each party's address.

mod support;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use support::netproxy::{CLIENT, Mode, NetProxy, check_loopback, connect_from, loopback_ip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const TEST_CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const CONTROL_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// How long a silent connection must stay silent to count as blackholed.
const SILENCE: Duration = Duration::from_millis(300);
/// How long a cut may take to show.
const PROMPTLY: Duration = Duration::from_secs(2);

/// Serves echo on `ip`, one task per connection.
async fn echo_server(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

fn node(i: usize) -> String {
    format!("n{i}")
}

/// `n` nodes, each an echo server on its own loopback address behind a forwarder on the same
/// address.
struct Net {
    proxy: NetProxy,
    proxied: Vec<SocketAddr>,
}

impl Net {
    async fn new(n: usize) -> Net {
        let proxy = NetProxy::new();
        proxy.add_party("control", CONTROL_IP);
        let mut proxied = Vec::new();
        for i in 0..n {
            proxy.add_party(&node(i), loopback_ip(i));
            let real = echo_server(loopback_ip(i)).await;
            let listen = SocketAddr::new(loopback_ip(i), 0);
            proxied.push(proxy.forward(&node(i), listen, real).await.unwrap());
        }
        Net { proxy, proxied }
    }

    /// Connects to node `to` through its forwarder, from node `from`'s address.
    async fn connect(&self, from: usize, to: usize) -> io::Result<TcpStream> {
        self.connect_from_ip(loopback_ip(from), to).await
    }

    async fn connect_from_ip(&self, ip: IpAddr, to: usize) -> io::Result<TcpStream> {
        let stream = connect_from(ip, self.proxied[to]).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Waits for the forwarders to have exactly `n` connections open.
    async fn wait_active(&self, n: usize) {
        let deadline = Instant::now() + PROMPTLY;
        while self.proxy.active_connections() != n {
            assert!(
                Instant::now() < deadline,
                "{} active connections, expected {n}",
                self.proxy.active_connections()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sends a message and expects it back.
async fn assert_echo(stream: &mut TcpStream) {
    let msg = b"ping through the proxy";
    stream.write_all(msg).await.unwrap();
    let mut back = [0u8; 22];
    timeout(PROMPTLY, stream.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo failed");
    assert_eq!(&back, msg);
}

/// Expects the connection to end (reset or closed) promptly instead of echoing.
async fn assert_cut(stream: &mut TcpStream) {
    let started = Instant::now();
    // The write may still be accepted by the kernel; the read reports the reset.
    let _ = stream.write_all(b"hello?").await;
    let mut buf = [0u8; 16];
    match timeout(PROMPTLY, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {PROMPTLY:?}"),
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => panic!("connection still forwarding: got {n} bytes"),
        Ok(Err(e)) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            "unexpected error {e}"
        ),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// Expects a new connection to be refused: reset right after the handshake.
async fn assert_refused(connected: io::Result<TcpStream>) {
    if let Ok(mut stream) = connected {
        assert_cut(&mut stream).await;
    }
}

/// Expects the request to go unanswered, without the connection failing.
async fn assert_silent(stream: &mut TcpStream) {
    stream.write_all(b"anyone?").await.unwrap();
    let mut buf = [0u8; 16];
    match timeout(SILENCE, stream.read(&mut buf)).await {
        Err(_) => {}
        Ok(r) => panic!("expected silence, got {r:?}"),
    }
}

#[tokio::test]
async fn loopback_addresses_work() {
    assert_eq!(loopback_ip(0), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)));
    assert_eq!(loopback_ip(5), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 15)));
    let mut ips: Vec<IpAddr> = (0..8).map(loopback_ip).collect();
    ips.push(CONTROL_IP);
    ips.push(TEST_CLIENT_IP);
    check_loopback(&ips).await.unwrap();
}

#[tokio::test]
async fn forwards_and_identifies_parties() {
    let net = Net::new(3).await;
    assert_eq!(net.proxy.party_of(loopback_ip(1)), "n1");
    assert_eq!(net.proxy.party_of(CONTROL_IP), "control");
    assert_eq!(net.proxy.party_of(TEST_CLIENT_IP), CLIENT);
    for (from, to) in [(1, 0), (0, 1), (2, 1), (0, 0)] {
        let mut s = net.connect(from, to).await.unwrap();
        assert_echo(&mut s).await;
    }
    let mut s = net.connect_from_ip(TEST_CLIENT_IP, 2).await.unwrap();
    assert_echo(&mut s).await;
}

#[tokio::test]
async fn forwards_bulk_data_and_half_close() {
    let net = Net::new(1).await;
    let stream = net.connect(0, 0).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        // Our FIN must reach the server, whose FIN must come back.
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("transfer timed out")
        .unwrap();
    writer.await.unwrap();
    assert!(back == data, "echoed data differs");
    net.wait_active(0).await;
}

#[tokio::test]
async fn upstream_down_resets_the_client() {
    let proxy = NetProxy::new();
    // A port nobody listens on.
    let closed = TcpListener::bind((loopback_ip(0), 0)).await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let listen = proxy
        .forward("n0", SocketAddr::new(loopback_ip(0), 0), dead)
        .await
        .unwrap();
    assert_refused(connect_from(TEST_CLIENT_IP, listen).await).await;
}

#[tokio::test]
async fn block_refuses_new_connections_and_kills_existing_ones() {
    let net = Net::new(3).await;
    let mut n1_to_n0 = net.connect(1, 0).await.unwrap();
    let mut n0_to_n1 = net.connect(0, 1).await.unwrap();
    let mut n2_to_n0 = net.connect(2, 0).await.unwrap();
    let mut client_to_n0 = net.connect_from_ip(TEST_CLIENT_IP, 0).await.unwrap();
    for s in [
        &mut n1_to_n0,
        &mut n0_to_n1,
        &mut n2_to_n0,
        &mut client_to_n0,
    ] {
        assert_echo(s).await;
    }
    net.wait_active(4).await;

    net.proxy.block("n0", "n1");
    assert_eq!(net.proxy.verdict("n1", "n0"), Some(Mode::Reset));
    assert_cut(&mut n1_to_n0).await;
    assert_cut(&mut n0_to_n1).await;
    net.wait_active(2).await;
    assert_echo(&mut n2_to_n0).await;
    assert_echo(&mut client_to_n0).await;
    assert_refused(net.connect(1, 0).await).await;
    assert_refused(net.connect(0, 1).await).await;
    assert_echo(&mut net.connect(2, 0).await.unwrap()).await;
    assert_echo(&mut net.connect(1, 2).await.unwrap()).await;

    net.proxy.heal_all();
    assert_eq!(net.proxy.verdict("n1", "n0"), None);
    assert_echo(&mut net.connect(1, 0).await.unwrap()).await;
    assert_echo(&mut net.connect(0, 1).await.unwrap()).await;
}

#[tokio::test]
async fn heal_lifts_one_pair_only() {
    let net = Net::new(3).await;
    net.proxy.block("n0", "n1");
    net.proxy.block("n0", "n2");
    net.proxy.heal("n1", "n0");
    assert_echo(&mut net.connect(1, 0).await.unwrap()).await;
    assert_refused(net.connect(2, 0).await).await;
}

#[tokio::test]
async fn one_way_block_covers_connections_opened_in_that_direction() {
    let net = Net::new(2).await;
    let mut n1_to_n0 = net.connect(1, 0).await.unwrap();
    let mut n0_to_n1 = net.connect(0, 1).await.unwrap();
    assert_echo(&mut n1_to_n0).await;
    assert_echo(&mut n0_to_n1).await;

    net.proxy.block_oneway("n1", "n0");
    assert_cut(&mut n1_to_n0).await;
    assert_echo(&mut n0_to_n1).await;
    assert_refused(net.connect(1, 0).await).await;
    assert_echo(&mut net.connect(0, 1).await.unwrap()).await;

    net.proxy.heal_all();
    assert_echo(&mut net.connect(1, 0).await.unwrap()).await;
}

#[tokio::test]
async fn isolate_cuts_every_other_party() {
    let net = Net::new(3).await;
    let mut n1_to_n0 = net.connect(1, 0).await.unwrap();
    let mut n0_to_n2 = net.connect(0, 2).await.unwrap();
    let mut n1_to_n2 = net.connect(1, 2).await.unwrap();
    for s in [&mut n1_to_n0, &mut n0_to_n2, &mut n1_to_n2] {
        assert_echo(s).await;
    }

    net.proxy.isolate("n0");
    assert_cut(&mut n1_to_n0).await;
    assert_cut(&mut n0_to_n2).await;
    assert_echo(&mut n1_to_n2).await;
    assert_refused(net.connect(2, 0).await).await;
    assert_refused(net.connect(0, 1).await).await;
    assert_refused(net.connect_from_ip(TEST_CLIENT_IP, 0).await).await;
    assert_refused(net.connect_from_ip(CONTROL_IP, 0).await).await;
    // A node can still reach itself.
    assert_echo(&mut net.connect(0, 0).await.unwrap()).await;
    assert_echo(&mut net.connect_from_ip(CONTROL_IP, 1).await.unwrap()).await;

    net.proxy.rejoin("n0");
    assert_echo(&mut net.connect(2, 0).await.unwrap()).await;
    assert_echo(&mut net.connect_from_ip(TEST_CLIENT_IP, 0).await.unwrap()).await;
}

#[tokio::test]
async fn clients_from_unknown_addresses_can_be_blocked() {
    let net = Net::new(2).await;
    let mut client_to_n0 = net.connect_from_ip(TEST_CLIENT_IP, 0).await.unwrap();
    assert_echo(&mut client_to_n0).await;
    net.proxy.block(CLIENT, "n0");
    assert_cut(&mut client_to_n0).await;
    assert_refused(net.connect_from_ip(TEST_CLIENT_IP, 0).await).await;
    assert_echo(&mut net.connect_from_ip(TEST_CLIENT_IP, 1).await.unwrap()).await;
    assert_echo(&mut net.connect(1, 0).await.unwrap()).await;
}

#[tokio::test]
async fn blackhole_gives_timeouts_not_resets_and_heals() {
    let net = Net::new(3).await;
    let mut old = net.connect(1, 0).await.unwrap();
    assert_echo(&mut old).await;
    let mut other = net.connect(2, 0).await.unwrap();

    net.proxy.blackhole("n0", "n1");
    assert_eq!(net.proxy.verdict("n0", "n1"), Some(Mode::Blackhole));
    assert_silent(&mut old).await;
    let mut new = net.connect(1, 0).await.unwrap();
    assert_silent(&mut new).await;
    assert_echo(&mut other).await;

    // Healing delivers what was stalled, on both connections.
    net.proxy.heal_all();
    for s in [&mut old, &mut new] {
        let mut back = [0u8; 7];
        timeout(PROMPTLY, s.read_exact(&mut back))
            .await
            .expect("stalled data not delivered after heal")
            .unwrap();
        assert_eq!(&back, b"anyone?");
        assert_echo(s).await;
    }
}

#[tokio::test]
async fn blackhole_then_reset_kills_silent_connections() {
    let net = Net::new(2).await;
    let mut old = net.connect(1, 0).await.unwrap();
    assert_echo(&mut old).await;
    net.proxy.isolate_blackhole("n0");
    let mut new = net.connect(1, 0).await.unwrap();
    assert_silent(&mut old).await;
    assert_silent(&mut new).await;
    // A reset rule is stronger than a blackhole one.
    net.proxy.block("n1", "n0");
    assert_eq!(net.proxy.verdict("n1", "n0"), Some(Mode::Reset));
    assert_cut(&mut old).await;
    assert_cut(&mut new).await;
    net.wait_active(0).await;
}

/// A node that stopped accepting (its backlog full, as when SIGSTOPped) leaves the forwarder
/// connecting; a cut must still reset the waiting client at once.
#[tokio::test]
async fn block_interrupts_a_pending_upstream_connect() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(loopback_ip(0), 0)).unwrap();
    let stuck = socket.listen(0).unwrap();
    let real = stuck.local_addr().unwrap();
    // Fill the accept queue; further handshakes go unanswered.
    let mut fillers = Vec::new();
    for _ in 0..3 {
        fillers.push(tokio::spawn(connect_from(TEST_CLIENT_IP, real)));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let proxy = NetProxy::new();
    let listen = proxy
        .forward("n0", SocketAddr::new(loopback_ip(0), 0), real)
        .await
        .unwrap();
    let mut s = connect_from(TEST_CLIENT_IP, listen).await.unwrap();
    assert_silent(&mut s).await;
    proxy.block(CLIENT, "n0");
    assert_cut(&mut s).await;
    for f in fillers {
        f.abort();
    }
}

/// The forwarder is byte-transparent: a connection upgraded from HTTP/1.1 keeps working.
#[tokio::test]
async fn http_upgrade_passes_through() {
    let listener = TcpListener::bind((loopback_ip(0), 0)).await.unwrap();
    let real = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"GET /chat HTTP/1.1\r\n"));
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        // Now a binary protocol: length-prefixed frames, echoed reversed.
        while let Ok(len) = s.read_u16().await {
            let mut frame = vec![0; len as usize];
            s.read_exact(&mut frame).await.unwrap();
            frame.reverse();
            s.write_u16(len).await.unwrap();
            s.write_all(&frame).await.unwrap();
        }
    });
    let proxy = NetProxy::new();
    let listen = proxy
        .forward("n0", SocketAddr::new(loopback_ip(0), 0), real)
        .await
        .unwrap();

    let mut s = connect_from(TEST_CLIENT_IP, listen).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: n0\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    for frame in [&b"\x00\x01\xff binary"[..], &[0u8; 3000][..]] {
        s.write_u16(frame.len() as u16).await.unwrap();
        s.write_all(frame).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut back = vec![0; len as usize];
        s.read_exact(&mut back).await.unwrap();
        back.reverse();
        assert_eq!(back, frame);
    }
}

#[tokio::test]
async fn forwarding_adds_little_latency() {
    let net = Net::new(1).await;
    let real = echo_server(loopback_ip(0)).await;
    let direct = connect_from(TEST_CLIENT_IP, real).await.unwrap();
    direct.set_nodelay(true).unwrap();
    let proxied = net.connect_from_ip(TEST_CLIENT_IP, 0).await.unwrap();

    async fn mean_round_trip(mut s: TcpStream) -> Duration {
        let rounds = 500;
        let started = Instant::now();
        let mut buf = [0u8; 64];
        for _ in 0..rounds {
            s.write_all(&buf).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
        }
        started.elapsed() / rounds
    }
    let direct = mean_round_trip(direct).await;
    let proxied = mean_round_trip(proxied).await;
    println!("mean round trip: direct {direct:?}, through the proxy {proxied:?}");
    assert!(proxied < Duration::from_millis(5), "{proxied:?}");
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let net = Net::new(1).await;
    let mut s = net.connect(0, 0).await.unwrap();
    assert_echo(&mut s).await;
    let addr = net.proxied[0];
    drop(net);
    assert_cut(&mut s).await;
    let deadline = Instant::now() + PROMPTLY;
    // The listener closes once its task is gone.
    while connect_from(TEST_CLIENT_IP, addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still listening");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn corrupt_after_flips_one_byte_of_one_direction_once() {
    let net = Net::new(2).await;
    net.proxy.corrupt_after(&node(0), &node(1), 5);
    let mut s = net.connect(0, 1).await.unwrap();
    let sent = b"0123456789abcdef".to_vec();
    s.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    timeout(PROMPTLY, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    let differ: Vec<usize> = (0..sent.len()).filter(|&i| sent[i] != got[i]).collect();
    assert_eq!(differ, vec![5], "exactly the sixth byte is flipped");
    assert_eq!(net.proxy.corrupted(), 1);
    // Once only: the next bytes pass untouched, and other pairs were never affected.
    s.write_all(&sent).await.unwrap();
    timeout(PROMPTLY, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, sent);
    let mut other = net.connect(1, 0).await.unwrap();
    assert_echo(&mut other).await;
}
