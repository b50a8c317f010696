//! Running programs inside a host (network namespace) and a cgroup, with their output captured,
//! a deadline on every wait, and a kill when the test lets go of them.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::netns::Host;
use crate::util::{describe, run_checked, wait_until};

/// Makes the command's child join `cgroup` before it execs, so the program is in the cgroup
/// from its first instruction (no window where its connections escape rocks).
pub fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: the hook only calls write(2) on an fd opened beforehand (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            // "0" means the writing process itself.
            let n = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
            if n == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// A command that runs `program` in `host`'s network namespace and in `cgroup`.
pub fn command_in(host: &Host, cgroup: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
    let mut cmd = host.exec(program);
    join_cgroup(&mut cmd, cgroup)?;
    Ok(cmd)
}

/// Starts `program args...` in `host`'s network namespace and in `cgroup`, output captured.
pub fn spawn_in<I, S>(
    host: &Host,
    cgroup: &Path,
    program: impl AsRef<OsStr>,
    args: I,
) -> Result<Child>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = command_in(host, cgroup, program)?;
    cmd.args(args);
    Child::spawn(cmd)
}

/// Runs a command to completion within `timeout` and requires success; returns its output.
pub fn run(cmd: Command, timeout: Duration) -> Result<Output> {
    Child::spawn(cmd)?.wait_success(timeout)
}

/// Waits until something listens on TCP `port` (any address) inside `host`, by polling
/// `ss -ltn` there. Polling `ss` rather than connecting, so a server that counts its
/// connections does not see a stray one.
pub fn wait_for_tcp_listen(host: &Host, port: u16, timeout: Duration) -> Result<()> {
    let mut last_err = None;
    let listening = wait_until(timeout, || {
        let mut cmd = host.exec("ss");
        cmd.args(["-H", "-l", "-t", "-n", "sport", "=", &format!(":{port}")]);
        match run_checked(&mut cmd) {
            Ok(out) => !out.trim().is_empty(),
            Err(e) => {
                last_err = Some(e);
                false
            }
        }
    });
    if !listening {
        let why = last_err
            .map(|e| format!(" (last error: {e:#})"))
            .unwrap_or_default();
        bail!(
            "nothing listens on TCP port {port} in {} after {timeout:?}{why}",
            host.name()
        );
    }
    Ok(())
}

/// Output collected from one pipe by a background thread.
#[derive(Default)]
struct Capture {
    buf: Mutex<Vec<u8>>,
    eof: AtomicBool,
}

impl Capture {
    fn start(mut pipe: impl Read + Send + 'static) -> Arc<Capture> {
        let cap = Arc::new(Capture::default());
        let c = Arc::clone(&cap);
        // Always drained, so a chatty child never blocks on a full pipe.
        thread::spawn(move || {
            let mut chunk = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                c.buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
            c.eof.store(true, Ordering::SeqCst);
        });
        cap
    }

    fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// A running program with captured stdout/stderr. It leads its own process group; dropping
/// the `Child` SIGKILLs that group and reaps the program.
pub struct Child {
    inner: std::process::Child,
    what: String,
    stdout: Arc<Capture>,
    stderr: Arc<Capture>,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.id())
            .field("what", &self.what)
            .finish()
    }
}

impl Child {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr captured.
    pub fn spawn(cmd: Command) -> Result<Child> {
        Child::spawn_with(cmd, Stdio::null())
    }

    /// Like [`Child::spawn`] with stdin a pipe, for programs a test keeps talking to (an ssh
    /// session carried across a fault): write through [`Child::stdin`].
    pub fn spawn_with_stdin(cmd: Command) -> Result<Child> {
        Child::spawn_with(cmd, Stdio::piped())
    }

    fn spawn_with(mut cmd: Command, stdin: Stdio) -> Result<Child> {
        let what = describe(&cmd);
        // Own process group: the drop kills helpers the program started too.
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut inner = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let stdout = Capture::start(inner.stdout.take().unwrap());
        let stderr = Capture::start(inner.stderr.take().unwrap());
        Ok(Child {
            inner,
            what,
            stdout,
            stderr,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// The program's stdin, if spawned with [`Child::spawn_with_stdin`] and not yet closed.
    pub fn stdin(&mut self) -> Option<&mut ChildStdin> {
        self.inner.stdin.as_mut()
    }

    /// Closes the program's stdin (it reads EOF).
    pub fn close_stdin(&mut self) {
        self.inner.stdin = None;
    }

    /// Everything the program wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout.text()
    }

    /// Everything the program wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Waits until stdout contains `needle`; fails if the program exits first or on timeout.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let mut exited = None;
        let found = wait_until(timeout, || {
            if self.stdout.text().contains(needle) {
                return true;
            }
            exited = self.try_wait().ok().flatten();
            exited.is_some() && self.stdout.eof.load(Ordering::SeqCst)
        });
        let out = self.stdout.text();
        if found && out.contains(needle) {
            return Ok(out);
        }
        let state = match exited {
            Some(st) => format!("exited ({st})"),
            None => format!("did not within {timeout:?}"),
        };
        bail!(
            "{} never printed {needle:?}: {state}{}",
            self.what,
            self.context()
        )
    }

    /// The exit status if the program has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.inner.try_wait()?;
        }
        Ok(self.status)
    }

    /// Sends `sig` to the program (not to its process group).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.id() as i32), sig).with_context(|| format!("kill {}", self.id()))
    }

    /// Waits for the program to exit within `timeout` and returns its status and output,
    /// whatever the status. On timeout the program is killed and the error carries its
    /// stderr.
    pub fn wait_with_timeout(&mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "{} did not finish within {timeout:?}{}",
                    self.what,
                    self.context()
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        // The pipes close right after exit, unless a process the program left behind holds
        // them; do not wait long for those.
        wait_until(Duration::from_millis(500), || {
            self.stdout.eof.load(Ordering::SeqCst) && self.stderr.eof.load(Ordering::SeqCst)
        });
        Ok(Output {
            status,
            stdout: self.stdout.bytes(),
            stderr: self.stderr.bytes(),
        })
    }

    /// Like [`Child::wait_with_timeout`], and also fails if the program exited unsuccessfully.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<Output> {
        let out = self.wait_with_timeout(timeout)?;
        if !out.status.success() {
            bail!("{} failed ({}){}", self.what, out.status, self.context());
        }
        Ok(out)
    }

    /// SIGKILLs the program's process group and reaps the program. Once the program has
    /// been reaped its pid (= group id) may be reused by an unrelated process, so the group
    /// is only signalled before that; anything it left behind in a test host dies with the
    /// [`crate::Topology`].
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = killpg(Pid::from_raw(self.id() as i32), Signal::SIGKILL);
            let _ = self.inner.kill();
            self.status = self.inner.wait().ok();
        }
    }

    /// The captured output for an error message, the tail only when it is long.
    fn context(&self) -> String {
        let tail = |s: String| {
            let s = s.trim().to_owned();
            match s.char_indices().rev().nth(4000) {
                Some((i, _)) => format!("...{}", &s[i..]),
                None => s,
            }
        };
        format!(
            "\n--- stderr ---\n{}\n--- stdout ---\n{}",
            tail(self.stderr.text()),
            tail(self.stdout.text())
        )
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}
