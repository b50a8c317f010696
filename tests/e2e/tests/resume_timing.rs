//! How long a kept connection stalls when the client host's address changes: a measurement,
//! not a limit. One session, 20 address changes in a row; for each the test records
//!
//! * `agent`: the client agent's own figure, `last_resume_ms` in `status --json` (from the
//!   moment the session was suspended to the resumed transport carrying it);
//! * `recovery`: from the moment the new address is in place (the `ip` batch that removes the
//!   old address, adds the new one and restores the default route has returned) until the first
//!   message the application sent after that moment came back from the server;
//! * `stall`: the longest silence the application saw, the biggest gap between two consecutive
//!   echoes from the last one before the change until 300 ms after data flowed again.
//!
//! The application is `socat` in the attached cgroup on host a, talking to a `socat` echo server
//! on host b; the test feeds it a 16-byte message (sequence number, send time) every 2 ms and
//! reads the echoes. It asserts only correctness: every message came back exactly once, in
//! order, byte for byte (sha256 of both streams), the agent counted one resume per change, and
//! after the 20 changes the client agent holds one connection to b's peer port (the transport),
//! not one per abandoned reconnect attempt. The same is measured over IPv6.

mod common;
mod resume_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use resume_support::*;
use rocks_e2e::spawn::command_in;
use rocks_e2e::util::wait_until;
use rocks_e2e::{
    Agent, AgentSpec, Child, ClusterSecret, TestCgroup, Topology, require_root, require_tools,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

const PORT: u16 = 5003;
const TRIALS: usize = 20;
const PERIOD: Duration = Duration::from_millis(2);
const MSG: usize = 16;

/// One echoed message: when it was sent and when its echo arrived (since the base instant).
#[derive(Clone, Copy)]
struct Echo {
    sent: Duration,
    arrived: Duration,
}

/// The application: socat in the cgroup with its stdin and stdout in our hands.
struct PingPong {
    child: std::process::Child,
    base: Instant,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoes: Arc<Mutex<Vec<Echo>>>,
    writer: Option<thread::JoinHandle<Result<[u8; 32]>>>,
    reader: Option<thread::JoinHandle<Result<[u8; 32]>>>,
}

impl PingPong {
    fn start(mut cmd: Command) -> Result<PingPong> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("start socat")?;
        let (mut stdin, mut stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        let base = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (stop, sent) = (stop.clone(), sent.clone());
            thread::spawn(move || -> Result<[u8; 32]> {
                let mut sha = Sha256::new();
                let mut next = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let mut msg = [0u8; MSG];
                    msg[..8].copy_from_slice(&seq.to_be_bytes());
                    msg[8..].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
                    stdin.write_all(&msg).context("writing to socat")?;
                    sha.update(msg);
                    seq += 1;
                    sent.store(seq, Ordering::SeqCst);
                    // A fixed schedule, without bursts to catch up after a slow write.
                    next = (next + PERIOD).max(Instant::now());
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                // Dropping stdin: socat half-closes toward the server once it is all sent.
                Ok(sha.finalize().into())
            })
        };
        let reader = {
            let echoes = echoes.clone();
            thread::spawn(move || -> Result<[u8; 32]> {
                let mut sha = Sha256::new();
                let mut msg = [0u8; MSG];
                let mut expect = 0u64;
                loop {
                    match read_full(&mut stdout, &mut msg)? {
                        0 => break,
                        MSG => {}
                        n => bail!(
                            "echo stream ends in a partial message ({n} bytes) after {expect} messages"
                        ),
                    }
                    let arrived = base.elapsed();
                    sha.update(msg);
                    let seq = u64::from_be_bytes(msg[..8].try_into().unwrap());
                    ensure!(
                        seq == expect,
                        "echo {seq} arrived where {expect} was due (lost, duplicated or reordered)"
                    );
                    expect += 1;
                    let sent =
                        Duration::from_nanos(u64::from_be_bytes(msg[8..].try_into().unwrap()));
                    echoes.lock().unwrap().push(Echo { sent, arrived });
                }
                Ok(sha.finalize().into())
            })
        };
        Ok(PingPong {
            child,
            base,
            stop,
            sent,
            echoes,
            writer: Some(writer),
            reader: Some(reader),
        })
    }

    fn since_base(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    fn echoed(&self) -> usize {
        self.echoes.lock().unwrap().len()
    }

    /// Stops sending, waits for every echo and for socat to exit; checks both streams are equal.
    fn finish(mut self) -> Result<(u64, usize)> {
        self.stop.store(true, Ordering::SeqCst);
        let up = self
            .writer
            .take()
            .unwrap()
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        let sent = self.sent.load(Ordering::SeqCst);
        let all = wait_until(secs(10), || self.echoed() as u64 >= sent);
        let down = self
            .reader
            .take()
            .unwrap()
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        let status = self.child.wait()?;
        ensure!(all, "{} of {sent} messages came back", self.echoed());
        ensure!(status.success(), "socat exited with {status}");
        ensure!(
            up == down,
            "the echoed stream differs from the sent one (sha256)"
        );
        Ok((sent, self.echoed()))
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading from socat"),
        }
    }
    Ok(n)
}

/// What one address change cost.
struct Trial {
    resumes: u64,
    agent_ms: f64,
    recovery_ms: f64,
    stall_ms: f64,
}

fn row(agent: &Agent, dst: &str) -> Result<Value> {
    let s = agent.status_json()?;
    client_row(&s, dst).with_context(|| format!("no connection to {dst} in {s}"))
}

fn measure(v6: bool) -> Result<()> {
    if !require_root() || !require_tools(&["socat"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let mut echo_cmd = b.exec("socat");
    echo_cmd.args([
        &format!("TCP6-LISTEN:{PORT},reuseaddr,fork,nodelay"),
        "PIPE",
    ]);
    let _echo = Child::spawn(echo_cmd)?;
    rocks_e2e::wait_for_tcp_listen(b, PORT, secs(5))?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    let target: SocketAddr = if v6 { b.sock6(PORT) } else { b.sock4(PORT) };
    let dst = target.to_string();
    let socat_target = if v6 {
        format!("TCP:[{}]:{PORT},nodelay", b.ip6())
    } else {
        format!("TCP:{}:{PORT},nodelay", b.ip4())
    };
    let mut cmd = command_in(a, cg.path(), "socat")?;
    cmd.args(["-b", "65536", "STDIO", &socat_target]);
    let app = PingPong::start(cmd)?;
    ensure!(
        wait_until(secs(10), || app.echoed() >= 200),
        "no echoes: {}",
        agent_a.log()
    );
    let first = row(&agent_a, &dst)?;
    ensure!(
        first["mode"] == "kept" && num(&first, "resumes") == 0,
        "{first}"
    );

    let mut trials = Vec::new();
    for i in 0..TRIALS {
        let before = num(&row(&agent_a, &dst)?, "resumes");
        let n = 101 + i as u16;
        let changing = Instant::now();
        if v6 {
            topo.change_ip6("a", n)?;
        } else {
            topo.change_ip4("a", n as u8)?;
        }
        let added = Instant::now();
        let mut last = Value::Null;
        let resumed = wait_until(secs(15), || {
            last = row(&agent_a, &dst).unwrap_or(Value::Null);
            num(&last, "resumes") > before
        });
        ensure!(
            resumed,
            "trial {i}: no resume after the change: {last}\n{}",
            agent_a.log()
        );
        let (t_change, t_added) = (app.since_base(changing), app.since_base(added));
        let flowing = |echoes: &[Echo]| {
            echoes
                .iter()
                .find(|e| e.sent >= t_added)
                .map(|e| e.arrived - t_added)
        };
        ensure!(
            wait_until(secs(10), || flowing(&app.echoes.lock().unwrap()).is_some()),
            "trial {i}: nothing sent after the change came back within 10 s\n{}",
            agent_a.log()
        );
        // Let a few more messages through, and any second (spurious) resume show up.
        thread::sleep(Duration::from_millis(300));
        let after = row(&agent_a, &dst)?;
        let settled = app.since_base(Instant::now());
        let echoes = app.echoes.lock().unwrap().clone();
        let recovery = flowing(&echoes).expect("seen above");
        // The biggest gap between consecutive echoes from the last one before the change until
        // the trial settled (a second resume would show here too).
        let from = echoes
            .iter()
            .rposition(|e| e.arrived <= t_change)
            .unwrap_or(0);
        let stall = echoes[from..]
            .windows(2)
            .take_while(|w| w[1].arrived <= settled)
            .map(|w| w[1].arrived - w[0].arrived)
            .max()
            .unwrap_or_default();
        trials.push(Trial {
            resumes: num(&after, "resumes") - before,
            agent_ms: after["last_resume_ms"].as_f64().unwrap_or(f64::NAN),
            recovery_ms: recovery.as_secs_f64() * 1e3,
            stall_ms: stall.as_secs_f64() * 1e3,
        });
    }
    let resumes_total = num(&row(&agent_a, &dst)?, "resumes");
    // While the session is still open: the connections a's agent holds to b's peer port.
    let per_trial: Vec<u64> = trials.iter().map(|t| t.resumes).collect();
    let mut held = Vec::new();
    wait_until(secs(10), || {
        held = connections_held_by(a, agent_a.pid(), PEER_PORT).unwrap_or_default();
        held.len() <= 1
    });
    let (sent, echoed) = app.finish()?;

    let family = if v6 { "IPv6" } else { "IPv4" };
    eprintln!(
        "resume after an {family} address change, {TRIALS} trials in one session (messages every {PERIOD:?}):"
    );
    eprintln!("  trial  resumes  agent last_resume_ms  recovery after add (ms)  app stall (ms)");
    for (i, t) in trials.iter().enumerate() {
        eprintln!(
            "  {i:>5}  {:>7}  {:>20.0}  {:>23.1}  {:>14.1}",
            t.resumes, t.agent_ms, t.recovery_ms, t.stall_ms
        );
    }
    let col = |f: fn(&Trial) -> f64| trials.iter().map(f).collect::<Vec<_>>();
    eprintln!(
        "  {family} agent last_resume_ms:      {}",
        distribution(&col(|t| t.agent_ms))
    );
    eprintln!(
        "  {family} recovery after the add:    {}",
        distribution(&col(|t| t.recovery_ms))
    );
    eprintln!(
        "  {family} app stall (longest gap):   {}",
        distribution(&col(|t| t.stall_ms))
    );
    eprintln!("  {sent} messages sent, {echoed} echoed, in order, sha256 equal");

    // Correctness only: every byte came back once (checked by `finish`), one resume per change,
    // and the agent is left holding one transport (abandoned attempts and superseded transports
    // are closed; those still flushing get CLOSE_LINGER, 5 s).
    eprintln!(
        "  resumes per change {per_trial:?}; a's agent holds {} connection(s) to b's peer port",
        held.len()
    );
    let mut problems = Vec::new();
    if resumes_total != TRIALS as u64 {
        problems.push(format!(
            "{resumes_total} resumes for {TRIALS} address changes: {per_trial:?}"
        ));
    }
    if held.len() != 1 {
        problems.push(format!(
            "a's agent still holds {} connections to b:{PEER_PORT} after the session settled (one is the transport):\n  {}",
            held.len(),
            held.join("\n  ")
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\na's log:\n{}",
        problems.join("\n"),
        agent_a.log()
    );
    Ok(())
}

#[test]
fn resume_time_after_ipv4_address_change() -> Result<()> {
    measure(false)
}

#[test]
fn resume_time_after_ipv6_address_change() -> Result<()> {
    measure(true)
}
