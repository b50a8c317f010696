//! Checking up front that we may load and attach eBPF programs, so the operator gets one clear
//! sentence instead of an EPERM from deep inside the loader.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("attach needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (missing: {missing})")]
pub struct PrivilegeError {
    pub missing: String,
}

/// Which of the needed capabilities are missing from an effective set (`CapEff` in
/// /proc/self/status, hex).
pub fn missing_capabilities(cap_eff_hex: &str) -> Vec<&'static str> {
    let caps = u64::from_str_radix(cap_eff_hex.trim(), 16).unwrap_or(0);
    [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
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
        assert_eq!(missing_capabilities("0000000000000000"), vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
        assert_eq!(missing_capabilities(&format!("{:x}", 1u64 << CAP_SYS_ADMIN)), vec!["CAP_BPF", "CAP_NET_ADMIN"]);
    }
}
