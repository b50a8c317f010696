//! The kernel feature probe run before anything is loaded, so an old kernel gets one clear
//! error naming what is missing instead of a verifier dump.
use std::path::Path;

/// The oldest kernel with everything the programs use: cgroup connect/getpeername hooks (5.8),
/// sockhash + sk_msg, and `bpf_get_netns_cookie` from sock_ops (5.15), which keeps agents in
/// different network namespaces apart.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(
        "kernel {release} is too old: rocks needs Linux {}.{} or newer ({feature})",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    TooOld { release: String, feature: &'static str },
    #[error("cannot parse kernel release {0:?}")]
    Unparsable(String),
    #[error("this kernel has no BPF syscall or it is disabled ({0})")]
    NoBpf(String),
}

/// Checks a kernel release string such as `6.1.0-27-amd64`.
pub fn check_release(release: &str) -> Result<(), KernelError> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(|| KernelError::Unparsable(release.into()))?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(|| KernelError::Unparsable(release.into()))?;
    if (major, minor) < MIN_KERNEL {
        let feature = if (major, minor) < (5, 8) {
            "cgroup getpeername hooks arrived in 5.8"
        } else {
            "bpf_get_netns_cookie in sock_ops arrived in 5.15"
        };
        return Err(KernelError::TooOld { release: release.into(), feature });
    }
    Ok(())
}

/// Probes the running kernel.
pub fn probe() -> Result<(), KernelError> {
    let uname = nix::sys::utsname::uname().map_err(|e| KernelError::Unparsable(e.to_string()))?;
    check_release(&uname.release().to_string_lossy())?;
    if !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        return Err(KernelError::NoBpf("no /proc/sys/kernel/unprivileged_bpf_disabled".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_supported_kernels() {
        for r in ["5.15.0", "6.1.0-27-amd64", "6.12.117+deb13-amd64", "6.18.44-fc-v657", "10.0"] {
            assert_eq!(check_release(r), Ok(()), "{r}");
        }
    }

    #[test]
    fn refuses_old_kernels_naming_the_feature() {
        let err = check_release("5.10.0-30-amd64").unwrap_err();
        assert!(err.to_string().contains("bpf_get_netns_cookie"), "{err}");
        let err = check_release("4.19.0").unwrap_err();
        assert!(err.to_string().contains("getpeername"), "{err}");
        assert!(matches!(check_release("garbage"), Err(KernelError::Unparsable(_))));
    }
}
