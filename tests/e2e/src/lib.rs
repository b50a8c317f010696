//! End-to-end test harness for rocks.
//!
//! Tests run real programs on the real kernel: hosts are network namespaces joined by a bridge
//! ([`netns`]), the processes rocks keeps live in a throwaway cgroup2 directory ([`cgroup`]),
//! programs are started inside both with captured output ([`spawn`]), and real peers are either
//! `rocks-testpeer` (byte-exact transfers, see [`testpeer`]) or OpenSSH ([`sshd`]).
//!
//! Everything a test creates is removed when the owning value is dropped, also when the test
//! panics; leftovers of a killed run are removed by [`cleanup_stale`], whose parts the constructors
//! call once per process.
//!
//! Most tests need root: start them with [`require_root`] (and [`require_tools`]), which fail
//! loudly instead of passing silently.

pub mod agent;
pub mod bpf;
pub mod cgroup;
pub mod netns;
pub mod require;
pub mod spawn;
pub mod sshd;
pub mod testpeer;
pub mod util;

pub use agent::{Agent, AgentSpec, ClusterSecret};
pub use cgroup::TestCgroup;
pub use netns::{Host, Topology};
pub use require::{require_root, require_tools, which};
pub use spawn::{Child, spawn_in, wait_for_tcp_listen};
pub use sshd::Sshd;
pub use testpeer::{AddrReport, ClientReport, ServerRecord};

/// Removes everything a killed test run left behind (namespaces, cgroups, temp directories,
/// agents' pins on bpffs, whose creating process is gone). The constructors already do this
/// once per process; this is for tools such as an `xtask clean`.
pub fn cleanup_stale() -> anyhow::Result<()> {
    netns::cleanup_stale()?;
    cgroup::cleanup_stale()?;
    util::cleanup_stale_tempdirs();
    bpf::cleanup_stale_pins();
    Ok(())
}

/// Path of the `rocks-testpeer` binary built with this package.
///
/// A macro because Cargo only tells integration tests (at compile time) where the package's
/// binaries are: it expands to `env!("CARGO_BIN_EXE_rocks-testpeer")` in the calling test.
#[macro_export]
macro_rules! testpeer_bin {
    () => {
        env!("CARGO_BIN_EXE_rocks-testpeer")
    };
}
