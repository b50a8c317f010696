//! The command line: the contract operators and tests drive (see the README).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use rocks_common::{DEFAULT_PEER_PORT, DEFAULT_REDIRECT_PORT};

#[derive(Debug, Parser)]
#[command(name = "rocks-agent", version, about = "Keeps TCP connections alive across address changes, outages and link failures")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to cgroups and keep the TCP connections their processes open; also serve peers.
    /// Runs in the foreground until SIGINT/SIGTERM, then detaches.
    Attach(AttachArgs),
    /// Peer side only: accept sessions from other agents (no eBPF).
    Serve(CommonArgs),
    /// Show kept connections, the hosts known to have no agent, and counters.
    Status(StatusArgs),
    /// Show the running agent's policy, or change it live (no re-attach): each option given
    /// replaces that list as a whole, the others stay as they are.
    Policy(PolicyArgs),
    /// Set the running agent's sk_msg fast path for new connections (connections already
    /// open keep the path they started on).
    FastPath(FastPathArgs),
    /// Write a new random cluster secret (mode 0600).
    Keygen(KeygenArgs),
    /// Remove what an agent left attached and pinned: after `attach --on-exit keep`, or after
    /// an agent was killed. Refuses while an agent runs with this --run-dir.
    Detach(DetachArgs),
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Where peers reach this agent.
    #[arg(long, default_value = "[::]:4470", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// The shared cluster secret (64 hex characters; `rocks-agent keygen` makes one).
    /// Required, here or as `secret-file` in the --config file.
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    pub secret_file: Option<PathBuf>,
    /// Control socket and state. Agents in different network namespaces on one machine need
    /// one each.
    #[arg(long, default_value = "/run/rocks", value_name = "DIR")]
    pub run_dir: PathBuf,
    /// How long a broken connection waits for its peer before it is closed.
    #[arg(long, default_value = "72h", value_parser = parse_duration, value_name = "DURATION")]
    pub keep_for: Duration,
    /// A TOML file setting any of these options (keys are the long flag names: `keep-for =
    /// "24h"`); flags given on the command line override it. See the README.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics. Default: off.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Connect to destinations on this host from the client's address, so server programs see
    /// the real client (needs CAP_NET_ADMIN; adds a routing rule and sets sysctls, see the
    /// README). Off: they see this host's own address.
    #[arg(long, value_enum, default_value = "on")]
    pub transparent: Transparent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transparent {
    /// Dial from the client's address.
    On,
    /// Dial from this host's own address.
    Off,
}

/// `--fast-path on|off|auto` (defined with the fast path itself).
pub use crate::fastpath::FastPathMode as FastPath;

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// A cgroup v2 directory whose processes' connections are kept (repeatable). Required,
    /// here or as `cgroup = [...]` in the --config file.
    #[arg(long = "cgroup", value_name = "PATH", required_unless_present = "config")]
    pub cgroups: Vec<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// The port peer agents listen on (dialed as `<destination>:<port>`).
    #[arg(long, default_value_t = DEFAULT_PEER_PORT, value_name = "PORT")]
    pub peer_port: u16,
    /// The loopback port redirected connections land on.
    #[arg(long, default_value_t = DEFAULT_REDIRECT_PORT, value_name = "PORT")]
    pub redirect_port: u16,
    /// The sk_msg fast path between the application and the agent. Off by default: sk_msg
    /// ingress redirection bypasses the receiving socket's window, and a socket in a sockhash
    /// receives differently (EAGAIN from a blocking recv, FIONREAD, splice); `auto` engages
    /// only where the kernel passes a probe for that (see the README).
    #[arg(long, value_enum, default_value = "off")]
    pub fast_path: FastPath,
    /// Keep only connections to these destination ports (comma-separated). Default: all.
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    pub ports: Option<Vec<u16>>,
    /// Never keep connections to these destination ports (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    pub exclude_ports: Vec<u16>,
    /// Never keep connections to destinations in these prefixes (comma-separated, repeatable:
    /// 10.0.0.0/8,fd00::/8). IPv4 prefixes also match IPv4-mapped IPv6 destinations.
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    pub exclude_cidr: Vec<String>,
    /// Never keep connections of processes in this cgroup or any cgroup below it (repeatable).
    /// It must lie below one of the --cgroup directories.
    #[arg(long, value_name = "PATH")]
    pub exclude_cgroup: Vec<PathBuf>,
    /// How long a host found to have no agent is left alone (connects to it go direct).
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub negative_ttl: Duration,
    /// How long to wait for a peer agent to answer before falling back to plain TCP.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_timeout: Duration,
    /// The most application connections this agent carries at once; beyond it, new connects
    /// from the cgroups go direct (not kept) until some close. Default: a quarter of the
    /// open-file limit, at most 32768.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u64>,
    /// What SIGINT/SIGTERM leaves behind. `detach`: nothing, the cgroups are as they were.
    /// `keep`: the eBPF programs stay attached and pinned, redirecting nothing (connects go
    /// direct), for the next agent with this --run-dir to take over without a detach; remove
    /// them with `rocks-agent detach` if none comes.
    #[arg(long, value_enum, default_value = "detach")]
    pub on_exit: OnExit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnExit {
    /// Detach every program and remove the pins.
    Detach,
    /// Leave the programs pinned, redirection off, for the next agent of this run directory.
    Keep,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The run directory of the agent whose leftovers to remove.
    #[arg(long, default_value = "/run/rocks", value_name = "DIR")]
    pub run_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "/run/rocks", value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Print the status as JSON (stable schema, see the README).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[arg(long, default_value = "/run/rocks", value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Keep only connections to these destination ports (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORTS", conflicts_with = "all_ports")]
    pub ports: Option<Vec<u16>>,
    /// Keep connections to every destination port (but the excluded ones).
    #[arg(long)]
    pub all_ports: bool,
    /// Never keep connections to these ports (comma-separated; `none` empties the list).
    #[arg(long, value_name = "PORTS|none", value_parser = parse_port_list)]
    pub exclude_ports: Option<List<u16>>,
    /// Never keep connections to these prefixes (comma-separated; `none` empties the list).
    #[arg(long, value_name = "CIDRS|none", value_parser = parse_cidr_list)]
    pub exclude_cidr: Option<List<String>>,
    /// Never keep connections of processes in this cgroup or below it (repeatable; the whole
    /// list is replaced; `--exclude-cgroup none` empties it).
    #[arg(long, value_name = "PATH|none")]
    pub exclude_cgroup: Option<Vec<PathBuf>>,
    /// Print the policy as JSON (the `policy` object of `status --json`).
    #[arg(long)]
    pub json: bool,
}

impl PolicyArgs {
    /// The change these options ask for (empty: just show the policy). Relative cgroup paths
    /// are made absolute here, against this command's working directory, not the agent's.
    pub fn change(&self) -> Result<crate::policy::PolicyChange, String> {
        use crate::policy::{PolicyChange, PortSelection};
        let ports = match (&self.ports, self.all_ports) {
            (Some(p), _) => Some(PortSelection::Only(p.clone())),
            (None, true) => Some(PortSelection::All),
            (None, false) => None,
        };
        let exclude_cgroup = match self.exclude_cgroup.as_deref() {
            None => None,
            Some([only]) if only.as_os_str() == "none" => Some(Vec::new()),
            Some(paths) if paths.iter().any(|p| p.as_os_str() == "none") => {
                return Err("--exclude-cgroup none empties the list: give it alone".to_owned());
            }
            Some(paths) => Some(
                paths
                    .iter()
                    .map(|p| std::path::absolute(p).map_err(|e| format!("--exclude-cgroup {}: {e}", p.display())))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(PolicyChange {
            ports,
            exclude_ports: self.exclude_ports.clone().map(|l| l.0),
            exclude_cidr: self.exclude_cidr.clone().map(|l| l.0),
            exclude_cgroup,
        })
    }
}

/// A comma-separated list given as one value, where `none` (or nothing) is the empty list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

fn parse_list<T>(s: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<List<T>, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(List(Vec::new()));
    }
    s.split(',').map(|i| item(i.trim())).collect::<Result<_, _>>().map(List)
}

fn parse_port_list(s: &str) -> Result<List<u16>, String> {
    parse_list(s, |p| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port number (1-65535)")))
}

fn parse_cidr_list(s: &str) -> Result<List<String>, String> {
    // Checked by the agent, which names the bad value; only the list is split here.
    parse_list(s, |c| Ok(c.to_owned()))
}

#[derive(Debug, Args)]
pub struct FastPathArgs {
    #[arg(long, default_value = "/run/rocks", value_name = "DIR")]
    pub run_dir: PathBuf,
    /// on: both directions, unbounded; off: loopback TCP only; auto: bounded, and off by
    /// itself when it misbehaves (see the README).
    #[arg(value_enum)]
    pub mode: FastPath,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the secret; refuses to overwrite an existing file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}
