//! The accept loop every listener shares (the next connection, or `None` once shutdown starts),
//! and the kernel's keep-alive for long-lived idle connections.

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
/// it was taken) are logged (a burst of 5 lines, then one a second, counting those left out) and
/// retried after a short pause, so a burst of them cannot spin a core.
/// Cancel-safe: dropped while waiting, it loses no connection.
pub async fn accept_retrying(
    listener: &TcpListener,
    what: &'static str,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(error) => {
                // Out of file descriptors, this would be 50 lines a second per listener.
                static LINES: crate::log_limit::LogLimit =
                    crate::log_limit::LogLimit::new(5.0, 1.0);
                if let Some(left_out) = LINES.take() {
                    tracing::warn!(%error, listener = what, left_out, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Silence after which the kernel starts probing the peer of a [`keepalive`] connection.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between two keep-alive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel ends the connection (reads fail with `ETIMEDOUT`).
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel ends the connection: what the
/// probes allow, so a peer that vanished while we were sending (a bundle push) is given up as soon
/// as a silent one (the kernel's default would retransmit for about 15 minutes).
pub const UNACKED_LIMIT: Duration = Duration::from_secs(60);

/// Lets the kernel notice a peer that vanished without a FIN or RST (its host gone, a network
/// cut) on a connection that may stay silent for long: after [`KEEPALIVE_IDLE`] of silence it
/// probes every [`KEEPALIVE_INTERVAL`] and ends the connection after [`KEEPALIVE_PROBES`]
/// unanswered probes, about a minute in all ([`UNACKED_LIMIT`] when data was in flight). A live
/// peer's kernel answers the probes itself, so neither process wakes up, and nothing is
/// encrypted, unlike an h2 PING: what a CA holding tens of thousands of idle bundle streams needs.
pub fn keepalive(tcp: &TcpStream) -> std::io::Result<()> {
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(&params)?;
    sock.set_tcp_user_timeout(Some(UNACKED_LIMIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_hands_the_idle_peer_check_to_the_kernel() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let sock = socket2::SockRef::from(&client);
        assert!(!sock.keepalive().unwrap(), "off by default");
        keepalive(&client).unwrap();
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(UNACKED_LIMIT));
    }

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
