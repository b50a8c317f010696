//! The bench's lab: hosts as network namespaces on one bridge, cgroups for each role (so the
//! CPU of each is counted separately), and long-running programs started inside both.
//!
//! ```text
//!   ns "rocksbench<pid>-a"        ns "rocksbench<pid>-sw"          ns "rocksbench<pid>-b"
//!   clients, socat (relay side),                                   servers, socat, iperf3 -s,
//!   rocks-agent attach            eth0 ──veth── pa ─┐   ┌─ pb ──veth── eth0  rocks-agent serve
//!   192.0.2.1/24                                    br0                        192.0.2.2/24
//!                                 ns "rocksbench<pid>-c" ── pc ─┘  192.0.2.3/24 (+ extra
//!                                 a host without an agent          addresses), plain servers
//! ```
//!
//! Programs enter a host through a `pre_exec` hook that calls `setns` on the namespace file,
//! not through `ip netns exec`, which remounts /sys and so hides the cgroup2 mount the agent
//! needs. The same hook moves the program into its cgroup and raises its file limit before it
//! runs its first instruction.
//!
//! Everything is removed by [`Lab::cleanup`] (also from `Drop`, and on Ctrl-C through the
//! interrupt flag every wait checks); leftovers of a killed run go at the start of the next.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::Ipv4Addr,
    os::{
        fd::AsRawFd as _,
        unix::{fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    libc,
    sched::CloneFlags,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::exec;

pub const PREFIX: &str = "rocksbench";
const NETNS_DIR: &str = "/var/run/netns";
/// The file limit the bench asks for: the memory figure needs 10,000 connections, which is
/// 20,000 sockets in each agent.
const NOFILE: u64 = 262_144;

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; everything the bench made is removed");
    }
    Ok(())
}

/// Sleeps, but returns early with an error when interrupted.
pub fn sleep(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Polls `ready` every `every` until it returns `Some`; fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(value) = ready()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("waited {:.0?} in vain for {what}", timeout);
        }
        thread::sleep(every);
    }
}

/// The monotonic clock in nanoseconds, which every process on the machine shares: the
/// helpers print their timestamps in it, so the bench can compare them with its own.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

pub fn show_line(line: &str) {
    if verbose() {
        println!("+ {line}");
    }
}

/// Runs a short command quietly (printed with `--verbose`); fails with its stderr.
pub fn quiet(cmd: &mut Command) -> Result<String> {
    show_line(&exec::shown(cmd));
    exec::stdout(cmd)
}

/// `ip` with the arguments in `line`, split at spaces.
pub fn ip(line: &str) -> Result<String> {
    quiet(&mut exec::command(&format!("ip {line}")))
}

/// The roles that get a cgroup each. CPU is read per cgroup, which also counts the children
/// socat forks for each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Client programs whose connections the agent keeps (the agent attaches here).
    Kept,
    /// Client programs for direct TCP and the socat relay.
    Plain,
    AgentA,
    AgentB,
    RelayA,
    RelayB,
    /// Servers on host b (iperf3 -s, echo, greeting) and on host c.
    Servers,
}

impl Group {
    pub const ALL: [Group; 7] = [
        Group::Kept,
        Group::Plain,
        Group::AgentA,
        Group::AgentB,
        Group::RelayA,
        Group::RelayB,
        Group::Servers,
    ];

    fn dir_name(self) -> &'static str {
        match self {
            Group::Kept => "kept",
            Group::Plain => "plain",
            Group::AgentA => "agent-a",
            Group::AgentB => "agent-b",
            Group::RelayA => "relay-a",
            Group::RelayB => "relay-b",
            Group::Servers => "servers",
        }
    }
}

/// A host: a named network namespace with `lo` and `eth0`.
pub struct Host {
    pub ns: String,
    file: Arc<File>,
}

/// Everything one run made.
pub struct Lab {
    pub tag: String,
    dir: Option<PathBuf>,
    namespaces: Vec<String>,
    cgroup_root: Option<PathBuf>,
    pub a: Host,
    pub b: Host,
    pub c: Host,
    /// The switch namespace, where the hosts' cables can be pulled.
    pub switch: String,
    /// Copies of the agent and of this program, so a rebuild meanwhile changes nothing.
    pub agent: PathBuf,
    /// The agent `--profile` runs (built with line tables), if profiling.
    pub profile_agent: Option<PathBuf>,
    pub helper: PathBuf,
    /// Long-running programs, stopped in reverse order.
    programs: Vec<Program>,
    blackholed: std::cell::Cell<bool>,
}

pub const A_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Host a's address after an address change (and back again for the next trial).
pub const A_IP_ALT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
pub const B_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const C_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);

/// The n-th extra address of host c (a "new" plain host for each first-connect trial).
pub fn c_extra(n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).expect("small");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + 1 + n)
}

impl Lab {
    pub fn new(agent: &Path, profile_agent: Option<&Path>, c_extras: usize) -> Result<Lab> {
        let pid = std::process::id();
        let tag = format!("{PREFIX}{pid}");
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{pid}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // It holds the cluster secret.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let copy = |from: &Path, name: &str| -> Result<PathBuf> {
            let to = dir.join(name);
            fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
            Ok(to)
        };
        let agent = copy(agent, "rocks-agent")?;
        let profile_agent = profile_agent
            .map(|p| copy(p, "rocks-agent-profile"))
            .transpose()?;
        // /proc/self/exe still reads if cargo replaced the file meanwhile.
        let helper = copy(Path::new("/proc/self/exe"), "xtask-bench")?;
        let unset = |name: &str| Host {
            ns: name.to_owned(),
            file: Arc::new(File::open("/dev/null").expect("/dev/null")),
        };
        let mut lab = Lab {
            switch: format!("{tag}-sw"),
            a: unset(""),
            b: unset(""),
            c: unset(""),
            tag,
            dir: Some(dir),
            namespaces: Vec::new(),
            cgroup_root: None,
            agent,
            profile_agent,
            helper,
            programs: Vec::new(),
            blackholed: std::cell::Cell::new(false),
        };
        lab.make_hosts(c_extras)?;
        lab.make_cgroups()?;
        Ok(lab)
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_deref().expect("lives until cleanup")
    }

    fn make_hosts(&mut self, c_extras: usize) -> Result<()> {
        let switch = self.switch.clone();
        self.add_netns(&switch)?;
        // No multicast snooping: without a querier it can starve neighbour discovery.
        ip(&format!(
            "-n {switch} link add br0 type bridge mcast_snooping 0"
        ))?;
        ip(&format!("-n {switch} link set br0 up"))?;
        self.a = self.add_host("a", A_IP)?;
        self.b = self.add_host("b", B_IP)?;
        self.c = self.add_host("c", C_IP)?;
        let c = self.c.ns.clone();
        // Extra addresses on c, each a fresh host as far as the agent's negative cache goes.
        let mut batch = String::new();
        for n in 0..c_extras {
            batch.push_str(&format!("addr add {}/32 dev eth0\n", c_extra(n)));
        }
        ip_batch(&c, &batch)?;
        // On-link routes to the extra addresses from a and b.
        for host in [self.a.ns.clone(), self.b.ns.clone()] {
            ip(&format!("-n {host} route add 198.51.100.0/24 dev eth0"))?;
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&format!("netns add {name}"))?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    /// A host whose `eth0` is cabled to the switch port `p<label>`.
    fn add_host(&mut self, label: &str, addr: Ipv4Addr) -> Result<Host> {
        let (ns, switch) = (format!("{}-{label}", self.tag), self.switch.clone());
        self.add_netns(&ns)?;
        ip(&format!(
            "-n {switch} link add p{label} type veth peer name eth0 netns {ns}"
        ))?;
        ip(&format!("-n {switch} link set p{label} master br0 up"))?;
        let file = File::open(format!("{NETNS_DIR}/{ns}"))
            .with_context(|| format!("opening {NETNS_DIR}/{ns}"))?;
        let host = Host {
            ns: ns.clone(),
            file: Arc::new(file),
        };
        // IPv4 only: no IPv6 on eth0, so no link-local address appears (with its netlink
        // events, which make the agent resume) whenever the link comes up.
        let mut sysctl = self.command(&host, None, "sysctl");
        sysctl.args(["-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=1"]);
        quiet(&mut sysctl)?;
        ip_batch(
            &ns,
            &format!("link set lo up\naddr add {addr}/24 dev eth0\nlink set eth0 up\n"),
        )?;
        Ok(host)
    }

    fn make_cgroups(&mut self) -> Result<()> {
        let root = cgroup2_mount()?.join(format!("{PREFIX}-{}", std::process::id()));
        show_line(&format!("mkdir {}", root.display()));
        fs::create_dir(&root).with_context(|| format!("creating cgroup {}", root.display()))?;
        self.cgroup_root = Some(root.clone());
        for group in Group::ALL {
            let path = root.join(group.dir_name());
            fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        }
        Ok(())
    }

    pub fn cgroup(&self, group: Group) -> PathBuf {
        self.cgroup_root
            .as_ref()
            .expect("made before use")
            .join(group.dir_name())
    }

    /// CPU time the cgroup's processes used so far, dead children included, in seconds.
    pub fn cpu_seconds(&self, group: Group) -> Result<f64> {
        let path = self.cgroup(group).join("cpu.stat");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let usec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no usage_usec in {}", path.display()))?;
        Ok(usec as f64 / 1e6)
    }

    /// A command that runs `program` in `host`, in `group`'s cgroup if given, in a process
    /// group of its own (Ctrl-C reaches only the bench). It inherits the file limit that
    /// [`raise_file_limit`] set.
    pub fn command(
        &self,
        host: &Host,
        group: Option<Group>,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        let mut cmd = Command::new(program);
        let ns = Arc::clone(&host.file);
        let procs = group.map(|g| {
            let path = self.cgroup(g).join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        });
        // SAFETY: the hook calls only setns(2) and write(2) on objects prepared before the
        // fork, both async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&*ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                if let Some(procs) = &procs {
                    // "0": the writing process itself.
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.process_group(0);
        cmd
    }

    /// A command running one of this program's helpers (`xtask bench <helper> ...`).
    pub fn helper(&self, host: &Host, group: Group, args: &[&str]) -> Command {
        let mut cmd = self.command(host, Some(group), &self.helper);
        cmd.arg("bench").args(args);
        cmd
    }

    /// Starts a long-running program with its output in `<dir>/<log>`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &str) -> Result<u32> {
        show_line(&exec::shown(&cmd));
        let path = self.dir().join(log);
        let out = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        let pid = child.id();
        self.programs.push(Program {
            name: name.to_owned(),
            child,
            log: path,
            stopped: false,
        });
        Ok(pid)
    }

    /// Stops the long-running program `name` (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, name: &str, grace: Duration) {
        if let Some(i) = self.programs.iter().position(|p| p.name == name) {
            let mut program = self.programs.remove(i);
            program.stop(grace);
        }
    }

    /// Waits until the long-running program `name` exits by itself (a profiler finishing).
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let Some(i) = self.programs.iter().position(|p| p.name == name) else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            if let Ok(Some(_)) = self.programs[i].child.try_wait() {
                self.programs.remove(i);
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut program = self.programs.remove(i);
                program.stop(Duration::from_secs(3));
                bail!(
                    "{name} did not finish within {timeout:.0?}:\n{}",
                    tail(&program.log, 10)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails if a long-running program has exited, with the end of its log.
    pub fn check_programs(&mut self) -> Result<()> {
        for program in &mut self.programs {
            if let Ok(Some(status)) = program.child.try_wait() {
                bail!(
                    "{} exited ({status}):\n{}",
                    program.name,
                    tail(&program.log, 20)
                );
            }
        }
        Ok(())
    }

    pub fn log_of(&self, name: &str) -> Option<PathBuf> {
        self.programs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.log.clone())
    }

    /// Waits until something listens on TCP `port` in `host`.
    pub fn wait_for_listener(&mut self, host_ns: &str, port: u16) -> Result<()> {
        let what = format!("something to listen on port {port} in {host_ns}");
        wait_for(
            &what,
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                self.check_programs()?;
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={NETNS_DIR}/{host_ns}")).args([
                    "ss",
                    "-H",
                    "-l",
                    "-t",
                    "-n",
                    "sport",
                    "=",
                    &format!(":{port}"),
                ]);
                Ok((!quiet(&mut cmd)?.trim().is_empty()).then_some(()))
            },
        )
    }

    /// Replaces host a's address `from` with `to`; returns when `to` is in place.
    pub fn change_a_address(&self, from: Ipv4Addr, to: Ipv4Addr) -> Result<()> {
        ip(&format!("-n {} addr del {from}/24 dev eth0", self.a.ns))?;
        ip(&format!("-n {} addr add {to}/24 dev eth0", self.a.ns))?;
        Ok(())
    }

    /// Pulls host a's cable (the switch side of its veth) or plugs it back in.
    pub fn set_a_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&format!("-n {} link set pa {state}", self.switch))?;
        Ok(())
    }

    /// Silently drops everything in and out of host a's `eth0` (the link stays up), or
    /// restores it.
    pub fn blackhole_a(&self, on: bool) -> Result<()> {
        let t = &self.tag;
        let script = if on {
            format!(
                "table inet {t} {{\n\
                 \tchain input {{ type filter hook input priority -300; iifname \"eth0\" drop; }}\n\
                 \tchain output {{ type filter hook output priority -300; oifname \"eth0\" drop; }}\n\
                 }}\n"
            )
        } else {
            format!("delete table inet {t}\n")
        };
        let mut cmd = self.command(&self.a, None, "nft");
        cmd.args(["-f", "-"]);
        run_with_stdin(&mut cmd, &script)?;
        self.blackholed.set(on);
        Ok(())
    }

    /// Removes everything this run made; safe to call again.
    pub fn cleanup(&mut self) {
        while let Some(mut program) = self.programs.pop() {
            program.stop(Duration::from_secs(5));
        }
        if self.blackholed.get() {
            let _ = self.blackhole_a(false);
        }
        if let Some(root) = self.cgroup_root.take() {
            for group in Group::ALL {
                if let Err(e) = remove_cgroup(&root.join(group.dir_name())) {
                    eprintln!("warning: {e:#}");
                }
            }
            if let Err(e) = remove_cgroup(&root) {
                eprintln!("warning: {e:#}");
            }
        }
        while let Some(ns) = self.namespaces.pop() {
            kill_netns_processes(&ns);
            if let Err(e) = ip(&format!("netns del {ns}")) {
                eprintln!("warning: {e:#}");
            }
        }
        if let Some(dir) = self.dir.take() {
            show_line(&format!("rm -r {}", dir.display()));
            if let Err(e) = fs::remove_dir_all(&dir) {
                eprintln!("warning: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A long-running program, its output in a log file.
struct Program {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Program {
    fn stop(&mut self, grace: Duration) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        show_line(&format!("kill -TERM {pid}"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The whole process group: socat's forked children too.
        let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A helper started with its stdout piped: each line it prints arrives on a channel.
pub struct Piped {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    what: String,
}

impl Piped {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Piped> {
        show_line(&exec::shown(&cmd));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {what}"))?;
        let stdout: ChildStdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Piped {
            child,
            lines,
            what: what.to_owned(),
        })
    }

    /// The next line, waiting at most `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => return Ok(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "{} ended ({status}) without printing what was expected",
                        self.what
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("{} printed nothing for {timeout:.0?}", self.what);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Waits for the helper to finish and returns everything it printed, one line each.
    pub fn finish(self, timeout: Duration) -> Result<Vec<String>> {
        let what = self.what.clone();
        let (status, out) = self.collect(timeout)?;
        if !status.success() {
            bail!("{what} failed ({status}): {}", out.join("\n"));
        }
        Ok(out)
    }

    /// Like [`Piped::finish`], whatever the exit status (which it returns too).
    pub fn collect(mut self, timeout: Duration) -> Result<(std::process::ExitStatus, Vec<String>)> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    self.kill();
                    bail!("{} did not finish within {timeout:.0?}", self.what);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        let status = self.child.wait()?;
        Ok((status, out))
    }

    pub fn kill(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Runs a command to the end with `input` on its stdin.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    show_line(&format!("{} <<< {input:?}", exec::shown(cmd)));
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", exec::shown(cmd)))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            exec::shown(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_batch(ns: &str, script: &str) -> Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-batch", "-"]);
    run_with_stdin(&mut cmd, script)
}

/// Raises this process's file limit, which every program the lab starts inherits, as far as
/// allowed (raising the hard limit needs CAP_SYS_RESOURCE); returns the limit now in force.
pub fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let wanted = libc::rlimit {
            rlim_cur: NOFILE,
            rlim_max: NOFILE,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return NOFILE;
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// Resident memory of a process in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Per-thread CPU seconds (user + system) of a process, by thread name.
pub fn thread_cpu(pid: u32) -> Vec<(u32, String, f64)> {
    let ticks = 100.0; // USER_HZ, 100 on every Linux ABI that matters here
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let tid = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        // comm is in parentheses and may hold spaces; the fields after it are plain.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After comm: state(0) ... utime is field 14 overall, so index 11 here; stime 12.
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        out.push((tid, comm, (utime + stime) / ticks));
    }
    out
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The cgroup2 mount point, from /proc/self/mounts (it differs between machines).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .context("no cgroup2 filesystem is mounted (see /proc/self/mounts)")
}

/// Kills what is left in the cgroup and removes it.
fn remove_cgroup(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    show_line(&format!(
        "echo 1 > {}/cgroup.kill; rmdir {}",
        path.display(),
        path.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
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

/// SIGKILLs every process left in the namespace.
fn kill_netns_processes(ns: &str) {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(3);
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

/// Removes what earlier runs that were killed left behind: namespaces, cgroups and temp
/// directories named after a bench process that no longer runs.
pub fn remove_leftovers() {
    let Ok(mount) = cgroup2_mount() else { return };
    let netns = exec::probe(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    let names: Vec<String> = netns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let alive = |pid: u32| {
        pid == std::process::id()
            || fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "xtask" || comm.trim() == "xtask-bench")
    };
    for name in &names {
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|&p| !alive(p)) {
            println!("Removing namespace {name}, left behind by an earlier bench (pid {pid}).");
            kill_netns_processes(name);
            let _ = ip(&format!("netns del {name}"));
        }
    }
    for entry in fs::read_dir(&mount).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&format!("{PREFIX}-"))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !alive(p)) {
            println!(
                "Removing cgroup {}, left behind by an earlier bench.",
                entry.path().display()
            );
            for group in Group::ALL {
                let _ = remove_cgroup(&entry.path().join(group.dir_name()));
            }
            let _ = remove_cgroup(&entry.path());
        }
    }
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&format!("{PREFIX}-"))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !alive(p)) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
