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
    /// Write a new random cluster secret (mode 0600).
    Keygen(KeygenArgs),
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FastPath {
    /// Redirect loopback traffic between the application and the agent with sk_msg.
    On,
    /// Always use the ordinary loopback TCP path.
    Off,
}

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
    /// ingress redirection bypasses the receiving socket's window, so a slow application or a
    /// long outage could queue unbounded data in kernel memory (see the README).
    #[arg(long, value_enum, default_value = "off")]
    pub fast_path: FastPath,
    /// Keep only connections to these destination ports (comma-separated). Default: all.
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    pub ports: Option<Vec<u16>>,
    /// Never keep connections to these destination ports (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    pub exclude_ports: Vec<u16>,
    /// How long a host found to have no agent is left alone (connects to it go direct).
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub negative_ttl: Duration,
    /// How long to wait for a peer agent to answer before falling back to plain TCP.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_timeout: Duration,
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
pub struct KeygenArgs {
    /// Where to write the secret; refuses to overwrite an existing file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}
