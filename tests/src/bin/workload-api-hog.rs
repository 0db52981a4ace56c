//! A process that holds watching streams on a Workload API socket: run by
//! `tests/tests/workload_api.rs` as another user than the test's, as a container of the pod that
//! is not the app would.
//!
//! Usage: `workload-api-hog SOCKET COUNT`. Opens up to COUNT connections to SOCKET, starts a
//! `FetchX509Bundles` call on each, prints `held N` (the connections whose call was answered with
//! a bundle) and keeps them until its standard input closes.

use std::io::Read;

use bytes::Bytes;

/// A connection with a `FetchX509Bundles` call whose first bundle arrived.
async fn watch_bundles(socket: &str) -> Option<(h2::client::SendRequest<Bytes>, h2::RecvStream)> {
    let unix = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (h2, connection) = h2::client::handshake(unix).await.ok()?;
    tokio::spawn(connection);
    let request = http::Request::post("http://localhost/SpiffeWorkloadAPI/FetchX509Bundles")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("workload.spiffe.io", "true")
        .body(())
        .ok()?;
    let mut ready = h2.clone().ready().await.ok()?;
    let (response, mut body) = ready.send_request(request, false).ok()?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .ok()?;
    let mut stream = response.await.ok()?.into_body();
    stream.data().await?.ok()?;
    Some((h2, stream))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(socket), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse().ok()))
    else {
        eprintln!("usage: workload-api-hog SOCKET COUNT");
        std::process::exit(64);
    };
    let mut held = Vec::new();
    for _ in 0..count {
        let watching =
            tokio::time::timeout(std::time::Duration::from_secs(5), watch_bundles(socket)).await;
        if let Ok(Some(w)) = watching {
            held.push(w);
        }
    }
    println!("held {}", held.len());
    // Until the test is done with it.
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read(&mut [0; 1])).await;
    drop(held);
}
