//! Acceptance (d): toward a host without an agent, a kept-cgroup connection still works,
//! byte-exact, as a plain TCP relay through the local agent; the host goes into the negative
//! cache and later connects to it are not redirected at all. The setup cost of that first
//! connect is printed next to a direct connect's, for a refused peer port and for a silent
//! (black-holed) one, where `--probe-timeout` bounds it.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use common::*;
use rocks_e2e::{
    Agent, AgentSpec, Child, ClientReport, ClusterSecret, Host, TestCgroup, Topology, require_root,
    require_tools, testpeer_bin,
};
use serde_json::Value;

const PORT: u16 = 5004;
const SIZE: u64 = 16 * MIB;

fn negative_hosts(status: &Value) -> Vec<IpAddr> {
    status["negative_cache"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["host"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// First connect from the cgroup to `target` on a host without an agent: plain relay through
/// the local agent (the program's end is loopback, the server sees a's real address).
fn first_connect(a: &Host, cg: &TestCgroup, target: SocketAddr) -> Result<ClientReport> {
    let r = transfer(a, Some(cg.path()), target, SIZE, secs(30))?;
    assert_eq!(r.peername, target.to_string(), "{r:?}");
    assert!(
        ip_of(&r.sockname).is_loopback(),
        "first connect not redirected: {r:?}"
    );
    let a_ip: IpAddr = if target.is_ipv4() {
        a.ip4().into()
    } else {
        a.ip6().into()
    };
    assert_eq!(
        ip_of(&r.server_saw_peer),
        a_ip,
        "plain relay dials from a's own address: {r:?}"
    );
    Ok(r)
}

/// A later connect to a host in the negative cache: not redirected, direct from a's address.
fn later_connect(a: &Host, cg: &TestCgroup, target: SocketAddr) -> Result<ClientReport> {
    let r = transfer(a, Some(cg.path()), target, SIZE, secs(30))?;
    let a_ip: IpAddr = if target.is_ipv4() {
        a.ip4().into()
    } else {
        a.ip6().into()
    };
    assert_eq!(r.peername, target.to_string(), "{r:?}");
    assert_eq!(
        ip_of(&r.sockname),
        a_ip,
        "a negative-cached host was redirected: {r:?}"
    );
    assert_eq!(r.server_saw_peer, r.sockname, "{r:?}");
    Ok(r)
}

/// A direct connect from outside the cgroup, for comparison.
fn direct(a: &Host, target: SocketAddr) -> Result<ClientReport> {
    let r = transfer(a, None, target, SIZE, secs(30))?;
    assert!(!ip_of(&r.sockname).is_loopback(), "{r:?}");
    Ok(r)
}

fn status(agent: &Agent) -> Value {
    agent.status_json().expect("status")
}

#[test]
fn host_without_agent_gets_plain_tcp_then_is_left_alone() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, c) = (topo.host("a"), topo.host("c"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(c, PORT)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    // The baseline also warms the neighbour caches, so both measured connects find them warm.
    let base = direct(a, c.sock4(PORT))?;
    let first = first_connect(a, &cg, c.sock4(PORT))?;
    eprintln!(
        "time to first byte toward c (no agent, peer port refused): direct {:.2} ms, first connect from the cgroup (probe + plain relay) {:.2} ms",
        ms(base.first_byte_us),
        ms(first.first_byte_us)
    );
    let s = status(&agent_a);
    assert_eq!(s["counters"]["plain_fallbacks"], 1, "{}", counters_line(&s));
    assert_eq!(s["counters"]["kept"], 0, "{}", counters_line(&s));
    assert_eq!(s["counters"]["accepted"], 1, "{}", counters_line(&s));
    assert_eq!(s["kernel"]["redirected"], 1, "{}", counters_line(&s));
    assert_eq!(negative_hosts(&s), vec![IpAddr::from(c.ip4())], "{s}");
    let expires = s["negative_cache"][0]["expires_in_secs"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        (590..=600).contains(&expires),
        "default --negative-ttl is 10m: {s}"
    );
    let log = agent_a.log();
    assert!(log.contains("no agent listens on the peer port"), "{log}");
    assert!(
        log.contains("carrying this connection as plain TCP"),
        "{log}"
    );

    let skipped = s["kernel"]["skipped_negative"].as_u64().unwrap_or(0);
    later_connect(a, &cg, c.sock4(PORT))?;
    let s = status(&agent_a);
    assert_eq!(s["kernel"]["redirected"], 1, "{}", counters_line(&s));
    assert_eq!(
        s["kernel"]["skipped_negative"],
        skipped + 1,
        "{}",
        counters_line(&s)
    );
    assert_eq!(s["counters"]["accepted"], 1, "{}", counters_line(&s));
    assert_eq!(s["counters"]["plain_fallbacks"], 1, "{}", counters_line(&s));

    // The cache is per address: c's IPv6 address is probed once on its own, then left alone.
    first_connect(a, &cg, c.sock6(PORT))?;
    let s = status(&agent_a);
    assert_eq!(s["counters"]["plain_fallbacks"], 2, "{}", counters_line(&s));
    assert_eq!(s["kernel"]["redirected"], 2, "{}", counters_line(&s));
    let mut hosts = negative_hosts(&s);
    hosts.sort();
    assert_eq!(
        hosts,
        vec![IpAddr::from(c.ip4()), IpAddr::from(c.ip6())],
        "{s}"
    );
    later_connect(a, &cg, c.sock6(PORT))?;
    let s = status(&agent_a);
    assert_eq!(s["kernel"]["redirected"], 2, "{}", counters_line(&s));
    assert_eq!(
        s["kernel"]["skipped_negative"],
        skipped + 2,
        "{}",
        counters_line(&s)
    );
    Ok(())
}

/// Drops TCP to port 4470 arriving at `host`, silently: the peer port neither answers nor
/// refuses, as behind a firewall that drops.
fn drop_peer_port(host: &Host) -> Result<()> {
    let mut cmd = host.exec("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("nft")?;
    child.stdin.take().unwrap().write_all(
        b"table inet rocks_e2e_drop_peer_port {\n\
          \tchain input { type filter hook input priority 0; policy accept; tcp dport 4470 drop; }\n\
          }\n",
    )?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn silent_peer_port_is_bounded_by_probe_timeout() -> Result<()> {
    if !require_root() || !require_tools(&["nft"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, c) = (topo.host("a"), topo.host("c"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(c, PORT)?;
    drop_peer_port(c)?;
    // The rule works: a direct connect to c's peer port times out instead of being refused.
    let mut cmd = a.exec(testpeer_bin!());
    cmd.args([
        "getpeername",
        "--connect",
        &c.sock4(4470).to_string(),
        "--connect-timeout-ms",
        "200",
    ]);
    let out = Child::spawn(cmd)?.wait_with_timeout(secs(5))?;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "port 4470 on c is not silent: {out:?}"
    );

    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .args(["--probe-timeout", "300ms"])
        .start(a)?;
    let base = direct(a, c.sock4(PORT))?;
    let first = first_connect(a, &cg, c.sock4(PORT))?;
    eprintln!(
        "time to first byte toward c (no agent, peer port silent, --probe-timeout 300ms): direct {:.2} ms, first connect from the cgroup (probe + plain relay) {:.2} ms",
        ms(base.first_byte_us),
        ms(first.first_byte_us)
    );
    // The program waited for the probe, and the probe gave up at its bound.
    assert!(
        first.first_byte_us >= 300_000,
        "the probe cannot have waited 300 ms: {first:?}"
    );
    let log = agent_a.log();
    assert!(
        log.contains("the peer port did not answer within 300ms"),
        "{log}"
    );
    let s = status(&agent_a);
    assert_eq!(s["counters"]["plain_fallbacks"], 1, "{}", counters_line(&s));
    assert_eq!(
        s["counters"]["handshake_failures"],
        0,
        "{}",
        counters_line(&s)
    );
    assert_eq!(negative_hosts(&s), vec![IpAddr::from(c.ip4())], "{s}");

    // Later connects pay nothing.
    let later = later_connect(a, &cg, c.sock4(PORT))?;
    eprintln!(
        "time to first byte of a later connect (negative cache, direct): {:.2} ms",
        ms(later.first_byte_us)
    );
    let s = status(&agent_a);
    assert_eq!(s["kernel"]["redirected"], 1, "{}", counters_line(&s));
    assert_eq!(s["kernel"]["skipped_negative"], 1, "{}", counters_line(&s));
    Ok(())
}
