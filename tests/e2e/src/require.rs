//! Preconditions of a test: root, tools on the PATH.
//!
//! A test whose precondition is missing must not pass silently (a green run that tested
//! nothing is worse than a red one). It fails with the reason, unless the person running it
//! opted in to skipping with `ROCKS_E2E_ALLOW_SKIP=1`; then it prints `SKIPPED: <reason>` and
//! the test returns early:
//!
//! ```no_run
//! if !rocks_e2e::require_root() || !rocks_e2e::require_tools(&["sshd", "ssh"]) {
//!     return;
//! }
//! ```

use std::path::PathBuf;

/// Environment variable that turns a missing precondition into a skip instead of a failure.
pub const ALLOW_SKIP_ENV: &str = "ROCKS_E2E_ALLOW_SKIP";

/// True if running as root. Otherwise panics with the reason, or prints `SKIPPED` and returns
/// false when `ROCKS_E2E_ALLOW_SKIP=1`.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    missing("this test needs root (network namespaces, cgroups, eBPF)")
}

/// True if every tool is found on the PATH (or in the sbin directories, where Debian puts sshd
/// and which a non-login PATH may lack). Otherwise fails or skips like [`require_root`].
pub fn require_tools(tools: &[&str]) -> bool {
    let absent: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if absent.is_empty() {
        return true;
    }
    missing(&format!("required tools not found: {}", absent.join(", ")))
}

/// Absolute path of an executable, searched on the PATH, then in the standard sbin
/// directories. Absolute because some programs (sshd) insist on it.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn missing(reason: &str) -> bool {
    if std::env::var(ALLOW_SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("SKIPPED: {reason}");
        return false;
    }
    panic!("{reason} (set {ALLOW_SKIP_ENV}=1 to skip such tests instead of failing)");
}
