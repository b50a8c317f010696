//! The control socket: `<run-dir>/control.sock`, owner-only, one request per connection: a
//! JSON [`Request`] on one line (or the bare line `status`, which older clients send), answered
//! by one JSON line. `rocks-agent status` and `rocks-agent policy` are its clients.
use std::{
    io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::{
    fastpath::{FastPathMode, FastPathStatus},
    policy::{PolicyChange, PolicyReport},
    redirect::{KernelStats, NegativeEntry},
    registry::{ConnectionStatus, CountersSnapshot},
};

pub const SOCKET_NAME: &str = "control.sock";

/// Everything `status` shows. Field names are the stable `--json` schema (documented in the
/// README); new fields may be added, existing ones keep their meaning.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub mode: String,
    pub listen: String,
    pub redirect_port: Option<u16>,
    pub cgroups: Vec<String>,
    pub fast_path: Option<bool>,
    pub connections: Vec<ConnectionStatus>,
    pub negative_cache: Vec<NegativeEntry>,
    pub kernel: Option<KernelStats>,
    pub counters: CountersSnapshot,
    /// The policy in force; null for `serve`.
    pub policy: Option<PolicyReport>,
    /// The fast path's mode and counters; null for `serve`.
    #[serde(default)]
    pub fast_path_mode: Option<FastPathStatus>,
}

/// A request on the control socket, one JSON object per line: `{"request":"status"}`,
/// `{"request":"set_policy","change":{...}}`. New requests are new variants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Replace the parts of the policy `change` names; answered by `{"policy": {...}}` (the
    /// policy now in force) or `{"error": "..."}` (nothing changed).
    SetPolicy { change: PolicyChange },
    /// Set the fast-path mode for new connections; answered by `{"fast_path": {...}}` (the
    /// mode now in force and its counters) or `{"error": "..."}`.
    SetFastPath { mode: FastPathMode },
}

impl Request {
    /// Parses one request line; the bare word `status` is the original protocol.
    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim();
        if line == "status" {
            return Ok(Request::Status);
        }
        if !line.starts_with('{') {
            return Err(format!("unknown request {line:?}"));
        }
        serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create run directory {path}")]
    RunDir { path: PathBuf, #[source] source: io::Error },
    #[error("another rocks agent is already running with run directory {0} (give each agent its own --run-dir)")]
    AlreadyRunning(PathBuf),
    #[error("cannot listen on control socket {path}")]
    Listen { path: PathBuf, #[source] source: io::Error },
    #[error("no agent is running with run directory {path}")]
    NotRunning { path: PathBuf, #[source] source: io::Error },
    #[error("the agent's control socket {path} answered badly: {why}")]
    BadAnswer { path: PathBuf, why: String },
    #[error("the agent refused the request (nothing changed): {0}")]
    Refused(String),
}

/// Something that can produce a status report on request.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> StatusReport;

    /// Applies a live policy change and returns the policy now in force, or says why not (and
    /// changes nothing). May block (it waits for the kernel): called off the runtime.
    fn set_policy(&self, _change: PolicyChange) -> Result<PolicyReport, String> {
        Err("this agent runs `serve`: it redirects nothing and has no policy to change".to_owned())
    }

    /// Sets the fast-path mode for new connections; returns the mode now in force.
    fn set_fast_path(&self, _mode: FastPathMode) -> Result<FastPathStatus, String> {
        Err("this agent runs `serve`: it has no fast path".to_owned())
    }
}

/// Creates the run directory (0700) and binds the control socket (0600). Refuses when another
/// live agent already uses this run directory; removes a stale socket otherwise.
pub async fn bind(run_dir: &Path) -> Result<UnixListener, ControlError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(|source| ControlError::RunDir { path: run_dir.to_owned(), source })?;
    let path = run_dir.join(SOCKET_NAME);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(ControlError::AlreadyRunning(run_dir.to_owned()));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| ControlError::Listen { path: path.clone(), source })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ControlError::Listen { path: path.clone(), source })?;
    Ok(listener)
}

/// Serves status requests until the task is dropped.
pub async fn serve(listener: UnixListener, source: Arc<dyn StatusSource>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, source).await {
                debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, source: Arc<dyn StatusSource>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))??;
    let reply = match Request::parse(&line) {
        Ok(Request::Status) => serde_json::to_string(&source.status()).map_err(io::Error::other)?,
        Ok(Request::SetPolicy { change }) => {
            // Only the agent's own user (root) may change what is kept. The socket is 0600
            // already; this holds even if its mode is loosened by hand.
            let uid = write.as_ref().peer_cred().map(|c| c.uid()).ok();
            if uid != Some(nix::unistd::geteuid().as_raw()) {
                serde_json::json!({ "error": "only the agent's own user may change the policy" }).to_string()
            } else {
                match tokio::task::spawn_blocking(move || source.set_policy(change)).await.map_err(io::Error::other)? {
                    Ok(policy) => serde_json::json!({ "policy": policy }).to_string(),
                    Err(why) => serde_json::json!({ "error": why }).to_string(),
                }
            }
        }
        Ok(Request::SetFastPath { mode }) => {
            // Like a policy change: only the agent's own user.
            let uid = write.as_ref().peer_cred().map(|c| c.uid()).ok();
            if uid != Some(nix::unistd::geteuid().as_raw()) {
                serde_json::json!({ "error": "only the agent's own user may change the fast path" }).to_string()
            } else {
                // May probe the kernel first (half a second): off the runtime.
                match tokio::task::spawn_blocking(move || source.set_fast_path(mode)).await.map_err(io::Error::other)? {
                    Ok(status) => serde_json::json!({ "fast_path": status }).to_string(),
                    Err(why) => serde_json::json!({ "error": why }).to_string(),
                }
            }
        }
        Err(why) => serde_json::json!({ "error": why }).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Sends one request line to the agent behind `run_dir` and returns its one-line reply.
async fn round_trip(run_dir: &Path, request: &str) -> Result<String, ControlError> {
    let path = run_dir.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path).await.map_err(|source| ControlError::NotRunning { path: path.clone(), source })?;
    let bad = |e: io::Error| ControlError::BadAnswer { path: path.clone(), why: e.to_string() };
    stream.write_all(request.as_bytes()).await.map_err(bad)?;
    stream.write_all(b"\n").await.map_err(bad)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).await.map_err(bad)?;
    Ok(reply)
}

fn bad_answer(run_dir: &Path, why: String) -> ControlError {
    ControlError::BadAnswer { path: run_dir.join(SOCKET_NAME), why }
}

/// Sends a change request; the agent answers `{"<field>": ...}` with what is now in force, or
/// `{"error": ...}` when it refused the change. `what` names the field's content in errors.
async fn change<T: serde::de::DeserializeOwned>(
    run_dir: &Path,
    request: &Request,
    field: &str,
    what: &str,
) -> Result<T, ControlError> {
    let request = serde_json::to_string(request).map_err(|e| bad_answer(run_dir, e.to_string()))?;
    let reply = round_trip(run_dir, &request).await?;
    let mut answer: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&reply).map_err(|e| bad_answer(run_dir, format!("{e}: {reply:?}")))?;
    if let Some(why) = answer.get("error").and_then(|e| e.as_str()) {
        return Err(ControlError::Refused(why.to_owned()));
    }
    match answer.remove(field).filter(|v| !v.is_null()) {
        Some(value) => serde_json::from_value(value).map_err(|e| bad_answer(run_dir, format!("{e}: {reply:?}"))),
        None => Err(bad_answer(run_dir, format!("neither {what} nor an error: {reply:?}"))),
    }
}

/// Asks the agent behind `run_dir` for its status.
pub async fn query_status(run_dir: &Path) -> Result<StatusReport, ControlError> {
    let reply = round_trip(run_dir, "status").await?;
    serde_json::from_str(&reply).map_err(|e| bad_answer(run_dir, e.to_string()))
}

/// Asks the agent behind `run_dir` to change its policy; returns the policy now in force.
pub async fn set_policy(run_dir: &Path, change: PolicyChange) -> Result<PolicyReport, ControlError> {
    self::change(run_dir, &Request::SetPolicy { change }, "policy", "a policy").await
}

/// Asks the agent behind `run_dir` to set its fast-path mode; returns the mode now in force.
pub async fn set_fast_path(run_dir: &Path, mode: FastPathMode) -> Result<FastPathStatus, ControlError> {
    change(run_dir, &Request::SetFastPath { mode }, "fast_path", "a fast path status").await
}

/// The `ss`-like table `status` prints without `--json`: a header line, the counters, one row
/// per connection (columns as wide as their widest value, so long IPv6 addresses stay
/// aligned), then the hosts known to have no agent.
pub fn render_table(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rocks-agent {} pid {} ({}), listening on {}{}",
        report.version,
        report.pid,
        report.mode,
        report.listen,
        if report.cgroups.is_empty() { String::new() } else { format!(", attached to {}", report.cgroups.join(", ")) }
    );
    let c = &report.counters;
    let _ = writeln!(
        out,
        "accepted {}  kept {}  plain {}  handshake failures {}  peer sessions {}  refused targets {}  transparent failures {}",
        c.accepted,
        c.kept,
        c.plain_fallbacks,
        c.handshake_failures,
        c.peer_sessions,
        c.refused_targets,
        c.transparent_failures
    );
    if let Some(k) = &report.kernel {
        let _ = writeln!(
            out,
            "kernel: redirected {}  skipped (no agent {}, ports {}, excluded cidr {}, excluded cgroup {}, agent's own {}, connection limit {})  fast path {} msgs, {} misses{}",
            k.redirected,
            k.skipped_negative,
            k.skipped_policy,
            k.skipped_cidr,
            k.skipped_cgroup,
            k.skipped_agent,
            k.skipped_limit,
            k.fast_path_msgs,
            k.fast_path_misses,
            if report.fast_path == Some(false) { " (off)" } else { "" }
        );
    }
    if let Some(f) = &report.fast_path_mode {
        let _ = writeln!(
            out,
            "fast path: mode {}, new connections {}{}; joined: on {}, auto {}; in-flight limit reached {}",
            f.mode,
            f.effective,
            f.off_because.as_ref().map(|why| format!(" (auto turned it off: {why})")).unwrap_or_default(),
            f.connections_on,
            f.connections_auto,
            f.limited
        );
    }
    const HEADER: [&str; 12] =
        ["ID", "ROLE", "MODE", "STATE", "PEER", "DESTINATION", "SENT", "RECEIVED", "BUFFERED", "RESUMES", "LAST-RESUME", "AGE"];
    // Left-aligned text columns, right-aligned numbers.
    const RIGHT: [bool; 12] = [false, false, false, false, false, false, true, true, true, true, true, true];
    let rows: Vec<[String; 12]> = report
        .connections
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.role.clone(),
                r.mode.clone(),
                r.state.clone(),
                r.peer.clone(),
                r.destination.clone(),
                r.bytes_sent.to_string(),
                r.bytes_received.to_string(),
                r.buffered.to_string(),
                r.resumes.to_string(),
                r.last_resume_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms}ms")),
                format!("{}s", r.age_secs),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 12]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let w = widths[i];
            let _ = if RIGHT[i] { write!(l, "{cell:>w$}") } else { write!(l, "{cell:<w$}") };
        }
        l.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(HEADER));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no connections)");
    }
    if !report.negative_cache.is_empty() {
        let _ = writeln!(out, "hosts without an agent (not redirected):");
        for n in &report.negative_cache {
            let _ = writeln!(out, "  {:<40} expires in {}s", n.host.to_string(), n.expires_in_secs);
        }
    }
    if let Some(policy) = &report.policy {
        let _ = writeln!(out, "policy: {}", crate::policy::one_line(policy));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ConnectionStatus;

    fn row(id: u64, peer: &str, destination: &str) -> ConnectionStatus {
        ConnectionStatus {
            id,
            role: "client".into(),
            mode: "kept".into(),
            state: "active".into(),
            peer: peer.into(),
            destination: destination.into(),
            session_id: Some("be9f6c3309fbed1a233789b03e2e6476".into()),
            bytes_sent: 123_456,
            bytes_received: 7,
            buffered: 0,
            resumes: 1,
            last_resume_ms: Some(42),
            age_secs: 3,
            started_unix: 1_700_000_000,
        }
    }

    #[test]
    fn requests_parse_in_the_old_and_the_new_form() {
        assert_eq!(Request::parse("status\n"), Ok(Request::Status));
        assert_eq!(Request::parse("{\"request\":\"status\"}\n"), Ok(Request::Status));
        let change = PolicyChange { exclude_ports: Some(vec![25]), ..PolicyChange::default() };
        let line = serde_json::to_string(&Request::SetPolicy { change: change.clone() }).unwrap();
        assert_eq!(line, r#"{"request":"set_policy","change":{"exclude_ports":[25]}}"#);
        assert_eq!(Request::parse(&line), Ok(Request::SetPolicy { change }));
        assert_eq!(Request::parse("reboot"), Err("unknown request \"reboot\"".to_owned()));
        let e = Request::parse(r#"{"request":"set_policy","change":{"exclude_cidrs":[]}}"#).unwrap_err();
        assert!(e.starts_with("bad request: unknown field `exclude_cidrs`"), "{e}");
        assert!(Request::parse(r#"{"request":"format_disk"}"#).unwrap_err().starts_with("bad request"));
    }

    #[test]
    fn table_columns_line_up_whatever_the_addresses() {
        let report = StatusReport {
            version: "0.1.0".into(),
            pid: 7,
            mode: "attach".into(),
            listen: "[::]:4470".into(),
            redirect_port: Some(4471),
            cgroups: vec!["/sys/fs/cgroup/app".into()],
            fast_path: Some(true),
            connections: vec![
                row(1, "127.0.0.1:40000", "192.0.2.2:22"),
                row(22, "[::1]:40001", "[2001:db8:85a3:1111:2222:8a2e:370:7334]:65535"),
            ],
            negative_cache: vec![NegativeEntry { host: "192.0.2.9".parse().unwrap(), expires_in_secs: 60 }],
            kernel: Some(KernelStats { redirected: 2, ..KernelStats::default() }),
            counters: CountersSnapshot { accepted: 2, kept: 2, ..CountersSnapshot::default() },
            policy: Some(crate::policy::PolicyReport::default()),
            fast_path_mode: None,
        };
        let text = render_table(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("rocks-agent 0.1.0 pid 7 (attach), listening on [::]:4470, attached to /sys/fs/cgroup/app"));
        assert!(lines[2].starts_with("kernel: redirected 2"), "{text}");
        let header = lines[3];
        assert!(header.starts_with("ID  ROLE"), "{text}");
        // Every column starts where its header starts (left-aligned) or ends where it ends.
        let dst_col = header.find("DESTINATION").unwrap();
        let age_end = header.len();
        for l in &lines[4..6] {
            assert_eq!(l.len(), age_end, "{text}");
            assert!(l[dst_col..].starts_with("192.0.2.2:22") || l[dst_col..].starts_with("[2001:db8"), "{text}");
            assert!(l.ends_with("3s") && l.contains("42ms"), "{text}");
        }
        assert!(text.contains("hosts without an agent (not redirected):\n  192.0.2.9"), "{text}");
        assert!(
            text.ends_with("policy: ports all, exclude-ports none, exclude-cidr none, exclude-cgroup none, 0 live changes\n"),
            "{text}"
        );

        let empty = StatusReport { connections: vec![], negative_cache: vec![], kernel: None, ..report };
        assert!(render_table(&empty).contains("(no connections)"));
    }
}
