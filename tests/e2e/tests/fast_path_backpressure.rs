//! A slow reader must push back on the sender, with the fast path off, on or auto: memory
//! stays bounded. Measured as the bytes the sender's `write()` had accepted while the reader
//! had taken nothing yet (the reader pauses at the start; the sender samples its count before
//! the reader's first read, which the test checks on the machine-wide monotonic clock).
//!
//! Both directions: the far end reads slowly (the application sends; the agent stops reading
//! it once its replay buffer is full), and the application reads slowly (the server sends;
//! the agent writes into the application's socket).
//!
//! Modes: off; auto (which stays off on a kernel that fails the sockmap probe, as Linux 6.18
//! does); and auto with the probe ignored, so its in-flight bound is exercised on this kernel
//! too. `on` is not run: it has no bound (measured: the whole stream accepted while the
//! reader paused, both directions; see the README).

mod fast_path_support;

use std::time::Duration;

use anyhow::{Result, bail};
use fast_path_support::*;
use rocks_e2e::require_root;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const LEN: &str = "128MiB";
/// The reader's pause, and when the sender counts (well inside the pause).
const PAUSE_MS: &str = "2000";
const SAMPLE_MS: &str = "1500";
/// What the whole path may hold for a paused reader. With loopback TCP on both hops of a
/// host it is the sum of socket buffers (tcp_rmem/tcp_wmem autotuning: a few MiB each, four
/// sockets between the application and its agent, the agents and the server), the agents'
/// buffers (8 MiB replay buffer, 256 KiB toward the local socket) and the session
/// transport's socket buffers; measured at about 16 MiB on Linux 6.18 (`auto` adds at most
/// its 4 MiB in-flight limit). An unbounded path accepts the whole 128 MiB in the sample
/// window (`on` accepted a whole 256 MiB stream, both directions).
const BOUND: u64 = 40 * MIB;

fn accepted_while_paused(sample: &Value, reader_start_ns: u64) -> Result<u64> {
    let (Some(accepted), Some(at)) = (sample["accepted"].as_u64(), sample["at_mono_ns"].as_u64())
    else {
        bail!("the sender took no sample: {sample}");
    };
    if at >= reader_start_ns {
        bail!(
            "the sample ({at} ns) came after the reader started ({reader_start_ns} ns): {sample}"
        );
    }
    Ok(accepted)
}

fn check_bounded(mode: &str, what: &str, accepted: u64) -> Result<String> {
    if accepted > BOUND {
        bail!(
            "{what}: the sender got {} MiB accepted while the reader took nothing (bound {} MiB)",
            accepted / MIB,
            BOUND / MIB
        );
    }
    // Something must have moved, or the measurement says nothing.
    if accepted < MIB {
        bail!("{what}: only {accepted} bytes accepted: the path did not carry anything");
    }
    Ok(format!(
        "{mode}: {what}: {:.1} MiB accepted while the reader paused",
        accepted as f64 / MIB as f64
    ))
}

type Start = fn() -> Result<Setup>;

/// The modes, and how to start each.
fn setups() -> [(&'static str, Start); 3] {
    [
        ("off", || Setup::new("off")),
        ("auto", || Setup::new("auto")),
        ("auto, probe ignored", Setup::auto_engaged),
    ]
}

fn each_mode(mut check: impl FnMut(&str, &mut Setup) -> Result<String>) -> Result<()> {
    let mut failed = Vec::new();
    for (name, start) in setups() {
        let mut setup = start()?;
        match check(name, &mut setup) {
            Ok(note) => eprintln!("fast path {note}"),
            Err(e) => {
                eprintln!("fast path {name}: FAILED: {e:#}");
                failed.push(format!("{name}: {e:#}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} mode(s) failed:\n{}", failed.len(), failed.join("\n"));
    }
    Ok(())
}

#[test]
fn slow_far_reader_pushes_back_on_the_application() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(|name, s| {
        let (c, srv) = s.run(
            &[
                "--nonblocking",
                "--op",
                "sink",
                "--len",
                LEN,
                "--delay-ms",
                PAUSE_MS,
                "--sample-ms",
                SAMPLE_MS,
            ],
            T,
        )?;
        // Byte-exact: also across `auto`'s switches between sk_msg and TCP.
        assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
        let accepted =
            accepted_while_paused(&c["sample"], u(&srv["received"]["read_start_mono_ns"]))?;
        let note = check_bounded(name, "far reader paused", accepted)?;
        if name == "auto, probe ignored" {
            let k = s.agent_a.status_json()?["kernel"].clone();
            // The bound is what held the application back, after sk_msg carried the start.
            if u(&k["fast_path_msgs"]) == 0
                || u(&k["fast_path_limited"]) == 0
                || u(&k["fast_path_passed"]) == 0
            {
                bail!("auto's bound did not engage: {}", counters(&s.agent_a));
            }
        }
        Ok(format!("{note}; {}", counters(&s.agent_a)))
    })
}

#[test]
fn slow_application_reader_pushes_back_on_the_server() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    each_mode(|name, s| {
        let (c, srv) = s.run(
            &[
                "--nonblocking",
                "--op",
                "source",
                "--len",
                LEN,
                "--pause-ms",
                PAUSE_MS,
                "--sample-ms",
                SAMPLE_MS,
            ],
            T,
        )?;
        assert_eq!(c["received"]["sha256"], srv["sent_sha256"], "{c}\n{srv}");
        let accepted =
            accepted_while_paused(&srv["sample"], u(&c["received"]["read_start_mono_ns"]))?;
        let note = check_bounded(name, "application paused", accepted)?;
        Ok(format!("{note}; {}", counters(&s.agent_a)))
    })
}
