//! Where an agent's eBPF links and state maps are pinned on bpffs, so they outlive the agent
//! process and the next agent of the same run directory finds them.
//!
//! One directory per run directory, so agents in different network namespaces (each with its
//! own `--run-dir`) never share anything:
//!
//! ```text
//! /sys/fs/bpf/rocks/<run-dir key>/maps/<MAP NAME>                 state kept across restarts
//! /sys/fs/bpf/rocks/<run-dir key>/links/<cgroup id>/<program>     one link per hook and cgroup
//! ```
//!
//! The run-dir key is the run directory made readable (`run_rocks` for `/run/rocks`) plus a
//! hash of its full path, so two run directories never share a key. Links are filed under the
//! cgroup's id (its inode number), not its path: a cgroup removed and created again under the
//! same path is a different cgroup, and its old links are stale.
//!
//! This module only knows paths and files; what is pinned, and when, is `redirect`'s business.
use std::{
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Component, Path, PathBuf},
};

use blake2::{Blake2s256, Digest};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Where bpffs is (or gets) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Our directory on it.
pub const ROOT_NAME: &str = "rocks";
/// Prefix of the (empty) directory naming the network namespace the pins belong to.
const NETNS_MARKER: &str = "netns-";
/// Room left for the hash within a file name (NAME_MAX is 255).
const READABLE_MAX: usize = 96;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "bpffs is not mounted at {BPFFS} and mounting it failed; mount it with `mount -t bpf bpf {BPFFS}` \
         (rocks pins its eBPF links and maps there so they survive an agent restart)"
    )]
    Mount(#[source] io::Error),
    #[error("cannot make the run directory {0} absolute")]
    RunDir(PathBuf, #[source] io::Error),
    #[error("cannot create {path} on bpffs")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path} on bpffs")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path} from bpffs")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the pins at {path} belong to an agent in another network namespace (netns cookie {theirs}; \
         this one is {ours}): agents in different network namespaces need different --run-dir \
         values; if that agent is gone for good, remove its leftovers with `rocks-agent detach \
         --run-dir DIR`"
    )]
    OtherNetns {
        path: PathBuf,
        theirs: u64,
        ours: u64,
    },
}

/// The pin directory of one run directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    path: PathBuf,
}

/// One pinned link as found on bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLinkFile {
    pub cgroup_id: u64,
    pub program: String,
    pub path: PathBuf,
}

/// The file-name-safe key of a run directory: bpffs refuses names with a dot, and a path has
/// slashes, so everything but `[A-Za-z0-9_-]` becomes `_`; the hash of the whole path keeps
/// run directories that read the same apart.
pub fn run_dir_key(run_dir: &Path) -> Result<String, PinError> {
    let abs = std::path::absolute(run_dir).map_err(|e| PinError::RunDir(run_dir.to_owned(), e))?;
    // `/run/rocks/`, `/run/./rocks` and `/run/rocks` are one directory.
    let normal: PathBuf = abs
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    let text = normal.to_string_lossy();
    let mut readable: String = text
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if readable.len() > READABLE_MAX {
        // Keep the end: the distinctive part of a long path is usually its last components.
        readable = readable.split_off(readable.len() - READABLE_MAX);
    }
    let hash = Blake2s256::digest(normal.as_os_str().as_encoded_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(if readable.is_empty() {
        hex
    } else {
        format!("{readable}-{hex}")
    })
}

impl PinDir {
    /// The pin directory of `run_dir` (nothing is created).
    pub fn for_run_dir(run_dir: &Path) -> Result<PinDir, PinError> {
        Ok(PinDir {
            path: Path::new(BPFFS).join(ROOT_NAME).join(run_dir_key(run_dir)?),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Mounts bpffs if needed and creates the directory tree (root-only).
    pub fn prepare(&self) -> Result<(), PinError> {
        ensure_bpffs()?;
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| PinError::Create {
                    path: dir.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// [`PinDir::prepare`], and if the directory did not exist yet, a guard that removes it
    /// again unless [`Created::keep`] is called: a start that fails half-way (after the loader
    /// pinned the maps, before any link) leaves nothing on bpffs.
    ///
    /// The directory is marked with the network namespace of the agent that made it: the run
    /// directory names the pins, and two agents in different namespaces (containers with a
    /// private `/run` but the host's bpffs) could name the same one. Pins of another namespace
    /// are refused, never taken over: their cgroups are someone else's.
    pub fn prepare_guarded(&self, netns_cookie: u64) -> Result<Created<'_>, PinError> {
        if let Some(theirs) = self.owner_netns()?
            && theirs != netns_cookie
        {
            return Err(PinError::OtherNetns {
                path: self.path.clone(),
                theirs,
                ours: netns_cookie,
            });
        }
        let fresh = !self.exists();
        self.prepare()?;
        let created = Created {
            pins: fresh.then_some(self),
        };
        let marker = self.path.join(format!("{NETNS_MARKER}{netns_cookie}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(PinError::Create {
                    path: marker,
                    source,
                });
            }
        }
        Ok(created)
    }

    /// The network namespace cookie the directory is marked with, if any.
    pub fn owner_netns(&self) -> Result<Option<u64>, PinError> {
        Ok(read_dir(&self.path)?
            .into_iter()
            .find_map(|(name, _)| name.strip_prefix(NETNS_MARKER)?.parse().ok()))
    }

    fn maps_dir(&self) -> PathBuf {
        self.path.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.path.join("links")
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where the link of `program` on the cgroup `cgroup_id` is pinned; creates its directory.
    pub fn link_path(&self, cgroup_id: u64, program: &str) -> Result<PathBuf, PinError> {
        let dir = self.links_dir().join(cgroup_id.to_string());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| PinError::Create {
                path: dir.clone(),
                source,
            })?;
        Ok(dir.join(program))
    }

    /// Every pinned link, in a stable order.
    pub fn links(&self) -> Result<Vec<PinnedLinkFile>, PinError> {
        let mut out = Vec::new();
        for (cgroup, cgroup_path) in read_dir(&self.links_dir())? {
            // Not ours (or half-written by a crash): leave it for `remove`.
            let Ok(cgroup_id) = cgroup.parse::<u64>() else {
                continue;
            };
            for (program, path) in read_dir(&cgroup_path)? {
                out.push(PinnedLinkFile {
                    cgroup_id,
                    program,
                    path,
                });
            }
        }
        out.sort_by(|a, b| (a.cgroup_id, &a.program).cmp(&(b.cgroup_id, &b.program)));
        Ok(out)
    }

    /// Removes one pinned file and, when it was the last of its cgroup, the cgroup's directory.
    pub fn unpin(&self, path: &Path) -> Result<(), PinError> {
        remove_file(path)?;
        if let Some(parent) = path.parent()
            && parent.starts_with(self.links_dir())
            && parent != self.links_dir()
        {
            // Fails while other links of the cgroup are still pinned, which is fine.
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Removes the whole pin directory. Unpinning a link whose program nobody else holds
    /// detaches it. Our root directory stays: removing it could race with another agent
    /// creating its own directory in it.
    pub fn remove(&self) -> Result<(), PinError> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PinError::Remove {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        Ok(())
    }
}

/// See [`PinDir::prepare_guarded`].
#[must_use = "dropping it removes the pin directory"]
pub struct Created<'a> {
    pins: Option<&'a PinDir>,
}

impl Created<'_> {
    /// The start succeeded: the pin directory stays.
    pub fn keep(mut self) {
        self.pins = None;
    }
}

impl Drop for Created<'_> {
    fn drop(&mut self) {
        if let Some(pins) = self.pins {
            let _ = pins.remove();
        }
    }
}

/// The id of a cgroup v2 directory, as BPF link info reports it: its inode number.
pub fn cgroup_id(file: &std::fs::File) -> io::Result<u64> {
    Ok(file.metadata()?.ino())
}

fn read_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, PinError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PinError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PinError::Read {
            path: dir.to_owned(),
            source,
        })?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    Ok(out)
}

fn remove_file(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

/// bpffs at [`BPFFS`]: mounted here if it is not yet (as `cargo xtask setup` and most
/// distributions do at boot).
pub fn ensure_bpffs() -> Result<(), PinError> {
    let at = Path::new(BPFFS);
    if is_bpffs(at) {
        return Ok(());
    }
    if !at.is_dir() {
        std::fs::create_dir_all(at).map_err(PinError::Mount)?;
    }
    mount(
        Some("bpf"),
        at,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| PinError::Mount(e.into()))?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_unique_and_valid_bpffs_names() {
        let key = run_dir_key(Path::new("/run/rocks")).unwrap();
        assert!(key.starts_with("run_rocks-"), "{key}");
        assert_eq!(key.len(), "run_rocks-".len() + 16, "{key}");
        // bpffs refuses dots; a slash would make a subdirectory.
        let odd = run_dir_key(Path::new("/tmp/x.y/ru n")).unwrap();
        assert!(
            !odd.contains('.') && !odd.contains('/') && !odd.contains(' '),
            "{odd}"
        );
        // Paths that read the same after sanitizing stay apart.
        assert_ne!(
            run_dir_key(Path::new("/a/b")).unwrap(),
            run_dir_key(Path::new("/a_b")).unwrap()
        );
        assert_ne!(
            run_dir_key(Path::new("/run/rocks")).unwrap(),
            run_dir_key(Path::new("/run/rocks2")).unwrap()
        );
    }

    #[test]
    fn keys_ignore_spelling_of_the_same_directory() {
        let key = run_dir_key(Path::new("/run/rocks")).unwrap();
        assert_eq!(run_dir_key(Path::new("/run/rocks/")).unwrap(), key);
        assert_eq!(run_dir_key(Path::new("/run/./rocks")).unwrap(), key);
        // Relative paths are taken from the current directory.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            run_dir_key(Path::new("state")).unwrap(),
            run_dir_key(&cwd.join("state")).unwrap()
        );
    }

    #[test]
    fn long_run_dirs_fit_a_file_name() {
        let long = format!("/{}", "x/".repeat(300));
        let key = run_dir_key(Path::new(&long)).unwrap();
        assert!(key.len() <= 255, "{}", key.len());
        assert!(key.len() == READABLE_MAX + 17, "{key}");
    }

    #[test]
    fn layout_under_bpffs() {
        let pins = PinDir::for_run_dir(Path::new("/run/rocks")).unwrap();
        assert!(
            pins.path().starts_with("/sys/fs/bpf/rocks/"),
            "{}",
            pins.path().display()
        );
        assert_eq!(
            pins.map_path("ROCKS_NEGATIVE_CACHE"),
            pins.path().join("maps/ROCKS_NEGATIVE_CACHE")
        );
    }
}
