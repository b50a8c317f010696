//! Client phase one: drive the initial handshake on a fresh transport until the peer agent has
//! connected to the destination. The application socket is not touched here, so every outcome
//! other than `Opened` can still fall back to plain TCP without losing a byte.
use std::io;

use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};

use crate::{
    registry::HandshakeFailure,
    session::{Event, HandshakeError, OpenError, Session, SessionError, SessionId},
};

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    #[error(transparent)]
    Handshake(HandshakeError),
    #[error("the peer agent could not connect to the destination: {0}")]
    Open(OpenError),
    #[error("session failed while opening: {0}")]
    Session(SessionError),
    #[error("transport failed during the handshake: {0}")]
    Io(#[from] io::Error),
}

impl EstablishError {
    /// The reason label of a failed handshake (not meaningful for `Open`, which is not one).
    pub fn failure(&self) -> HandshakeFailure {
        match self {
            EstablishError::Handshake(e) => e.into(),
            EstablishError::Session(e) => e.into(),
            EstablishError::Io(_) => HandshakeFailure::TransportClosed,
            EstablishError::Open(_) => HandshakeFailure::Other,
        }
    }
}

/// Returns the session id once the server reports the destination connected.
pub async fn establish(session: &mut Session, stream: &mut TcpStream) -> Result<SessionId, EstablishError> {
    let transport = session.first_transport();
    let mut id = None;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let now = Instant::now().into_std();
        while let Some(t) = session.poll_transmit(now) {
            if t.transport == transport {
                stream.write_all(&t.data).await?;
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Established { id: sid } => id = Some(sid),
                Event::Opened => {
                    return id.ok_or(EstablishError::Handshake(HandshakeError::TransportClosed));
                }
                Event::OpenFailed(e) => return Err(EstablishError::Open(e)),
                Event::Failed(SessionError::Handshake(e)) => return Err(EstablishError::Handshake(e)),
                Event::Failed(e) => return Err(EstablishError::Session(e)),
                // Losing the first transport before the session exists cannot be resumed.
                Event::Reconnect { .. } | Event::Suspended => {
                    return Err(EstablishError::Handshake(HandshakeError::TransportClosed));
                }
                Event::TransportClosed { .. } | Event::Resumed { .. } | Event::PeerFinished => {}
                other if other.is_terminal() => {
                    return Err(EstablishError::Handshake(HandshakeError::TransportClosed));
                }
                _ => {}
            }
        }
        let timer = session.poll_timeout().map(Instant::from_std);
        tokio::select! {
            ready = stream.readable() => {
                ready?;
                match stream.try_read(&mut buf) {
                    Ok(0) => session.transport_lost(Instant::now().into_std(), transport),
                    Ok(n) => session.handle_input(Instant::now().into_std(), transport, &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => session.transport_lost(Instant::now().into_std(), transport),
                }
            }
            _ = async { match timer { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                session.handle_timeout(Instant::now().into_std());
            }
        }
    }
}
