//! The agent's programs on its cgroups, as BPF links pinned on bpffs (see [`crate::pin`]).
//!
//! A pinned link stays attached when the agent process ends. The next agent of the same run
//! directory finds it and swaps its own, just loaded, program in with `BPF_LINK_UPDATE`: the
//! hook is never without a program and never runs two, and the link (its id) stays the same.
//! Only what changed between the two agents' cgroup sets is attached or detached.
use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya_obj::generated::bpf_attach_type;
use rocks_common::names;
use tracing::{debug, info, warn};

use crate::{
    bpf_sys,
    cgroup::CgroupDir,
    pin::{self, PinDir, PinError},
};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("cannot read the id of cgroup {0}")]
    CgroupId(PathBuf, #[source] io::Error),
    #[error("cannot attach {program} to cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot pin the link of {program} at {path}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("eBPF program {0} is not loaded")]
    NoProgram(&'static str),
}

/// The hook each program of ours attaches to.
pub fn attach_type(program: &str) -> Option<bpf_attach_type> {
    Some(match program {
        names::PROG_CONNECT4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        names::PROG_CONNECT6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        names::PROG_GETPEERNAME4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        names::PROG_GETPEERNAME6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
        names::PROG_SOCK_OPS => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        names::PROG_SOCK_RELEASE => bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE,
        _ => return None,
    })
}

/// The programs every target cgroup gets (sock_ops aside, see [`wanted`]).
const SOCK_ADDR_PROGRAMS: [&str; 5] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    // Not a sock_addr program, but wanted wherever they are: it forgets what connect4/6
    // recorded once the socket is gone.
    names::PROG_SOCK_RELEASE,
];

/// One program on one cgroup.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    pub cgroup: &'a CgroupDir,
    pub cgroup_id: u64,
    pub program: &'static str,
}

/// What the agent attaches: the connect and getpeername programs on each target cgroup, and
/// `sock_ops` on each target and on the agent's own cgroup (its accepted sockets live there),
/// once per subtree: a cgroup inside another that has it already would run it twice.
pub fn wanted<'a>(
    targets: &'a [CgroupDir],
    own: Option<&'a CgroupDir>,
) -> Result<Vec<Wanted<'a>>, LinkError> {
    let id = |cg: &CgroupDir| {
        pin::cgroup_id(&cg.file).map_err(|e| LinkError::CgroupId(cg.path.clone(), e))
    };
    let mut out = Vec::new();
    for cg in targets {
        let cgroup_id = id(cg)?;
        for program in SOCK_ADDR_PROGRAMS {
            out.push(Wanted {
                cgroup: cg,
                cgroup_id,
                program,
            });
        }
        let covered_by_own = own.is_some_and(|own| cg.path.starts_with(&own.path));
        if !covered_by_own {
            out.push(Wanted {
                cgroup: cg,
                cgroup_id,
                program: names::PROG_SOCK_OPS,
            });
        }
    }
    if let Some(own) = own {
        let covered_by_target = targets.iter().any(|t| own.path.starts_with(&t.path));
        if !covered_by_target {
            out.push(Wanted {
                cgroup: own,
                cgroup_id: id(own)?,
                program: names::PROG_SOCK_OPS,
            });
        }
    }
    // The same cgroup given twice gets each program once.
    out.sort_by_key(|w| (w.cgroup_id, w.program));
    out.dedup_by_key(|w| (w.cgroup_id, w.program));
    Ok(out)
}

/// A link this agent holds open (and pinned).
#[derive(Debug)]
pub struct HeldLink {
    pub cgroup: PathBuf,
    pub program: &'static str,
    pub id: u32,
    fd: OwnedFd,
}

/// What [`reconcile`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Links of an earlier agent now running this agent's programs.
    pub reused: usize,
    /// Links made now.
    pub attached: usize,
    /// Links of an earlier agent removed: their cgroup is no longer wanted, or gone.
    pub removed: usize,
}

/// Makes the pinned links exactly `wanted`, each running this agent's program, whose fd
/// `program_fd` gives. Links made or reused are pushed onto `held` as soon as they exist, so
/// a failure half-way leaves nothing that the caller cannot detach.
pub fn reconcile<'p>(
    pins: &PinDir,
    wanted: &[Wanted<'_>],
    program_fd: impl Fn(&'static str) -> Option<BorrowedFd<'p>>,
    held: &mut Vec<HeldLink>,
) -> Result<Reconciled, LinkError> {
    let mut done = Reconciled::default();
    for stale in pins.links()? {
        let still_wanted = wanted
            .iter()
            .any(|w| w.cgroup_id == stale.cgroup_id && w.program == stale.program);
        if !still_wanted {
            detach_pinned(pins, &stale.path)?;
            info!(cgroup_id = stale.cgroup_id, program = %stale.program, "detached a link an earlier agent left on a cgroup no longer given");
            done.removed += 1;
        }
    }
    for w in wanted {
        let prog = program_fd(w.program).ok_or(LinkError::NoProgram(w.program))?;
        let expected = attach_type(w.program).expect("every wanted program has a hook") as u32;
        let path = pins.link_path(w.cgroup_id, w.program)?;
        if path.exists() {
            match reuse(&path, w, expected, prog) {
                Ok(link) => {
                    held.push(link);
                    done.reused += 1;
                    continue;
                }
                Err(why) => {
                    warn!(path = %path.display(), "replacing a pinned link: {why}");
                    detach_pinned(pins, &path)?;
                    done.removed += 1;
                }
            }
        }
        let fd = bpf_sys::link_create_cgroup(
            prog,
            w.cgroup.file.as_fd(),
            attach_type(w.program).expect("hook"),
        )
        .map_err(|source| LinkError::Attach {
            program: w.program,
            cgroup: w.cgroup.path.clone(),
            source,
        })?;
        let id = bpf_sys::cgroup_link_info(fd.as_fd())
            .map(|i| i.id)
            .unwrap_or(0);
        let link = HeldLink {
            cgroup: w.cgroup.path.clone(),
            program: w.program,
            id,
            fd,
        };
        // Held before pinning: if the pin fails, detaching still finds it.
        held.push(link);
        let link = held.last().expect("just pushed");
        bpf_sys::obj_pin(link.fd.as_fd(), &path).map_err(|source| LinkError::PinLink {
            program: w.program,
            path: path.clone(),
            source,
        })?;
        debug!(cgroup = %w.cgroup.path.display(), program = w.program, link_id = id, "attached and pinned");
        done.attached += 1;
    }
    Ok(done)
}

/// Takes over the link pinned at `path` when it still sits on the wanted cgroup and hook.
fn reuse(
    path: &Path,
    w: &Wanted<'_>,
    expected: u32,
    prog: BorrowedFd<'_>,
) -> Result<HeldLink, String> {
    let fd = bpf_sys::obj_get(path).map_err(|e| format!("cannot open it: {e}"))?;
    let info =
        bpf_sys::cgroup_link_info(fd.as_fd()).map_err(|e| format!("cannot read its info: {e}"))?;
    if info.cgroup_id != w.cgroup_id || info.attach_type != expected {
        // A cgroup id of 0 means the cgroup was removed under the link.
        return Err(format!(
            "it is on cgroup id {} hook {}, not cgroup id {} hook {expected}",
            info.cgroup_id, info.attach_type, w.cgroup_id
        ));
    }
    let old_tag = bpf_sys::prog_tag_by_id(info.prog_id).ok();
    let new_tag = bpf_sys::prog_tag(prog).ok();
    bpf_sys::link_update(fd.as_fd(), prog).map_err(|e| format!("BPF_LINK_UPDATE failed: {e}"))?;
    debug!(
        cgroup = %w.cgroup.path.display(),
        program = w.program,
        link_id = info.id,
        same_code = old_tag.is_some() && old_tag == new_tag,
        "reused the pinned link, with this agent's program swapped in"
    );
    Ok(HeldLink {
        cgroup: w.cgroup.path.clone(),
        program: w.program,
        id: info.id,
        fd,
    })
}

/// Detaches the link pinned at `path` now and removes the pin. Detaching explicitly, rather
/// than only dropping the last reference, takes effect even if some process still holds it.
pub fn detach_pinned(pins: &PinDir, path: &Path) -> Result<(), LinkError> {
    if let Ok(fd) = bpf_sys::obj_get(path) {
        let _ = bpf_sys::link_detach(fd.as_fd());
    }
    Ok(pins.unpin(path)?)
}

/// Detaches the links this agent holds. Their pins go with [`PinDir::remove`].
pub fn detach_held(held: Vec<HeldLink>) {
    for link in held {
        if let Err(e) = bpf_sys::link_detach(link.fd.as_fd()) {
            warn!(cgroup = %link.cgroup.display(), program = link.program, error = %e, "detaching a link failed");
        }
    }
}

/// What `rocks-agent detach` removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub cgroups: usize,
}

/// Detaches every link pinned in `pins` and removes the whole pin directory, maps included:
/// the leftovers of an agent that was killed or exited with `--on-exit keep`.
pub fn remove_all(pins: &PinDir) -> Result<Removed, LinkError> {
    let links = pins.links()?;
    let mut cgroups: Vec<u64> = links.iter().map(|l| l.cgroup_id).collect();
    cgroups.dedup();
    for link in &links {
        detach_pinned(pins, &link.path)?;
    }
    pins.remove()?;
    Ok(Removed {
        links: links.len(),
        cgroups: cgroups.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain directories stand in for cgroups: only paths and inode numbers matter here.
    fn dirs(names: &[&str]) -> (PathBuf, Vec<CgroupDir>) {
        let root = std::env::temp_dir().join(format!(
            "rocks-links-test-{}-{}",
            std::process::id(),
            names.join("+")
        ));
        let _ = std::fs::remove_dir_all(&root);
        let out = names
            .iter()
            .map(|n| {
                let path = root.join(n);
                std::fs::create_dir_all(&path).unwrap();
                CgroupDir {
                    file: std::fs::File::open(&path).unwrap(),
                    path,
                }
            })
            .collect();
        (root, out)
    }

    fn summary(wanted: &[Wanted<'_>], root: &Path) -> Vec<(String, &'static str)> {
        let mut out: Vec<_> = wanted
            .iter()
            .map(|w| {
                (
                    w.cgroup
                        .path
                        .strip_prefix(root)
                        .unwrap()
                        .display()
                        .to_string(),
                    w.program,
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_target_gets_all_hooks_and_sock_ops_goes_once_per_subtree() {
        let (root, cgs) = dirs(&["app", "agent", "app/child"]);
        let (app, agent, child) = (&cgs[0], &cgs[1], &cgs[2]);
        let all = |cg: &str| {
            let mut v: Vec<(String, &'static str)> = SOCK_ADDR_PROGRAMS
                .iter()
                .map(|p| (cg.to_owned(), *p))
                .collect();
            v.push((cg.to_owned(), names::PROG_SOCK_OPS));
            v.sort();
            v
        };

        // The agent in a cgroup of its own: sock_ops on both.
        let w = wanted(std::slice::from_ref(app), Some(agent)).unwrap();
        let mut want = all("app");
        want.push(("agent".to_owned(), names::PROG_SOCK_OPS));
        want.sort();
        assert_eq!(summary(&w, &root), want);

        // The agent inside a target: that target's sock_ops covers it.
        let w = wanted(std::slice::from_ref(app), Some(child)).unwrap();
        assert_eq!(summary(&w, &root), all("app"));

        // A target inside the agent's cgroup: sock_ops on the agent's cgroup only.
        let w = wanted(std::slice::from_ref(child), Some(app)).unwrap();
        let mut want: Vec<_> = SOCK_ADDR_PROGRAMS
            .iter()
            .map(|p| ("app/child".to_owned(), *p))
            .collect();
        want.push(("app".to_owned(), names::PROG_SOCK_OPS));
        want.sort();
        assert_eq!(summary(&w, &root), want);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_cgroup_given_twice_is_attached_once() {
        let (root, cgs) = dirs(&["twice"]);
        let again = CgroupDir {
            file: std::fs::File::open(&cgs[0].path).unwrap(),
            path: cgs[0].path.clone(),
        };
        let targets = [cgs.into_iter().next().unwrap(), again];
        let w = wanted(&targets, None).unwrap();
        assert_eq!(w.len(), SOCK_ADDR_PROGRAMS.len() + 1);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn every_program_has_its_hook() {
        for p in SOCK_ADDR_PROGRAMS.iter().chain([&names::PROG_SOCK_OPS]) {
            assert!(attach_type(p).is_some(), "{p}");
        }
        assert_eq!(attach_type(names::PROG_SK_MSG), None);
    }
}
