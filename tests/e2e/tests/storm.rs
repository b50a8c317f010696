//! Issue 5, storms: 2,000 connections opened at once by one program in the attached cgroup all
//! work, each kept through both agents and byte-exact both ways, and the agents' counters add up
//! to exactly that many. The same storm sent direct (from outside the cgroup) is the baseline;
//! both times are printed, not asserted.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use common::*;
use rocks_e2e::bpf::rocks_map_entries;
use rocks_e2e::testpeer::{StormReport, parse_server_log};
use rocks_e2e::util::wait_until;
use rocks_e2e::{
    AgentSpec, Child, ClusterSecret, Host, TestCgroup, Topology, require_root, require_tools,
    spawn_in, testpeer_bin, wait_for_tcp_listen,
};

const PORT: u16 = 5071;
const COUNT: u64 = 2000;
/// Bytes each way on every connection: enough to cross every hop, small enough for one write.
const BYTES: u64 = 333;

/// A testpeer server whose accept queue holds a whole storm, so the server program is not
/// what the storm measures.
fn storm_server(host: &Host) -> Result<Child> {
    let mut cmd = host.exec(testpeer_bin!());
    cmd.args([
        "serve",
        "--listen",
        &format!("[::]:{PORT}"),
        "--backlog",
        "4096",
    ]);
    let child = Child::spawn(cmd)?;
    wait_for_tcp_listen(host, PORT, secs(5))?;
    Ok(child)
}

/// `rocks-testpeer storm` from `host`, inside `cgroup` when given; the report, whatever the
/// outcome (the caller asserts on it).
fn storm(host: &Host, cgroup: Option<&Path>, to: SocketAddr, seed: u64) -> Result<StormReport> {
    storm_of(COUNT, host, cgroup, to, seed)
}

/// [`storm`] with `count` connections.
fn storm_of(
    count: u64,
    host: &Host,
    cgroup: Option<&Path>,
    to: SocketAddr,
    seed: u64,
) -> Result<StormReport> {
    let (count, bytes, to, seed) = (
        count.to_string(),
        BYTES.to_string(),
        to.to_string(),
        seed.to_string(),
    );
    let args = [
        "storm",
        "--connect",
        &to,
        "--count",
        &count,
        "--up",
        &bytes,
        "--down",
        &bytes,
        "--seed",
        &seed,
    ];
    let mut child = match cgroup {
        Some(cg) => spawn_in(host, cg, testpeer_bin!(), args)?,
        None => {
            let mut cmd = host.exec(testpeer_bin!());
            cmd.args(args);
            Child::spawn(cmd)?
        }
    };
    let out = child.wait_with_timeout(secs(120))?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "storm printed: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn storm_of_2000_connections_all_kept_byte_exact() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let server = storm_server(b)?;
    // Both agents start with the soft open-file limit service managers commonly give (1024),
    // far below the ~4,000 descriptors each needs here (two per connection): they must raise it.
    let agent_b = AgentSpec::serve(secret.path())
        .open_file_limit(1024)
        .start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .open_file_limit(1024)
        .start(a)?;
    for agent in [&agent_a, &agent_b] {
        let log = agent.log();
        assert!(
            log.contains("raised the open-file limit to its hard limit")
                && log.contains("from=1024"),
            "{log}"
        );
    }

    let direct = storm(a, None, b.sock4(PORT), 1)?;
    assert!(direct.all_ok(), "direct storm failed: {direct:?}");
    assert_eq!(direct.via_loopback, 0, "{direct:?}");

    let kept = storm(a, Some(cg.path()), b.sock4(PORT), 1_000_000)?;
    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    assert!(
        kept.all_ok(),
        "storm from the cgroup failed: {kept:?}\na: {}\nb: {}",
        counters_line(&sa),
        counters_line(&sb)
    );
    assert_eq!(
        kept.via_loopback, COUNT,
        "every connection redirected: {kept:?}"
    );
    // Every one of them went through a session, none fell back or was lost on the way.
    assert_eq!(sa["kernel"]["redirected"], COUNT, "{}", counters_line(&sa));
    assert_eq!(sa["counters"]["accepted"], COUNT, "{}", counters_line(&sa));
    assert_eq!(sa["counters"]["kept"], COUNT, "{}", counters_line(&sa));
    assert_eq!(
        sa["counters"]["plain_fallbacks"],
        0,
        "{}",
        counters_line(&sa)
    );
    assert_eq!(
        sa["counters"]["handshake_failures"],
        0,
        "{}",
        counters_line(&sa)
    );
    assert_eq!(
        sb["counters"]["peer_sessions"],
        COUNT,
        "{}",
        counters_line(&sb)
    );
    assert_eq!(
        sb["counters"]["handshake_failures"],
        0,
        "{}",
        counters_line(&sb)
    );

    // The server checked every upload too: 2 x COUNT records, all byte-exact.
    let records = parse_server_log(&server.stdout_text())?;
    let good = records
        .iter()
        .filter(|r| r.ok && r.up == BYTES && r.down == BYTES)
        .count() as u64;
    assert_eq!(good, 2 * COUNT, "server records: {} in all", records.len());

    // Both agents let go of every connection.
    let empty = wait_until(secs(20), || {
        [&agent_a, &agent_b].iter().all(|ag| {
            ag.status_json()
                .is_ok_and(|s| s["connections"].as_array().is_some_and(|c| c.is_empty()))
        })
    });
    assert!(empty, "connections left after the storm");
    // Each redirected socket's original destination left the kernel map with the socket
    // (`sock_release`): a long-lived connection's entry is never pushed out by later ones.
    assert_eq!(
        rocks_map_entries(cg.path(), "rocks_connect4", "ROCKS_ORIG_BY_COOKIE")?,
        0
    );
    eprintln!(
        "storm of {COUNT} connections, {BYTES} bytes each way: direct: all connected after {} ms, done after {} ms; kept: all connected after {} ms, done after {} ms",
        direct.connect_ms, direct.total_ms, kept.connect_ms, kept.total_ms
    );
    Ok(())
}

/// The same storm against `--max-connections 256`: the connect hooks count in the kernel, so
/// no more than the limit (and at most a few that slip past, see `limit.rs`) are redirected,
/// although all 2,000 connects come long before the agent has accepted the 256th; every other
/// connect goes direct, and every connection works.
#[test]
fn storm_beyond_max_connections_goes_direct_and_all_work() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const MAX: u64 = 256;
    /// Concurrent connects on other CPUs, and connects between the hook and the accept queue
    /// while the agent rewrites the budget, may each take one unit more.
    const SLIP: u64 = 8;
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let server = storm_server(b)?;
    // Transparent dials on (the default): b's relayed connections come from a's address, and
    // this storm's direct connections from a go to the same server port at the same time. Their
    // source ports must never collide (when b drew from a's ephemeral range, one connect in
    // 2,000 here did: "destination refused through the peer agent").
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .args(["--max-connections", &MAX.to_string()])
        .start(a)?;

    let r = storm(a, Some(cg.path()), b.sock4(PORT), 7)?;
    let s = agent_a.status_json()?;
    assert!(r.all_ok(), "storm failed: {r:?}\n{}", counters_line(&s));
    assert!(
        (MAX..=MAX + SLIP).contains(&r.via_loopback),
        "{} kept of {COUNT} with --max-connections {MAX}: {r:?}",
        r.via_loopback
    );
    assert_eq!(
        s["kernel"]["redirected"],
        r.via_loopback,
        "{}",
        counters_line(&s)
    );
    assert_eq!(
        s["kernel"]["skipped_limit"],
        COUNT - r.via_loopback,
        "{}",
        counters_line(&s)
    );
    assert_eq!(
        s["counters"]["kept"],
        r.via_loopback,
        "{}",
        counters_line(&s)
    );
    assert_eq!(s["counters"]["plain_fallbacks"], 0, "{}", counters_line(&s));
    assert!(
        s["counters"]["connection_limit_reached"].as_u64() >= Some(1),
        "{}",
        counters_line(&s)
    );
    let records = parse_server_log(&server.stdout_text())?;
    assert_eq!(records.iter().filter(|r| r.ok).count() as u64, COUNT);
    eprintln!(
        "storm of {COUNT} against --max-connections {MAX}: {} kept, {} direct, done after {} ms",
        r.via_loopback,
        COUNT - r.via_loopback,
        r.total_ms
    );
    Ok(())
}

/// Twice the storm, kept only: the agent opens at most a few hundred sessions at a time, so no
/// handshake runs past its timeout however many connects come at once. (Started all together,
/// 318 of 4,000 timed out on this 2-core machine, fell back to plain TCP and put the healthy
/// peer into the negative cache for 10 minutes.)
#[test]
fn storm_of_4000_opens_every_session_in_time() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const BIG: u64 = 2 * COUNT;
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = storm_server(b)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .args(["--max-connections", &(BIG + 96).to_string()])
        .start(a)?;
    let r = storm_of(BIG, a, Some(cg.path()), b.sock4(PORT), 3)?;
    let s = agent_a.status_json()?;
    assert!(r.all_ok(), "storm failed: {r:?}\n{}", counters_line(&s));
    assert_eq!(r.via_loopback, BIG, "{r:?}");
    assert_eq!(s["counters"]["kept"], BIG, "{}", counters_line(&s));
    assert_eq!(
        s["counters"]["handshake_failures"],
        0,
        "{}",
        counters_line(&s)
    );
    assert_eq!(s["counters"]["plain_fallbacks"], 0, "{}", counters_line(&s));
    assert_eq!(s["negative_cache"], serde_json::json!([]), "{s}");
    eprintln!(
        "storm of {BIG} connections, kept: all connected after {} ms, done after {} ms",
        r.connect_ms, r.total_ms
    );
    Ok(())
}
