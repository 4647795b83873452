//! `sensorgate-load null-relay`: the baseline the relay figures are measured against.
//!
//! It speaks just enough of the opcode protocol for this tool's own clients: tokens from
//! `/auth/developer` and `/auth/user` that name the developer and user and are taken
//! unchecked, HELLO, IDENTIFY, READY, HEARTBEAT_ACK, and SUBMIT in → DISPATCH out with a
//! per-developer seq, sent to that developer's consumer in batched writes. Nothing else: no
//! store, no validation, no limits, no metrics. Run against it with the same client, the same
//! sockets and the same cores, it measures what the load generator and loopback TCP can carry;
//! sensorgate's figure divided by it is the cost of durable sequencing and everything a
//! gateway checks. Owns its listener; shares no code with the server on purpose.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use fastwebsockets::{upgrade, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const HELLO: &[u8] = br#"{"op":2,"d":{"heartbeat_interval":40000}}"#;
const READY: &[u8] = br#"{"op":4}"#;
const ACK: &[u8] = br#"{"op":1}"#;
/// Bytes gathered into one consumer write.
const WRITE_BATCH: usize = 256 << 10;

#[derive(Default)]
struct Relay {
    devs: Mutex<HashMap<String, Arc<Dev>>>,
}

#[derive(Default)]
struct Dev {
    state: Mutex<DevState>,
}

#[derive(Default)]
struct DevState {
    seq: u64,
    consumer: Option<mpsc::UnboundedSender<Bytes>>,
}

impl Relay {
    fn dev(&self, id: &str) -> Arc<Dev> {
        let mut devs = self.devs.lock().expect("relay map");
        devs.entry(id.to_string()).or_default().clone()
    }
}

/// Serves until Ctrl-C.
pub async fn serve(listen: SocketAddr, allow_remote: bool) -> Result<()> {
    if !listen.ip().is_loopback() && !allow_remote {
        bail!("--listen {listen}: not a loopback address (use --allow-remote)");
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!(
        "null relay listening on ws://{}",
        listener.local_addr().unwrap_or(listen)
    );
    let relay = Arc::new(Relay::default());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        stream.set_nodelay(true)?;
        let relay = relay.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, relay.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn route(
    mut req: Request<Incoming>,
    relay: Arc<Relay>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let dev = req
        .headers()
        .get("dev-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let token = match (req.method(), req.uri().path()) {
        (&Method::POST, "/auth/developer") => format!("d|{dev}"),
        (&Method::POST, "/auth/user") => {
            let uid = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("id=")))
                .unwrap_or("");
            format!("u|{dev}|{uid}")
        }
        (&Method::GET, "/connect") => {
            return Ok(match upgrade::upgrade(&mut req) {
                Ok((response, ws)) => {
                    tokio::spawn(async move {
                        if let Ok(ws) = ws.await {
                            let _ = connection(ws, relay).await;
                        }
                    });
                    let (parts, _) = response.into_parts();
                    Response::from_parts(parts, Full::new(Bytes::new()))
                }
                Err(_) => status(StatusCode::BAD_REQUEST),
            });
        }
        _ => return Ok(status(StatusCode::NOT_FOUND)),
    };
    let body = serde_json::json!({ "token": token }).to_string();
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

type Ws = fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>;

#[derive(Deserialize)]
struct Inbound<'a> {
    op: u64,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    #[serde(borrow)]
    t: Option<&'a str>,
}

#[derive(Deserialize)]
struct Identify<'a> {
    #[serde(borrow)]
    token: &'a str,
}

async fn connection(mut ws: Ws, relay: Arc<Relay>) -> Result<(), WebSocketError> {
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    ws.write_frame(text(HELLO)).await?;
    let token = loop {
        let frame = ws.read_frame().await?;
        if frame.opcode != OpCode::Text {
            continue;
        }
        let Ok(msg) = serde_json::from_slice::<Inbound>(&frame.payload) else {
            return Ok(());
        };
        if msg.op != 3 {
            continue;
        }
        match msg
            .d
            .and_then(|d| serde_json::from_str::<Identify>(d.get()).ok())
        {
            Some(id) => break id.token.to_string(),
            None => return Ok(()),
        }
    };
    let mut parts = token.split('|');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("u"), Some(dev), Some(uid)) => {
            let dev = relay.dev(dev);
            let uid = uid.to_string();
            ws.write_frame(text(READY)).await?;
            producer(ws, &dev, &uid).await
        }
        (Some("d"), Some(dev), None) => {
            let (tx, rx) = mpsc::unbounded_channel();
            relay.dev(dev).state.lock().expect("dev state").consumer = Some(tx);
            ws.write_frame(text(READY)).await?;
            consumer(ws, rx).await;
            Ok(())
        }
        _ => Ok(()),
    }
}

fn text(payload: &[u8]) -> Frame<'_> {
    Frame::text(Payload::Borrowed(payload))
}

async fn producer(mut ws: Ws, dev: &Dev, uid: &str) -> Result<(), WebSocketError> {
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text => {}
            _ => continue,
        }
        let Ok(msg) = serde_json::from_slice::<Inbound>(&frame.payload) else {
            return Ok(());
        };
        match (msg.op, msg.d, msg.t) {
            (0, _, _) => ws.write_frame(text(ACK)).await?,
            (6, Some(d), Some(t)) => {
                let mut state = dev.state.lock().expect("dev state");
                state.seq += 1;
                let out = format!(
                    r#"{{"op":5,"d":{},"uid":"{uid}","seq":{},"t":"{t}"}}"#,
                    d.get(),
                    state.seq
                );
                if let Some(tx) = &state.consumer {
                    let _ = tx.send(Bytes::from(out));
                }
            }
            _ => {}
        }
    }
}

/// Writes dispatches in batches; reads (and ignores) what the consumer sends.
async fn consumer(ws: Ws, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let io = ws.into_inner();
    let (mut read, mut write) = tokio::io::split(io);
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 4096];
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        buf.clear();
        push_text(&mut buf, &first);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(next) => push_text(&mut buf, &next),
                Err(_) => break,
            }
        }
        if write.write_all(&buf).await.is_err() {
            break;
        }
    }
    reader.abort();
}

/// Appends an unmasked, unfragmented server text frame.
fn push_text(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_carry_their_length() {
        let mut out = Vec::new();
        push_text(&mut out, b"{}");
        assert_eq!(out, [0x81, 2, b'{', b'}']);
        out.clear();
        push_text(&mut out, &[b'x'; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        assert_eq!(out.len(), 304);
    }
}
