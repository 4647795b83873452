//! The one listener: accept loop with a connection cap, HTTP/1.1 with a header deadline, and
//! the hand-off of upgraded sockets to `conn`.
//!
//! Owns the listening socket and the per-connection permits. Must not know protocol frames:
//! routes live in [`http`], connection lives in `conn`.

mod http;
mod json;
mod publish;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conn::ConnCtx;

/// What the HTTP side needs besides the connection context.
pub struct App {
    pub ctx: Arc<ConnCtx>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// Further paths serving STOMP, beside `/stomp/websocket`.
    pub stomp_paths: Vec<String>,
    /// A context path under which `/stream` and `/json` are served too ("" for none).
    pub endpoint_context_path: String,
}

impl App {
    /// `/stream` or `/json` when `path` is one of them under the context path.
    fn endpoint_alias(&self, path: &str) -> Option<&'static str> {
        let context = &self.endpoint_context_path;
        if context.is_empty() {
            return None;
        }
        match path.strip_prefix(context.as_str())? {
            "/stream" => Some("/stream"),
            "/json" => Some("/json"),
            _ => None,
        }
    }
}

/// Accepts until shutdown begins. A permit is taken before each accept, so at the cap new
/// clients wait in the kernel's backlog instead of costing memory here.
pub async fn accept_loop(listener: TcpListener, app: Arc<App>) {
    let permits = Arc::new(Semaphore::new(app.max_connections));
    let shutdown = app.ctx.shutdown.clone();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                shutdown
                    .tracker()
                    .spawn(serve_http(stream, app.clone(), permit));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the loop goes on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("stopped accepting connections");
}

async fn serve_http(stream: TcpStream, app: Arc<App>, permit: OwnedSemaphorePermit) {
    let permit = Arc::new(permit);
    let shutdown = app.ctx.shutdown.clone();
    let timeout = app.handshake_timeout;
    let service =
        hyper::service::service_fn(move |req| http::route(req, app.clone(), permit.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_headers(64)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
