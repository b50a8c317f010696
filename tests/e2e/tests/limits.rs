//! Issue 5, limits: when the agent carries `--max-connections` already, new connects from the
//! cgroup go direct in the kernel (never a failed connect), IPv4 and IPv6 alike, the agent says
//! so once per episode, and counts them; once connections close, new ones are kept again.
//! Out-of-range limits are refused at start with a clear error. (`storm.rs` checks the limit
//! against 2,000 connects at once.)

mod common;

use std::net::SocketAddr;

use anyhow::Result;
use common::*;
use rocks_e2e::agent::run_agent;
use rocks_e2e::bpf::rocks_map_entries;
use rocks_e2e::util::{TempDir, wait_until};
use rocks_e2e::{AgentSpec, ClusterSecret, TestCgroup, Topology, require_root, require_tools};
use serde_json::Value;

const PORT: u16 = 5072;
const MAX: u64 = 5;
/// Connections opened while the first MAX are held open.
const MORE: u64 = 15;
const HELD_SIZE: u64 = 2 * MIB;
const SIZE: u64 = 256 * 1024;

fn kept_rows(status: &Value) -> usize {
    status["connections"]
        .as_array()
        .map(|c| c.iter().filter(|r| r["mode"] == "kept").count())
        .unwrap_or(0)
}

#[test]
fn at_the_connection_limit_new_connects_go_direct_and_all_work() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .args(["--max-connections", &MAX.to_string()])
        .start(a)?;
    let target: SocketAddr = b.sock4(PORT);

    // MAX connections, each paused early in its transfer so all of them stay open while the
    // others run; the pause is long enough to cover the MORE transfers below.
    let held: Vec<_> = (0..MAX)
        .map(|_| {
            spawn_client(
                a,
                Some(cg.path()),
                target,
                HELD_SIZE,
                &["--pause-after", "64KiB", "--pause-ms", "8000"],
            )
        })
        .collect::<Result<_>>()?;
    let all_kept = wait_until(secs(10), || {
        agent_a
            .status_json()
            .is_ok_and(|s| kept_rows(&s) == MAX as usize)
    });
    assert!(
        all_kept,
        "{MAX} kept connections never showed: {}",
        agent_a.status_json()?
    );
    // Their original destinations are in the kernel map, and nothing else is.
    assert_eq!(
        rocks_map_entries(cg.path(), "rocks_connect4", "ROCKS_ORIG_BY_COOKIE")?,
        MAX as usize
    );
    agent_a.wait_for_log("connection limit reached", secs(5))?;

    // At the limit: each new connect goes direct, and works.
    // IPv4 and IPv6 in turn: connect4 and connect6 share the budget.
    for i in 0..MORE {
        let target = if i % 2 == 0 { target } else { b.sock6(PORT) };
        let r = transfer(a, Some(cg.path()), target, SIZE, secs(30))?;
        assert!(
            !ip_of(&r.sockname).is_loopback(),
            "redirected although the agent is at its limit: {r:?}"
        );
        assert_eq!(r.peername, target.to_string(), "{r:?}");
        assert_eq!(r.server_saw_peer, r.sockname, "a direct connection: {r:?}");
    }
    let s = agent_a.status_json()?;
    // The held ones were still open the whole time (else the switch would have flipped back).
    assert_eq!(kept_rows(&s), MAX as usize, "{s}");
    assert_eq!(s["kernel"]["redirected"], MAX, "{}", counters_line(&s));
    assert_eq!(s["kernel"]["skipped_limit"], MORE, "{}", counters_line(&s));
    assert_eq!(s["counters"]["accepted"], MAX, "{}", counters_line(&s));
    assert_eq!(s["counters"]["kept"], MAX, "{}", counters_line(&s));
    assert_eq!(
        s["counters"]["connection_limit_reached"],
        1,
        "{}",
        counters_line(&s)
    );

    // The held connections complete byte-exact through the agents.
    for c in held {
        let r = finish_client(c, HELD_SIZE, secs(60))?;
        assert!(ip_of(&r.sockname).is_loopback(), "{r:?}");
    }
    agent_a.wait_for_log("below the connection limit again", secs(10))?;

    // Below the limit: kept again (over IPv6 here).
    let r = transfer(a, Some(cg.path()), b.sock6(PORT), SIZE, secs(30))?;
    assert!(
        ip_of(&r.sockname).is_loopback(),
        "not kept after the limit: {r:?}"
    );
    let s = agent_a.status_json()?;
    assert_eq!(s["counters"]["kept"], MAX + 1, "{}", counters_line(&s));
    assert_eq!(s["kernel"]["skipped_limit"], MORE, "{}", counters_line(&s));
    assert_eq!(
        s["counters"]["connection_limit_reached"],
        1,
        "{}",
        counters_line(&s)
    );
    // One line per episode, not per connection sent direct.
    let log = agent_a.log();
    assert_eq!(log.matches("connection limit reached").count(), 1, "{log}");
    assert_eq!(
        log.matches("below the connection limit again").count(),
        1,
        "{log}"
    );
    Ok(())
}

#[test]
fn out_of_range_limits_are_refused_at_start() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    // Never reached (the check comes first), but a run directory of its own all the same.
    let run = TempDir::new("limits")?;
    for bad in ["0", "32769"] {
        let out = run_agent(
            None,
            [
                "attach".as_ref(),
                "--cgroup".as_ref(),
                cg.path().as_os_str(),
                "--secret-file".as_ref(),
                secret.path().as_os_str(),
                "--run-dir".as_ref(),
                run.path().as_os_str(),
                "--max-connections".as_ref(),
                std::ffi::OsStr::new(bad),
            ],
            secs(10),
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "--max-connections {bad} accepted: {err}"
        );
        assert!(
            err.contains(&format!(
                "--max-connections must be between 1 and 32768, not {bad}"
            )),
            "{err}"
        );
    }
    Ok(())
}
