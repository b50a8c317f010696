//! The agent's composition root: validate everything up front, bind, load, attach, serve until
//! shutdown, detach. `attach` and `serve` take the shutdown future as a parameter so tests can
//! run a whole agent in-process.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
    task::JoinSet,
};
use tracing::{info, warn};

use crate::{
    cgroup, cli,
    control::{self, StatusReport, StatusSource},
    kernel,
    keeper::{self, driver::ResumeOffer},
    listen, metrics, netwatch, privileges,
    redirect::{RedirectOptions, Redirector},
    registry::Registry,
    secret::{self, Secret},
    session::{self, SessionId},
};

/// What every connection task needs.
pub struct Shared {
    pub secret: Secret,
    pub session_config: session::Config,
    /// Server sessions by id, so a resume arriving on a new transport finds its session.
    pub sessions: Mutex<HashMap<SessionId, mpsc::Sender<ResumeOffer>>>,
    /// Fires on network address and route changes (client sessions resume at once).
    pub path_changes: Option<broadcast::Sender<()>>,
    /// Turns true when the agent stops: every connection resets both ends and ends.
    pub stopping: watch::Sender<bool>,
    pub registry: Arc<Registry>,
    pub redirector: Option<Arc<Redirector>>,
    pub peer_port: u16,
    pub probe_timeout: Duration,
    pub negative_ttl: Duration,
    /// How long the server side waits for a destination to accept.
    pub dial_timeout: Duration,
    /// The peer listener's own address: a peer may never ask us to dial it.
    pub listen: SocketAddr,
}

struct Status {
    shared: Arc<Shared>,
    mode: &'static str,
    redirect_port: Option<u16>,
    cgroups: Vec<String>,
}

impl StatusSource for Status {
    fn status(&self) -> StatusReport {
        let redirector = self.shared.redirector.as_ref();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            mode: self.mode.to_owned(),
            listen: self.shared.listen.to_string(),
            redirect_port: self.redirect_port,
            cgroups: self.cgroups.clone(),
            fast_path: redirector.map(|r| r.fast_path()),
            connections: self.shared.registry.connections(),
            negative_cache: redirector.map(|r| r.negative_entries()).unwrap_or_default(),
            kernel: redirector.map(|r| r.stats()),
            counters: self.shared.registry.counters(),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
}

fn load_secret(path: Option<&std::path::Path>) -> anyhow::Result<Secret> {
    // `config::resolve_*` already refused an invocation without one; this is the backstop.
    let path = path.ok_or(crate::config::ConfigError::MissingSecret)?;
    let secret = Secret::from_file(path)?;
    if let Some(warning) = secret::check_permissions(path) {
        warn!("{warning}");
    }
    Ok(secret)
}

fn session_config(common: &cli::CommonArgs) -> session::Config {
    session::Config { keep_for: common.keep_for, ..session::Config::default() }
}

fn bind_peer_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(listen::tcp(addr, "peer", "; choose another with --listen")?)
}

/// `rocks-agent attach`.
pub async fn attach(args: cli::AttachArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Everything that can be wrong with the invocation is checked before anything is bound or
    // loaded, so a bad call changes nothing on the host.
    let secret = load_secret(args.common.secret_file.as_deref())?;
    let targets = args
        .cgroups
        .iter()
        .map(|p| cgroup::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    privileges::check_attach()?;
    kernel::probe()?;
    let own = match cgroup::own_cgroup().and_then(|p| cgroup::open(&p)) {
        Ok(own) => Some(own),
        Err(e) => {
            warn!(error = %e, "cannot find the agent's own cgroup; the fast path may not engage");
            None
        }
    };

    let peer_listener = bind_peer_listener(args.common.listen)?;
    let redirect_listeners = listen::redirect_listeners(args.redirect_port)?;
    let metrics_listener = args.common.metrics.map(metrics::bind).transpose()?;
    let control_listener = control::bind(&args.common.run_dir).await?;

    let options = RedirectOptions {
        redirect_port: args.redirect_port,
        peer_port: args.peer_port,
        fast_path: args.fast_path == cli::FastPath::On,
        ports: args.ports.clone(),
        exclude_ports: args.exclude_ports.clone(),
        // Each record crosses a ring buffer per connect: only pay for it when someone reads it.
        log_redirects: tracing::enabled!(target: "rocks", tracing::Level::DEBUG),
    };
    let mut redirector = Redirector::load(&options)?;
    redirector.attach(&targets, own.as_ref())?;
    redirector.enable()?;
    let redirector = Arc::new(redirector);
    let path_changes = match netwatch::spawn() {
        Ok(tx) => Some(tx),
        Err(e) => {
            warn!(error = %e, "cannot watch network changes; resumes will wait for the dead-path timer");
            None
        }
    };

    let shared = Arc::new(Shared {
        secret,
        session_config: session_config(&args.common),
        sessions: Mutex::new(HashMap::new()),
        path_changes,
        stopping: watch::Sender::new(false),
        registry: Arc::new(Registry::default()),
        redirector: Some(redirector.clone()),
        peer_port: args.peer_port,
        probe_timeout: args.probe_timeout,
        negative_ttl: args.negative_ttl,
        dial_timeout: Duration::from_secs(10),
        listen: args.common.listen,
    });
    let status = Arc::new(Status {
        shared: shared.clone(),
        mode: "attach",
        redirect_port: Some(args.redirect_port),
        cgroups: args.cgroups.iter().map(|p| p.display().to_string()).collect(),
    });
    info!(
        listen = %args.common.listen,
        redirect_port = args.redirect_port,
        fast_path = options.fast_path,
        cgroups = ?args.cgroups,
        "rocks agent attached and serving"
    );

    let mut tasks = JoinSet::new();
    tasks.spawn(control::serve(control_listener, status.clone()));
    spawn_metrics(&mut tasks, metrics_listener, status, &shared);
    tasks.spawn(accept_peers(peer_listener, shared.clone()));
    for listener in redirect_listeners {
        tasks.spawn(accept_apps(listener, shared.clone()));
    }
    shutdown.await;

    // Detach first, so new connects go direct instead of landing on a listener about to close.
    // Connection tasks may still hold the redirector for map lookups, so detaching is explicit
    // rather than left to the last drop.
    redirector.detach();
    // Stop accepting (the listeners close once their tasks are gone), then end what is open.
    tasks.shutdown().await;
    end_connections(&shared).await;
    let _ = std::fs::remove_file(args.common.run_dir.join(control::SOCKET_NAME));
    info!("detached; exiting");
    Ok(())
}

/// Connections cannot outlive the agent that carries them: each resets both ends (the local
/// socket here, and through the session the far end's), so no application mistakes the cut
/// for a complete transfer. Bounded, so a peer that does not answer cannot hold up the exit.
async fn end_connections(shared: &Shared) {
    let open = shared.registry.connections().len();
    let _ = shared.stopping.send(true);
    if open > 0 {
        info!(connections = open, "resetting the connections this agent carries");
    }
    let deadline = tokio::time::Instant::now() + STOP_BOUND;
    while shared.registry.live_tasks() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.registry.live_tasks();
    if left > 0 {
        warn!(connections = left, "connections still ending after {STOP_BOUND:?}; exiting anyway");
    }
}

/// How long stopping waits for connections to tell their peers.
const STOP_BOUND: Duration = Duration::from_secs(3);

/// `rocks-agent serve`: the peer side only.
pub async fn serve(args: cli::CommonArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let secret = load_secret(args.secret_file.as_deref())?;
    let peer_listener = bind_peer_listener(args.listen)?;
    let metrics_listener = args.metrics.map(metrics::bind).transpose()?;
    let control_listener = control::bind(&args.run_dir).await?;
    let shared = Arc::new(Shared {
        secret,
        session_config: session_config(&args),
        sessions: Mutex::new(HashMap::new()),
        path_changes: None,
        stopping: watch::Sender::new(false),
        registry: Arc::new(Registry::default()),
        redirector: None,
        peer_port: args.listen.port(),
        probe_timeout: Duration::from_secs(1),
        negative_ttl: Duration::ZERO,
        dial_timeout: Duration::from_secs(10),
        listen: args.listen,
    });
    let status = Arc::new(Status { shared: shared.clone(), mode: "serve", redirect_port: None, cgroups: Vec::new() });
    info!(listen = %args.listen, "rocks agent serving peers");
    let mut tasks = JoinSet::new();
    tasks.spawn(control::serve(control_listener, status.clone()));
    spawn_metrics(&mut tasks, metrics_listener, status, &shared);
    tasks.spawn(accept_peers(peer_listener, shared.clone()));
    shutdown.await;
    tasks.shutdown().await;
    end_connections(&shared).await;
    let _ = std::fs::remove_file(args.run_dir.join(control::SOCKET_NAME));
    info!("exiting");
    Ok(())
}

/// Serves `--metrics` when it was asked for.
fn spawn_metrics(tasks: &mut JoinSet<()>, listener: Option<TcpListener>, status: Arc<Status>, shared: &Shared) {
    if let Some(listener) = listener {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving Prometheus metrics at /metrics");
        }
        tasks.spawn(metrics::serve(listener, status, shared.registry.clone()));
    }
}

async fn accept_peers(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(keeper::server::handle(shared.clone(), stream, from));
            }
            Err(e) => accept_error("peer", e).await,
        }
    }
}

async fn accept_apps(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(keeper::client::handle(shared.clone(), stream, from));
            }
            Err(e) => accept_error("redirect", e).await,
        }
    }
}

/// EMFILE and friends must not spin the accept loop.
async fn accept_error(what: &str, e: std::io::Error) {
    warn!(listener = what, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

