//! Helpers shared by the acceptance tests (each `tests/*.rs` file includes this module).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rocks_e2e::{Child, ClientReport, Host, spawn_in, testpeer_bin, wait_for_tcp_listen};

pub const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub const MIB: u64 = 1 << 20;

/// `rocks-testpeer serve` in `host` on `[::]:port` (dual-stack), until killed.
pub fn server(host: &Host, port: u16) -> Result<Child> {
    let mut cmd = host.exec(testpeer_bin!());
    cmd.args(["serve", "--listen", &format!("[::]:{port}")]);
    let child = Child::spawn(cmd)?;
    wait_for_tcp_listen(host, port, secs(5))?;
    Ok(child)
}

/// A testpeer client transfer of `size` bytes each way from `host`, inside `cgroup` when
/// given, else outside any test cgroup. Returns the report; fails unless the client succeeded
/// (every byte checked against the pattern, sha256 equal on both ends, both directions).
pub fn transfer(
    host: &Host,
    cgroup: Option<&Path>,
    to: SocketAddr,
    size: u64,
    timeout: Duration,
) -> Result<ClientReport> {
    let child = spawn_client(host, cgroup, to, size, &[])?;
    finish_client(child, size, timeout)
}

/// Starts a testpeer client transfer (see [`transfer`]) with extra client options.
pub fn spawn_client(
    host: &Host,
    cgroup: Option<&Path>,
    to: SocketAddr,
    size: u64,
    extra: &[&str],
) -> Result<Child> {
    let (size, to) = (size.to_string(), to.to_string());
    let mut args = vec![
        "client",
        "--connect",
        &to,
        "--up",
        &size,
        "--down",
        &size,
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    match cgroup {
        Some(cg) => spawn_in(host, cg, testpeer_bin!(), &args),
        None => {
            let mut cmd = host.exec(testpeer_bin!());
            cmd.args(&args);
            Child::spawn(cmd)
        }
    }
}

/// Waits for a client from [`spawn_client`] and checks its transfer was exact.
pub fn finish_client(mut child: Child, size: u64, timeout: Duration) -> Result<ClientReport> {
    let out = child.wait_success(timeout)?;
    let report: ClientReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("client printed: {}", String::from_utf8_lossy(&out.stdout)))?;
    check_exact(&report, size)?;
    Ok(report)
}

/// Byte-exact both ways, and as many bytes as asked for.
pub fn check_exact(r: &ClientReport, size: u64) -> Result<()> {
    if !(r.ok() && r.up == size && r.down == size) {
        bail!("transfer of {size} bytes each way not exact: {r:?}");
    }
    Ok(())
}

/// The address part of `ip:port` / `[ip]:port` text as the reports print it.
pub fn ip_of(text: &str) -> IpAddr {
    text.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("not a socket address: {text:?}: {e}"))
        .ip()
}

/// The kernel counters and agent counters of a status report as one line, for messages.
pub fn counters_line(status: &serde_json::Value) -> String {
    format!(
        "kernel {} counters {}",
        status["kernel"], status["counters"]
    )
}
