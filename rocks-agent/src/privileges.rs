//! Checking up front that we may load and attach eBPF programs, so the operator gets one clear
//! sentence instead of an EPERM from deep inside the loader.
//!
//! What `attach` needs, measured on Linux 6.18 by starting it with only these in its bounding
//! set (and failing with either one missing):
//! - CAP_BPF: the bpf(2) syscall itself, loading the object's BTF, creating the maps;
//! - CAP_NET_ADMIN: loading the cgroup sock_addr, sock_ops and sk_msg programs (network
//!   program types), creating the sockhash, attaching to the cgroups, and `SO_MARK` on the
//!   agent's own sockets (which the connect hooks skip).
//!
//! CAP_SYS_ADMIN is not needed (it would stand in for both on the bpf side, but not for
//! `SO_MARK`); CAP_PERFMON is not needed either (the verifier accepts the programs without it).

const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("attach needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN (missing: {missing})")]
pub struct PrivilegeError {
    pub missing: String,
}

/// Which of the needed capabilities are missing from an effective set (`CapEff` in
/// /proc/self/status, hex).
pub fn missing_capabilities(cap_eff_hex: &str) -> Vec<&'static str> {
    let caps = u64::from_str_radix(cap_eff_hex.trim(), 16).unwrap_or(0);
    [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, name)| name)
        .collect()
}

pub fn check_attach() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or("0");
    let missing = missing_capabilities(cap_eff);
    if missing.is_empty() { Ok(()) } else { Err(PrivilegeError { missing: missing.join(", ") }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_empty_capability_sets() {
        assert!(missing_capabilities("000001ffffffffff").is_empty());
        assert!(missing_capabilities(&format!("{:x}", (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN))).is_empty());
        assert_eq!(missing_capabilities("0000000000000000"), vec!["CAP_BPF", "CAP_NET_ADMIN"]);
        // CAP_SYS_ADMIN alone does not do: SO_MARK needs CAP_NET_ADMIN.
        assert_eq!(missing_capabilities(&format!("{:x}", 1u64 << 21)), vec!["CAP_BPF", "CAP_NET_ADMIN"]);
        assert_eq!(missing_capabilities(&format!("{:x}", 1u64 << CAP_BPF)), vec!["CAP_NET_ADMIN"]);
    }
}
