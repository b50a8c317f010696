//! `--metrics`: the agents serve the Prometheus text format, and the numbers follow what
//! happened. Host a attaches (metrics on 127.0.0.1:9470 inside a), b serves with the same
//! secret (metrics too), c has no agent, d serves with another secret. From a's cgroup: a kept
//! connection to b that survives an address change of a mid-stream, then a plain one to c
//! (no agent), then one to d (wrong secret). Every scrape is parsed strictly (HELP and TYPE for
//! every family, cumulative histograms, no series twice).

mod common;
mod ops_support;

use std::net::SocketAddr;

use anyhow::Result;
use common::*;
use ops_support::*;
use rocks_e2e::util::wait_until;
use rocks_e2e::{AgentSpec, ClusterSecret, TestCgroup, Topology, require_root};

const PORT: u16 = 5021;
const SIZE: u64 = 16 * MIB;

fn metrics_addr() -> SocketAddr {
    "127.0.0.1:9470".parse().unwrap()
}

#[test]
fn metrics_follow_sessions_resumes_fallbacks_and_failures() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c", "d"])?;
    let (a, b, c, d) = (topo.host("a"), topo.host("b"), topo.host("c"), topo.host("d"));
    let cg = TestCgroup::new()?;
    let (secret, other_secret) = (ClusterSecret::new()?, ClusterSecret::new()?);
    let _servers = [server(b, PORT)?, server(c, PORT)?, server(d, PORT)?];
    let agent_b = AgentSpec::serve(secret.path()).args(["--metrics", "127.0.0.1:9470"]).start(b)?;
    let _agent_d = AgentSpec::serve(other_secret.path()).start(d)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path())
        .args(["--metrics", "127.0.0.1:9470"])
        .start(a)?;
    assert!(agent_a.log().contains("serving Prometheus metrics at /metrics addr=127.0.0.1:9470"), "{}", agent_a.log());

    // Before anything: every family is there, at zero.
    let m = scrape(a, metrics_addr())?;
    assert_eq!(m.get(&format!("rocks_info{{version=\"{}\",mode=\"attach\"}}", env!("CARGO_PKG_VERSION"))), 1.0);
    for series in [
        "rocks_kept_connections_total",
        "rocks_plain_fallbacks_total",
        "rocks_accepted_connections_total",
        "rocks_replay_buffer_bytes",
        "rocks_negative_cache_hosts",
        "rocks_bytes_total{direction=\"sent\"}",
        "rocks_bytes_total{direction=\"received\"}",
        "rocks_resumes_total{role=\"client\"}",
        "rocks_sessions{role=\"client\",state=\"active\"}",
        "rocks_sessions{role=\"client\",state=\"suspended\"}",
        "rocks_handshake_failures_total{phase=\"open\",reason=\"wrong_secret\"}",
        "rocks_handshake_failures_total{phase=\"resume\",reason=\"unknown_session\"}",
        "rocks_kernel_events_total{event=\"redirected\"}",
    ] {
        assert_eq!(m.get(series), 0.0, "{series}");
    }
    assert_eq!(m.types["rocks_resume_duration_seconds"], "histogram");
    let (code, _, body) = http_get(a, metrics_addr(), "/healthz")?;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(http_get(a, metrics_addr(), "/nothing")?.0, 404);

    // A kept connection to b; a's address changes while it is paused mid-stream.
    let client = spawn_client(a, Some(cg.path()), b.sock4(PORT), SIZE, &["--pause-after", "4MiB", "--pause-ms", "3000"])?;
    let mut during = None;
    let open = wait_until(secs(20), || {
        during = scrape(a, metrics_addr()).ok();
        during.as_ref().is_some_and(|m| m.get("rocks_sessions{role=\"client\",state=\"active\"}") == 1.0)
    });
    assert!(open, "no active client session in the metrics: {during:?}\n{}", agent_a.log());
    let m = during.unwrap();
    assert_eq!(m.get("rocks_connections{role=\"client\",mode=\"kept\"}"), 1.0);
    assert_eq!(m.get("rocks_kept_connections_total"), 1.0);
    let mb = scrape(b, metrics_addr())?;
    assert_eq!(mb.get("rocks_sessions{role=\"server\",state=\"active\"}"), 1.0);
    assert_eq!(mb.get("rocks_peer_sessions_total"), 1.0);
    assert!(mb.samples.keys().all(|k| !k.starts_with("rocks_kernel_events_total")), "serve loads no eBPF");

    topo.change_ip4("a", 11)?;
    finish_client(client, SIZE, secs(60)).map_err(|e| e.context(agent_a.log()))?;

    // Then a host without an agent, and one with another secret: both plain TCP.
    transfer(a, Some(cg.path()), c.sock4(PORT), SIZE, secs(30))?;
    transfer(a, Some(cg.path()), d.sock4(PORT), SIZE, secs(30))?;

    // Everything closed: the totals stay, the gauges are back at zero.
    let mut m = None;
    let settled = wait_until(secs(10), || {
        m = scrape(a, metrics_addr()).ok();
        m.as_ref().is_some_and(|m| {
            m.get("rocks_connections{role=\"client\",mode=\"kept\"}") == 0.0
                && m.get("rocks_connections{role=\"client\",mode=\"plain\"}") == 0.0
        })
    });
    let m = m.unwrap();
    assert!(settled, "connections still listed:\n{}", m.text);
    eprintln!("a's metrics after the run:\n{}", m.text);
    assert_eq!(m.get("rocks_accepted_connections_total"), 3.0);
    assert_eq!(m.get("rocks_kept_connections_total"), 1.0);
    assert_eq!(m.get("rocks_plain_fallbacks_total"), 2.0);
    assert_eq!(m.get("rocks_handshake_failures_total{phase=\"open\",reason=\"wrong_secret\"}"), 1.0);
    let failures: f64 = m.samples.iter().filter(|(k, _)| k.starts_with("rocks_handshake_failures_total{phase=\"open\"")).map(|(_, v)| v).sum();
    assert_eq!(failures, 1.0, "only the wrong secret failed a handshake");
    assert_eq!(m.get("rocks_negative_cache_hosts"), 2.0);
    assert_eq!(m.get("rocks_kernel_events_total{event=\"redirected\"}"), 3.0);
    assert_eq!(m.get("rocks_replay_buffer_bytes"), 0.0);
    // Three transfers of SIZE each way (plus the test peer's small headers).
    for direction in ["sent", "received"] {
        let bytes = m.get(&format!("rocks_bytes_total{{direction=\"{direction}\"}}"));
        assert!(bytes >= (3 * SIZE) as f64 && bytes < (3 * SIZE + MIB) as f64, "{direction}: {bytes}");
    }
    let resumes = m.get("rocks_resumes_total{role=\"client\"}");
    assert!(resumes >= 1.0, "the address change caused no resume");
    let (buckets, count, sum) = m.histogram("rocks_resume_duration_seconds", "role=\"client\"");
    assert_eq!(count, resumes, "one latency per resume");
    assert!(sum < 10.0 * count, "resumes after an address change take well under 10 s each: sum {sum}");
    assert!(buckets.len() > 10, "{buckets:?}");

    // b saw the resume as well, from its side.
    let mb = scrape(b, metrics_addr())?;
    assert!(mb.get("rocks_resumes_total{role=\"server\"}") >= 1.0, "{}", mb.text);
    assert_eq!(mb.get("rocks_sessions{role=\"server\",state=\"active\"}"), 0.0);
    let sb = agent_b.status_json()?;
    assert_eq!(mb.get("rocks_peer_sessions_total"), sb["counters"]["peer_sessions"].as_f64().unwrap());
    Ok(())
}

#[test]
fn metrics_port_in_use_fails_the_start_and_changes_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let secret = ClusterSecret::new()?;
    let _first = AgentSpec::serve(secret.path()).args(["--metrics", "127.0.0.1:9470", "--listen", "[::]:4480"]).start(a)?;
    let dir = rocks_e2e::util::TempDir::new("metrics-busy")?;
    let out = rocks_e2e::agent::run_agent(
        Some(a),
        [
            "serve".as_ref(),
            "--secret-file".as_ref(),
            secret.path().as_os_str(),
            "--metrics".as_ref(),
            "127.0.0.1:9470".as_ref(),
            "--run-dir".as_ref(),
            dir.path().join("run").as_os_str(),
        ],
        secs(10),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("metrics port 127.0.0.1:9470 is already in use") && err.contains("--metrics"), "{err}");
    assert!(!dir.path().join("run").join("control.sock").exists(), "a failed start left a control socket");
    Ok(())
}
