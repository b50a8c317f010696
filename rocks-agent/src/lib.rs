//! The rocks agent as a library: the binary in `main.rs` is a thin CLI over it, and tests
//! start pieces of it in-process.
//!
//! - [`redirect`]: loading the eBPF programs, attaching them, the maps shared with them.
//! - [`session`]: the session protocol between agents, a pure state machine.
//! - [`keeper`]: carrying each connection (client side, server side, plain fallback).
//! - [`agent`]: putting it together for `attach` and `serve`.
//! - [`control`]: the control socket and `status`.
//! - [`config`]: the `--config` file.
//! - [`metrics`]: the Prometheus endpoint (`--metrics`).

pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod duration;
pub mod keeper;
pub mod kernel;
pub mod listen;
pub mod metrics;
pub mod net;
pub mod netwatch;
pub mod privileges;
pub mod redirect;
pub mod registry;
pub mod secret;
pub mod session;
