//! A single stream past 2 GiB through the fast path, byte-exact: the boundary where a signed
//! 32-bit byte counter overflows (sockmap had such bugs). Run with the fast path on (an
//! event-loop receiver: see fast_path.rs) and with auto engaged (the sockmap probe ignored, as
//! auto otherwise stays off on this kernel), where the application's sends go through sk_msg;
//! with the fast path off the path is plain loopback TCP, which the other tests cover. Sized
//! just past the boundary (2 GiB + 32 MiB) because a debug-build agent moves it at a few
//! hundred MB/s.

mod fast_path_support;

use std::time::{Duration, Instant};

use anyhow::Result;
use fast_path_support::*;
use rocks_e2e::require_root;

const LEN: u64 = (2 << 30) + 32 * MIB;

#[test]
fn one_stream_past_2gib_through_the_fast_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    for mode in ["on", "auto, probe ignored"] {
        let mut s = if mode == "on" {
            Setup::new("on")?
        } else {
            Setup::auto_engaged()?
        };
        let before = s.fast_path_msgs()?;
        let started = Instant::now();
        let len = LEN.to_string();
        let (c, _) = s.run(
            &[
                "--nonblocking",
                "--op",
                "sink",
                "--len",
                &len,
                "--reply",
                "1MiB",
            ],
            Duration::from_secs(120),
        )?;
        let took = started.elapsed();
        assert_eq!(c["server_count"], LEN, "{c}");
        assert_eq!(c["server_sha256"], c["sent_sha256"], "{c}");
        let msgs = s.fast_path_msgs()? - before;
        assert!(
            msgs > 0,
            "the fast path never engaged: {}",
            counters(&s.agent_a)
        );
        eprintln!(
            "fast path {mode}: {} MiB in one stream, byte-exact, in {took:.1?}; {msgs} messages through sk_msg; {}",
            LEN / MIB,
            counters(&s.agent_a)
        );
    }
    Ok(())
}
