//! Throwaway cgroup2 directories for the processes a test wants rocks to keep.
//!
//! The cgroup2 mount point differs between machines (`/sys/fs/cgroup` on a unified layout,
//! `/sys/fs/cgroup/unified` on a hybrid one), so it is read from `/proc/self/mounts`.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{next_id, pid_alive_since, wait_until};

const NAME_PREFIX: &str = "rocks-test-";

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(dir)))
        })
        .next()
        .context("no cgroup2 filesystem mounted (see /proc/self/mounts)")
}

/// /proc/self/mounts writes space, tab, newline and backslash in paths as `\ooo` octal.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child cgroup `<cgroup2 mount>/rocks-test-<pid>-<n>`. On drop, every process still in it
/// (or in cgroups below it) is killed and the directories are removed.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Result<TestCgroup> {
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            if let Err(e) = cleanup_stale() {
                eprintln!("rocks-e2e: cleaning up stale cgroups failed: {e:#}");
            }
        });
        let path =
            cgroup2_mount()?.join(format!("{NAME_PREFIX}{}-{}", std::process::id(), next_id()));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// The cgroup's directory, what `rocks-agent attach --cgroup` takes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as seen in `/proc/<pid>/cgroup` ("0::/rocks-test-1-0").
    pub fn relative_path(&self) -> Result<PathBuf> {
        Ok(Path::new("/").join(self.path.strip_prefix(cgroup2_mount()?)?))
    }

    /// Pids of the processes directly in this cgroup.
    pub fn procs(&self) -> Result<Vec<i32>> {
        procs(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            eprintln!(
                "rocks-e2e: cannot remove cgroup {}: {e:#}",
                self.path.display()
            );
        }
    }
}

/// Removes cgroups of our naming scheme whose creating process is gone. Called once per
/// process by [`TestCgroup::new`].
pub fn cleanup_stale() -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(cgroup2_mount()?)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // The directory's mtime is at or after its creation: errs on the side of keeping it.
        let Ok(modified) = path.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if path.is_dir() && !pid_alive_since(pid, modified) && remove_tree(&path).is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

fn procs(dir: &Path) -> Result<Vec<i32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("read {}/cgroup.procs", dir.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kills everything in the cgroup tree, then removes it bottom-up.
fn remove_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    kill_all(dir);
    // rmdir fails with EBUSY while killed processes are still exiting.
    let mut last = None;
    let removed = wait_until(Duration::from_secs(3), || match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) => {
            kill_all(dir);
            last = Some(e);
            false
        }
    });
    if !removed {
        bail!(
            "rmdir {}: {}",
            dir.display(),
            last.map(|e| e.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

fn kill_all(dir: &Path) {
    // cgroup.kill (Linux 5.14+) kills atomically, including processes forking meanwhile;
    // otherwise SIGKILL whatever cgroup.procs lists.
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in procs(dir).unwrap_or_default() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount_field(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_field(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_field(r"/a\04"), r"/a\04");
    }
}
