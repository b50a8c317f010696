//! Carrying connections: `client` for applications redirected on this host, `server` for
//! sessions opened by peer agents, `plain` for destinations without an agent; `establish` and
//! `driver` run the session core over real sockets (`transport`: the sockets to the peer agent).
pub mod client;
pub mod dial;
pub mod driver;
pub mod establish;
pub mod plain;
pub mod server;
mod transport;
