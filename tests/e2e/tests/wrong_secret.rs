//! Acceptance (f): the agent on b holds another cluster secret. a's connection still works,
//! byte-exact, as plain TCP; a's log says why (the peer does not hold our secret), b's log
//! records the refused handshake, and neither secret appears in any log.

mod common;

use std::net::IpAddr;

use anyhow::Result;
use common::*;
use rocks_e2e::{AgentSpec, ClusterSecret, TestCgroup, Topology, require_root};

const PORT: u16 = 5006;
const SIZE: u64 = 16 * MIB;

#[test]
fn different_secret_falls_back_to_plain_tcp() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let (secret_a, secret_b) = (ClusterSecret::new()?, ClusterSecret::new()?);
    let _server = server(b, PORT)?;
    let agent_b = AgentSpec::serve(secret_b.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret_a.path()).start(a)?;

    let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
    assert_eq!(r.peername, b.sock4(PORT).to_string(), "{r:?}");
    assert!(
        ip_of(&r.sockname).is_loopback(),
        "the connect was redirected: {r:?}"
    );
    // Plain relay: a's agent dialed the server itself, from a's address; b's agent is not
    // in the path.
    assert_eq!(ip_of(&r.server_saw_peer), IpAddr::from(a.ip4()), "{r:?}");

    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    assert_eq!(sa["counters"]["kept"], 0, "{}", counters_line(&sa));
    assert_eq!(
        sa["counters"]["plain_fallbacks"],
        1,
        "{}",
        counters_line(&sa)
    );
    assert_eq!(
        sa["counters"]["handshake_failures"],
        1,
        "{}",
        counters_line(&sa)
    );
    assert_eq!(sa["negative_cache"][0]["host"], b.ip4().to_string(), "{sa}");
    assert_eq!(sb["counters"]["peer_sessions"], 0, "{}", counters_line(&sb));
    assert_eq!(
        sb["counters"]["handshake_failures"],
        1,
        "{}",
        counters_line(&sb)
    );

    // a names the cause; b records the refusal and whom it refused.
    let log_a = agent_a.wait_for_log("plain TCP", secs(5))?;
    assert!(
        log_a.contains("wrong cluster secret")
            || log_a.contains("does not hold our cluster secret"),
        "a's log does not say the secrets differ:\n{log_a}"
    );
    assert!(log_a.contains("session handshake failed"), "{log_a}");
    let log_b = agent_b.wait_for_log("refused a session handshake", secs(5))?;
    assert!(
        log_b.contains("does not hold our cluster secret"),
        "b's log does not say why:\n{log_b}"
    );
    assert!(
        log_b.contains(&a.ip4().to_string()),
        "b's log does not name the peer:\n{log_b}"
    );
    for line in log_a
        .lines()
        .chain(log_b.lines())
        .filter(|l| l.contains("secret"))
    {
        eprintln!("{line}");
    }

    // The secrets themselves never appear in logs or status.
    for secret in [&secret_a, &secret_b] {
        let hex = std::fs::read_to_string(secret.path())?.trim().to_owned();
        assert_eq!(hex.len(), 64);
        for (what, text) in [
            ("a's log", &log_a),
            ("b's log", &log_b),
            ("a's status", &sa.to_string()),
            ("b's status", &sb.to_string()),
        ] {
            assert!(
                !text.contains(&hex) && !text.contains(&hex[..16]),
                "{what} shows a secret"
            );
        }
    }

    // A second connect goes direct (negative cache), still byte-exact.
    let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
    assert_eq!(ip_of(&r.sockname), IpAddr::from(a.ip4()), "{r:?}");
    assert_eq!(agent_b.counter("counters", "handshake_failures")?, 1);
    Ok(())
}
