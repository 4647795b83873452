//! HTTP routes: the WebSocket upgrades (`/connect`, STOMP's paths, `/stream`), token
//! minting, the publish and JSON APIs, metrics and health.
//!
//! Every answer is small and built here; anything not listed is 404, a listed path with the
//! wrong method 405.

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpStream;

use super::{App, Slot};
use crate::auth::{AuthError, Role};
use crate::metrics::AuthPlace;

pub(super) type Body = Full<Bytes>;

pub(super) async fn route(
    req: Request<Incoming>,
    app: Arc<App>,
    permit: Arc<Slot>,
) -> Result<Response<Body>, Infallible> {
    let health = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let (name, response) = match (req.method(), req.uri().path()) {
        _ if permit.shed && !health => ("shed", shed()),
        (&Method::GET, "/connect") => ("connect", connect(req, app, permit, Protocol::Opcode)),
        (&Method::GET, "/stomp/websocket") => ("stomp", connect(req, app, permit, Protocol::Stomp)),
        (&Method::POST, "/api/publish") => ("publish", super::publish::publish(req, app).await),
        (&Method::GET, "/stream") => ("stream", connect(req, app, permit, Protocol::Endpoint)),
        (&Method::POST, "/json") => ("json", super::json::call(req, app).await),
        (&Method::OPTIONS, "/json") => ("json", super::json::preflight()),
        (&Method::GET, "/stomp") => ("sockjs", sockjs_welcome()),
        (&Method::GET, "/stomp/info") => ("sockjs", sockjs_info()),
        (&Method::POST, "/auth/developer") => ("auth_developer", mint(&req, &app, Role::Developer)),
        (&Method::POST, "/auth/user") => ("auth_user", mint(&req, &app, Role::User)),
        (&Method::GET, "/metrics") if !app.admin_listener => ("metrics", metrics()),
        (&Method::GET, "/metrics") => ("other", text(StatusCode::NOT_FOUND, "not found\n")),
        (&Method::GET, "/healthz") => ("healthz", text(StatusCode::OK, "ok\n")),
        (&Method::GET, "/readyz") => ("readyz", ready(&app)),
        (
            _,
            "/connect" | "/auth/developer" | "/auth/user" | "/metrics" | "/healthz" | "/readyz"
            | "/stomp/websocket" | "/stomp" | "/stomp/info" | "/api/publish" | "/stream" | "/json",
        ) => (
            "other",
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        ),
        (&Method::GET, path) if app.stomp_paths.iter().any(|p| p == path) => {
            ("stomp", connect(req, app, permit, Protocol::Stomp))
        }
        (method, path) if app.endpoint_alias(path).is_some() => {
            match (method, app.endpoint_alias(path)) {
                (&Method::GET, Some("/stream")) => {
                    ("stream", connect(req, app, permit, Protocol::Endpoint))
                }
                (&Method::POST, Some("/json")) => ("json", super::json::call(req, app).await),
                (&Method::OPTIONS, Some("/json")) => ("json", super::json::preflight()),
                _ => (
                    "other",
                    text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
                ),
            }
        }
        _ => ("other", text(StatusCode::NOT_FOUND, "not found\n")),
    };
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => name, "status" => class)
        .increment(1);
    Ok(response)
}

/// A connection accepted past a budget: it may check health, nothing else.
fn shed() -> Response<Body> {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections: retry shortly\n",
    );
    r.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Why a request body was not read.
pub(super) enum BodyError {
    TooLarge,
    TooSlow,
    Unreadable,
}

impl BodyError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TooSlow => StatusCode::REQUEST_TIMEOUT,
            BodyError::Unreadable => StatusCode::BAD_REQUEST,
        }
    }

    pub(super) fn message(&self, limit: usize) -> String {
        match self {
            BodyError::TooLarge => format!("request body larger than {limit} bytes"),
            BodyError::TooSlow => "request body not received in time".into(),
            BodyError::Unreadable => "request body unreadable".into(),
        }
    }
}

/// Reads a request body of at most `limit` bytes within the handshake timeout: a body that
/// never ends holds its connection no longer than headers that never end would.
pub(super) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    app: &App,
) -> Result<Bytes, BodyError> {
    use http_body_util::{BodyExt, LengthLimitError, Limited};
    let collect = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(app.handshake_timeout, collect).await {
        Err(_) => Err(BodyError::TooSlow),
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Unreadable),
    }
}

/// The admin listener's routes: health and metrics, nothing else.
pub(super) async fn admin_route(
    req: Request<Incoming>,
    app: Arc<App>,
) -> Result<Response<Body>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => ready(&app),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(super) fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, serde_json::json!({ "error": message }).to_string())
}

fn ready(app: &App) -> Response<Body> {
    if app.ctx.shutdown.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !app.ctx.hub.store_writable() {
        text(StatusCode::SERVICE_UNAVAILABLE, "store cannot write\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

fn metrics() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// `POST /auth/developer` and `POST /auth/user?id=…[&employee=true]`: 200
/// `{"token":"…"}`, 400 for missing input, 403 for bad credentials.
fn mint(req: &Request<Incoming>, app: &App, role: Role) -> Response<Body> {
    let Some((developer, key)) = credentials(req) else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing credentials: send dev-id and x-api-key headers, or HTTP Basic",
        );
    };
    let query = req.uri().query().unwrap_or("");
    let employee = match query_param(query, "employee").as_deref() {
        None | Some("false") => false,
        Some("true") if role == Role::User => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "employee must be true or false, and only on /auth/user",
            )
        }
    };
    let user = match role {
        Role::User => match query_param(query, "id") {
            Some(id) if !id.is_empty() => Some(id),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "missing user id: POST /auth/user?id=<uid>",
                )
            }
        },
        Role::Developer => None,
    };
    let auth = &app.ctx.auth;
    if let Err(e) = auth.check_key(&developer, &key) {
        crate::metrics::handles().auth_failed(AuthPlace::Mint, &e);
        return error(StatusCode::FORBIDDEN, "unknown developer or wrong api key");
    }
    let minted = match (&user, employee) {
        (Some(user), true) => auth.mint_employee(&developer, user),
        _ => auth.mint(&developer, role, user.as_deref()),
    };
    match minted {
        Ok(token) => {
            metrics::counter!(crate::metrics::TOKENS_MINTED, "role" => role.as_str()).increment(1);
            json(
                StatusCode::OK,
                serde_json::json!({ "token": token }).to_string(),
            )
        }
        Err(AuthError::InvalidUser | AuthError::MissingUser) => error(
            StatusCode::BAD_REQUEST,
            "invalid user id: 1-128 printable ASCII characters without quotes or backslashes",
        ),
        Err(e) => {
            tracing::warn!(error = %e, "token minting failed");
            error(StatusCode::FORBIDDEN, "unknown developer or wrong api key")
        }
    }
}

/// `dev-id` + `x-api-key` headers, or `Authorization: Basic base64(dev-id:api-key)`.
pub(super) fn credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    let h = req.headers();
    let header = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
    };
    if let (Some(dev), Some(key)) = (header("dev-id"), header("x-api-key")) {
        return Some((dev.to_owned(), key.to_owned()));
    }
    let basic = h
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (dev, key) = decoded.split_once(':')?;
    (!dev.is_empty() && !key.is_empty()).then(|| (dev.to_owned(), key.to_owned()))
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))?
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Which protocol an upgraded socket speaks.
#[derive(Clone, Copy)]
enum Protocol {
    Opcode,
    Stomp,
    Endpoint,
}

/// STOMP subprotocols, most preferred first. Browsers drop a connection whose offered
/// subprotocol is not echoed; clients that offer none (stomp.py, many Android ones) are
/// served too.
const STOMP_SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// The STOMP subprotocol to echo, from the client's `Sec-WebSocket-Protocol` offers.
fn stomp_subprotocol(req: &Request<Incoming>) -> Option<&'static str> {
    let offered: Vec<&str> = req
        .headers()
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .collect();
    STOMP_SUBPROTOCOLS.into_iter().find(|p| offered.contains(p))
}

/// `GET /stomp`, as Spring's SockJS endpoint answers it, so clients that probe it proceed.
fn sockjs_welcome() -> Response<Body> {
    text(StatusCode::OK, "Welcome to SockJS!\n")
}

/// `GET /stomp/info`: the SockJS info document; only the raw WebSocket transport is served.
fn sockjs_info() -> Response<Body> {
    let entropy = getrandom::u32().unwrap_or(0);
    let mut r = json(
        StatusCode::OK,
        format!(
            r#"{{"entropy":{entropy},"origins":["*:*"],"cookie_needed":false,"websocket":true}}"#
        ),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, no-transform, must-revalidate, max-age=0"),
    );
    r
}

/// `GET /connect`, `/stomp/websocket` and `/stream`: answers 101 and hands the socket to the
/// protocol once hyper lets go of it. The connection's permit moves with it.
fn connect(
    mut req: Request<Incoming>,
    app: Arc<App>,
    permit: Arc<Slot>,
    protocol: Protocol,
) -> Response<Body> {
    if app.ctx.shutdown.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut r = text(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required\n");
        r.headers_mut().insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        return r;
    }
    if let Some(origin) = req.headers().get(hyper::header::ORIGIN) {
        let allowed = app.allowed_origins.is_empty()
            || origin.to_str().is_ok_and(|o| {
                app.allowed_origins
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(o))
            });
        if !allowed {
            tracing::debug!(origin = ?origin, "WebSocket upgrade from an origin not allowed");
            return text(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
    }
    let subprotocol = match protocol {
        Protocol::Stomp => stomp_subprotocol(&req),
        Protocol::Opcode | Protocol::Endpoint => None,
    };
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "bad upgrade request");
            return text(StatusCode::BAD_REQUEST, "bad WebSocket upgrade request\n");
        }
    };
    let timeout = app.handshake_timeout;
    let ctx = app.ctx.clone();
    let unauthenticated = permit.unauthenticated.lock().take();
    app.ctx.shutdown.tracker().spawn(async move {
        let _permit = permit;
        let ws = match tokio::time::timeout(timeout, upgrade).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => return tracing::debug!(error = %e, "upgrade failed"),
            Err(_) => return tracing::debug!("upgrade timed out"),
        };
        match ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
        {
            Ok(parts) => {
                // A copy of what the client sent behind its upgrade (usually nothing):
                // `read_buf` shares hyper's whole 8 KiB read buffer, which must not stay
                // allocated for the connection's life.
                let leftover = Bytes::copy_from_slice(&parts.read_buf);
                drop(parts.read_buf);
                let socket = crate::conn::Upgraded {
                    stream: parts.io.into_inner(),
                    leftover,
                    unauthenticated,
                };
                match protocol {
                    Protocol::Opcode => crate::conn::serve_opcode(ctx, socket).await,
                    Protocol::Stomp => crate::conn::serve_stomp(ctx, socket, bearer).await,
                    Protocol::Endpoint => crate::conn::serve_endpoint(ctx, socket).await,
                }
            }
            Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
    if let Some(p) = subprotocol {
        response.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(p),
        );
    }
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(query_param("id=abc&x=1", "id").as_deref(), Some("abc"));
        assert_eq!(query_param("x=1&id=a%2Db", "id").as_deref(), Some("a-b"));
        assert_eq!(query_param("id", "id").as_deref(), Some(""));
        assert_eq!(query_param("x=1", "id"), None);
        assert_eq!(query_param("id=%zz", "id"), None);
    }
}
