//! `cargo xtask demo`: two hosts in network namespaces, a real ssh session kept through the
//! agents, and (by default) a network outage in the middle of it.
//!
//! ```text
//!   ns "rocksdemo<pid>-laptop"      ns "rocksdemo<pid>-switch"        ns "rocksdemo<pid>-server"
//!   ssh (in the demo's cgroup)                                         sshd
//!   rocks-agent attach                                                 rocks-agent serve
//!   eth0 ─────────veth─────── laptop ─┐                ┌─ server ───veth──────── eth0
//!   192.0.2.1/24, 2001:db8::1/64      └────── br0 ─────┘      192.0.2.2/24, 2001:db8::2/64
//! ```
//!
//! Programs run in a host with `nsenter --net=/var/run/netns/<name>`, not `ip netns exec`,
//! which remounts /sys and so hides the cgroup2 mount the agent needs. The bridge sits in a
//! namespace of its own, so the laptop's cable can be pulled from outside (`ip -n <switch> link
//! set laptop down`) and nothing touches the machine's own interfaces.
//!
//! Everything the demo makes is held by [`Demo`], whose cleanup runs on success, on failure,
//! on Ctrl-C or SIGTERM (a handler sets a flag that every wait checks) and from `Drop`.
//! Leftovers of a run that was SIGKILLed are removed by the next run.

use std::{
    fs::{self, File},
    io::Read as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::{
    build, exec,
    setup::{self, Mode},
};

/// Two hosts in network namespaces and a real ssh session kept through the agents, with an
/// address change and a 5-second link outage in the middle (needs root).
#[derive(clap::Args)]
pub struct Options {
    /// How much the ssh session streams, in bytes; K, M and G mean KiB, MiB and GiB.
    #[arg(long, env = "DEMO_BYTES", default_value = "64M", value_parser = parse_size)]
    bytes: u64,
    /// Break the network during the transfer (the default): change the laptop's address,
    /// then take its link down for 5 seconds.
    #[arg(long, overrides_with = "no_outage")]
    outage: bool,
    /// Stream without breaking the network.
    #[arg(long)]
    no_outage: bool,
    /// Print every command the demo runs.
    #[arg(long, short)]
    verbose: bool,
}

const PREFIX: &str = "rocksdemo";
const NETNS_DIR: &str = "/var/run/netns";
const LAPTOP_IP: &str = "192.0.2.1";
const LAPTOP_NEW_IP: &str = "192.0.2.11";
const SERVER_IP: &str = "192.0.2.2";
const SSH_PORT: u16 = 22;
/// The remote side sends the data in this many chunks with a pause after each, so the
/// transfer lasts long enough to watch it (and to break the network under it).
const CHUNKS: u64 = 64;
const PAUSE_PLAIN: &str = "0.05";
const PAUSE_OUTAGE: &str = "0.15";
const LINK_DOWN_FOR: Duration = Duration::from_secs(5);
/// A transfer that makes no progress for this long (outside the deliberate outage) failed.
const STALL_LIMIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

static VERBOSE: AtomicBool = AtomicBool::new(false);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(options: Options) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "`cargo xtask demo` needs root: it creates network namespaces and a cgroup and \
             attaches eBPF programs. Run it as root."
        );
    }
    VERBOSE.store(options.verbose, Ordering::Relaxed);
    ctrlc::set_handler(|| {
        if !INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nInterrupted: stopping and cleaning up.");
        }
    })
    .context("installing the Ctrl-C handler")?;

    let started = Instant::now();
    println!("Setting up the machine and building rocks-agent.");
    setup::ensure(Mode::Install)?;
    let agent = build_agent()?;
    check_interrupted()?;
    remove_leftovers();

    let outage = !options.no_outage;
    let mut demo = Demo::new(agent)?;
    let result = demo.run(options.bytes, outage);
    if let Err(error) = &result {
        demo.show_logs(error);
    }
    demo.cleanup();
    let verdict = match &result {
        Ok(()) => "succeeded",
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => "was interrupted",
        Err(_) => "FAILED",
    };
    println!(
        "The demo {verdict} in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    result
}

fn build_agent() -> Result<PathBuf> {
    let mut cmd = build::build_command(false);
    if !verbose() {
        cmd.arg("--quiet");
    }
    show(&cmd);
    let started = Instant::now();
    let status = cmd.status().context("could not start cargo")?;
    check_interrupted()?;
    if !status.success() {
        bail!("building rocks-agent failed: {status}");
    }
    let agent = build::agent_binary(false)?;
    println!(
        "Built {} in {:.1} s.",
        agent.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(agent)
}

/// Everything one run made, removed by [`Demo::cleanup`] (also from `Drop`).
struct Demo {
    agent: PathBuf,
    /// `rocksdemo<pid>`: the namespaces are `<tag>-laptop` and so on.
    tag: String,
    dir: Option<PathBuf>,
    namespaces: Vec<String>,
    cgroup: Option<PathBuf>,
    /// Long-running programs, stopped in reverse order.
    programs: Vec<Program>,
    /// Whether cleanup says what it removed (not for another run's leftovers).
    report_cleanup: bool,
}

impl Demo {
    fn new(agent: PathBuf) -> Result<Demo> {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{pid}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // It holds the cluster secret and private keys.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        Ok(Demo {
            agent,
            tag: format!("{PREFIX}{pid}"),
            dir: Some(dir),
            namespaces: Vec::new(),
            cgroup: None,
            programs: Vec::new(),
            report_cleanup: true,
        })
    }

    fn run(&mut self, bytes: u64, outage: bool) -> Result<()> {
        self.make_hosts()?;
        self.make_cgroup()?;
        self.start_agents()?;
        let ssh_key = self.start_sshd()?;
        let mut transfer = self.start_transfer(&ssh_key, bytes, outage)?;
        if outage {
            self.break_network(&mut transfer)?;
        } else {
            self.show_tables_mid_transfer(&mut transfer)?;
        }
        let outcome = transfer.finish()?;
        self.report(&transfer, &outcome, outage)
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_deref()
            .expect("the temp dir lives until cleanup")
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    // --- the two hosts -------------------------------------------------------------------

    fn make_hosts(&mut self) -> Result<()> {
        let switch = self.ns("switch");
        self.add_netns(&switch)?;
        // No multicast snooping: without a querier it can starve IPv6 neighbour discovery.
        ip(&format!(
            "-n {switch} link add br0 type bridge mcast_snooping 0"
        ))?;
        ip(&format!("-n {switch} link set br0 up"))?;
        self.add_host("laptop", LAPTOP_IP, "2001:db8::1")?;
        self.add_host("server", SERVER_IP, "2001:db8::2")?;
        println!(
            "Made two hosts as network namespaces joined by a bridge: \"laptop\" ({LAPTOP_IP}, \
             2001:db8::1) is {}, \"server\" ({SERVER_IP}, 2001:db8::2) is {}.",
            self.ns("laptop"),
            self.ns("server")
        );
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&format!("netns add {name}"))?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    /// A host namespace whose `eth0` is cabled to the port named `host` on the switch.
    fn add_host(&mut self, host: &str, ip4: &str, ip6: &str) -> Result<()> {
        let (ns, switch) = (self.ns(host), self.ns("switch"));
        self.add_netns(&ns)?;
        ip(&format!(
            "-n {switch} link add {host} type veth peer name eth0 netns {ns}"
        ))?;
        ip(&format!("-n {switch} link set {host} master br0 up"))?;
        ip(&format!("-n {ns} link set lo up"))?;
        ip(&format!("-n {ns} addr add {ip4}/24 dev eth0"))?;
        // nodad: usable at once instead of after a second of duplicate address detection.
        ip(&format!("-n {ns} addr add {ip6}/64 dev eth0 nodad"))?;
        // No duplicate address detection for the link-local address either: it would appear
        // a second or so after the link comes up, in the middle of the transfer, and the
        // agent resumes its sessions on every address change.
        let mut no_dad = in_ns(&ns, "sysctl");
        no_dad.args(["-q", "-w", "net.ipv6.conf.eth0.accept_dad=0"]);
        quiet(&mut no_dad)?;
        ip(&format!("-n {ns} link set eth0 up"))?;
        Ok(())
    }

    fn make_cgroup(&mut self) -> Result<()> {
        let path = cgroup2_mount()?.join(format!("{PREFIX}-{}", std::process::id()));
        show_line(&format!("mkdir {}", path.display()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        println!("Made cgroup {} for the ssh client.", path.display());
        self.cgroup = Some(path);
        Ok(())
    }

    fn cgroup(&self) -> &Path {
        self.cgroup.as_deref().expect("made before use")
    }

    // --- agents and sshd -----------------------------------------------------------------

    fn start_agents(&mut self) -> Result<()> {
        let secret = self.dir().join("secret");
        let mut keygen = Command::new(&self.agent);
        keygen.arg("keygen").arg("--out").arg(&secret);
        quiet(&mut keygen)?;

        let common = |run_dir: &Path| {
            let mut args = vec!["--secret-file".into(), secret.clone().into_os_string()];
            args.extend(["--run-dir".into(), run_dir.as_os_str().to_owned()]);
            args.extend(["--keep-for".into(), "10m".into()]);
            args
        };
        // NO_COLOR: plain logs, since they are files whose ends are shown when the demo fails.
        let server_run = self.run_dir("server");
        let mut serve = in_ns(&self.ns("server"), &self.agent);
        serve
            .env("NO_COLOR", "1")
            .arg("serve")
            .args(common(&server_run));
        self.spawn("the server's agent", serve, "server-agent.log")?;

        let laptop_run = self.run_dir("laptop");
        let mut attach = in_ns(&self.ns("laptop"), &self.agent);
        attach
            .env("NO_COLOR", "1")
            .arg("attach")
            .arg("--cgroup")
            .arg(self.cgroup())
            .args(common(&laptop_run));
        self.spawn("the laptop's agent", attach, "laptop-agent.log")?;

        self.wait_for_agent(&server_run)?;
        self.wait_for_agent(&laptop_run)?;
        println!(
            "Started `rocks-agent serve` on the server and `rocks-agent attach` on the laptop, \
             attached to the cgroup; both answer `rocks-agent status`."
        );
        Ok(())
    }

    fn run_dir(&self, host: &str) -> PathBuf {
        self.dir().join(format!("{host}-run"))
    }

    fn wait_for_agent(&mut self, run_dir: &Path) -> Result<()> {
        let what = format!(
            "an agent to answer `rocks-agent status --run-dir {}`",
            run_dir.display()
        );
        self.wait_until(&what, |demo| {
            let answer = demo
                .status_command(run_dir, false)
                .stdin(Stdio::null())
                .output()?;
            Ok(answer.status.success())
        })
    }

    /// Polls `ready` until it holds; fails if a program exits meanwhile or after 15 s.
    fn wait_until(&mut self, what: &str, ready: impl Fn(&Demo) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            check_interrupted()?;
            if ready(self)? {
                return Ok(());
            }
            self.check_programs()?;
            if Instant::now() > deadline {
                bail!("waited 15 s in vain for {what}");
            }
            thread::sleep(POLL);
        }
    }

    fn status_command(&self, run_dir: &Path, json: bool) -> Command {
        let mut cmd = Command::new(&self.agent);
        cmd.arg("status").arg("--run-dir").arg(run_dir);
        if json {
            cmd.arg("--json");
        }
        cmd
    }

    /// Starts sshd on the server with a throwaway config and keys; returns the client key.
    fn start_sshd(&mut self) -> Result<PathBuf> {
        let dir = self.dir().to_owned();
        let (host_key, client_key) = (dir.join("host_key"), dir.join("client_key"));
        for key in [&host_key, &client_key] {
            let mut cmd = Command::new("ssh-keygen");
            cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "rocks-demo", "-f"])
                .arg(key);
            quiet(&mut cmd)?;
        }
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized)?;
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            sshd_config(&host_key, &authorized, &dir.join("sshd.pid")),
        )?;
        // sshd refuses to start without its privilege separation directory, which the init
        // system normally makes. Left in place afterwards: other sshds on this machine use it.
        fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;

        // sshd re-executes itself for each connection, so it needs its absolute path.
        let sshd = find_program("sshd")?;
        let mut cmd = in_ns(&self.ns("server"), &sshd);
        cmd.arg("-D").arg("-e").arg("-f").arg(&config);
        self.spawn("sshd", cmd, "sshd.log")?;
        self.wait_for_listener("server", SSH_PORT)?;
        println!("Started OpenSSH's sshd on the server, port {SSH_PORT}.");
        Ok(client_key)
    }

    fn wait_for_listener(&mut self, host: &str, port: u16) -> Result<()> {
        let what = format!("something to listen on port {port} on the {host}");
        self.wait_until(&what, |demo| {
            let mut ss = in_ns(&demo.ns(host), "ss");
            ss.args(["-H", "-l", "-t", "-n", "sport", "=", &format!(":{port}")]);
            Ok(!exec::stdout(&mut ss)?.trim().is_empty())
        })
    }

    fn spawn(&mut self, name: &'static str, cmd: Command, log: &str) -> Result<()> {
        let program = Program::spawn(name, cmd, &self.dir().join(log))?;
        self.programs.push(program);
        Ok(())
    }

    /// Fails if a long-running program has exited, with the end of its log.
    fn check_programs(&mut self) -> Result<()> {
        for program in &mut self.programs {
            if let Some(status) = program.exited() {
                bail!(
                    "{} exited ({status}):\n{}",
                    program.name,
                    tail(&program.log, 20)
                );
            }
        }
        Ok(())
    }

    // --- the ssh session -----------------------------------------------------------------

    fn start_transfer(&mut self, key: &Path, bytes: u64, outage: bool) -> Result<Transfer> {
        let pause = if outage { PAUSE_OUTAGE } else { PAUSE_PLAIN };
        let remote = remote_command(&self.dir().join("server-data"), bytes, pause);
        // The shell moves itself into the cgroup and then becomes ssh: ssh is in the cgroup
        // from its first instruction, so its connection is one the laptop's agent keeps.
        let join = format!(
            "echo $$ > {}/cgroup.procs && exec \"$@\"",
            self.cgroup().display()
        );
        let mut cmd = in_ns(&self.ns("laptop"), "sh");
        cmd.args(["-c", &join, "sh", "ssh", "-T", "-F", "/dev/null", "-i"])
            .arg(key);
        for option in [
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "LogLevel=ERROR",
            "ConnectTimeout=10",
        ] {
            cmd.args(["-o", option]);
        }
        cmd.arg(format!("root@{SERVER_IP}")).arg(remote);
        println!(
            "Running on the laptop, inside the cgroup: ssh root@{SERVER_IP}, whose remote command \
             writes {} of random data to a file, prints its sha256 and sends it in {CHUNKS} chunks \
             with a {pause} s pause after each.",
            size(bytes)
        );
        Transfer::start(
            cmd,
            &self.dir().join("ssh.stderr"),
            bytes,
            self.status_command(&self.run_dir("laptop"), true),
        )
    }

    fn show_tables_mid_transfer(&mut self, transfer: &mut Transfer) -> Result<()> {
        transfer.wait_for_share(25)?;
        self.show_tables(transfer)
    }

    fn show_tables(&mut self, transfer: &Transfer) -> Result<()> {
        println!(
            "The agents' view of the connection with {} of {} received:",
            size(transfer.received()),
            size(transfer.expected)
        );
        for host in ["laptop", "server"] {
            let table = exec::stdout(&mut self.status_command(&self.run_dir(host), false))?;
            println!("  {host}$ rocks-agent status");
            for line in table.lines() {
                println!("    {line}");
            }
        }
        Ok(())
    }

    /// (a) a new address for the laptop, (b) its cable pulled for 5 s, each while data flows,
    /// and what the agents did about it.
    fn break_network(&mut self, transfer: &mut Transfer) -> Result<()> {
        transfer.phase = "before any outage";
        transfer.wait_for_share(10)?;
        self.show_tables(transfer)?;
        transfer.wait_for_share(25)?;
        self.change_address(transfer)?;
        transfer.wait_for_share(50)?;
        self.pull_cable(transfer)
    }

    fn change_address(&mut self, transfer: &mut Transfer) -> Result<()> {
        let (laptop, received, resumes) = (
            self.ns("laptop"),
            transfer.received(),
            transfer.resumes.len(),
        );
        transfer.phase = "after the address change";
        let changed = Instant::now();
        ip(&format!("-n {laptop} addr del {LAPTOP_IP}/24 dev eth0"))?;
        ip(&format!("-n {laptop} addr add {LAPTOP_NEW_IP}/24 dev eth0"))?;
        println!(
            "Outage 1: with {} received, the laptop's address changed from {LAPTOP_IP} to {LAPTOP_NEW_IP}.",
            size(received)
        );
        transfer.wait_for(
            "data to flow again after the address change",
            STALL_LIMIT,
            |t| t.received() > received,
        )?;
        println!("  {}", recovery(transfer, resumes, changed.elapsed()));
        Ok(())
    }

    fn pull_cable(&mut self, transfer: &mut Transfer) -> Result<()> {
        let (switch, received, resumes) = (
            self.ns("switch"),
            transfer.received(),
            transfer.resumes.len(),
        );
        transfer.phase = "around the link outage";
        ip(&format!("-n {switch} link set laptop down"))?;
        println!(
            "Outage 2: with {} received, the laptop's link went down for {} s.",
            size(received),
            LINK_DOWN_FOR.as_secs()
        );
        transfer.hold(LINK_DOWN_FOR)?;
        let state = transfer
            .conn
            .as_ref()
            .map_or("gone", |c| c.state.as_str())
            .to_owned();
        let arrived = match transfer.received() - received {
            0 => "nothing arrived".to_owned(),
            n => format!("{} more arrived (what was already on its way)", size(n)),
        };
        ip(&format!("-n {switch} link set laptop up"))?;
        let up = Instant::now();
        println!(
            "  While it was down {arrived}, and the laptop's agent showed the connection as \
             \"{state}\". Then the link came back up."
        );
        let received = transfer.received();
        transfer.wait_for(
            "data to flow again after the link came back",
            STALL_LIMIT,
            |t| t.received() > received,
        )?;
        println!("  {}", recovery(transfer, resumes, up.elapsed()));
        Ok(())
    }

    // --- the report ----------------------------------------------------------------------

    fn report(&mut self, transfer: &Transfer, outcome: &Outcome, outage: bool) -> Result<()> {
        let last = self.laptop_status();
        println!("What happened:");
        let counter =
            |section: &str, name: &str| last.as_ref().and_then(|s| s[section][name].as_u64());
        let redirected = counter("kernel", "redirected")
            .map_or_else(|| "an unknown number of".into(), |n| n.to_string());
        let kept = counter("counters", "kept").unwrap_or(0);
        println!(
            "  The laptop's kernel redirected {redirected} connection(s) to its agent (kernel.redirected), \
             and the agent kept {kept} through a session with the server's agent (counters.kept)."
        );
        match &transfer.conn {
            Some(conn) => println!(
                "  ssh's connection was carried as \"{}\", session {}; the agent's last look showed \
                 {} sent to the server and {} received from it.",
                conn.mode,
                conn.session_id.as_deref().unwrap_or("(none)"),
                size(conn.bytes_sent),
                size(conn.bytes_received)
            ),
            None => println!("  The laptop's agent never listed ssh's connection."),
        }
        println!(
            "  ssh received {} ({} bytes) in {:.1} s and {}.",
            size(outcome.received),
            outcome.received,
            outcome.took.as_secs_f64(),
            exit(outcome.status)
        );
        match self.sshd_client_address() {
            Some(from) if from == LAPTOP_IP => println!(
                "  sshd logged the login as coming from {from}, the laptop: the server's agent \
                 connects to sshd from the laptop's address (--transparent on)."
            ),
            Some(from) if from == SERVER_IP => println!(
                "  sshd logged the login as coming from {from}, the server itself: it sees the \
                 server's agent, not the laptop."
            ),
            Some(from) => println!("  sshd logged the login as coming from {from}."),
            None => {}
        }
        let resumes = &transfer.resumes;
        if resumes.is_empty() {
            println!("  The session never resumed.");
        } else {
            let each: Vec<String> = resumes
                .iter()
                .map(|r| match r.took_ms {
                    Some(ms) => format!("#{} {}: {ms} ms", r.number, r.phase),
                    None => format!("#{} {}", r.number, r.phase),
                })
                .collect();
            println!(
                "  The session resumed {} (from when the laptop's agent noticed a break until the \
                 session resumed): {}.",
                times(resumes.len()),
                each.join("; ")
            );
        }
        let checksum = match (&outcome.remote_sha256, &outcome.local_sha256) {
            (Some(remote), local) if remote == local => {
                format!("match: sha256 {local} on both ends")
            }
            (Some(remote), local) => {
                format!("DO NOT match: the server sent {remote}, the laptop got {local}")
            }
            (None, local) => {
                format!("cannot be compared: the server printed none (the laptop got {local})")
            }
        };
        println!("  The checksums {checksum}.");

        let intact = outcome.status.success()
            && outcome.received == transfer.expected
            && outcome.remote_sha256.as_deref() == Some(outcome.local_sha256.as_str());
        if !intact {
            if !outcome.stderr.trim().is_empty() {
                println!("  ssh's stderr:\n{}", indent(outcome.stderr.trim()));
            }
            bail!(
                "the ssh session did not deliver the data intact ({} of {} bytes arrived, ssh {})",
                outcome.received,
                transfer.expected,
                exit(outcome.status)
            );
        }
        if outage {
            println!(
                "The ssh session survived an address change and a {}-second link outage, and \
                 every byte arrived intact.",
                LINK_DOWN_FOR.as_secs()
            );
        } else {
            println!("The ssh session went through the agents and every byte arrived intact.");
        }
        Ok(())
    }

    /// Where sshd believes the client is, from its "Accepted publickey for root from ..." line.
    fn sshd_client_address(&self) -> Option<String> {
        let log = fs::read_to_string(self.dir().join("sshd.log")).ok()?;
        let line = log.lines().find(|l| l.starts_with("Accepted "))?;
        let (_, rest) = line.split_once(" from ")?;
        rest.split_whitespace().next().map(str::to_owned)
    }

    fn laptop_status(&self) -> Option<Value> {
        status_json(&mut self.status_command(&self.run_dir("laptop"), true))
    }

    /// On failure: the end of every log, before cleanup deletes them.
    fn show_logs(&self, error: &anyhow::Error) {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        eprintln!(
            "Something went wrong ({error:#}). The end of each log, before cleanup removes them:"
        );
        for program in &self.programs {
            eprintln!(
                "Last lines of {}'s log ({}):",
                program.name,
                program.log.display()
            );
            eprintln!("{}", indent(&tail(&program.log, 15)));
        }
    }

    // --- cleanup -------------------------------------------------------------------------

    /// Removes everything this run made; safe to call again (what is gone is skipped).
    fn cleanup(&mut self) {
        let mut done = Vec::new();
        if !self.programs.is_empty() {
            let names: Vec<&str> = self.programs.iter().rev().map(|p| p.name).collect();
            done.push(format!("stopped {}", names.join(", ")));
        }
        while let Some(mut program) = self.programs.pop() {
            program.stop();
        }
        if let Some(cgroup) = self.cgroup.take() {
            match remove_cgroup(&cgroup) {
                Ok(()) => done.push(format!("removed cgroup {}", cgroup.display())),
                Err(e) => eprintln!("warning: {e:#}"),
            }
        }
        if !self.namespaces.is_empty() {
            done.push(format!("deleted namespaces {}", self.namespaces.join(", ")));
        }
        while let Some(ns) = self.namespaces.pop() {
            kill_netns_processes(&ns);
            if let Err(e) = ip(&format!("netns del {ns}")) {
                eprintln!("warning: {e:#}");
            }
        }
        if let Some(dir) = self.dir.take() {
            show_line(&format!("rm -r {}", dir.display()));
            match fs::remove_dir_all(&dir) {
                Ok(()) => done.push(format!("removed {}", dir.display())),
                Err(e) => eprintln!("warning: cannot remove {}: {e}", dir.display()),
            }
        }
        if self.report_cleanup && !done.is_empty() {
            println!("Cleaned up: {}.", done.join("; "));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// How the transfer came back after outage: how long until data flowed and which resumes
/// the agent reported meanwhile.
fn recovery(transfer: &Transfer, resumes_before: usize, flowing_after: Duration) -> String {
    let new = &transfer.resumes[resumes_before..];
    let flowing = format!(
        "Data flowed again {:.1} s later",
        flowing_after.as_secs_f64()
    );
    let [.., last] = new else {
        return format!("{flowing}, and the session did not resume: its transport survived.");
    };
    let times = match new.len() {
        1 => String::new(),
        n => format!(" {} (the last one is shown)", times(n)),
    };
    match last.took_ms {
        Some(ms) => format!(
            "{flowing}: the laptop's agent resumed the session{times}, {ms} ms after it noticed the break."
        ),
        None => format!("{flowing}: the laptop's agent resumed the session{times}."),
    }
}

// --- the transfer ----------------------------------------------------------------------

/// The ssh session while it runs: bytes arriving (hashed as they come) and what the laptop's
/// agent says about the connection.
struct Transfer {
    ssh: Program,
    expected: u64,
    received: Arc<AtomicU64>,
    reader: Option<JoinHandle<Result<String>>>,
    status: Command,
    started: Instant,
    last_progress: (Instant, u64),
    /// The laptop agent's last view of ssh's connection.
    conn: Option<Conn>,
    resumes: Vec<Resume>,
    /// What the network is going through, for the resumes seen meanwhile.
    phase: &'static str,
}

/// One resume the laptop's agent reported (`resumes` went up to `number`).
struct Resume {
    number: u64,
    /// When it was seen: "before any outage", "after the address change"...
    phase: &'static str,
    took_ms: Option<u64>,
}

/// One row of the laptop agent's `status --json` connections.
#[derive(Clone)]
struct Conn {
    mode: String,
    state: String,
    session_id: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    resumes: u64,
    last_resume_ms: Option<u64>,
}

struct Outcome {
    status: ExitStatus,
    received: u64,
    took: Duration,
    local_sha256: String,
    remote_sha256: Option<String>,
    stderr: String,
}

impl Transfer {
    fn start(mut cmd: Command, stderr: &Path, expected: u64, status: Command) -> Result<Transfer> {
        show(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(stderr)?)
            .process_group(0);
        let mut child = cmd.spawn().context("could not start ssh")?;
        let stdout = child.stdout.take().expect("piped");
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        let reader = thread::spawn(move || hash_stream(stdout, &counter));
        Ok(Transfer {
            ssh: Program {
                name: "ssh",
                child,
                log: stderr.to_owned(),
                stopped: false,
            },
            expected,
            received,
            reader: Some(reader),
            status,
            started: Instant::now(),
            last_progress: (Instant::now(), 0),
            conn: None,
            resumes: Vec::new(),
            phase: "during the transfer",
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// One look: progress, and the laptop agent's view of the connection.
    fn poll(&mut self) -> Result<()> {
        check_interrupted()?;
        let received = self.received();
        if received > self.last_progress.1 {
            self.last_progress = (Instant::now(), received);
        }
        let Some(report) = status_json(&mut self.status) else {
            return Ok(());
        };
        let Some(conn) = report["connections"]
            .as_array()
            .and_then(|c| c.iter().find_map(parse_conn))
        else {
            return Ok(());
        };
        let seen = self.resumes.last().map_or(0, |r| r.number);
        if conn.resumes > seen {
            self.resumes.push(Resume {
                number: conn.resumes,
                phase: self.phase,
                took_ms: conn.last_resume_ms,
            });
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// Polls until `done` holds; fails if ssh exits first or `timeout` passes.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Transfer) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            if done(self) {
                return Ok(());
            }
            if let Some(status) = self.ssh.exited() {
                bail!(
                    "ssh exited ({status}) while waiting for {what}:\n{}",
                    tail(&self.ssh.log, 10)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {} s for {what} in vain ({} of {} received): the session did not recover",
                    timeout.as_secs(),
                    size(self.received()),
                    size(self.expected)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until `percent` % of the data has arrived.
    fn wait_for_share(&mut self, percent: u64) -> Result<()> {
        let share = self.expected * percent / 100;
        let what = format!("{percent} % of the data to arrive");
        self.wait_for(&what, Duration::from_secs(60), |t| t.received() >= share)
    }

    /// Polls for `duration` (the transfer may stall meanwhile).
    fn hold(&mut self, duration: Duration) -> Result<()> {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            self.poll()?;
            thread::sleep(POLL);
        }
        self.last_progress = (Instant::now(), self.received());
        Ok(())
    }

    /// Waits for ssh to exit (failing after [`STALL_LIMIT`] without progress) and collects
    /// what arrived.
    fn finish(&mut self) -> Result<Outcome> {
        let status = loop {
            self.poll()?;
            if let Some(status) = self.ssh.exited() {
                break status;
            }
            if self.last_progress.0.elapsed() > STALL_LIMIT {
                bail!(
                    "the transfer stalled: nothing arrived for {} s ({} of {} received)",
                    STALL_LIMIT.as_secs(),
                    size(self.received()),
                    size(self.expected)
                );
            }
            thread::sleep(POLL);
        };
        let took = self.started.elapsed();
        let local_sha256 = match self.reader.take().map(JoinHandle::join) {
            Some(Ok(digest)) => digest?,
            _ => bail!("the thread reading ssh's output failed"),
        };
        let stderr = fs::read_to_string(&self.ssh.log).unwrap_or_default();
        Ok(Outcome {
            status,
            received: self.received(),
            took,
            remote_sha256: first_sha256(&stderr),
            local_sha256,
            stderr,
        })
    }
}

/// Reads everything, counting and hashing; returns the hex sha256.
fn hash_stream(mut input: impl std::io::Read, counter: &AtomicU64) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = input.read(&mut buf).context("reading ssh's output")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn parse_conn(row: &Value) -> Option<Conn> {
    let text = |key: &str| row[key].as_str().unwrap_or_default().to_owned();
    let number = |key: &str| row[key].as_u64().unwrap_or(0);
    (row["role"] == "client").then(|| Conn {
        mode: text("mode"),
        state: text("state"),
        session_id: row["session_id"].as_str().map(str::to_owned),
        bytes_sent: number("bytes_sent"),
        bytes_received: number("bytes_received"),
        resumes: number("resumes"),
        last_resume_ms: row["last_resume_ms"].as_u64(),
    })
}

fn status_json(cmd: &mut Command) -> Option<Value> {
    serde_json::from_str(&exec::probe(cmd)?).ok()
}

/// The command the server runs: make the data, print its sha256 on stderr, send it paced.
fn remote_command(file: &Path, bytes: u64, pause: &str) -> String {
    let chunk = bytes.div_ceil(CHUNKS).max(1);
    let chunks = bytes.div_ceil(chunk);
    let f = file.display();
    format!(
        "head -c {bytes} /dev/urandom > {f} && sha256sum < {f} >&2 && i=0 && \
         while [ $i -lt {chunks} ]; do dd if={f} bs={chunk} skip=$i count=1 status=none || exit 1; \
         sleep {pause}; i=$((i+1)); done; rm -f {f}"
    )
}

fn first_sha256(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|word| word.len() == 64 && word.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
}

fn sshd_config(host_key: &Path, authorized: &Path, pid_file: &Path) -> String {
    format!(
        "Port {SSH_PORT}\n\
         ListenAddress 0.0.0.0\n\
         ListenAddress ::\n\
         HostKey {}\n\
         PidFile {}\n\
         AuthorizedKeysFile {}\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         StrictModes no\n\
         UsePAM no\n\
         UseDNS no\n\
         PrintMotd no\n",
        host_key.display(),
        pid_file.display(),
        authorized.display()
    )
}

// --- programs ----------------------------------------------------------------------------

/// A long-running program started by the demo, its output in a log file. It leads its own
/// process group, so a Ctrl-C in the terminal reaches only the demo, which stops it in order.
struct Program {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Program {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Program> {
        show(&cmd);
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        Ok(Program {
            name,
            child,
            log: log.to_owned(),
            stopped: false,
        })
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, up to 3 s to exit (the agent detaches its programs), then SIGKILL.
    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) || self.exited().is_some() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        show_line(&format!("kill -TERM {pid}"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.stop();
    }
}

// --- commands ----------------------------------------------------------------------------

fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

fn show(cmd: &Command) {
    show_line(&exec::shown(cmd));
}

fn show_line(line: &str) {
    if verbose() {
        println!("+ {line}");
    }
}

/// Runs a short command (printed with `--verbose`); fails with its stderr.
fn quiet(cmd: &mut Command) -> Result<String> {
    show(cmd);
    exec::stdout(cmd)
}

/// `ip` with the arguments in `line`, split at spaces (the names here have none).
fn ip(line: &str) -> Result<String> {
    quiet(&mut exec::command(&format!("ip {line}")))
}

/// `program` run inside the named network namespace. nsenter, unlike `ip netns exec`, keeps
/// the mount namespace and so the cgroup2 mount; without --fork it execs the program.
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{ns}")).arg(program);
    cmd
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; everything the demo made is removed");
    }
    Ok(())
}

fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{name} not found (`cargo xtask setup` installs it)"))
}

// --- removing things ---------------------------------------------------------------------

/// The cgroup2 mount point, from /proc/self/mounts (it differs between machines).
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            // The kernel escapes spaces as \040; a cgroup mount with one is not worth handling.
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .context("no cgroup2 filesystem is mounted (see /proc/self/mounts)")
}

/// Kills what is left in the cgroup and removes it (rmdir fails while processes exit).
fn remove_cgroup(path: &Path) -> Result<()> {
    show_line(&format!(
        "echo 1 > {}/cgroup.kill; rmdir {}",
        path.display(),
        path.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if fs::write(path.join("cgroup.kill"), "1").is_err() {
            // Before Linux 5.14 there is no cgroup.kill.
            let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("cannot remove cgroup {}: {e}", path.display())
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// SIGKILLs every process left in the namespace (a session sshd forked, say).
fn kill_netns_processes(ns: &str) {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Ok(pids) = ip(&format!("netns pids {ns}")) else {
            return;
        };
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes what earlier runs that were SIGKILLed left behind: namespaces, cgroups and temp
/// directories named after a demo process that no longer runs.
fn remove_leftovers() {
    let Ok(mount) = cgroup2_mount() else { return };
    let mut pids: Vec<u32> = Vec::new();
    let netns = exec::probe(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    let names: Vec<&str> = netns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &names {
        pids.extend(
            name.strip_prefix(PREFIX)
                .and_then(|r| r.split_once('-'))
                .and_then(|(p, _)| p.parse::<u32>().ok()),
        );
    }
    for dir in [&mount, &std::env::temp_dir()] {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            pids.extend(
                name.strip_prefix(&format!("{PREFIX}-"))
                    .and_then(|p| p.parse::<u32>().ok()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids.into_iter().filter(|&pid| !demo_running(pid)) {
        let tag = format!("{PREFIX}{pid}");
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{pid}"));
        let cgroup = mount.join(format!("{PREFIX}-{pid}"));
        let leftover = Demo {
            agent: PathBuf::new(),
            namespaces: names
                .iter()
                .filter(|n| n.starts_with(&format!("{tag}-")))
                .map(|n| n.to_string())
                .collect(),
            tag,
            dir: dir.exists().then_some(dir),
            cgroup: cgroup.exists().then_some(cgroup),
            programs: Vec::new(),
            report_cleanup: false,
        };
        println!("Removing what an earlier demo (pid {pid}) left behind.");
        drop(leftover);
    }
}

/// Whether `pid` is a running demo: an xtask process (pids are reused).
fn demo_running(pid: u32) -> bool {
    pid == std::process::id()
        || fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "xtask")
}

// --- small helpers -----------------------------------------------------------------------

/// `64M`, `512K`, `1G`, `1000`: K, M and G (optionally followed by `iB` or `B`) are binary.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 64M"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown unit {other:?} (use K, M or G)")),
    };
    match number.checked_mul(1 << shift) {
        Some(0) => Err("the size must be at least 1 byte".into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} bytes"),
        1024..1048576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1048576.0),
    }
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn times(n: usize) -> String {
    match n {
        1 => "once".into(),
        n => format!("{n} times"),
    }
}

/// "exited with status 0", "was killed by signal 9".
fn exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("M").is_err());
        assert_eq!(size(1000), "1000 bytes");
        assert_eq!(size(64 << 20), "64.0 MiB");
    }

    #[test]
    fn remote_command_covers_every_byte() {
        // 100 bytes in 64 chunks: chunks of 2, so 50 of them.
        let cmd = remote_command(Path::new("/tmp/x"), 100, "0.05");
        assert!(
            cmd.contains("head -c 100 ") && cmd.contains("bs=2 ") && cmd.contains("-lt 50 "),
            "{cmd}"
        );
    }

    #[test]
    fn finds_the_remote_checksum() {
        let sum = "a".repeat(64);
        assert_eq!(first_sha256(&format!("warning\n{sum}  -\n")), Some(sum));
        assert_eq!(first_sha256("no sum here"), None);
    }
}
