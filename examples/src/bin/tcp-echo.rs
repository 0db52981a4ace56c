//! The example tcp echo app on its own: `tcp-echo [ADDR]` (default 127.0.0.1:8080). Put a
//! meshid sidecar in front of it; it listens on localhost only.

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("tcp-echo listening on {}", listener.local_addr()?);
    meshid_examples::tcp_echo(listener).await;
    Ok(())
}
