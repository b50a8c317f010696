//! The rocks agent as a library: the binary in `main.rs` is a thin CLI over it, and tests
//! start pieces of it in-process.

pub mod session;
