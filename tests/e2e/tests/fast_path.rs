//! Regression tests for the bug classes sockmap/sk_msg fast paths met elsewhere (Cilium's
//! sockops acceleration, dae): a `splice()` receiver, `FIONREAD`, blocking readers and
//! half-close with a reply from the CLOSE_WAIT side, many small writes, and MPTCP sockets.
//! Each runs through the kept path (agent a attached to the app's cgroup, agent b serving),
//! byte-exact (every byte checked against a pattern, sha256 compared on both ends).
//!
//! Every test runs with `--fast-path off` and `auto`. `on` runs where this kernel lets it
//! pass: the application's socket in a sockhash changes how it receives (see
//! `rocks-agent/src/sockmap_probe.rs` and the README), so `on` is run with an event-loop
//! receiver (poll, then non-blocking reads), and not at all for splice(), blocking readers
//! and slow readers, which it fails on Linux 6.18. The `fast_path_*.rs` files hold the rest:
//! the 2 GiB stream, back-pressure, and `auto`'s own mechanics.

mod fast_path_support;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fast_path_support::*;
use rocks_e2e::agent::run_agent;
use rocks_e2e::require_root;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// The modes every test runs in.
const SAFE: [&str; 2] = ["off", "auto"];

/// Runs `check` once per mode and reports every mode that failed, not just the first.
fn each_mode(
    modes: &[&'static str],
    mut check: impl FnMut(&mut Setup) -> Result<String>,
) -> Result<()> {
    let mut failed = Vec::new();
    for &mode in modes {
        let mut setup = Setup::new(mode)?;
        match check(&mut setup) {
            Ok(note) => eprintln!("fast path {mode}: ok; {note}"),
            Err(e) => {
                eprintln!("fast path {mode}: FAILED: {e:#}");
                failed.push(format!("{mode}: {e:#}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} mode(s) failed:\n{}", failed.len(), failed.join("\n"));
    }
    Ok(())
}

/// `on` must have moved the app's sends through sk_msg (or the test proves nothing about it);
/// `off` never; `auto` only where the kernel passed the sockmap probe.
fn check_engaged(setup: &Setup, before: u64) -> Result<String> {
    let after = setup.fast_path_msgs()?;
    let status = setup.agent_a.status_json()?;
    let effective = status["fast_path_mode"]["effective"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    match (setup.mode, effective.as_str()) {
        ("off", _) | ("auto", "off") if after != before => {
            bail!(
                "sk_msg redirected {} messages with the fast path {effective}",
                after - before
            )
        }
        ("on", _) | ("auto", "auto") if after <= before => {
            bail!("the fast path never engaged: {}", counters(&setup.agent_a))
        }
        _ => Ok(format!(
            "new connections {effective}, {} messages through sk_msg{}",
            after - before,
            match status["fast_path_mode"]["off_because"].as_str() {
                Some(why) => format!(" ({why})"),
                None => String::new(),
            }
        )),
    }
}

fn received(v: &Value) -> &Value {
    &v["received"]
}

#[test]
fn splice_receiver_gets_every_byte() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(&SAFE, |s| {
        let before = s.fast_path_msgs()?;
        // The app receives the server's stream by splice() into a pipe, then replies.
        let (c, srv) = s.run(
            &[
                "--op", "source", "--len", "32MiB", "--reply", "1MiB", "--recv", "splice",
            ],
            T,
        )?;
        assert_eq!(u(&received(&c)["bytes"]), 32 * MIB);
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        assert_eq!(u(&received(&srv)["bytes"]), MIB);
        assert_eq!(received(&srv)["sha256"], c["sent_sha256"]);
        // And the answer after the app's upload, also through splice().
        let (c, srv) = s.run(
            &[
                "--op", "sink", "--len", "8MiB", "--reply", "16MiB", "--recv", "splice",
            ],
            T,
        )?;
        assert_eq!(u(&received(&c)["bytes"]), 16 * MIB);
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        check_engaged(s, before)
    })
}

fn fionread(s: &mut Setup, extra: &[&str]) -> Result<String> {
    let before = s.fast_path_msgs()?;
    let mut args = vec![
        "--op", "source", "--len", "32MiB", "--reply", "64KiB", "--recv", "fionread",
    ];
    args.extend_from_slice(extra);
    let (c, srv) = s.run(&args, T)?;
    let r = received(&c);
    assert_eq!(r["sha256"], srv["sent_sha256"], "{c}\n{srv}");
    if u(&r["fionread_violations"]) != 0 {
        bail!(
            "FIONREAD disagreed with read() {} times in {} checks; first: {}",
            r["fionread_violations"],
            r["fionread_checks"],
            r["first_violation"]
        );
    }
    assert!(u(&r["fionread_checks"]) > 0, "{c}");
    let note = check_engaged(s, before)?;
    Ok(format!("{note}; {} FIONREAD checks", r["fionread_checks"]))
}

#[test]
fn fionread_reports_what_is_readable() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(&SAFE, |s| fionread(s, &[]))?;
    // With `on` everything toward the app comes through sk_msg, which this kernel's FIONREAD
    // counts (it is TCP-delivered bytes it misses: see sockmap_probe.rs).
    each_mode(&["on"], |s| fionread(s, &["--nonblocking"]))
}

#[test]
fn blocking_readers_and_half_close_both_ways() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(&SAFE, |s| {
        let before = s.fast_path_msgs()?;
        // The app shuts down its write side first; the server (CLOSE_WAIT) reads the rest,
        // then answers with its count, sha256 and 8 MiB, which the app reads blocking.
        let (c, srv) = s.run(
            &[
                "--op", "sink", "--len", "8MiB", "--reply", "8MiB", "--recv", "blocking",
            ],
            T,
        )?;
        assert_eq!(c["server_count"], 8 * MIB, "{c}");
        assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        // The server shuts down first; the app (CLOSE_WAIT) reads to EOF with blocking
        // read()s, then replies 8 MiB.
        let (c, srv) = s.run(
            &[
                "--op", "source", "--len", "32MiB", "--reply", "8MiB", "--recv", "blocking",
            ],
            T,
        )?;
        assert_eq!(u(&received(&srv)["bytes"]), 8 * MIB, "{srv}");
        assert_eq!(received(&srv)["sha256"], c["sent_sha256"], "{c}\n{srv}");
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        check_engaged(s, before)
    })
}

#[test]
fn half_close_both_ways_with_an_event_loop_receiver_and_the_fast_path_on() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(&["on"], |s| {
        let before = s.fast_path_msgs()?;
        let (c, srv) = s.run(
            &[
                "--nonblocking",
                "--op",
                "sink",
                "--len",
                "8MiB",
                "--reply",
                "8MiB",
            ],
            T,
        )?;
        assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        let (c, srv) = s.run(
            &[
                "--nonblocking",
                "--op",
                "source",
                "--len",
                "8MiB",
                "--reply",
                "8MiB",
            ],
            T,
        )?;
        assert_eq!(received(&srv)["sha256"], c["sent_sha256"], "{c}\n{srv}");
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        check_engaged(s, before)
    })
}

#[test]
fn many_small_writes_arrive_in_order() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let check = |s: &mut Setup| {
        let before = s.fast_path_msgs()?;
        // Writes of 1 to 64 bytes: each one is an sk_msg of its own.
        let (c, _) = s.run(
            &[
                "--nonblocking",
                "--op",
                "sink",
                "--len",
                "6MiB",
                "--small-writes",
                "--chunk",
                "64",
                "--reply",
                "1MiB",
            ],
            T,
        )?;
        assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
        let writes = u(&c["writes"]);
        assert!(writes > 150_000, "only {writes} writes: {c}");
        let note = check_engaged(s, before)?;
        Ok(format!("{note}; {writes} writes"))
    };
    each_mode(&["off", "on", "auto"], check)
}

/// `socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)` from the cgroup (Go does this by default on
/// some versions): the connection is kept or goes direct, but is never broken. The sockhash
/// refuses MPTCP subflows, so `sock_ops` leaves such a connection on loopback TCP.
#[test]
fn mptcp_sockets_are_kept_or_direct_never_broken() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(&["off", "on", "auto"], |s| {
        let a = s.topo.host("a");
        let mut cmd = a.exec("sysctl");
        cmd.args(["-n", "net.mptcp.enabled"]);
        let enabled = rocks_e2e::spawn::run(cmd, Duration::from_secs(5))?;
        let enabled = String::from_utf8_lossy(&enabled.stdout).trim().to_owned();
        if enabled != "1" {
            bail!("net.mptcp.enabled is {enabled:?} in host a: this test needs MPTCP");
        }
        let kept_before = s.agent_a.counter("counters", "kept")?;
        let before = s.fast_path_msgs()?;
        let (c, srv) = s.run(
            &[
                "--mptcp", "--op", "sink", "--len", "16MiB", "--reply", "16MiB", "--recv",
                "blocking",
            ],
            T,
        )?;
        assert_eq!(c["protocol"], 262, "the app's socket is MPTCP: {c}");
        assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
        assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        let (c2, srv2) = s.run(
            &[
                "--mptcp", "--op", "source", "--len", "16MiB", "--reply", "1MiB", "--recv",
                "blocking",
            ],
            T,
        )?;
        assert_eq!(received(&c2)["sha256"], srv2["sent_sha256"], "{c2}\n{srv2}");
        let kept = s.agent_a.counter("counters", "kept")? - kept_before;
        let sockname = c["sockname"].as_str().unwrap_or_default();
        let how = if sockname.starts_with("127.") {
            assert_eq!(kept, 2, "redirected but not kept: {}", counters(&s.agent_a));
            "kept"
        } else {
            "direct"
        };
        // Never on the fast path, whatever the mode.
        assert_eq!(
            s.fast_path_msgs()?,
            before,
            "an MPTCP connection went through sk_msg: {}",
            counters(&s.agent_a)
        );
        Ok(format!(
            "MPTCP connections went {how} (app socket {sockname}); {}",
            counters(&s.agent_a)
        ))
    })
}

fn fast_path_cmd(run_dir: &std::path::Path, mode: &str) -> Result<std::process::Output> {
    run_agent(
        None,
        [
            "fast-path".as_ref(),
            "--run-dir".as_ref(),
            run_dir.as_os_str(),
            mode.as_ref(),
        ],
        Duration::from_secs(20),
    )
}

fn fast_path_status(s: &Setup) -> Result<Value> {
    Ok(s.agent_a.status_json()?["fast_path_mode"].clone())
}

/// `rocks-agent fast-path` switches the mode at run time, for new connections only; `status`
/// shows the mode, what new connections get, and why `auto` is off when it is.
#[test]
fn fast_path_switches_at_run_time_for_new_connections() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = Setup::new("off")?;
    let st = fast_path_status(&s)?;
    assert_eq!(
        (st["mode"].as_str(), st["effective"].as_str()),
        (Some("off"), Some("off")),
        "{st}"
    );
    let (c, _) = s.run(
        &[
            "--nonblocking",
            "--op",
            "sink",
            "--len",
            "4MiB",
            "--reply",
            "1MiB",
        ],
        T,
    )?;
    assert_eq!(c["server_sha256"], c["sent_sha256"]);
    assert_eq!(s.fast_path_msgs()?, 0);

    // A connection opened under `off`, still open (its server pauses) when the mode changes.
    let to = s.topo.host("b").sock4(PORT).to_string();
    let long = rocks_e2e::spawn_in(
        s.topo.host("a"),
        s.cg.path(),
        app_bin(),
        [
            "client",
            "--connect",
            &to,
            "--nonblocking",
            "--op",
            "sink",
            "--len",
            "48MiB",
            "--delay-ms",
            "2500",
        ],
    )?;
    // Established (the mode is recorded then) before the switch: the agent accepted it.
    let accepted = rocks_e2e::util::wait_until(Duration::from_secs(10), || {
        s.agent_a
            .counter("counters", "accepted")
            .is_ok_and(|n| n >= 2)
    });
    assert!(
        accepted,
        "the long connection never arrived: {}",
        counters(&s.agent_a)
    );

    let out = fast_path_cmd(s.agent_a.run_dir(), "on")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).context("fast-path printed no JSON")?;
    assert_eq!(
        (answer["mode"].as_str(), answer["effective"].as_str()),
        (Some("on"), Some("on")),
        "{answer}"
    );

    let before = s.fast_path_msgs()?;
    let (c, srv) = s.run(
        &[
            "--nonblocking",
            "--op",
            "sink",
            "--len",
            "8MiB",
            "--reply",
            "8MiB",
        ],
        T,
    )?;
    assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
    assert_eq!(received(&c)["sha256"], srv["sent_sha256"], "{c}\n{srv}");
    assert!(
        s.fast_path_msgs()? > before,
        "the switch did not reach new connections: {}",
        counters(&s.agent_a)
    );

    // The connection from before the switch finishes byte-exact and never joined the fast path.
    let mut long = long;
    let out = long.wait_success(T)?;
    let r: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(r["server_sha256"], r["sent_sha256"], "{r}");
    let st = fast_path_status(&s)?;
    assert_eq!(
        st["connections_on"], 1,
        "only the connection after the switch joined: {st}"
    );

    // `auto`: on where the kernel passes the sockmap probe, else off, saying why.
    let out = fast_path_cmd(s.agent_a.run_dir(), "auto")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = fast_path_status(&s)?;
    assert_eq!(st["mode"], "auto", "{st}");
    let defects = st["kernel_defects"].as_array().cloned().unwrap_or_default();
    if defects.is_empty() {
        assert_eq!(st["effective"], "auto", "{st}");
    } else {
        assert_eq!(st["effective"], "off", "{st}");
        let why = st["off_because"].as_str().unwrap_or_default();
        assert!(why.contains("sockmap probe"), "{st}");
        let before = s.fast_path_msgs()?;
        s.run(
            &[
                "--op", "sink", "--len", "4MiB", "--reply", "1MiB", "--recv", "blocking",
            ],
            T,
        )?;
        assert_eq!(
            s.fast_path_msgs()?,
            before,
            "auto engaged although the probe failed: {st}"
        );
    }
    eprintln!("auto on this kernel: {st}");

    let out = fast_path_cmd(s.agent_a.run_dir(), "off")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fast_path_status(&s)?["effective"], "off");

    // Bad input: a clear error, nothing changed.
    let out = fast_path_cmd(s.agent_a.run_dir(), "fast")?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values: on, off, auto"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fast_path_cmd(s.agent_b.run_dir(), "on")?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no fast path"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The agent starts with `--fast-path auto` and says in `status` what new connections get.
#[test]
fn auto_reports_what_the_sockmap_probe_found() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new("auto")?;
    let st = fast_path_status(&s)?;
    assert_eq!(st["mode"], "auto", "{st}");
    let log = s.agent_a.log();
    assert!(log.contains("sockmap probe done"), "{log}");
    let defects = st["kernel_defects"].as_array().cloned().unwrap_or_default();
    for d in &defects {
        assert!(
            log.contains(d.as_str().unwrap_or("?")),
            "the log names {d}: {log}"
        );
    }
    assert_eq!(
        st["effective"],
        if defects.is_empty() { "auto" } else { "off" },
        "{st}"
    );
    eprintln!("auto at start on this kernel: {st}");
    Ok(())
}

/// `auto`'s own mechanics, with the sockmap probe ignored so they run on this kernel. The
/// server reads nothing for its first 1.5 s: the agent's replay buffer fills, it stops
/// reading, and the application's first 16 MiB burst reaches the in-flight limit, after which
/// its messages take loopback TCP. Once the server reads, the agent drains both queues between
/// bursts, and later bursts go through sk_msg again. The stream stays byte-exact across every
/// switch (the agent reads its sk_msg queue before its TCP queue, and sk_msg resumes only
/// when both are empty).
#[test]
fn auto_switches_between_sk_msg_and_tcp_without_reordering() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::auto_engaged()?;
    let st = fast_path_status(&s)?;
    assert_eq!(st["effective"], "auto", "{st}");
    let to = s.topo.host("b").sock4(PORT).to_string();
    let mut client = rocks_e2e::spawn_in(
        s.topo.host("a"),
        s.cg.path(),
        app_bin(),
        [
            "client",
            "--connect",
            &to,
            "--nonblocking",
            "--op",
            "sink",
            "--len",
            "96MiB",
            "--burst",
            "16MiB",
            "--burst-pause-ms",
            "600",
            "--delay-ms",
            "3000",
            "--reply",
            "1MiB",
        ],
    )?;
    // While the server still reads nothing (3 s from its first byte), the agent stops at its
    // full replay buffer and the application reaches the limit.
    let mut k = Value::Null;
    let limited = rocks_e2e::util::wait_until(Duration::from_millis(2500), || {
        k = s
            .agent_a
            .status_json()
            .map(|v| v["kernel"].clone())
            .unwrap_or_default();
        k["fast_path_limited"].as_u64().unwrap_or(0) >= 1
    });
    assert!(
        limited,
        "the paused reader never held the application at the limit: {k}"
    );
    let msgs_paused = u(&k["fast_path_msgs"]);
    assert!(
        msgs_paused > 0,
        "sk_msg carried nothing before the limit: {k}"
    );
    assert_eq!(k["fast_path_limited"], 1, "{k}");

    let out = client.wait_success(T)?;
    let c: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(c["server_count"], 96 * MIB, "{c}");
    assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
    let k = s.agent_a.status_json()?["kernel"].clone();
    let (msgs, passed) = (u(&k["fast_path_msgs"]), u(&k["fast_path_passed"]));
    assert!(passed > 0, "{k}");
    assert!(
        msgs > msgs_paused,
        "sk_msg never resumed after the limit: {k}"
    );
    // Once the connection is gone, the agent removed its entries and counted its limits.
    rocks_e2e::util::wait_until(Duration::from_secs(5), || {
        fast_path_status(&s).is_ok_and(|st| st["limited"].as_u64().unwrap_or(0) >= 1)
    });
    let st = fast_path_status(&s)?;
    assert_eq!(st["connections_auto"], 1, "{st}");
    assert!(u(&st["limited"]) >= 1, "{st}");
    assert_eq!(
        st["effective"], "auto",
        "a well-behaved connection must not switch auto off: {st}"
    );
    eprintln!(
        "auto, probe ignored: {} limit hits, {msgs_paused} messages by sk_msg before the limit, \
         {msgs} in all, {passed} by TCP; {st}",
        u(&k["fast_path_limited"])
    );
    Ok(())
}
