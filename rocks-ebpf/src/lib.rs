//! Empty on purpose: `rocks-agent` build-depends on this crate only so cargo rebuilds the
//! agent (and the eBPF object it embeds) whenever the programs in `main.rs` change.
#![no_std]
