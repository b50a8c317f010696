//! The control socket: `<run-dir>/control.sock`, owner-only, one JSON request per connection.
//! `rocks-agent status` is its client.
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
}

/// Something that can produce a status report on request.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> StatusReport;
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
    let reply = match line.trim() {
        "status" => serde_json::to_string(&source.status()).map_err(io::Error::other)?,
        other => serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Asks the agent behind `run_dir` for its status.
pub async fn query_status(run_dir: &Path) -> Result<StatusReport, ControlError> {
    let path = run_dir.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path).await.map_err(|source| ControlError::NotRunning { path: path.clone(), source })?;
    let bad = |why: String| ControlError::BadAnswer { path: path.clone(), why };
    stream.write_all(b"status\n").await.map_err(|e| bad(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).await.map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&reply).map_err(|e| bad(e.to_string()))
}

/// The `ss`-like table `status` prints without `--json`.
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
        "accepted {}  kept {}  plain {}  handshake failures {}  peer sessions {}",
        c.accepted, c.kept, c.plain_fallbacks, c.handshake_failures, c.peer_sessions
    );
    let _ = writeln!(
        out,
        "{:<5} {:<7} {:<7} {:<11} {:<28} {:<28} {:>12} {:>12} {:>10} {:>7} {:>6}",
        "ID", "ROLE", "MODE", "STATE", "PEER", "DESTINATION", "SENT", "RECEIVED", "BUFFERED", "RESUMES", "AGE"
    );
    for r in &report.connections {
        let _ = writeln!(
            out,
            "{:<5} {:<7} {:<7} {:<11} {:<28} {:<28} {:>12} {:>12} {:>10} {:>7} {:>5}s",
            r.id, r.role, r.mode, r.state, r.peer, r.destination, r.bytes_sent, r.bytes_received, r.buffered, r.resumes, r.age_secs
        );
    }
    if !report.negative_cache.is_empty() {
        let _ = writeln!(out, "hosts without an agent (not redirected):");
        for n in &report.negative_cache {
            let _ = writeln!(out, "  {:<40} expires in {}s", n.host.to_string(), n.expires_in_secs);
        }
    }
    out
}
