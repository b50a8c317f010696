//! The kernel feature probe run before anything is loaded, so a kernel that lacks something
//! gets one clear error naming it instead of a verifier dump half-way through attaching.
//!
//! Each feature the agent uses is probed itself (a tiny program loaded for the hook, a map
//! created, a helper called from the program type that uses it), not inferred from the version
//! number: distribution kernels backport features, and a kernel can be built without some.
//! The release only appears in the message.
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};
use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_prog_type};

use crate::bpf_sys;

/// The oldest kernel with every feature in [`FEATURES`] (the newest of their `since`).
pub const MIN_KERNEL: &str = "5.15";

/// One thing the agent needs from the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// What it is, as the error names it.
    pub name: &'static str,
    /// The mainline release that brought it.
    pub since: &'static str,
    probe: Probe,
}

#[derive(Clone, Copy, Debug)]
enum Probe {
    /// A trivial program of this type loads for this hook.
    Hook(bpf_prog_type, bpf_attach_type),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// `BPF_LINK_CREATE` for a cgroup hook.
    CgroupLinks,
    /// A `bpf(2)` command exists.
    Command(bpf_cmd),
    NetnsCookieSockopt,
}

use bpf_attach_type::*;
use bpf_prog_type::*;

/// Everything the agent uses, oldest first.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "sock_ops programs",
        since: "4.13",
        probe: Probe::Hook(BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS),
    },
    Feature {
        name: "cgroup connect4 hooks",
        since: "4.17",
        probe: Probe::Hook(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    },
    Feature {
        name: "cgroup connect6 hooks",
        since: "4.17",
        probe: Probe::Hook(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT),
    },
    Feature {
        name: "sk_msg programs",
        since: "4.17",
        probe: Probe::Hook(BPF_PROG_TYPE_SK_MSG, BPF_SK_MSG_VERDICT),
    },
    Feature {
        name: "sockhash maps",
        since: "4.18",
        probe: Probe::Map(MapType::SockHash),
    },
    Feature {
        name: "bpf_sock_hash_update from sock_ops",
        since: "4.18",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    },
    Feature {
        name: "bpf_msg_redirect_hash from sk_msg",
        since: "4.18",
        probe: Probe::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    },
    Feature {
        name: "bpf_get_socket_cookie from cgroup sock_addr programs",
        since: "5.0",
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
    },
    Feature {
        name: "bpf_sk_lookup_tcp from cgroup sock_addr programs",
        since: "5.2",
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_lookup_tcp,
        ),
    },
    Feature {
        name: "BPF links for cgroup hooks",
        since: "5.7",
        probe: Probe::CgroupLinks,
    },
    Feature {
        name: "bpf_get_netns_cookie from cgroup sock_addr programs",
        since: "5.7",
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    },
    Feature {
        name: "bpf_get_current_ancestor_cgroup_id from cgroup sock_addr programs",
        since: "5.7",
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
    },
    Feature {
        name: "cgroup getpeername4 hooks",
        since: "5.8",
        probe: Probe::Hook(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_GETPEERNAME),
    },
    Feature {
        name: "cgroup getpeername6 hooks",
        since: "5.8",
        probe: Probe::Hook(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_GETPEERNAME),
    },
    Feature {
        name: "cgroup sock_release hooks",
        since: "5.9",
        probe: Probe::Hook(BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_RELEASE),
    },
    Feature {
        name: "BPF_LINK_DETACH",
        since: "5.9",
        probe: Probe::Command(bpf_cmd::BPF_LINK_DETACH),
    },
    Feature {
        name: "the SO_NETNS_COOKIE socket option",
        since: "5.14",
        probe: Probe::NetnsCookieSockopt,
    },
    Feature {
        name: "bpf_get_netns_cookie from sock_ops",
        since: "5.15",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(
        "this kernel ({release}) lacks {feature} (Linux {since}); rocks needs Linux {MIN_KERNEL} or newer \
         with BPF, cgroup BPF and sockmap enabled"
    )]
    Missing {
        release: String,
        feature: &'static str,
        since: &'static str,
    },
    #[error("the kernel feature probe failed for {feature}: {why}")]
    Unknown { feature: &'static str, why: String },
}

fn probe_one(feature: &Feature) -> Result<bool, String> {
    match feature.probe {
        Probe::Hook(prog_type, attach_type) => {
            match bpf_sys::load_trivial(prog_type, attach_type) {
                Ok(_) => Ok(true),
                // Unknown program type or hook (E2BIG: an attr field this kernel does not know).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        }
        Probe::Map(map_type) => is_map_supported(map_type).map_err(|e| e.to_string()),
        Probe::Helper(prog_type, helper) => {
            is_helper_supported(prog_type, helper).map_err(|e| e.to_string())
        }
        Probe::CgroupLinks => {
            let prog =
                bpf_sys::load_trivial(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT)
                    .map_err(|e| e.to_string())?;
            Ok(bpf_sys::cgroup_links_supported(
                std::os::fd::AsFd::as_fd(&prog),
                BPF_CGROUP_INET4_CONNECT,
            ))
        }
        Probe::Command(cmd) => Ok(bpf_sys::command_exists(cmd)),
        Probe::NetnsCookieSockopt => match crate::redirect::netns_cookie() {
            Ok(_) => Ok(true),
            Err(crate::redirect::RedirectError::NetnsCookie(e))
                if e.raw_os_error() == Some(libc::ENOPROTOOPT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        },
    }
}

/// The first feature `has` says is missing, as the error to show.
pub fn first_missing(
    release: &str,
    features: &[Feature],
    mut has: impl FnMut(&Feature) -> Result<bool, String>,
) -> Result<(), KernelError> {
    for feature in features {
        match has(feature) {
            Ok(true) => {}
            Ok(false) => {
                return Err(KernelError::Missing {
                    release: release.to_owned(),
                    feature: feature.name,
                    since: feature.since,
                });
            }
            Err(why) => {
                return Err(KernelError::Unknown {
                    feature: feature.name,
                    why,
                });
            }
        }
    }
    Ok(())
}

/// Probes the running kernel for everything in [`FEATURES`]. Needs the privileges to load
/// programs (check those first, so a missing capability is not reported as a missing feature).
pub fn probe() -> Result<(), KernelError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown release".to_owned());
    first_missing(&release, FEATURES, probe_one)?;
    let names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
    tracing::debug!(kernel = %release, features = names.join(", "), "kernel feature probe passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_missing_feature_and_the_minimum_kernel() {
        let err =
            first_missing("5.4.0-150-generic", FEATURES, |f| Ok(f.since != "5.8")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this kernel (5.4.0-150-generic) lacks cgroup getpeername4 hooks (Linux 5.8); rocks needs \
             Linux 5.15 or newer with BPF, cgroup BPF and sockmap enabled"
        );
    }

    #[test]
    fn all_present_passes_and_probe_failures_say_which_feature() {
        assert_eq!(first_missing("6.1.0", FEATURES, |_| Ok(true)), Ok(()));
        let err = first_missing("6.1.0", FEATURES, |_| Err("EPERM".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel feature probe failed for sock_ops programs: EPERM"
        );
    }

    #[test]
    fn the_minimum_kernel_is_the_newest_feature() {
        let version = |s: &str| -> (u32, u32) {
            let (a, b) = s.split_once('.').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let newest = FEATURES.iter().map(|f| version(f.since)).max().unwrap();
        assert_eq!(newest, version(MIN_KERNEL));
        // Listed oldest first, so the error names the oldest thing missing.
        assert!(
            FEATURES
                .windows(2)
                .all(|w| version(w[0].since) <= version(w[1].since))
        );
    }
}
