//! Example apps that sit behind meshid sidecars. They know nothing about TLS: the sidecar in front
//! of them terminates mTLS and tells them who called in `x-forwarded-client-cert`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// The caller's SPIFFE ID from an `x-forwarded-client-cert` value (`...;URI=<id>`).
pub fn caller_from_xfcc(xfcc: &str) -> Option<&str> {
    xfcc.split(';').find_map(|part| part.strip_prefix("URI="))
}

/// An HTTP app (HTTP/1.1 and h2c) that echoes what it saw, one line:
/// `<method> <path> version=<v> host=<host> xfcc=<header> caller=<spiffe id> traceparent=<header>`
/// then the request body.
/// `/slow?ms=N` answers after N milliseconds.
pub async fn http_echo(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(echo);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (xfcc, host) = (header("x-forwarded-client-cert"), header("host"));
    let traceparent = header("traceparent");
    let caller = caller_from_xfcc(&xfcc).unwrap_or("-").to_owned();
    if req.uri().path() == "/slow" {
        let ms: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let line = format!(
        "{} {} version={:?} host={host} xfcc={xfcc} caller={caller} traceparent={traceparent}\n",
        req.method(),
        req.uri().path(),
        req.version()
    );
    let mut out = line.into_bytes();
    if let Ok(body) = req.into_body().collect().await {
        out.extend_from_slice(&body.to_bytes());
    }
    Ok(Response::new(Full::new(Bytes::from(out))))
}

/// A TCP app that echoes every byte back until the client half-closes.
pub async fn tcp_echo(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn caller_is_read_from_xfcc() {
        assert_eq!(
            super::caller_from_xfcc("By=spiffe://td/a;Hash=ab;URI=spiffe://td/b"),
            Some("spiffe://td/b")
        );
        assert_eq!(super::caller_from_xfcc("By=x"), None);
    }
}
