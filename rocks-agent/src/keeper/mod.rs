//! Carrying connections: `client` for applications redirected on this host, `server` for
//! sessions opened by peer agents, `plain` for destinations without an agent; `establish` and
//! `driver` run the session core over real sockets.
pub mod client;
pub mod driver;
pub mod establish;
pub mod plain;
pub mod server;
