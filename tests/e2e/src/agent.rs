//! A real `rocks-agent` in a test host: started with its own run directory, waited for until
//! its control socket answers, asked for `status --json`, stopped with SIGTERM when dropped.
//!
//! Each agent also runs in a cgroup of its own, the way a systemd service or a DaemonSet pod
//! does. The agent attaches `sock_ops` to its own cgroup (its accepted loopback sockets live
//! there); left in the test runner's cgroup, which may be the root of the hierarchy, every
//! agent of every parallel test would attach there.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::cgroup::TestCgroup;
use crate::netns::Host;
use crate::spawn::{Child, join_cgroup};
use crate::util::{TempDir, wait_until};

/// The environment variable `cargo xtask test` sets to the agent it just built.
pub const AGENT_BIN_ENV: &str = "ROCKS_AGENT_BIN";

/// How long an agent may take from start until its control socket answers.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `rocks-agent` binary: `$ROCKS_AGENT_BIN`, else `<target>/<profile>/rocks-agent` next to
/// the directory holding the running test executable (`<target>/<profile>/deps/<test>-<hash>`).
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{AGENT_BIN_ENV}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .filter(|d| d.file_name() == Some(OsStr::new("deps")))
        .and_then(Path::parent)
        .with_context(|| format!("cannot derive the target dir from {}", exe.display()))?;
    let bin = profile_dir.join("rocks-agent");
    if !bin.is_file() {
        bail!(
            "{} not found: build it (`cargo build -p rocks-agent`) or set {AGENT_BIN_ENV}",
            bin.display()
        );
    }
    Ok(bin)
}

/// A command running the agent binary inside `host` (or in the caller's namespace).
pub fn agent_command(host: Option<&Host>) -> Result<Command> {
    let bin = agent_bin()?;
    Ok(match host {
        Some(h) => h.exec(bin),
        None => Command::new(bin),
    })
}

/// Runs the agent with `args` to completion (killed after `timeout`) and returns its output,
/// whatever its exit status.
pub fn run_agent<I, S>(host: Option<&Host>, args: I, timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = agent_command(host)?;
    cmd.args(args).env("RUST_LOG", "info").env("NO_COLOR", "1");
    Child::spawn(cmd)?.wait_with_timeout(timeout)
}

/// A cluster secret made by `rocks-agent keygen --out`, in a private temp directory.
#[derive(Debug)]
pub struct ClusterSecret {
    path: PathBuf,
    _dir: TempDir,
}

impl ClusterSecret {
    pub fn new() -> Result<ClusterSecret> {
        let dir = TempDir::new("secret")?;
        let path = dir.path().join("cluster.secret");
        let out = run_agent(
            None,
            [OsStr::new("keygen"), OsStr::new("--out"), path.as_os_str()],
            Duration::from_secs(10),
        )?;
        if !out.status.success() {
            bail!(
                "rocks-agent keygen failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ClusterSecret { path, _dir: dir })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What to start: `attach --cgroup ...` or `serve`, plus any further options.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    args: Vec<OsString>,
    mode: &'static str,
    env: Vec<(OsString, OsString)>,
    /// A soft open-file limit to start the agent with (the hard limit stays).
    nofile_soft: Option<u64>,
    /// A run directory chosen by the test (shared by agents started one after another);
    /// default: a fresh one per agent.
    run_dir: Option<PathBuf>,
}

impl AgentSpec {
    /// `rocks-agent attach --cgroup C1 [--cgroup C2 ...] --secret-file SECRET`.
    pub fn attach(cgroups: &[&Path], secret: &Path) -> AgentSpec {
        let mut args: Vec<OsString> = vec!["attach".into()];
        for cg in cgroups {
            args.push("--cgroup".into());
            args.push(cg.as_os_str().to_owned());
        }
        args.push("--secret-file".into());
        args.push(secret.as_os_str().to_owned());
        AgentSpec {
            args,
            mode: "attach",
            env: Vec::new(),
            nofile_soft: None,
            run_dir: None,
        }
    }

    /// `rocks-agent serve --secret-file SECRET`.
    pub fn serve(secret: &Path) -> AgentSpec {
        let args = vec![
            "serve".into(),
            "--secret-file".into(),
            secret.as_os_str().to_owned(),
        ];
        AgentSpec {
            args,
            mode: "serve",
            env: Vec::new(),
            nofile_soft: None,
            run_dir: None,
        }
    }

    /// `rocks-agent <mode> ARGS...` with nothing added but `--run-dir` (everything else may
    /// come from a `--config FILE`). `mode` is `attach` or `serve`.
    pub fn custom<I, S>(mode: &'static str, args: I) -> AgentSpec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut a: Vec<OsString> = vec![mode.into()];
        a.extend(args.into_iter().map(|s| s.as_ref().to_owned()));
        AgentSpec {
            args: a,
            mode,
            env: Vec::new(),
            nofile_soft: None,
            run_dir: None,
        }
    }

    /// Appends options (`--probe-timeout`, `300ms`, ...).
    pub fn args<I, S>(mut self, args: I) -> AgentSpec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable (e.g. `RUST_LOG`; the default is `info`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> AgentSpec {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Starts the agent with this soft open-file limit, as under a service manager whose
    /// default is low (systemd's is 1024); the hard limit is left as it is.
    pub fn open_file_limit(mut self, soft: u64) -> AgentSpec {
        self.nofile_soft = Some(soft);
        self
    }

    /// Uses this run directory instead of a fresh one, so a later agent can take over what
    /// this one leaves pinned. The test then owns the leftovers (`rocks-agent detach`).
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> AgentSpec {
        self.run_dir = Some(dir.into());
        self
    }

    /// Starts the agent in `host` and waits until its control socket answers `status`.
    pub fn start(self, host: &Host) -> Result<Agent> {
        Agent::start(host, self)
    }
}

/// Makes the command's child lower its soft RLIMIT_NOFILE to `soft` before it execs.
fn set_soft_nofile(cmd: &mut Command, soft: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only calls getrlimit(2) and setrlimit(2) (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = soft.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running agent. Dropping it sends SIGTERM and waits for the exit (SIGKILL after a bound).
#[derive(Debug)]
pub struct Agent {
    // Field order matters for the drops after `Drop::drop`: the process first, then its
    // cgroup (which kills anything left in it), then the run directory.
    child: Child,
    cgroup: TestCgroup,
    run_dir: PathBuf,
    _dir: TempDir,
    host_name: String,
    mode: &'static str,
    exit: Option<ExitStatus>,
    /// Whether the run directory is this agent's own (then so are its pins on bpffs).
    own_run_dir: bool,
}

impl Agent {
    fn start(host: &Host, spec: AgentSpec) -> Result<Agent> {
        let dir = TempDir::new(&format!("agent-{}", host.label()))?;
        static STALE_PINS: std::sync::Once = std::sync::Once::new();
        STALE_PINS.call_once(crate::bpf::cleanup_stale_pins);
        // Not created here: the agent makes its own run directory.
        let own_run_dir = spec.run_dir.is_none();
        let run_dir = spec
            .run_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("run"));
        let cgroup = TestCgroup::new()?;
        let mut cmd = host.exec(agent_bin()?);
        cmd.args(&spec.args)
            .arg("--run-dir")
            .arg(&run_dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        join_cgroup(&mut cmd, cgroup.path())?;
        if let Some(soft) = spec.nofile_soft {
            set_soft_nofile(&mut cmd, soft);
        }
        let child = Child::spawn(cmd)?;
        let mut agent = Agent {
            child,
            cgroup,
            run_dir,
            _dir: dir,
            host_name: host.name().to_owned(),
            own_run_dir,
            mode: spec.mode,
            exit: None,
        };
        agent.wait_ready(START_TIMEOUT)?;
        Ok(agent)
    }

    /// Polls `status --json` until it answers; fails early if the agent exits.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "rocks-agent {} in {} exited at start ({st}):\n{}",
                    self.mode,
                    self.host_name,
                    self.log()
                );
            }
            // Cheap pre-check: no socket yet means no answer yet.
            if self.control_socket().exists() {
                match self.status_json_within(Duration::from_secs(5)) {
                    Ok(v) if v["mode"] == self.mode => return Ok(()),
                    Ok(v) => last_err = Some(anyhow::anyhow!("unexpected status: {v}")),
                    Err(e) => last_err = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let why = last_err
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_else(|| "no control socket".into());
                bail!(
                    "rocks-agent {} in {} not ready after {timeout:?} ({why}):\n{}",
                    self.mode,
                    self.host_name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `<run-dir>/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's own cgroup.
    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// `rocks-agent status --json --run-dir <run-dir>`, parsed.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        self.status_json_within(Duration::from_secs(10))
    }

    fn status_json_within(&self, timeout: Duration) -> Result<serde_json::Value> {
        let out = run_agent(
            None,
            [
                OsStr::new("status"),
                OsStr::new("--json"),
                OsStr::new("--run-dir"),
                self.run_dir.as_os_str(),
            ],
            timeout,
        )?;
        if !out.status.success() {
            bail!(
                "rocks-agent status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "status --json printed: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `status_json()[group][name]` as a number (e.g. `counter("kernel", "redirected")`).
    pub fn counter(&self, group: &str, name: &str) -> Result<u64> {
        let v = self.status_json()?;
        v[group][name]
            .as_u64()
            .with_context(|| format!("status has no number {group}.{name}: {v}"))
    }

    /// Everything the agent logged (stderr) so far.
    pub fn log(&self) -> String {
        self.child.stderr_text()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        if wait_until(timeout, || self.log().contains(needle)) {
            return Ok(self.log());
        }
        bail!(
            "rocks-agent in {} never logged {needle:?} within {timeout:?}:\n{}",
            self.host_name,
            self.log()
        )
    }

    /// Sends SIGTERM and waits for the agent to exit; returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.exit {
            return Ok(st);
        }
        if self.child.try_wait()?.is_none() {
            self.child.signal(Signal::SIGTERM)?;
        }
        let out = self.child.wait_with_timeout(STOP_TIMEOUT)?;
        self.exit = Some(out.status);
        Ok(out.status)
    }

    /// SIGKILL, as the OOM killer would: the agent cannot detach, and leaves its programs
    /// attached and pinned. Returns the exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.exit {
            return Ok(st);
        }
        if self.child.try_wait()?.is_none() {
            self.child.signal(Signal::SIGKILL)?;
        }
        let out = self.child.wait_with_timeout(STOP_TIMEOUT)?;
        self.exit = Some(out.status);
        Ok(out.status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exit.is_none()
            && let Err(e) = self.stop()
        {
            eprintln!(
                "rocks-e2e: stopping rocks-agent in {}: {e:#}",
                self.host_name
            );
        }
        // An agent that did not exit cleanly (killed, crashed, or --on-exit keep) leaves its
        // programs pinned on bpffs; they must not outlive the test.
        if self.mode == "attach"
            && self.own_run_dir
            && !self
                .exit
                .is_some_and(|st| st.success() && !self.log().contains("--on-exit keep"))
        {
            let detach = run_agent(
                None,
                [
                    OsStr::new("detach"),
                    OsStr::new("--run-dir"),
                    self.run_dir.as_os_str(),
                ],
                Duration::from_secs(10),
            );
            if let Err(e) = detach {
                eprintln!(
                    "rocks-e2e: rocks-agent detach --run-dir {}: {e:#}",
                    self.run_dir.display()
                );
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- rocks-agent {} in {} log ---\n{}",
                self.mode,
                self.host_name,
                self.log()
            );
        }
    }
}
