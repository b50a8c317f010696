//! Carrying connections: `client` for applications redirected on this host, `server` for
//! sessions opened by peer agents, `plain` for destinations without an agent.
pub mod client;
pub mod plain;
pub mod server;
