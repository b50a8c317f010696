//! How the server side reaches the destination on this host: from the client's address (the
//! default, see `transparent`) or from this host's own (`--transparent off`).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{net, registry::Registry, session::OpenError, transparent};

/// Whose address the dial comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This host's own, chosen by the kernel.
    Own,
    /// The client's, as the peer agent's transport arrived from it (NAT included).
    Client(IpAddr),
}

/// A dial to make once the session is confirmed.
pub struct Dial {
    pub dst: SocketAddr,
    pub timeout: Duration,
    pub source: Source,
    pub registry: Arc<Registry>,
    /// The connection's id in `status`, for the logs.
    pub id: u64,
}

impl Dial {
    pub async fn run(self) -> Result<TcpStream, OpenError> {
        match self.source {
            // A transport over loopback comes from this host itself: a direct connection would
            // have come from this host's own address too, which the kernel picks.
            Source::Client(client) if client.to_canonical().is_loopback() => {
                debug!(id = self.id, %client, "the client is on this host: dialing from its own address");
                self.own().await
            }
            Source::Client(client) => self.transparent(client).await,
            Source::Own => self.own().await,
        }
    }

    async fn own(&self) -> Result<TcpStream, OpenError> {
        net::connect_marked(self.dst, self.timeout).await.map_err(|e| match e {
            net::ConnectError::Refused => OpenError::Refused,
            net::ConnectError::TimedOut(_) => OpenError::TimedOut,
            net::ConnectError::Other(_) => OpenError::Unreachable,
        })
    }

    /// Never falls back to this host's own address: a service that trusts local addresses
    /// must not trust a relayed remote client. A dial that cannot be made as asked resets the
    /// connection.
    async fn transparent(&self, client: IpAddr) -> Result<TcpStream, OpenError> {
        match transparent::connect(client, self.dst, self.timeout).await {
            Ok(stream) => Ok(stream),
            Err(transparent::DialError::Refused) => Err(OpenError::Refused),
            Err(transparent::DialError::TimedOut(t)) => {
                // Also what a removed routing rule looks like: the server's replies left for
                // the client's real address.
                info!(
                    id = self.id,
                    %client,
                    dst = %self.dst,
                    "the destination did not answer a transparent dial within {t:?}"
                );
                Err(OpenError::TimedOut)
            }
            Err(e) => {
                self.registry.counters.transparent_failures.fetch_add(1, Relaxed);
                warn!(
                    id = self.id,
                    %client,
                    dst = %self.dst,
                    error = %e,
                    "transparent dial failed; resetting the connection (never dialing from this host's own address instead)"
                );
                Err(OpenError::Unreachable)
            }
        }
    }
}
