//! Logs and status, as an operator reads them. One line per session event (opened,
//! suspended, resumed, closed, fallback to plain TCP), each with the connection's id and its
//! addresses (and the session id where there is one), on both agents; the cluster secret never
//! appears in a log (even at debug level), in `status` (table or JSON), in the metrics or in the
//! process's arguments and environment; `status --json` has exactly the fields
//! `docs/status-schema.md` documents.

mod common;
mod ops_support;

use std::ffi::OsStr;
use std::time::Duration;

use anyhow::Result;
use common::*;
use ops_support::*;
use rocks_e2e::agent::run_agent;
use rocks_e2e::util::wait_until;
use rocks_e2e::{AgentSpec, ClusterSecret, TestCgroup, Topology, require_root};

const PORT: u16 = 5041;
const SIZE: u64 = 8 * MIB;

/// The lines of `log` containing `needle`.
fn lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// The one line containing `event` and `id=<id> ` (or `id=<id>` at the end); fails otherwise.
fn event_line<'a>(log: &'a str, event: &str, id: u64) -> &'a str {
    let with_id = |l: &&str| l.contains(&format!(" id={id} ")) || l.ends_with(&format!(" id={id}"));
    let found: Vec<&str> = lines(log, event).into_iter().filter(with_id).collect();
    assert!(!found.is_empty(), "no {event:?} line for id={id} in:\n{log}");
    found[0]
}

#[test]
fn one_line_per_session_event_with_ids_and_addresses_and_never_the_secret() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let hex = std::fs::read_to_string(secret.path())?.trim().to_owned();
    assert_eq!(hex.len(), 64);
    let _servers = [server(b, PORT)?, server(c, PORT)?];
    // Debug level everywhere (eBPF redirect records included): the secret must not appear
    // even there.
    let agent_b = AgentSpec::serve(secret.path())
        .env("RUST_LOG", "debug")
        .args(["--metrics", "127.0.0.1:9470"])
        .start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .env("RUST_LOG", "debug")
        .args(["--metrics", "127.0.0.1:9470"])
        .start(a)?;

    // 1. c has no agent: fallback to plain TCP (connection id 1 on a).
    transfer(a, Some(cg.path()), c.sock4(PORT), SIZE, secs(30))?;

    // 2. A kept connection to b (id 2 on a), suspended by a link outage mid-stream, resumed,
    //    closed. The status is read while it is open: every section of the schema has a value.
    let client = spawn_client(a, Some(cg.path()), b.sock4(PORT), SIZE, &["--pause-after", "2MiB", "--pause-ms", "9000"])?;
    let mut status = None;
    let open = wait_until(secs(20), || {
        status = agent_a.status_json().ok();
        status.as_ref().is_some_and(|s| s["connections"].as_array().is_some_and(|c| c.iter().any(|r| r["mode"] == "kept")))
    });
    assert!(open, "no kept connection listed: {status:?}");
    let status_a = status.unwrap();
    check_status_schema(&status_a)?;
    let status_b = agent_b.status_json()?;
    check_status_schema(&status_b)?;
    let table_a = String::from_utf8_lossy(
        &run_agent(None, [OsStr::new("status"), "--run-dir".as_ref(), agent_a.run_dir().as_os_str()], secs(10))?.stdout,
    )
    .into_owned();
    eprintln!("{table_a}");
    let metrics_a = scrape(a, "127.0.0.1:9470".parse()?)?.text;
    let metrics_b = scrape(b, "127.0.0.1:9470".parse()?)?.text;

    // The cable is out for 6 s: longer than the dead-path timer (4 s), so the session is
    // suspended, then resumes when the link is back.
    topo.set_link("a", false)?;
    std::thread::sleep(Duration::from_secs(6));
    topo.set_link("a", true)?;
    finish_client(client, SIZE, secs(60)).map_err(|e| e.context(agent_a.log()))?;
    // The close reaches both logs.
    agent_a.wait_for_log("kept connection closed", secs(10))?;
    agent_b.wait_for_log("kept connection closed", secs(10))?;

    let (log_a, log_b) = (agent_a.log(), agent_b.log());
    let a_ip = a.ip4().to_string();
    let (b_dst, c_dst) = (b.sock4(PORT).to_string(), c.sock4(PORT).to_string());

    // Fallback (a, id 1): the app's address, the destination, why; then its close.
    let l = event_line(&log_a, "carrying this connection as plain TCP", 1);
    assert!(l.contains("app=127.0.0.1:") && l.contains(&format!("dst={c_dst}")) && l.contains("why="), "{l}");
    let l = event_line(&log_a, "plain connection closed", 1);
    assert!(l.contains("app=127.0.0.1:") && l.contains(&format!("dst={c_dst}")) && l.contains("up="), "{l}");

    // The kept connection on a (id 2): opened, suspended, resumed, closed.
    let session = status_a["connections"]
        .as_array()
        .and_then(|c| c.iter().find(|r| r["mode"] == "kept"))
        .and_then(|r| r["session_id"].as_str())
        .expect("session id")
        .to_owned();
    for event in ["kept connection opened", "session suspended: transport lost", "session resumed", "kept connection closed"] {
        let l = event_line(&log_a, event, 2);
        assert!(l.contains(&format!("session={session}")), "{event}: no session id: {l}");
        assert!(l.contains(&format!("dst={b_dst}")), "{event}: no destination: {l}");
        assert!(l.contains("app=127.0.0.1:") || l.contains("peer=127.0.0.1:"), "{event}: no application address: {l}");
        eprintln!("a: {l}");
    }
    // And on b (its id 1): served, resumed, closed, with the peer agent's address.
    for event in ["serving a kept connection", "session resumed", "kept connection closed"] {
        let l = event_line(&log_b, event, 1);
        assert!(l.contains(&format!("session={session}")), "{event}: {l}");
        assert!(l.contains(&format!("peer={a_ip}:")), "{event}: no peer address (IPv4 form): {l}");
        assert!(l.contains(&format!("dst={b_dst}")), "{event}: {l}");
        eprintln!("b: {l}");
    }

    // The secret, in full or in part, nowhere.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent_a.pid()))?;
    let environ = std::fs::read(format!("/proc/{}/environ", agent_a.pid()))?;
    for (what, text) in [
        ("a's log", log_a.clone()),
        ("b's log", log_b.clone()),
        ("a's status --json", status_a.to_string()),
        ("b's status --json", status_b.to_string()),
        ("a's status table", table_a),
        ("a's metrics", metrics_a),
        ("b's metrics", metrics_b),
        ("a's arguments", String::from_utf8_lossy(&cmdline).into_owned()),
        ("a's environment", String::from_utf8_lossy(&environ).into_owned()),
    ] {
        for part in [&hex[..], &hex[..16], &hex[24..40], &hex[48..]] {
            assert!(!text.to_lowercase().contains(part), "{what} shows (part of) the cluster secret");
        }
    }
    assert!(log_a.contains("DEBUG"), "the agent logged at debug level");
    Ok(())
}

#[test]
fn rust_log_filters_the_lines() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let secret = ClusterSecret::new()?;
    let quiet = AgentSpec::serve(secret.path()).env("RUST_LOG", "warn").start(topo.host("a"))?;
    let loud = AgentSpec::serve(secret.path()).env("RUST_LOG", "info").args(["--listen", "[::]:4480"]).start(topo.host("a"))?;
    assert!(loud.log().contains("rocks agent serving peers"), "{}", loud.log());
    assert!(!quiet.log().contains("rocks agent serving peers"), "RUST_LOG=warn hides info lines: {}", quiet.log());
    Ok(())
}
