//! Acceptance (c): only processes in the attached cgroup (and its descendants), in the agent's
//! network namespace, are redirected. A process in the same namespace but outside the cgroup
//! connects directly: the kernel's `redirected` counter does not move, and the program's own
//! address is the host's real address, not loopback.

mod common;

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use common::*;
use rocks_e2e::{
    Agent, AgentSpec, ClientReport, ClusterSecret, Host, TestCgroup, Topology, require_root,
};

const PORT: u16 = 5003;
const SIZE: u64 = 4 * MIB;

/// The host's own address in the family of `target`.
fn own_ip(host: &Host, target: SocketAddr) -> IpAddr {
    if target.is_ipv4() {
        host.ip4().into()
    } else {
        host.ip6().into()
    }
}

/// A transfer that must have gone direct: the program's address is its host's real one, and
/// the server saw exactly that socket.
fn assert_direct(r: &ClientReport, from: &Host, target: SocketAddr) {
    assert_eq!(r.peername, target.to_string(), "{r:?}");
    assert_eq!(
        ip_of(&r.sockname),
        own_ip(from, target),
        "not direct: {r:?}"
    );
    assert_eq!(
        r.server_saw_peer, r.sockname,
        "the server saw another socket: {r:?}"
    );
}

/// A transfer that must have been redirected: the program's end is the loopback hop, and the
/// server saw another socket, from `from`'s address (b's agent dials transparently).
fn assert_redirected(r: &ClientReport, from: &Host, target: SocketAddr) {
    assert_eq!(r.peername, target.to_string(), "{r:?}");
    assert!(ip_of(&r.sockname).is_loopback(), "not redirected: {r:?}");
    assert_ne!(r.server_saw_peer, r.sockname, "{r:?}");
    assert_eq!(
        ip_of(&r.server_saw_peer),
        own_ip(from, target),
        "not through the peer agent: {r:?}"
    );
}

fn redirected(agent: &Agent) -> u64 {
    agent.counter("kernel", "redirected").expect("status")
}

#[test]
fn only_the_attached_cgroup_is_redirected() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let sibling = TestCgroup::new()?;
    let child = cg.path().join("child");
    std::fs::create_dir(&child)?;
    let secret = ClusterSecret::new()?;
    let _server_b = server(b, PORT)?;
    let _server_a = server(a, PORT)?;
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    // Outside any test cgroup (the test runner's own cgroup) and in a sibling cgroup: direct,
    // over both families, and the agents see nothing.
    for place in [None, Some(sibling.path())] {
        for target in [b.sock4(PORT), b.sock6(PORT)] {
            let r = transfer(a, place, target, SIZE, secs(30))?;
            assert_direct(&r, a, target);
        }
    }
    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    assert_eq!(sa["kernel"]["redirected"], 0, "{}", counters_line(&sa));
    assert_eq!(sa["counters"]["accepted"], 0, "{}", counters_line(&sa));
    assert_eq!(sb["counters"]["peer_sessions"], 0, "{}", counters_line(&sb));

    // Control: the same program in the attached cgroup, and in a cgroup below it (programs
    // attached to a cgroup apply to its descendants), is redirected.
    let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
    assert_redirected(&r, a, b.sock4(PORT));
    assert_eq!(redirected(&agent_a), 1);
    let r = transfer(a, Some(&child), b.sock6(PORT), SIZE, secs(30))?;
    assert_redirected(&r, a, b.sock6(PORT));
    assert_eq!(redirected(&agent_a), 2);

    // Outside again, after redirected connections: still direct.
    let r = transfer(a, None, b.sock4(PORT), SIZE, secs(30))?;
    assert_direct(&r, a, b.sock4(PORT));
    assert_eq!(redirected(&agent_a), 2);

    // A process in the attached cgroup but in another network namespace (host b, whose agent
    // attached nothing) belongs to no agent there: direct, and a's agent does not touch it.
    let r = transfer(b, Some(cg.path()), a.sock4(PORT), SIZE, secs(30))?;
    assert_direct(&r, b, a.sock4(PORT));
    let sa = agent_a.status_json()?;
    assert_eq!(sa["kernel"]["redirected"], 2, "{}", counters_line(&sa));
    assert_eq!(sa["counters"]["accepted"], 2, "{}", counters_line(&sa));
    assert_eq!(sa["counters"]["kept"], 2, "{}", counters_line(&sa));
    Ok(())
}
