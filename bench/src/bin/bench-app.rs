//! `bench-app`: the benchmark's application, a fixed small response to every request (HTTP/1.1 or
//! h2c), on one thread, so its own CPU per request is small and measurable.

use std::convert::Infallible;

use anyhow::Result;
use bytes::Bytes;
use clap::Parser;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "bench-app",
    about = "fixed-response HTTP app for the meshid benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Wait this many milliseconds before answering (requests in flight for the chaos scenarios).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await?;
        let body = Bytes::from(vec![b'x'; args.body_bytes]);
        let delay = std::time::Duration::from_millis(args.delay_ms);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
