//! What a peer can make an agent do. A raw session client built from the agent's own library
//! (`rocks_agent::session::Session`, driven over a plain TCP socket from a thread inside host a's
//! namespace) asks b's agent to open connections: only addresses of b's own host may be dialed
//! (never loopback, never another host, never the agent's peer port). A client without the
//! cluster secret is refused and b logs why. Garbage, truncated and replayed handshakes on the
//! peer port leave b's agent running: it still answers `status`, a kept connection in progress
//! finishes exactly, and new ones are kept.

mod common;
mod resume_support;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::*;
use resume_support::*;
use rocks_agent::secret::Secret;
use rocks_agent::session::{Config, Event, OpenError, Session};
use rocks_e2e::testpeer::{self, Direction, Pattern, RESPONSE_MAGIC, Request, TRAILER_LEN};
use rocks_e2e::util::wait_until;
use rocks_e2e::{AgentSpec, ClusterSecret, Host, TestCgroup, Topology, require_root};
use sha2::{Digest, Sha256};

const PORT: u16 = 5001;

/// How a raw session attempt ended (printed with `Debug`).
#[derive(Debug)]
#[allow(dead_code)] // Other's text is read through Debug
enum Outcome {
    /// The peer agent connected to the destination; `received` is everything the destination
    /// sent until it finished.
    Opened { received: Vec<u8> },
    /// The peer agent would not or could not connect to the destination.
    OpenFailed(OpenError),
    /// The session failed (e.g. the handshake was rejected); the error's text.
    Failed(String),
    /// Anything else (another terminal event, the transport closing, no answer in time).
    Other(String),
}

/// From a thread in `from`'s namespace: a session to the agent at `agent` asking for `dst`,
/// with `secret`. Once opened, sends `payload`, finishes, and collects what comes back.
fn raw_session(
    from: &Host,
    agent: SocketAddr,
    dst: SocketAddr,
    secret: &Secret,
    payload: &[u8],
) -> Result<Outcome> {
    in_netns(from, || drive(agent, dst, secret, payload))
}

fn drive(agent: SocketAddr, dst: SocketAddr, secret: &Secret, payload: &[u8]) -> Result<Outcome> {
    let mut stream =
        TcpStream::connect_timeout(&agent, secs(5)).with_context(|| format!("connect {agent}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(5)))?;
    let start = Instant::now();
    let mut session = Session::connect(start, Config::default(), secret, dst);
    let t = session.first_transport();
    let (mut opened, mut sent, mut finished, mut lost) = (false, false, false, false);
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let now = Instant::now();
        if now - start > secs(15) {
            return Ok(Outcome::Other(format!(
                "no outcome within 15 s (state {:?})",
                session.state()
            )));
        }
        while let Some(tx) = session.poll_transmit(now) {
            if tx.transport == t && !lost {
                let _ = stream.write_all(&tx.data);
            }
        }
        while let Some(chunk) = session.recv() {
            received.extend_from_slice(&chunk);
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Opened => opened = true,
                Event::OpenFailed(e) => return Ok(Outcome::OpenFailed(e)),
                Event::Failed(e) => return Ok(Outcome::Failed(e.to_string())),
                Event::PeerFinished => finished = true,
                Event::Reconnect { .. } => return Ok(Outcome::Other("transport lost".into())),
                e if e.is_terminal() => return Ok(Outcome::Other(format!("{e:?}"))),
                _ => {}
            }
        }
        if finished {
            while let Some(chunk) = session.recv() {
                received.extend_from_slice(&chunk);
            }
            return Ok(Outcome::Opened { received });
        }
        if opened && !sent {
            let n = session.send(payload);
            if n != payload.len() {
                bail!("the session took {n} of {} bytes", payload.len());
            }
            session.finish();
            sent = true;
            continue;
        }
        if session.poll_timeout().is_some_and(|d| d <= Instant::now()) {
            session.handle_timeout(Instant::now());
            continue;
        }
        if lost {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                lost = true;
                session.transport_lost(Instant::now(), t);
            }
            Ok(n) => session.handle_input(Instant::now(), t, &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                lost = true;
                session.transport_lost(Instant::now(), t);
            }
        }
    }
}

/// A testpeer request for `down` bytes and no upload: what a server on the destination answers
/// proves the session really reached it.
fn testpeer_request(down: u64, seed: u64) -> Vec<u8> {
    Request {
        up_len: 0,
        down_len: down,
        seed,
        flags: 0,
    }
    .encode()
    .to_vec()
}

/// Checks a testpeer server's complete answer to [`testpeer_request`]; returns the client
/// address the server saw.
fn check_testpeer_answer(received: &[u8], down: u64, seed: u64) -> Result<String> {
    let mut r = received;
    if !r.starts_with(&RESPONSE_MAGIC) {
        bail!(
            "not a testpeer answer: {:?}",
            &received[..received.len().min(32)]
        );
    }
    let peer = testpeer::read_response_header(&mut r)?;
    let down = down as usize;
    if r.len() != down + TRAILER_LEN {
        bail!(
            "answer has {} bytes after the header, want {}",
            r.len(),
            down + TRAILER_LEN
        );
    }
    let (data, trailer) = r.split_at(down);
    Pattern::new(seed, Direction::Down)
        .verify(data)
        .map_err(|at| anyhow::anyhow!("download byte {at} differs"))?;
    if trailer[..32] != Sha256::digest([])[..] || trailer[32..] != Sha256::digest(data)[..] {
        bail!("trailer hashes differ");
    }
    Ok(peer)
}

/// b's agent dials only addresses of b's own host. Everything else is refused with
/// `NotAllowed` before anything is dialed: loopback (v4, v6, v4-mapped), the unspecified
/// address, another host (c, reachable from b and listening), b's own peer port.
#[test]
fn a_peer_can_only_open_connections_to_the_agents_own_addresses() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let cluster = ClusterSecret::new()?;
    let secret = Secret::from_file(cluster.path())?;
    let server_b = server(b, PORT)?;
    let server_c = server(c, PORT)?;
    let agent_b = AgentSpec::serve(cluster.path()).start(b)?;
    let peer_port = b.sock4(PEER_PORT);

    // c is reachable from b and would answer: a refusal below is the agent's doing.
    let r = transfer(b, None, c.sock4(PORT), 1024, secs(10))?;
    assert!(r.ok(), "{r:?}");
    let c_before = testpeer::parse_server_log(&server_c.stdout_text())?.len();

    let refused: Vec<SocketAddr> = [
        "127.0.0.1:22",
        "127.0.0.1:5001",
        "[::1]:5001",
        "[::ffff:127.0.0.1]:5001",
        "0.0.0.0:5001",
        "[::]:5001",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .chain([
        c.sock4(PORT),
        c.sock6(PORT),
        b.sock4(PEER_PORT),
        b.sock6(PEER_PORT),
    ])
    .collect();
    for dst in &refused {
        let outcome = raw_session(a, peer_port, *dst, &secret, &testpeer_request(100, 1))?;
        eprintln!("open {dst} through b: {outcome:?}");
        assert!(
            matches!(outcome, Outcome::OpenFailed(OpenError::NotAllowed)),
            "{dst}: {outcome:?}\n{}",
            agent_b.log()
        );
    }

    // b's own addresses are fine, over either family of the peer port.
    for (via, dst) in [
        (peer_port, b.sock4(PORT)),
        (b.sock6(PEER_PORT), b.sock6(PORT)),
    ] {
        let outcome = raw_session(a, via, dst, &secret, &testpeer_request(100_000, 3))?;
        let Outcome::Opened { received } = &outcome else {
            panic!("{dst} via {via}: {outcome:?}\n{}", agent_b.log());
        };
        let seen = check_testpeer_answer(received, 100_000, 3)?;
        eprintln!("open {dst} through b: opened; the server saw the connection come from {seen}");
        // b's agent dials transparently: from the address a's session came from.
        let a_ip = if dst.is_ipv4() {
            IpAddr::from(a.ip4())
        } else {
            IpAddr::from(a.ip6())
        };
        assert_eq!(
            ip_of(&seen),
            a_ip,
            "b's agent dials from the client's address"
        );
    }

    // A session that arrived over IPv4 asking for b's IPv6 address: b's agent cannot dial
    // from the client's address in the other family, and never dials from its own instead
    // (a service trusting b's addresses must not trust a relayed client): reset, counted.
    let outcome = raw_session(
        a,
        peer_port,
        b.sock6(PORT),
        &secret,
        &testpeer_request(100, 5),
    )?;
    assert!(
        matches!(outcome, Outcome::OpenFailed(OpenError::Unreachable)),
        "{outcome:?}"
    );

    let s = agent_b.status_json()?;
    assert_eq!(
        s["counters"]["transparent_failures"],
        1,
        "{}",
        counters_line(&s)
    );
    assert_eq!(
        log_lines(&agent_b.log(), "transparent dial failed").len(),
        1,
        "{}",
        agent_b.log()
    );
    assert_eq!(
        s["counters"]["refused_targets"],
        refused.len() as u64,
        "{}",
        counters_line(&s)
    );
    let log = agent_b.log();
    let refusals = log_lines(&log, "not an address of this host");
    assert_eq!(refusals.len(), refused.len(), "{log}");
    // Nothing reached c, and b's own server saw only the two allowed sessions.
    let mut records = Vec::new();
    wait_until(secs(5), || {
        records = testpeer::parse_server_log(&server_b.stdout_text()).unwrap_or_default();
        records.len() >= 2
    });
    assert_eq!(
        testpeer::parse_server_log(&server_c.stdout_text())?.len(),
        c_before,
        "b connected to c!"
    );
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r.ok), "{records:?}");
    Ok(())
}

/// A client without the cluster secret gets no session: the handshake is rejected, b says why
/// in its log and counts it, and nothing is dialed.
#[test]
fn a_client_without_the_secret_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cluster = ClusterSecret::new()?;
    let server_b = server(b, PORT)?;
    let agent_b = AgentSpec::serve(cluster.path()).start(b)?;

    let stranger = Secret::generate();
    let outcome = raw_session(
        a,
        b.sock4(PEER_PORT),
        b.sock4(PORT),
        &stranger,
        &testpeer_request(10, 1),
    )?;
    eprintln!("with another secret: {outcome:?}");
    let Outcome::Failed(why) = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(why.contains("wrong cluster secret"), "{why}");

    let log = agent_b.wait_for_log("refused a session handshake", secs(5))?;
    let line = log_lines(&log, "refused a session handshake").join("\n");
    assert!(
        line.contains("does not hold our cluster secret") && line.contains(&a.ip4().to_string()),
        "{line}"
    );
    eprintln!("b: {line}");
    let s = agent_b.status_json()?;
    assert_eq!(
        s["counters"]["handshake_failures"],
        1,
        "{}",
        counters_line(&s)
    );
    assert_eq!(s["counters"]["peer_sessions"], 0, "{}", counters_line(&s));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server_b.stdout_text().is_empty(),
        "b dialed its server: {}",
        server_b.stdout_text()
    );
    // The secret never shows up in the log.
    let hex = std::fs::read_to_string(cluster.path())?;
    assert!(!log.contains(hex.trim()), "the log shows the secret");
    Ok(())
}

/// One connection to `to` from `from`'s namespace: writes `bytes` (ignoring a peer that stops
/// reading), half-closes unless `hold`, then reads until the agent closes or 5 s pass. Returns
/// what the agent sent back and whether it closed the connection.
fn poke(from: &Host, to: SocketAddr, bytes: &[u8], hold: bool) -> Result<(Vec<u8>, bool)> {
    in_netns(from, || -> Result<(Vec<u8>, bool)> {
        let mut s = TcpStream::connect_timeout(&to, secs(5))?;
        let _ = s.write_all(bytes);
        if !hold {
            let _ = s.shutdown(Shutdown::Write);
        }
        s.set_read_timeout(Some(secs(5)))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        Ok((got, closed))
    })
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut v)?;
    Ok(v)
}

/// Garbage on the peer port does not hurt b's agent: random bytes, a valid preamble followed by
/// junk, a corrupted and a truncated handshake, a silent connection, HTTP, and a real client's
/// first flight replayed twice (which must not make b dial anything). Meanwhile a kept
/// connection is open through b; it finishes exactly, b still answers `status` as the same
/// process, and the next connection is kept too.
#[test]
fn garbage_on_the_peer_port_does_not_hurt_the_agent() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let cluster = ClusterSecret::new()?;
    let secret = Secret::from_file(cluster.path())?;
    let _server = server(b, PORT)?;
    // Only a replayed handshake could make b dial this one.
    let bait = server(b, 5002)?;
    let agent_b = AgentSpec::serve(cluster.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], cluster.path()).start(a)?;
    let pid = agent_b.status_json()?["pid"].clone();

    let size = 16 * MIB;
    let target = b.sock4(PORT);
    let client = spawn_client(
        a,
        Some(cg.path()),
        target,
        size,
        &["--pause-after", "2MiB", "--pause-ms", "4000"],
    )?;
    watching(&agent_a, &target.to_string(), |w| {
        w.wait_row(secs(20), "reached the pause", |r| {
            r["mode"] == "kept" && num(r, "bytes_sent") >= 2 * MIB
        })
    })?;

    // A real client's first flight (preamble + handshake message), for the variants below.
    let first_flight = {
        let mut s = Session::connect(Instant::now(), Config::default(), &secret, b.sock4(5002));
        let mut out = Vec::new();
        while let Some(t) = s.poll_transmit(Instant::now()) {
            out.extend_from_slice(&t.data);
        }
        out
    };
    let preamble = &first_flight[..8];
    let mut corrupted = first_flight.clone();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0x55;
    let peer_port = b.sock4(PEER_PORT);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("4 KiB of random bytes", random_bytes(4096)?, false),
        ("1 MiB of random bytes", random_bytes(1 << 20)?, false),
        (
            "preamble, then random bytes",
            [preamble, &random_bytes(4096)?].concat(),
            false,
        ),
        (
            "preamble, then a record claiming 64 KiB",
            [preamble, &[0xff, 0xff], &random_bytes(100)?].concat(),
            false,
        ),
        ("a corrupted handshake message", corrupted, false),
        (
            "half a handshake, then silence",
            first_flight[..first_flight.len() / 2].to_vec(),
            true,
        ),
        ("nothing at all", Vec::new(), true),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        ("a replayed first flight", first_flight.clone(), true),
        ("the same first flight again", first_flight.clone(), true),
    ];
    for (what, bytes, hold) in &cases {
        let started = Instant::now();
        let (answer, closed) = poke(a, peer_port, bytes, *hold)?;
        eprintln!(
            "{what}: b answered {} bytes and {} after {:.0} ms",
            answer.len(),
            if closed {
                "closed the connection"
            } else {
                "kept it open"
            },
            started.elapsed().as_secs_f64() * 1e3
        );
        let s = agent_b
            .status_json()
            .with_context(|| format!("b stopped answering after {what}:\n{}", agent_b.log()))?;
        assert_eq!(s["pid"], pid, "b restarted?");
    }

    let r = finish_client(client, size, secs(60))?;
    assert!(r.ok(), "{r:?}");
    let r = transfer(a, Some(cg.path()), target, MIB, secs(30))?;
    assert!(r.ok(), "{r:?}");
    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    assert_eq!(sa["counters"]["kept"], 2, "{}", counters_line(&sa));
    assert!(
        sb["counters"]["peer_sessions"].as_u64().unwrap_or(0) >= 2,
        "{}",
        counters_line(&sb)
    );
    assert!(
        sb["counters"]["handshake_failures"].as_u64().unwrap_or(0) >= 5,
        "{}",
        counters_line(&sb)
    );
    let log = agent_b.log();
    assert!(!log.contains("panicked"), "{log}");
    // The bait server logs a record per finished connection; a held one shows in `ss`.
    let bait_hit = wait_until(Duration::from_millis(500), || {
        !bait.stdout_text().is_empty()
    });
    assert!(
        !bait_hit,
        "a replayed handshake made b dial {}: {}",
        b.sock4(5002),
        bait.stdout_text()
    );
    let dialed: Vec<IpAddr> = established_to(b, 5002)?
        .into_iter()
        .map(|a| a.ip())
        .collect();
    assert!(
        dialed.is_empty(),
        "b holds connections to the bait: {dialed:?}"
    );
    eprintln!("b after the garbage: {}", counters_line(&sb));
    Ok(())
}
