//! The master's accept loop: each connection in its own task, over TLS
//! where it is on (the handshake there too, with a deadline, so a slow
//! client holds up nobody), served by hyper with HTTP/1.1 and HTTP/2 (the
//! agents' gRPC link) on the same port. Each request carries the peer's
//! address and, over TLS, the identity its client certificate names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::tls::{PeerIdentity, Tls};

/// What a plain-HTTP request on the TLS port gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlainHttp {
    /// 400, saying to use https.
    Refuse,
    /// 308 to the same path over https.
    Redirect,
}

/// A handshake (or a plain request's head) must be done by then.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stopped`, then lets open connections
/// finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    plain: PlainHttp,
    stopped: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of fds, most often: wait rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        // Small event records and acknowledgements must not wait for
        // Nagle's algorithm and delayed ACKs (40 ms a round trip otherwise).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            match tls {
                None => {
                    http(
                        TokioIo::new(tcp),
                        peer,
                        PeerIdentity::default(),
                        app,
                        watcher,
                    )
                    .await
                }
                Some(tls) => secure(tcp, peer, &tls, plain, app, watcher).await,
            }
        });
    }
    graceful.shutdown().await;
}

/// A connection to the TLS port: the handshake, or the answer to plain HTTP.
async fn secure(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: &Tls,
    plain: PlainHttp,
    app: Router,
    watcher: Watcher,
) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    // A TLS record of type handshake starts with 0x16.
    if first[0] != 0x16 {
        answer_plain(tcp, plain).await;
        return;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "TLS handshake refused");
            return;
        }
        Err(_) => return,
    };
    let identity = PeerIdentity::of(stream.get_ref().1);
    http(TokioIo::new(stream), peer, identity, app, watcher).await;
}

async fn http<I>(io: I, peer: SocketAddr, identity: PeerIdentity, app: Router, watcher: Watcher)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = app.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(identity.clone());
        request
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Plain HTTP on the TLS port: refused, or redirected to https with the
/// same host and path. The request's head is read first either way, so
/// that the client sees the answer rather than a reset.
async fn answer_plain(mut tcp: TcpStream, plain: PlainHttp) {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let response = match plain {
        PlainHttp::Refuse => refusal(),
        PlainHttp::Redirect => redirect(&String::from_utf8_lossy(&head)).unwrap_or_else(refusal),
    };
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

fn refusal() -> String {
    let body = "This port speaks HTTPS only: use https:// (and the CA that signed the master's certificate)\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// 308 to the request's path on https at its Host; None where the head
/// has no usable host or path.
fn redirect(head: &str) -> Option<String> {
    let path = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)
        .filter(|path| path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()))?;
    let host = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim())
    })?;
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://{host}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ))
}
