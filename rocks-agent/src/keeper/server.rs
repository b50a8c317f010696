//! The peer side: a peer agent opens (or resumes) a session and asks us to connect to a
//! destination on this host.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use crate::agent::Shared;

pub async fn handle(_shared: Arc<Shared>, _transport: TcpStream, _from: SocketAddr) {}
