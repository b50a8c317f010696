//! Running one kernel's pair of VMs under QEMU (TCG: KVM hangs on the machines this runs on)
//! and following their serial consoles: the verdict lines, the link-down requests (carried out
//! through QMP), and the watchdog for hangs, panics and VMs that die early.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead as _, BufReader, BufWriter, Read, Write as _},
    net::UdpSocket,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::report::{KernelRun, Outcome, ScenarioResult};

/// Guest memory per VM: the initramfs (about 11 MiB, unpacked into RAM) and the transfers.
const MEMORY_MIB: u32 = 512;
/// The client VM prints something at least this often while scenarios run: the scripts' own
/// time limits (at most 180 s for one step) end a stuck step with a verdict first. Longer
/// silence means the VM itself hangs.
const SILENCE_LIMIT: Duration = Duration::from_secs(240);
/// Console lines kept for the failure report.
const TAIL_LINES: usize = 60;

/// The test network (the addresses the scripts in tests/vm expect).
const SERVER_IP4: &str = "192.0.2.2/24,192.0.2.3/24";
const SERVER_IP6: &str = "2001:db8::2/64";
const CLIENT_IP4: &str = "192.0.2.10/24";
const CLIENT_IP6: &str = "2001:db8::10/64";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Server = 0,
    Client = 1,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

/// How to run one kernel's VMs.
pub struct Plan<'a> {
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    /// Console logs and QMP sockets go here.
    pub dir: &'a Path,
    /// The scenarios the client will run, in order: each must end with a verdict.
    pub scenarios: &'a [String],
    /// No `--scenario` filter: the client runs everything in tests/vm/scenarios.
    pub selected_all: bool,
    pub keep_for: Option<&'a str>,
    pub timeout: Duration,
    pub verbose: bool,
}

enum Event {
    Line(Role, String),
    /// The VM's QEMU closed its stdout: it has exited.
    Gone(Role),
}

struct Vm {
    role: Role,
    child: Child,
    qmp: PathBuf,
    tail: VecDeque<String>,
    log: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots both VMs, follows them to the end, and returns what happened.
pub fn run(plan: &Plan) -> Result<KernelRun> {
    fs::create_dir_all(plan.dir)?;
    let (server_port, client_port) = free_udp_ports()?;
    let (events, inbox) = mpsc::channel();
    let started = Instant::now();

    let keep_for = plan
        .keep_for
        .map(|k| format!(" rocks.keep_for={k}"))
        .unwrap_or_default();
    let server_cmdline =
        format!("rocks.role=server rocks.ip4={SERVER_IP4} rocks.ip6={SERVER_IP6}{keep_for}");
    let mut client_cmdline =
        format!("rocks.role=client rocks.ip4={CLIENT_IP4} rocks.ip6={CLIENT_IP6}{keep_for}");
    if !plan.selected_all {
        client_cmdline.push_str(&format!(" rocks.scenarios={}", plan.scenarios.join(",")));
    }
    let vms = [
        spawn(
            plan,
            Role::Server,
            &server_cmdline,
            (server_port, client_port),
            &events,
        )?,
        spawn(
            plan,
            Role::Client,
            &client_cmdline,
            (client_port, server_port),
            &events,
        )?,
    ];
    drop(events);

    let mut watch = Watch {
        plan,
        started,
        logs: [
            BufWriter::new(fs::File::create(&vms[0].log)?),
            BufWriter::new(fs::File::create(&vms[1].log)?),
        ],
        vms,
        run: KernelRun::default(),
        begun: None,
        link_up_at: None,
        last_client_line: started,
        stop_at: None,
    };
    let failure = watch.follow(&inbox);
    Ok(watch.finish(failure))
}

/// Why a run ended before the client was done, and which VM it blames.
type Failure = (Role, String);

/// How following the consoles ends.
enum End {
    /// The client ran all its scenarios.
    Done,
    Failed(Failure),
}

/// The state of one kernel's run while its consoles are followed.
struct Watch<'a> {
    plan: &'a Plan<'a>,
    started: Instant,
    vms: [Vm; 2],
    logs: [BufWriter<fs::File>; 2],
    run: KernelRun,
    /// The scenario running now and since when (host clock).
    begun: Option<(String, Instant)>,
    /// When to bring the link back up, during a link-down scenario.
    link_up_at: Option<Instant>,
    last_client_line: Instant,
    /// After a panic: keep reading until then, for the trace that follows the panic line.
    stop_at: Option<(Instant, Failure)>,
}

/// How long to keep reading the console after a kernel panic line.
const PANIC_TRACE: Duration = Duration::from_secs(3);

impl Watch<'_> {
    /// Follows the consoles until the client is done (`None`) or something ends the run early.
    fn follow(&mut self, inbox: &mpsc::Receiver<Event>) -> Option<Failure> {
        let deadline = self.started + self.plan.timeout;
        loop {
            let now = Instant::now();
            if let Some((at, failure)) = &self.stop_at
                && now >= *at
            {
                return Some(failure.clone());
            }
            if now >= deadline {
                let why = format!(
                    "watchdog: no end after {} s (--timeout)",
                    self.plan.timeout.as_secs()
                );
                return Some((Role::Client, why));
            }
            if now >= self.last_client_line + SILENCE_LIMIT {
                let why = format!(
                    "watchdog: the client VM printed nothing for {} s",
                    SILENCE_LIMIT.as_secs()
                );
                return Some((Role::Client, why));
            }
            if self.link_up_at.is_some_and(|at| now >= at) {
                self.link_up_at = None;
                if let Err(e) = set_link(&self.vms[Role::Client as usize], true) {
                    return Some((Role::Client, format!("{e:#}")));
                }
                println!("  {} host: link up again", self.plan.label);
            }
            let wake = [
                Some(deadline),
                Some(self.last_client_line + SILENCE_LIMIT),
                self.link_up_at,
                self.stop_at.as_ref().map(|(at, _)| *at),
            ];
            let wake = wake.into_iter().flatten().min().unwrap_or(deadline);
            match inbox.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Event::Line(role, line)) => match self.on_line(role, line) {
                    Some(End::Done) => return None,
                    Some(End::Failed(failure)) => return Some(failure),
                    None => {}
                },
                Ok(Event::Gone(role)) => {
                    if let Some((_, failure)) = self.stop_at.take() {
                        return Some(failure);
                    }
                    let status = self.vms[role as usize]
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    let why = format!(
                        "the {} VM stopped before the client was done ({status})",
                        role.name()
                    );
                    return Some((role, why));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Some((Role::Client, "both VMs are gone".into()));
                }
            }
        }
    }

    /// Logs one console line and acts on it; `Some` ends the run.
    fn on_line(&mut self, role: Role, line: String) -> Option<End> {
        let label = self.plan.label;
        let _ = writeln!(self.logs[role as usize], "{line}");
        let vm = &mut self.vms[role as usize];
        if vm.tail.len() == TAIL_LINES {
            vm.tail.pop_front();
        }
        vm.tail.push_back(line.clone());
        if self.plan.verbose {
            println!("  [{label} {}] {line}", role.name());
        }
        if role == Role::Client {
            self.last_client_line = Instant::now();
        }
        if line.contains("Kernel panic") && self.stop_at.is_none() {
            let why = format!("kernel panic in the {} VM", role.name());
            self.stop_at = Some((Instant::now() + PANIC_TRACE, (role, why)));
        }
        let marker = line.find("ROCKS-VM-")?;
        let mut words = line[marker..].splitn(4, ' ');
        let (tag, first) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        match (role, tag) {
            (_, "ROCKS-VM-FATAL") => {
                let why = format!(
                    "the {} VM's init failed: {}",
                    role.name(),
                    line[marker + tag.len()..].trim()
                );
                return Some(End::Failed((role, why)));
            }
            (Role::Client, "ROCKS-VM-BOOTED") => {
                let took = self.started.elapsed();
                self.run.boot = Some(took);
                println!(
                    "  {label} booted {} in {:.1} s",
                    words.next().unwrap_or("?"),
                    took.as_secs_f64()
                );
            }
            (Role::Client, "ROCKS-VM-BEGIN") => {
                self.begun = Some((first.to_owned(), Instant::now()))
            }
            (Role::Client, "ROCKS-VM-RESULT") => {
                let verdict = words.next().unwrap_or("");
                let detail = words.next().unwrap_or("").to_owned();
                let seconds = self
                    .begun
                    .take()
                    .filter(|(name, _)| name == first)
                    .map(|(_, at)| at.elapsed().as_secs_f64());
                let shown = seconds.map_or("-".to_owned(), |s| format!("{s:.1}"));
                println!("  {label} {first:<10} {verdict} {shown:>6} s  {detail}");
                let outcome = if verdict == "PASS" {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                };
                self.run.results.push(ScenarioResult {
                    name: first.to_owned(),
                    outcome,
                    seconds,
                    detail,
                });
            }
            (Role::Client, "ROCKS-VM-SETUP") => {
                let verdict = words.next().unwrap_or("");
                println!(
                    "  {label} (setup) {first} {verdict} {}",
                    words.next().unwrap_or("")
                );
            }
            (Role::Client, "ROCKS-VM-CONTROL") if first == "link-down" => {
                let secs: u64 = words
                    .next()
                    .and_then(|w| w.trim().parse().ok())
                    .unwrap_or(30);
                if let Err(e) = set_link(&self.vms[Role::Client as usize], false) {
                    return Some(End::Failed((Role::Client, format!("{e:#}"))));
                }
                println!("  {label} host: link between the VMs down for {secs} s");
                self.link_up_at = Some(Instant::now() + Duration::from_secs(secs));
            }
            // After a panic line the run is over whatever follows.
            (Role::Client, "ROCKS-VM-DONE") if self.stop_at.is_none() => return Some(End::Done),
            _ => {}
        }
        None
    }

    /// Stops the VMs and turns what was seen into the kernel's results.
    fn finish(mut self, failure: Option<Failure>) -> KernelRun {
        if self.link_up_at.is_some() {
            // A scenario ended during the outage; the VMs stop anyway, but leave no surprise.
            let _ = set_link(&self.vms[Role::Client as usize], true);
        }
        for vm in &mut self.vms {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
        }
        for log in &mut self.logs {
            let _ = log.flush();
        }
        let mut run = self.run;
        run.total = self.started.elapsed();
        for name in self.plan.scenarios {
            if !run.results.iter().any(|r| &r.name == name) {
                let why = failure
                    .as_ref()
                    .map_or("the client finished without it", |(_, why)| why.as_str());
                run.results.push(ScenarioResult {
                    name: name.clone(),
                    outcome: Outcome::Fail,
                    seconds: None,
                    detail: format!("no verdict: {why}"),
                });
            }
        }
        if failure.is_some() || run.results.iter().any(|r| r.outcome == Outcome::Fail) {
            // The failing VM's console first: the one the watchdog blamed, else the client that
            // ran the failing scenarios; then the other one, shorter.
            let blamed = failure.as_ref().map_or(Role::Client, |(role, _)| *role);
            for (role, lines) in [(blamed, TAIL_LINES), (other(blamed), 20)] {
                let vm = &self.vms[role as usize];
                let skip = vm.tail.len().saturating_sub(lines);
                let tail: String = vm
                    .tail
                    .iter()
                    .skip(skip)
                    .map(|l| format!("  | {l}\n"))
                    .collect();
                run.tails.push(format!(
                    "--- {} {} VM console, last {} lines (all of it: {}) ---\n{tail}",
                    self.plan.label,
                    role.name(),
                    vm.tail.len() - skip,
                    vm.log.display(),
                ));
            }
        }
        run.failure = failure.map(|(_, why)| why);
        run
    }
}

fn other(role: Role) -> Role {
    match role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    }
}

/// Starts one VM. Its NIC is a QEMU UDP socket sending to the other VM's port: a private link
/// with no bridge, no tap device and no root, and no start-up order between the two.
fn spawn(
    plan: &Plan,
    role: Role,
    cmdline: &str,
    (own_port, peer_port): (u16, u16),
    events: &mpsc::Sender<Event>,
) -> Result<Vm> {
    let qmp = plan.dir.join(format!("{}.qmp", role.name()));
    let _ = fs::remove_file(&qmp);
    let mac = match role {
        Role::Server => "52:54:00:00:02:02",
        Role::Client => "52:54:00:00:02:10",
    };
    // panic=-1 and -no-reboot: a panic ends QEMU at once; oops=panic makes any oops one.
    let append =
        format!("console=ttyS0 panic=-1 oops=panic quiet loglevel=4 rdinit=/init {cmdline}");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-nodefaults",
        "-no-reboot",
    ])
    .args(["-m", &MEMORY_MIB.to_string()])
    .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-kernel")
    .arg(plan.vmlinuz)
    .arg("-initrd")
    .arg(plan.initramfs)
    .args(["-append", &append])
    .arg("-netdev")
    .arg(format!(
        "socket,id=n0,udp=127.0.0.1:{peer_port},localaddr=127.0.0.1:{own_port}"
    ))
    .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    forward(stdout, role, "", events.clone(), true);
    forward(stderr, role, "qemu: ", events.clone(), false);
    Ok(Vm {
        role,
        child,
        qmp,
        tail: VecDeque::with_capacity(TAIL_LINES),
        log: plan.dir.join(format!("{}.log", role.name())),
    })
}

/// Sends each line of `from` as an event; `Gone` at the end if `announce_end`.
fn forward(
    from: impl Read + Send + 'static,
    role: Role,
    prefix: &'static str,
    to: mpsc::Sender<Event>,
    announce_end: bool,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if to
                        .send(Event::Line(role, format!("{prefix}{line}")))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        if announce_end {
            let _ = to.send(Event::Gone(role));
        }
    });
}

/// Two distinct UDP ports on the loopback that nothing uses right now.
fn free_udp_ports() -> Result<(u16, u16)> {
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0")?,
        UdpSocket::bind("127.0.0.1:0")?,
    );
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// `set_link n0 on|off` through the VM's QMP socket: QEMU stops passing frames in both
/// directions and the guest's NIC reports the carrier change.
fn set_link(vm: &Vm, up: bool) -> Result<()> {
    let what = format!(
        "set_link {} on the {} VM",
        if up { "on" } else { "off" },
        vm.role.name()
    );
    qmp(
        &vm.qmp,
        "set_link",
        &format!(r#"{{"name": "n0", "up": {up}}}"#),
    )
    .with_context(|| what)
}

fn qmp(socket: &Path, command: &str, arguments: &str) -> Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    let mut reply = |writer: &mut UnixStream, request: String| -> Result<()> {
        writer.write_all(request.as_bytes())?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("QMP closed the connection");
            }
            if line.contains("\"return\"") {
                return Ok(());
            }
            if line.contains("\"error\"") {
                bail!("QMP: {}", line.trim());
            }
            // Events and the greeting: not the answer.
        }
    };
    reply(&mut writer, "{\"execute\": \"qmp_capabilities\"}\n".into())?;
    reply(
        &mut writer,
        format!("{{\"execute\": \"{command}\", \"arguments\": {arguments}}}\n"),
    )
}
