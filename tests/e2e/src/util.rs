//! Small shared helpers: running a short command and checking it, polling with a deadline,
//! unique names, temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A number unique within this process, for names of namespaces, cgroups and directories.
pub fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs a short helper command (ip, nft, ss...) to completion and returns its stdout; a
/// failure becomes an error that names the command and carries its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    check_output(cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` (iproute2) with the given arguments, like [`run_checked`].
pub fn ip(args: &[&str]) -> Result<String> {
    run_checked(Command::new("ip").args(args))
}

pub(crate) fn check_output(cmd: &Command, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The command line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
/// Tests wait for conditions this way instead of sleeping for a guessed time.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(|| {
            cleanup_stale_tempdirs();
        });
        let path = std::env::temp_dir().join(format!(
            "rocks-e2e-{}-{}-{tag}",
            std::process::id(),
            next_id()
        ));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        // Private: it holds private keys.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes temp directories of our naming scheme whose creating process is gone.
pub fn cleanup_stale_tempdirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("rocks-e2e-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // mtime is at or after creation, so this errs on the side of keeping the directory.
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if !pid_alive_since(pid, modified) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether a process with this pid is running. A zombie counts as dead: after a test run is
/// SIGKILLed its zombie may linger until someone reaps it, and it must not keep its
/// namespaces and cgroups alive.
pub fn pid_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Whether `pid` is running and started no later than `time` (with 2 s of slack for the
/// 1-second resolution of the boot time). A process that started after a resource was made
/// cannot have made it: its pid was reused.
pub fn pid_alive_since(pid: i32, time: std::time::SystemTime) -> bool {
    let started = || -> Option<std::time::SystemTime> {
        let (_, ticks) = proc_stat(pid)?;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let btime: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let since_boot =
            Duration::from_secs(ticks / hz) + Duration::from_secs(ticks % hz) / hz as u32;
        Some(std::time::UNIX_EPOCH + Duration::from_secs(btime) + since_boot)
    };
    pid_alive(pid) && started().is_none_or(|s| s <= time + Duration::from_secs(2))
}

/// State letter and start time (clock ticks after boot) from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of proc_pid_stat(5), the 20th after the name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn liveness_and_pid_reuse() {
        let me = std::process::id() as i32;
        assert!(pid_alive(me));
        assert!(pid_alive_since(me, SystemTime::now()));
        // We started long after 1970: we cannot have made something made then.
        assert!(!pid_alive_since(me, UNIX_EPOCH));
        assert!(!pid_alive(i32::MAX));
    }
}
