//! Finding and validating cgroup v2 directories.
//!
//! Paths are taken as the operator gives them; the cgroup2 mount is discovered from
//! `/proc/self/mounts` (hybrid hosts mount it at `/sys/fs/cgroup/unified`, pure v2 hosts at
//! `/sys/fs/cgroup`), never assumed.
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup path {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cgroup path {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory (it is not on a cgroup2 filesystem{hint})")]
    NotCgroup2 { path: PathBuf, hint: String },
    #[error("cannot open cgroup {path}")]
    Open { path: PathBuf, #[source] source: io::Error },
    #[error("no cgroup2 filesystem is mounted (see /proc/self/mounts); rocks needs cgroup v2")]
    NoCgroup2Mount,
    #[error("cannot read {what}")]
    Read { what: &'static str, #[source] source: io::Error },
}

/// Where the cgroup2 filesystem is mounted.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|source| CgroupError::Read { what: "/proc/self/mounts", source })?;
    parse_cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroup2Mount)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/self/mounts` escapes spaces and a few other bytes as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A validated cgroup v2 directory, opened for attaching programs.
#[derive(Debug)]
pub struct CgroupDir {
    pub path: PathBuf,
    pub file: File,
}

/// Opens `path` after checking it is an existing cgroup v2 directory.
pub fn open(path: &Path) -> Result<CgroupDir, CgroupError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CgroupError::NotFound { path: path.to_owned() });
        }
        Err(source) => return Err(CgroupError::Open { path: path.to_owned(), source }),
    };
    if !meta.is_dir() {
        return Err(CgroupError::NotADirectory { path: path.to_owned() });
    }
    let fs = statfs(path).map_err(|e| CgroupError::Open { path: path.to_owned(), source: e.into() })?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        let hint = match cgroup2_mount() {
            Ok(mount) => format!("; cgroup2 is mounted at {}", mount.display()),
            Err(_) => "; no cgroup2 filesystem is mounted".to_owned(),
        };
        return Err(CgroupError::NotCgroup2 { path: path.to_owned(), hint });
    }
    let file = File::open(path).map_err(|source| CgroupError::Open { path: path.to_owned(), source })?;
    Ok(CgroupDir { path: path.to_owned(), file })
}

/// The cgroup v2 directory this process belongs to. The agent's own accepted sockets belong to
/// it, so `sock_ops` must also be attached there for the fast path to see them.
pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|source| CgroupError::Read { what: "/proc/self/cgroup", source })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/');
    Ok(mount.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
    }

    #[test]
    fn missing_and_non_cgroup_paths_are_refused() {
        let err = open(Path::new("/nonexistent/rocks-cgroup")).unwrap_err();
        assert!(matches!(err, CgroupError::NotFound { .. }), "{err}");
        let err = open(Path::new("/proc")).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
        let err = open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, CgroupError::NotADirectory { .. }), "{err}");
    }
}
