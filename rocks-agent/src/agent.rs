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
    policy::{Policy, PolicyChange, PolicyError, PolicyReport, PolicySpec, PortSelection},
    limit::{self, ConnectionLimit},
    listen, metrics, netwatch, privileges,
    redirect::{RedirectOptions, Redirector},
    registry::Registry,
    secret::{self, Secret},
    session::{self, SessionId},
    transparent,
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
    /// `attach`: counts the application connections carried, against `--max-connections`.
    pub connection_limit: Option<Arc<ConnectionLimit>>,
    /// `attach`: the sk_msg fast path's mode and `auto`'s supervisor.
    pub fast_path: Option<Arc<crate::fastpath::FastPath>>,
    pub peer_port: u16,
    pub probe_timeout: Duration,
    pub negative_ttl: Duration,
    /// How long the server side waits for a destination to accept.
    pub dial_timeout: Duration,
    /// The peer listener's own address: a peer may never ask us to dial it.
    pub listen: SocketAddr,
    /// Dial destinations from the client's address (`--transparent on`).
    pub transparent: bool,
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
            fast_path: self.shared.fast_path.as_ref().map(|f| f.status().effective != "off"),
            fast_path_mode: self.shared.fast_path.as_ref().map(|f| f.status()),
            connections: self.shared.registry.connections(),
            negative_cache: redirector.map(|r| r.negative_entries()).unwrap_or_default(),
            kernel: redirector.map(|r| r.stats()),
            counters: self.shared.registry.counters(),
            policy: redirector.map(|r| r.policy()),
        }
    }

    fn set_fast_path(&self, mode: crate::fastpath::FastPathMode) -> Result<crate::fastpath::FastPathStatus, String> {
        let Some(fast_path) = self.shared.fast_path.as_ref() else {
            return Err("this agent runs `serve`: it has no fast path".to_owned());
        };
        fast_path.set(mode).map_err(|e| format!("{e:#}"))
    }

    fn set_policy(&self, change: PolicyChange) -> Result<PolicyReport, String> {
        let Some(redirector) = self.shared.redirector.as_ref() else {
            return Err("this agent runs `serve`: it redirects nothing and has no policy to change".to_owned());
        };
        let attached = redirector.attached().to_vec();
        let result =
            redirector.update_policy(|current| -> anyhow::Result<Policy> { Ok(current.changed(change, &attached)?) });
        match result {
            Ok((old, new)) => {
                info!(policy = %new, was = %old, "policy changed");
                Ok(redirector.policy())
            }
            Err(e) => {
                warn!(error = format!("{e:#}"), "policy change refused; the policy in force is unchanged");
                Err(format!("{e:#}"))
            }
        }
    }
}

/// The policy `attach` starts with, from its flags (and the --config file).
fn attach_policy(args: &cli::AttachArgs) -> Result<Policy, PolicyError> {
    let spec = PolicySpec {
        ports: args.ports.clone().map_or(PortSelection::All, PortSelection::Only),
        exclude_ports: args.exclude_ports.clone(),
        exclude_cidr: args.exclude_cidr.clone(),
        exclude_cgroup: args.exclude_cgroup.clone(),
    };
    Policy::resolve(&spec, &args.cgroups)
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
    let policy = attach_policy(&args)?;
    let nofile = limit::raise_nofile_limit()?;
    let max_connections = match args.max_connections {
        Some(n) => limit::check_max(n)?,
        None => limit::default_max(nofile),
    };
    limit::check_nofile(max_connections, nofile);
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
    // Before the eBPF programs: if this fails, nothing is attached yet.
    let routing = transparent_routing(&args.common)?;

    let options = RedirectOptions {
        redirect_port: args.redirect_port,
        peer_port: args.peer_port,
        // Off until `FastPath::start` has probed the kernel and decided (below).
        fast_path: crate::fastpath::FastPathMode::Off,
        policy: policy.clone(),
        // Each record crosses a ring buffer per connect: only pay for it when someone reads it.
        log_redirects: tracing::enabled!(target: "rocks", tracing::Level::DEBUG),
    };
    // Pinned per run directory: a restarted agent takes over what an earlier one left.
    let pins = crate::pin::PinDir::for_run_dir(&args.common.run_dir)?;
    let mut redirector = Redirector::load(&options, &pins)?;
    redirector.attach(&targets, own.as_ref())?;
    // Before enabling: a budget of 0 (fresh maps) would send every connect direct.
    redirector.set_connect_budget(max_connections as i64)?;
    redirector.enable()?;
    let redirector = Arc::new(redirector);
    let registry = Arc::new(Registry::default());
    let queues = limit::ListenerQueues::new(&redirect_listeners)?;
    let connection_limit = ConnectionLimit::new(max_connections, redirector.clone(), Box::new(queues), registry.clone());
    connection_limit.spawn_refresh(Duration::from_secs(1));
    let fast_path = {
        let (redirector, mode) = (redirector.clone(), args.fast_path);
        tokio::task::spawn_blocking(move || crate::fastpath::FastPath::start(redirector, mode)).await??
    };
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
        registry,
        redirector: Some(redirector.clone()),
        connection_limit: Some(connection_limit),
        fast_path: Some(fast_path.clone()),
        peer_port: args.peer_port,
        probe_timeout: args.probe_timeout,
        negative_ttl: args.negative_ttl,
        dial_timeout: Duration::from_secs(10),
        listen: args.common.listen,
        transparent: routing.is_some(),
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
        fast_path = %fast_path.status().effective,
        max_connections,
        cgroups = ?args.cgroups,
        %policy,
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

    // Detach (or switch redirection off) first, so new connects go direct instead of landing
    // on a listener about to close. Connection tasks may still hold the redirector for map
    // lookups, so this is explicit rather than left to the last drop.
    match args.on_exit {
        cli::OnExit::Detach => redirector.detach(),
        cli::OnExit::Keep => redirector.keep(),
    }
    // Stop accepting (the listeners close once their tasks are gone), then end what is open.
    tasks.shutdown().await;
    // The limit's copies of the listeners' descriptors would keep them listening.
    if let Some(limit) = &shared.connection_limit {
        limit.close_listeners();
    }
    end_connections(&shared).await;
    // Only once no connection needs the routing any more.
    drop(routing);
    let _ = std::fs::remove_file(args.common.run_dir.join(control::SOCKET_NAME));
    match args.on_exit {
        cli::OnExit::Detach => info!("detached; exiting"),
        cli::OnExit::Keep => info!("programs left pinned for the next agent (--on-exit keep); exiting"),
    }
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
    // Served connections need descriptors too (two each), and they are not limited.
    limit::raise_nofile_limit()?;
    let peer_listener = bind_peer_listener(args.listen)?;
    let metrics_listener = args.metrics.map(metrics::bind).transpose()?;
    let control_listener = control::bind(&args.run_dir).await?;
    let routing = transparent_routing(&args)?;
    let shared = Arc::new(Shared {
        secret,
        session_config: session_config(&args),
        sessions: Mutex::new(HashMap::new()),
        path_changes: None,
        stopping: watch::Sender::new(false),
        registry: Arc::new(Registry::default()),
        redirector: None,
        fast_path: None,
        connection_limit: None,
        peer_port: args.listen.port(),
        probe_timeout: Duration::from_secs(1),
        negative_ttl: Duration::ZERO,
        dial_timeout: Duration::from_secs(10),
        listen: args.listen,
        transparent: routing.is_some(),
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
    drop(routing);
    let _ = std::fs::remove_file(args.run_dir.join(control::SOCKET_NAME));
    info!("exiting");
    Ok(())
}

/// `--transparent on`: the routing and sysctls transparent dials need, undone when dropped.
fn transparent_routing(common: &cli::CommonArgs) -> anyhow::Result<Option<transparent::Routing>> {
    match common.transparent {
        cli::Transparent::On => Ok(Some(transparent::Routing::setup(&common.run_dir)?)),
        cli::Transparent::Off => {
            info!("transparent dials off: server programs see this host's own address as the client");
            Ok(None)
        }
    }
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
                // Counted from the accept, so the switch flips before the next connect lands.
                let slot = shared.connection_limit.as_ref().map(|l| l.acquire());
                let shared = shared.clone();
                tokio::spawn(async move {
                    keeper::client::handle(shared, stream, from).await;
                    drop(slot);
                });
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

/// `rocks-agent detach`: removes what an agent of `run_dir` left attached and pinned (after
/// `--on-exit keep`, or a kill). Never under a running agent: that one detaches on SIGTERM.
pub async fn detach_leftovers(run_dir: &std::path::Path) -> anyhow::Result<()> {
    if let Ok(report) = control::query_status(run_dir).await {
        anyhow::bail!(
            "an agent is running with run dir {} (pid {}): stop it with SIGTERM, which detaches",
            run_dir.display(),
            report.pid
        );
    }
    let pins = crate::pin::PinDir::for_run_dir(run_dir)?;
    if !pins.exists() {
        eprintln!("rocks-agent: nothing pinned for run dir {} ({})", run_dir.display(), pins.path().display());
        return Ok(());
    }
    let removed = crate::links::remove_all(&pins)?;
    eprintln!(
        "rocks-agent: detached {} links from {} cgroups and removed {}",
        removed.links,
        removed.cgroups,
        pins.path().display()
    );
    Ok(())
}
