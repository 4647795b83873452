//! The one listener: accept loop with a connection cap and a budget for connections that
//! have not authenticated, HTTP/1.1 with header and body deadlines, and the hand-off of
//! upgraded sockets to `conn`.
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

use crate::conn::{ConnCtx, Unauthenticated};

/// What the HTTP side needs besides the connection context.
pub struct App {
    pub ctx: Arc<ConnCtx>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub max_unauthenticated: usize,
    /// Further paths serving STOMP, beside `/stomp/websocket`.
    pub stomp_paths: Vec<String>,
    /// A context path under which `/stream` and `/json` are served too ("" for none).
    pub endpoint_context_path: String,
    /// Browser origins allowed to open WebSockets (empty: any).
    pub allowed_origins: Vec<String>,
    /// `/metrics` is on the admin listener, not this one.
    pub admin_listener: bool,
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

/// Connections accepted past `max_connections` (or past the unauthenticated budget) only to
/// answer health checks and 503: a probe must get through when strangers fill the rest.
const SHED_RESERVE: usize = 64;
/// A shed connection's time to send its request headers.
const SHED_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// What one accepted connection holds for its life: its place under `max_connections` and,
/// unless it was shed, among the unauthenticated (which an upgrade takes along).
pub(crate) struct Slot {
    _total: OwnedSemaphorePermit,
    unauthenticated: parking_lot::Mutex<Option<Unauthenticated>>,
    /// Accepted past a budget: health checks are answered, everything else is 503.
    shed: bool,
}

/// Accepts until shutdown begins. A permit is taken before each accept, so past the cap and
/// its reserve new clients wait in the kernel's backlog instead of costing memory here.
pub async fn accept_loop(listener: TcpListener, app: Arc<App>) {
    let total = Arc::new(Semaphore::new(app.max_connections + SHED_RESERVE));
    let strangers = Arc::new(Semaphore::new(app.max_unauthenticated));
    let shutdown = app.ctx.shutdown.clone();
    let shed = &crate::metrics::handles().connections_shed;
    loop {
        let permit = tokio::select! {
            p = total.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let unauthenticated = if total.available_permits() < SHED_RESERVE {
                    shed[1].increment(1);
                    None
                } else if let Ok(p) = strangers.clone().try_acquire_owned() {
                    Some(Unauthenticated::new(p))
                } else {
                    shed[0].increment(1);
                    None
                };
                let slot = Slot {
                    _total: permit,
                    shed: unauthenticated.is_none(),
                    unauthenticated: parking_lot::Mutex::new(unauthenticated),
                };
                shutdown
                    .tracker()
                    .spawn(serve_http(stream, app.clone(), Arc::new(slot)));
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

/// Connections the admin listener serves at once; it answers three cheap routes.
const ADMIN_CONNECTIONS: usize = 64;

/// The admin listener (`admin_listen`): `/metrics`, `/healthz` and `/readyz` only, with its
/// own small cap, so probes and scrapes never queue behind clients.
pub async fn admin_loop(listener: TcpListener, app: Arc<App>) {
    let permits = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let shutdown = app.ctx.shutdown.clone();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = app.handshake_timeout;
            let service =
                hyper::service::service_fn(move |req| http::admin_route(req, app.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_headers(64)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn serve_http(stream: TcpStream, app: Arc<App>, slot: Arc<Slot>) {
    let shutdown = app.ctx.shutdown.clone();
    let timeout = if slot.shed {
        SHED_HEADER_TIMEOUT.min(app.handshake_timeout)
    } else {
        app.handshake_timeout
    };
    let keep_alive = !slot.shed;
    let service =
        hyper::service::service_fn(move |req| http::route(req, app.clone(), slot.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(keep_alive)
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
