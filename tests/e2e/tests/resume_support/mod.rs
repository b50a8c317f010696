//! Helpers shared by the resume and security tests (`resume_faults`, `resume_programs`,
//! `resume_timing`, `security`): watching one kept connection in an agent's `status --json`
//! while a fault is injected, looking at an agent's transports with `ss`, and running code
//! inside a host's network namespace on a thread of the test process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rocks_e2e::util::run_checked;
use rocks_e2e::{Agent, Host};
use serde_json::Value;

/// The port agents listen on for peers (the default).
pub const PEER_PORT: u16 = 4470;

/// How often [`watching`] asks the agent for its status.
const POLL: Duration = Duration::from_millis(100);

/// The client row of `connections[]` whose destination is `dst` ("192.0.2.2:5001").
pub fn client_row(status: &Value, dst: &str) -> Option<Value> {
    status["connections"]
        .as_array()?
        .iter()
        .find(|c| c["role"] == "client" && c["destination"] == dst)
        .cloned()
}

/// A numeric field of a connection row (0 when absent or null).
pub fn num(row: &Value, field: &str) -> u64 {
    row[field].as_u64().unwrap_or(0)
}

/// The lines of an agent log containing `needle`.
pub fn log_lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// How many times the driver of connection `id` logged a completed resume.
pub fn resumes_logged(log: &str, id: u64) -> usize {
    let needle = format!("session resumed id={id} ");
    log.lines().filter(|l| l.contains(&needle)).count()
}

/// One look at the watched connection.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    /// The connection's row, or None when the agent no longer (or not yet) lists it.
    pub row: Option<Value>,
}

/// The samples collected by [`watching`] so far, and waits on them.
pub struct Watch {
    dst: String,
    samples: Mutex<Vec<Sample>>,
    stop: AtomicBool,
}

impl Watch {
    /// Every sample so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// The newest row seen (the last sample that had one).
    pub fn last_row(&self) -> Option<Value> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|s| s.row.clone())
    }

    /// The highest `resumes` any sample showed.
    pub fn max_resumes(&self) -> u64 {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| s.row.as_ref())
            .map(|r| num(r, "resumes"))
            .max()
            .unwrap_or(0)
    }

    /// The distinct states the connection went through, in order ("active", "resuming", ...).
    pub fn states(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.samples.lock().unwrap().iter() {
            if let Some(state) = s.row.as_ref().and_then(|r| r["state"].as_str())
                && out.last().map(String::as_str) != Some(state)
            {
                out.push(state.to_owned());
            }
        }
        out
    }

    /// When a sample after `since` first satisfied `cond`.
    pub fn first_since(&self, since: Instant, cond: impl Fn(&Value) -> bool) -> Option<Instant> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= since)
            .find(|s| s.row.as_ref().is_some_and(&cond))
            .map(|s| s.at)
    }

    /// Whether every sample taken after `since` still listed the connection.
    pub fn listed_throughout(&self, since: Instant) -> bool {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= since)
            .all(|s| s.row.is_some())
    }

    /// Waits for a sample taken from now on whose row satisfies `cond`; returns that row.
    pub fn wait_row(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let since = Instant::now();
        let deadline = since + timeout;
        loop {
            let found = self
                .samples
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.at >= since)
                .find_map(|s| s.row.as_ref().filter(|r| cond(r)).cloned());
            if let Some(row) = found {
                return Ok(row);
            }
            if Instant::now() >= deadline {
                bail!(
                    "connection to {} never {what} within {timeout:?}; last row {}; states {:?}",
                    self.dst,
                    self.last_row()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "none".into()),
                    self.states()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the connection shows at least `n` resumes.
    pub fn wait_resumes(&self, n: u64, timeout: Duration) -> Result<Value> {
        self.wait_row(timeout, &format!("reached {n} resumes"), |r| {
            num(r, "resumes") >= n
        })
    }
}

/// Sets the stop flag when dropped, also when the body panics (the poller must end for the
/// scope to return).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `body` while a thread polls `agent`'s status every 100 ms and records the client row
/// for destination `dst`.
pub fn watching<R>(agent: &Agent, dst: &str, body: impl FnOnce(&Watch) -> R) -> R {
    let watch = Watch {
        dst: dst.to_owned(),
        samples: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    };
    thread::scope(|s| {
        s.spawn(|| {
            while !watch.stop.load(Ordering::SeqCst) {
                let at = Instant::now();
                if let Ok(status) = agent.status_json() {
                    let row = client_row(&status, dst);
                    watch.samples.lock().unwrap().push(Sample { at, row });
                }
                thread::sleep(POLL);
            }
        });
        let _stop = StopOnDrop(&watch.stop);
        body(&watch)
    })
}

/// The peer addresses of the established TCP connections on local port `port` in `host`
/// (for an agent: its transports to or from other agents), by `ss`.
pub fn established_peers(host: &Host, local_port: u16) -> Result<Vec<SocketAddr>> {
    let mut cmd = host.exec("ss");
    cmd.args([
        "-H",
        "-t",
        "-n",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{local_port}"),
    ]);
    parse_ss_peers(&run_checked(&mut cmd)?)
}

/// The TCP connections (any state) in `host` to remote port `remote_port` that process `pid`
/// still holds open, as `ss -p` lines (sockets a process closed, orphans in FIN-WAIT, do not
/// count).
pub fn connections_held_by(host: &Host, pid: u32, remote_port: u16) -> Result<Vec<String>> {
    let mut cmd = host.exec("ss");
    cmd.args([
        "-H",
        "-t",
        "-n",
        "-p",
        "state",
        "all",
        "dport",
        "=",
        &format!(":{remote_port}"),
    ]);
    let out = run_checked(&mut cmd)?;
    let owner = format!("pid={pid},");
    Ok(out
        .lines()
        .filter(|l| l.contains(&owner))
        .map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" "))
        .collect())
}

/// Waits until the established connections on local port `port` in `host` come from exactly
/// one peer with address `ip` (a superseded transport may take a moment to close); returns it.
pub fn wait_single_peer(
    host: &Host,
    local_port: u16,
    ip: std::net::IpAddr,
    timeout: Duration,
) -> Result<SocketAddr> {
    let mut last = Ok(Vec::new());
    let ok = rocks_e2e::util::wait_until(timeout, || {
        last = established_peers(host, local_port);
        matches!(&last, Ok(p) if p.len() == 1 && p[0].ip() == ip)
    });
    match last {
        Ok(p) if ok => Ok(p[0]),
        other => bail!(
            "{}: want one connection on port {local_port} from {ip}, have {other:?}",
            host.name()
        ),
    }
}

/// The peer addresses of the established TCP connections in `host` to remote port `port`.
pub fn established_to(host: &Host, remote_port: u16) -> Result<Vec<SocketAddr>> {
    let mut cmd = host.exec("ss");
    cmd.args([
        "-H",
        "-t",
        "-n",
        "state",
        "established",
        "dport",
        "=",
        &format!(":{remote_port}"),
    ]);
    let out = run_checked(&mut cmd)?;
    // Local address is the third column.
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|a| parse_ss_addr(a).with_context(|| format!("ss printed {out:?}")))
        .collect()
}

fn parse_ss_peers(out: &str) -> Result<Vec<SocketAddr>> {
    // With a state filter ss prints: Recv-Q Send-Q Local:Port Peer:Port [Process].
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|a| parse_ss_addr(a).with_context(|| format!("ss printed {out:?}")))
        .collect()
}

/// `192.0.2.1:4470`, `[2001:db8::1]:4470`, `[::ffff:192.0.2.1]:4470` (IPv4-mapped shown as
/// IPv4 in the result), also `[fe80::1%eth0]:1`.
fn parse_ss_addr(text: &str) -> Result<SocketAddr> {
    let cleaned = match (text.find('%'), text.rfind(']')) {
        (Some(p), Some(b)) if p < b => format!("{}{}", &text[..p], &text[b..]),
        _ => text.to_owned(),
    };
    let a: SocketAddr = cleaned
        .parse()
        .with_context(|| format!("bad address {text:?}"))?;
    Ok(SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// Runs `f` on a thread of this process that has entered `host`'s network namespace: sockets
/// it creates live in that host (no cgroup: the agent there does not redirect them).
pub fn in_netns<T: Send>(host: &Host, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(host.netns_file(), nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {}: {e}", host.name()));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Deletes every IPv4 conntrack entry in `host` (what `conntrack -F` does, over
/// NETLINK_NETFILTER), so the next packet of each flow is tracked (and NATed) afresh.
pub fn flush_conntrack4(host: &Host) -> Result<()> {
    in_netns(host, || -> Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        const NETLINK_NETFILTER: i32 = 12;
        const NFNL_SUBSYS_CTNETLINK: u16 = 1;
        const IPCTNL_MSG_CT_DELETE: u16 = 2;
        const NLMSG_ERROR: u16 = 2;
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink socket");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut msg = [0u8; 20];
        msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
        msg[4..6]
            .copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
        msg[16] = libc::AF_INET as u8; // nfgenmsg: family, version 0, res_id 0
        // SAFETY: valid buffer and length; the kernel is the default destination.
        let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n != msg.len() as isize {
            return Err(std::io::Error::last_os_error()).context("netlink send");
        }
        let mut buf = [0u8; 4096];
        // SAFETY: valid buffer and length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 20 {
            return Err(std::io::Error::last_os_error()).context("netlink ack");
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if kind != NLMSG_ERROR || err != 0 {
            bail!("conntrack flush answered type {kind} error {err}");
        }
        Ok(())
    })
}

/// Percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// "min/median/p90/max" of values in milliseconds.
pub fn distribution(values: &[f64]) -> String {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "n={} min {:.1} / median {:.1} / p90 {:.1} / max {:.1} ms",
        v.len(),
        v.first().copied().unwrap_or(f64::NAN),
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        v.last().copied().unwrap_or(f64::NAN)
    )
}
