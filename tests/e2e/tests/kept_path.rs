//! Acceptance (a): a process in the attached cgroup on host a reaches a server on host b
//! through both agents, byte-exact, 100 MiB each way, over IPv4 and over IPv6; the counters,
//! the connection table and the addresses each end sees prove which path the bytes took.

mod common;

use std::net::IpAddr;
use std::time::Instant;

use anyhow::Result;
use common::*;
use rocks_e2e::util::wait_until;
use rocks_e2e::{AgentSpec, ClusterSecret, TestCgroup, Topology, require_root};
use serde_json::Value;

const PORT: u16 = 5001;
const SIZE: u64 = 100 * MIB;

/// The one row of `connections[]` whose destination is `dst`, if any.
fn connection_to(status: &Value, dst: &str) -> Option<Value> {
    status["connections"]
        .as_array()?
        .iter()
        .find(|c| c["destination"] == dst)
        .cloned()
}

#[test]
fn kept_path_v4_and_v6_100mib_each_way() -> Result<()> {
    kept_path()
}

/// The whole path, with the sk_msg fast path off (the default). The fast path has tests of its
/// own (`fast_path*.rs`): with the application's socket in the sockhash, a blocking reader such
/// as rocks-testpeer's can get EAGAIN on this kernel, so it is tested where it is safe.
fn kept_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    let s = agent_a.status_json()?;
    assert_eq!(s["mode"], "attach", "{s}");
    assert_eq!(
        s["cgroups"],
        serde_json::json!([cg.path().display().to_string()]),
        "{s}"
    );
    assert_eq!(s["redirect_port"], 4471, "{s}");
    assert_eq!(s["fast_path"], false, "off by default: {s}");
    assert_eq!(s["kernel"]["redirected"], 0, "{s}");
    assert_eq!(s["counters"]["kept"], 0, "{s}");
    let s = agent_b.status_json()?;
    assert_eq!(s["mode"], "serve", "{s}");
    assert_eq!(s["kernel"], Value::Null, "serve loads no eBPF: {s}");

    for (n, (target, loopback)) in [
        (b.sock4(PORT), IpAddr::from([127, 0, 0, 1])),
        (b.sock6(PORT), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ]
    .into_iter()
    .enumerate()
    {
        let n = n as u64;
        let fast_before = agent_a.counter("kernel", "fast_path_msgs")?;
        let started = Instant::now();
        // A pause early in the transfer leaves time to look at both agents' tables while the
        // connection is open.
        let client = spawn_client(
            a,
            Some(cg.path()),
            target,
            SIZE,
            &["--pause-after", "1MiB", "--pause-ms", "400"],
        )?;
        let dst = target.to_string();
        let (mut row_a, mut row_b) = (None, None);
        let seen = wait_until(secs(10), || {
            row_a = agent_a
                .status_json()
                .ok()
                .and_then(|s| connection_to(&s, &dst));
            row_b = agent_b
                .status_json()
                .ok()
                .and_then(|s| connection_to(&s, &dst));
            // b registers its row just before a hears the open result: wait for both ends.
            row_a.as_ref().is_some_and(|r| r["mode"] == "kept") && row_b.is_some()
        });
        assert!(
            seen,
            "connection to {dst} not in both tables: a {row_a:?} b {row_b:?}\n{}",
            agent_a.log()
        );
        let r = finish_client(client, SIZE, secs(90))?;
        let took = started.elapsed();

        // The program believes it talks to b; its own end is the agent's loopback listener.
        assert_eq!(r.peername, dst, "{r:?}");
        assert_eq!(ip_of(&r.sockname), loopback, "{r:?}");
        // The server sees a's address: b's agent dials transparently (`--transparent on`).
        let a_seen = if target.is_ipv4() {
            IpAddr::from(a.ip4())
        } else {
            IpAddr::from(a.ip6())
        };
        assert_eq!(ip_of(&r.server_saw_peer), a_seen, "{r:?}");

        let (row_a, row_b) = (row_a.unwrap(), row_b.unwrap());
        assert_eq!(
            (row_a["role"].as_str(), row_a["mode"].as_str()),
            (Some("client"), Some("kept")),
            "{row_a}"
        );
        assert_eq!(
            row_a["peer"],
            r.sockname.as_str(),
            "a's row names the app's socket: {row_a}"
        );
        assert_eq!(
            (row_b["role"].as_str(), row_b["mode"].as_str()),
            (Some("server"), Some("kept")),
            "{row_b}"
        );
        // The peer agent dials b's peer port in the destination's family, from a's address.
        let a_ip = if target.is_ipv4() {
            IpAddr::from(a.ip4())
        } else {
            IpAddr::from(a.ip6())
        };
        assert_eq!(
            ip_of(row_b["peer"].as_str().unwrap_or_default()).to_canonical(),
            a_ip,
            "b's peer is a's agent: {row_b}"
        );
        assert!(
            row_a["session_id"].is_string() && row_a["session_id"] == row_b["session_id"],
            "one session: {row_a} {row_b}"
        );

        let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
        assert_eq!(sa["counters"]["kept"], n + 1, "{}", counters_line(&sa));
        assert_eq!(sa["counters"]["accepted"], n + 1, "{}", counters_line(&sa));
        assert_eq!(
            sa["counters"]["plain_fallbacks"],
            0,
            "{}",
            counters_line(&sa)
        );
        assert_eq!(sa["kernel"]["redirected"], n + 1, "{}", counters_line(&sa));
        assert_eq!(
            sb["counters"]["peer_sessions"],
            n + 1,
            "{}",
            counters_line(&sb)
        );
        assert_eq!(
            sb["counters"]["handshake_failures"],
            0,
            "{}",
            counters_line(&sb)
        );
        assert_eq!(sa["negative_cache"], serde_json::json!([]), "{sa}");
        // With the fast path off, nothing went through sk_msg.
        let fast_after = sa["kernel"]["fast_path_msgs"].as_u64().unwrap_or(0);
        assert_eq!(fast_after, fast_before, "fast path engaged although off: {}", counters_line(&sa));
        eprintln!(
            "kept path to {dst}: {} MiB each way in {took:.2?} ({:.0} MiB/s each way), first byte after {} us; {}",
            SIZE / MIB,
            (SIZE / MIB) as f64 / took.as_secs_f64(),
            r.first_byte_us,
            counters_line(&sa)
        );
    }

    // Both ends drop the connection from their tables once it is closed.
    let empty = wait_until(secs(5), || {
        [&agent_a, &agent_b].iter().all(|ag| {
            ag.status_json()
                .is_ok_and(|s| s["connections"].as_array().is_some_and(|c| c.is_empty()))
        })
    });
    assert!(
        empty,
        "connections left: a {} b {}",
        agent_a.status_json()?,
        agent_b.status_json()?
    );
    let (log_a, log_b) = (agent_a.log(), agent_b.log());
    assert_eq!(
        log_a.matches("kept connection opened").count(),
        2,
        "{log_a}"
    );
    assert_eq!(
        log_b.matches("serving a kept connection").count(),
        2,
        "{log_b}"
    );
    Ok(())
}
