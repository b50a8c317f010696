//! The rocks agent as a library: the binary in `main.rs` is a thin CLI over it, and tests
//! start pieces of it in-process.
//!
//! - [`redirect`]: loading the eBPF programs, attaching them, the maps shared with them.
//! - [`links`], [`pin`]: the links and state maps pinned on bpffs per run directory, taken
//!   over by a restarted agent; [`bpf_sys`]: the `bpf(2)` commands aya does not wrap.
//! - [`kernel`]: the kernel feature probe at start.
//! - [`session`]: the session protocol between agents, a pure state machine.
//! - [`keeper`]: carrying each connection (client side, server side, plain fallback).
//! - [`agent`]: putting it together for `attach` and `serve`.
//! - [`control`]: the control socket and `status`.
//! - [`config`]: the `--config` file.
//! - [`metrics`]: the Prometheus endpoint (`--metrics`).

pub mod agent;
pub mod bpf_sys;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod duration;
pub mod fastpath;
pub mod keeper;
pub mod kernel;
pub mod limit;
pub mod links;
pub mod listen;
pub mod metrics;
pub mod net;
pub mod netwatch;
pub mod pin;
pub mod policy;
pub mod policy_maps;
pub mod privileges;
pub mod redirect;
pub mod registry;
pub mod secret;
pub mod session;
pub mod sockmap_probe;
pub mod transparent;
