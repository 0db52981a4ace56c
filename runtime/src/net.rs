//! The accept loop every listener shares: the next connection, or `None` once shutdown starts.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Resolves once `shutdown` turns true (holds no lock across awaits, unlike a kept `wait_for` guard).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The next accepted connection, or `None` when shutdown has started.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    tokio::select! {
        pair = accept_retrying(listener, what) => Some(pair),
        () = stopped(shutdown) => None,
    }
}

/// The next accepted connection. Accept errors (out of file descriptors, a connection reset before
/// it was taken) are logged and retried after a short pause, so a burst of them cannot spin a core.
/// Cancel-safe: dropped while waiting, it loses no connection.
pub async fn accept_retrying(
    listener: &TcpListener,
    what: &'static str,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(error) => {
                tracing::warn!(%error, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = watch::channel(false);
        let _client = TcpStream::connect(addr).await.unwrap();
        assert!(accept(&listener, &mut rx, "test").await.is_some());
        tx.send_replace(true);
        assert!(accept(&listener, &mut rx, "test").await.is_none());
    }
}
