//! Acceptance (e): while the agent runs, bpftool shows its connect and getpeername programs on
//! the cgroup, attached in multi mode (so they coexist with other programs); after SIGTERM the
//! agent exits cleanly, nothing of ours is left attached or loaded, and new connections from
//! the cgroup go direct.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Result;
use common::*;
use rocks_e2e::bpf::{prog_loaded, rocks_programs};
use rocks_e2e::util::wait_until;
use rocks_e2e::{AgentSpec, ClusterSecret, TestCgroup, Topology, require_root, require_tools};

const PORT: u16 = 5005;
const SIZE: u64 = 4 * MIB;

#[test]
fn sigterm_detaches_everything_and_connections_go_direct() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    assert!(
        rocks_programs(cg.path())?.is_empty(),
        "programs on a fresh cgroup"
    );
    let mut agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    let attached = rocks_programs(cg.path())?;
    let got: BTreeSet<(String, String, String)> = attached
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.attach_type.clone(),
                p.attach_flags.clone(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = [
        ("rocks_connect4", "cgroup_inet4_connect"),
        ("rocks_connect6", "cgroup_inet6_connect"),
        ("rocks_getpeername4", "cgroup_inet4_getpeername"),
        ("rocks_getpeername6", "cgroup_inet6_getpeername"),
        ("rocks_sock_release", "cgroup_inet_sock_release"),
        // The agent runs in another cgroup, so sock_ops goes on the target as well.
        ("rocks_sock_ops", "cgroup_sock_ops"),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_owned(), t.to_owned(), "multi".to_owned()))
    .collect();
    assert_eq!(
        got,
        want,
        "bpftool cgroup show {}: {attached:?}",
        cg.path().display()
    );
    // sock_ops also watches the agent's own cgroup, where its accepted sockets live.
    let own = rocks_programs(agent_a.cgroup())?;
    assert_eq!(
        own.iter()
            .map(|p| (p.name.as_str(), p.attach_flags.as_str()))
            .collect::<Vec<_>>(),
        vec![("rocks_sock_ops", "multi")],
        "{own:?}"
    );

    // Working before: a kept connection.
    let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
    assert!(ip_of(&r.sockname).is_loopback(), "{r:?}");
    assert_eq!(agent_a.counter("counters", "kept")?, 1);

    // A connection open when the agent stops ends (the README's limit: reset), it does not
    // hang and does not complete as if nothing happened.
    let mut open = spawn_client(
        a,
        Some(cg.path()),
        b.sock4(PORT),
        SIZE,
        &["--pause-after", "1MiB", "--pause-ms", "1500"],
    )?;
    let carried = wait_until(secs(10), || {
        agent_a.status_json().is_ok_and(|s| {
            s["connections"].as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|c| c["mode"] == "kept" && c["bytes_sent"].as_u64().unwrap_or(0) >= MIB)
            })
        })
    });
    assert!(
        carried,
        "the second connection never showed up: {}",
        agent_a.status_json()?
    );

    let status = agent_a.stop()?;
    assert!(
        status.success(),
        "agent exit after SIGTERM: {status}\n{}",
        agent_a.log()
    );
    let log = agent_a.log();
    assert!(
        log.contains("SIGTERM: shutting down") && log.contains("detached; exiting"),
        "{log}"
    );
    assert!(
        !agent_a.control_socket().exists(),
        "control socket left behind"
    );
    let out = open.wait_with_timeout(secs(15))?;
    assert!(
        !out.status.success(),
        "a connection carried by the stopped agent completed: {out:?}"
    );
    eprintln!(
        "open connection when the agent stopped: {} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );

    assert_eq!(
        rocks_programs(cg.path())?,
        vec![],
        "left attached to {}",
        cg.path().display()
    );
    assert_eq!(
        rocks_programs(agent_a.cgroup())?,
        vec![],
        "left attached to the agent's cgroup"
    );
    // And unloaded: no link, map or fd keeps any of them alive (freed asynchronously).
    let ids: Vec<u32> = attached.iter().chain(&own).map(|p| p.id).collect();
    assert!(
        wait_until(secs(5), || ids.iter().all(|&id| !prog_loaded(id))),
        "still loaded: {ids:?}"
    );

    // New connections from the cgroup now go direct.
    for target in [b.sock4(PORT), b.sock6(PORT)] {
        let r = transfer(a, Some(cg.path()), target, SIZE, secs(30))?;
        let a_ip: IpAddr = if target.is_ipv4() {
            a.ip4().into()
        } else {
            a.ip6().into()
        };
        assert_eq!(
            ip_of(&r.sockname),
            a_ip,
            "still redirected after the agent left: {r:?}"
        );
        assert_eq!(r.server_saw_peer, r.sockname, "{r:?}");
        assert_eq!(r.peername, target.to_string(), "{r:?}");
    }
    // `status` now says nobody is there.
    let out = rocks_e2e::agent::run_agent(
        None,
        [
            std::ffi::OsStr::new("status"),
            "--run-dir".as_ref(),
            agent_a.run_dir().as_os_str(),
        ],
        secs(10),
    )?;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent is running"),
        "{out:?}"
    );
    Ok(())
}

/// Blocks in recv() on a connection that carries nothing, and reports how it ended.
const WAIT_FOR_END: &str = r#"
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print("connected", flush=True)
try:
    data = s.recv(1)
    print(json.dumps({"end": "eof" if data == b"" else "data"}), flush=True)
except ConnectionResetError:
    print(json.dumps({"end": "reset"}), flush=True)
except socket.timeout:
    print(json.dumps({"end": "timeout"}), flush=True)
"#;

/// The README's limit: "Stopping the agent ends the connections it carries (they are reset)".
/// A reset, not an orderly EOF: an application must not mistake a connection cut by the
/// agent's exit for the peer's end of stream (a truncated download that looks complete). And
/// the peer agent ends the server side too, instead of holding it for `--keep-for`.
#[test]
fn connections_open_when_the_agent_stops_are_reset() -> Result<()> {
    if !require_root() || !require_tools(&["python3"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    // Waits for a request header that never comes: the connection stays idle.
    let _server = server(b, PORT)?;
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let mut agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    let mut app = rocks_e2e::spawn_in(
        a,
        cg.path(),
        "python3",
        ["-c", WAIT_FOR_END, &b.ip4().to_string(), &PORT.to_string()],
    )?;
    app.wait_for_stdout("connected", secs(10))?;
    let kept = wait_until(secs(10), || {
        agent_a.status_json().is_ok_and(|s| {
            s["connections"].as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|c| c["mode"] == "kept" && c["state"] == "active")
            })
        })
    });
    assert!(
        kept,
        "the idle connection is not kept: {}",
        agent_a.status_json()?
    );
    assert!(agent_a.stop()?.success());
    let out = app.wait_with_timeout(secs(15))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let app_end = stdout.lines().last().unwrap_or_default().to_owned();
    // The other end: with a's agent gone for good, b's agent must end the server side too
    // rather than hold it for --keep-for (72 h) waiting for a resume that cannot come.
    let b_ended = wait_until(secs(5), || {
        agent_b
            .status_json()
            .is_ok_and(|s| s["connections"].as_array().is_some_and(|c| c.is_empty()))
    });
    assert!(
        app_end == r#"{"end": "reset"}"# && b_ended,
        "when a's agent stopped, the app saw {app_end:?} (want a reset) and b's agent {} the \
         server side within 5 s (both logs follow).\nb's status: {}",
        if b_ended { "ended" } else { "still held" },
        agent_b.status_json()?,
    );
    Ok(())
}
