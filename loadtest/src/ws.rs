//! WebSocket client sessions: TCP connect, the HTTP/1.1 upgrade to
//! `/connect`, HELLO → IDENTIFY → READY, and the split read/write halves the
//! scenarios drive (a dedicated reader task per connection, since
//! fastwebsockets' `read_frame` is not cancel-safe).

use std::convert::Infallible;
use std::fmt;
use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead, WebSocketWrite};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, Chain};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

use crate::frames::{self, ClientKind};
use crate::scan;
use crate::target::Target;

/// Read half: bytes the upgrade response over-read, then the socket.
pub type WsRead = WebSocketRead<Chain<Cursor<Vec<u8>>, OwnedReadHalf>>;
/// Write half, buffered so many frames go out per syscall (flush per batch).
pub type WsWrite = WebSocketWrite<BufWriter<OwnedWriteHalf>>;

/// How long each setup step (connect, upgrade, HELLO, READY) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// Client-side buffering of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Buffers {
    /// User-space write buffer; frames are flushed from it per batch.
    pub write: usize,
    /// Kernel send buffer (SO_SNDBUF), bounding unsent bytes under
    /// backpressure; `None` leaves the kernel's autotuning.
    pub send: Option<u32>,
}

/// An identified connection.
pub struct Session {
    pub read: WsRead,
    pub write: WsWrite,
    /// From HELLO.
    pub heartbeat_interval: Duration,
}

impl Session {
    /// How often this tool sends `{"op":0}`: three quarters of the server's
    /// interval, leaving margin for scheduling delay.
    pub fn heartbeat_period(&self) -> Duration {
        (self.heartbeat_interval * 3 / 4).max(Duration::from_millis(100))
    }
}

/// The setup step a connection failed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Token,
    Connect,
    Upgrade,
    Hello,
    Identify,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Token => "token",
            Stage::Connect => "connect",
            Stage::Upgrade => "upgrade",
            Stage::Hello => "hello",
            Stage::Identify => "identify",
        })
    }
}

/// Why a connection could not be set up.
#[derive(Debug)]
pub struct SetupError {
    pub stage: Stage,
    /// Close code, if the server closed the socket during setup.
    pub close_code: Option<u16>,
    pub detail: String,
}

impl SetupError {
    pub fn new(stage: Stage, detail: impl fmt::Display) -> Self {
        Self {
            stage,
            close_code: None,
            detail: detail.to_string(),
        }
    }

    /// Short key for grouping failures in reports, e.g. `identify: close 4001`.
    pub fn kind(&self) -> String {
        match self.close_code {
            Some(code) => format!("{}: close {code}", self.stage),
            None => format!("{}: {}", self.stage, self.detail),
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.detail)?;
        if let Some(code) = self.close_code {
            write!(f, " (close code {code})")?;
        }
        Ok(())
    }
}

impl std::error::Error for SetupError {}

/// Connects, upgrades, waits for HELLO, identifies and waits for READY.
pub async fn open(
    target: &Target,
    token: &str,
    kind: ClientKind,
    buffers: Buffers,
) -> Result<Session, SetupError> {
    let stream = timeout(STEP_TIMEOUT, connect(target, buffers.send))
        .await
        .map_err(|_| SetupError::new(Stage::Connect, "timed out"))?
        .map_err(|e| SetupError::new(Stage::Connect, e))?;
    let (read, write) = timeout(
        STEP_TIMEOUT,
        upgrade(stream, target, "/connect", buffers.write),
    )
    .await
    .map_err(|_| SetupError::new(Stage::Upgrade, "timed out"))??;
    let mut session = Session {
        read,
        write,
        heartbeat_interval: Duration::ZERO,
    };

    let hello = timeout(STEP_TIMEOUT, next_text(&mut session.read))
        .await
        .map_err(|_| SetupError::new(Stage::Hello, "no HELLO within 15 s"))?
        .map_err(|e| e.into_setup(Stage::Hello))?;
    let interval = match scan::scan(&hello) {
        Some(s) if s.op == Some(2) => s.heartbeat_interval,
        _ => None,
    };
    let interval = interval.ok_or_else(|| {
        SetupError::new(
            Stage::Hello,
            format!("expected HELLO, got {}", snippet(&hello)),
        )
    })?;
    session.heartbeat_interval = Duration::from_millis(interval);

    let mut identify = frames::identify(token, kind);
    send_now(&mut session.write, &mut identify)
        .await
        .map_err(|e| SetupError::new(Stage::Identify, e))?;
    loop {
        let text = timeout(STEP_TIMEOUT, next_text(&mut session.read))
            .await
            .map_err(|_| SetupError::new(Stage::Identify, "no READY within 15 s"))?
            .map_err(|e| e.into_setup(Stage::Identify))?;
        match scan::scan(&text).and_then(|s| s.op) {
            Some(4) => return Ok(session),
            // A heartbeat ACK or similar before READY: keep waiting.
            Some(1) => continue,
            _ => {
                return Err(SetupError::new(
                    Stage::Identify,
                    format!("expected READY, got {}", snippet(&text)),
                ))
            }
        }
    }
}

async fn connect(target: &Target, send_buffer: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(size) = send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects and upgrades at `path`, with no protocol exchange yet (STOMP starts there).
pub async fn open_raw(
    target: &Target,
    path: &str,
    buffers: Buffers,
) -> Result<(WsRead, WsWrite), SetupError> {
    let stream = timeout(STEP_TIMEOUT, connect(target, buffers.send))
        .await
        .map_err(|_| SetupError::new(Stage::Connect, "timed out"))?
        .map_err(|e| SetupError::new(Stage::Connect, e))?;
    timeout(STEP_TIMEOUT, upgrade(stream, target, path, buffers.write))
        .await
        .map_err(|_| SetupError::new(Stage::Upgrade, "timed out"))?
}

async fn upgrade(
    mut stream: TcpStream,
    target: &Target,
    path: &str,
    write_capacity: usize,
) -> Result<(WsRead, WsWrite), SetupError> {
    let err = |e: &dyn fmt::Display| SetupError::new(Stage::Upgrade, e);
    let key = fastwebsockets::handshake::generate_key();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path(path),
        target.host_header
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| err(&e))?;

    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if buf.len() > 16 * 1024 {
            return Err(err(&"upgrade response headers over 16 KiB"));
        }
        let n = stream.read_buf(&mut buf).await.map_err(|e| err(&e))?;
        if n == 0 {
            return Err(err(&"connection closed during upgrade"));
        }
        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    response
        .parse(&buf[..head_len])
        .map_err(|e| err(&format!("bad upgrade response: {e}")))?;
    let status = response.code.unwrap_or(0);
    if status != 101 {
        let body = String::from_utf8_lossy(&buf[head_len..]);
        return Err(err(&format!("HTTP {status} {}", body.trim())));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(err(&"101 response without Upgrade: websocket"));
    }
    if header("sec-websocket-accept").as_deref() != Some(accept_key(&key).as_str()) {
        return Err(err(&"wrong Sec-WebSocket-Accept"));
    }

    let leftover = buf.split_off(head_len);
    let (read, write) = stream.into_split();
    let (mut read, mut write) = fastwebsockets::after_handshake_split(
        Cursor::new(leftover).chain(read),
        BufWriter::with_capacity(write_capacity, write),
        Role::Client,
    );
    read.set_auto_close(false);
    read.set_auto_pong(false);
    write.set_writev(false);
    Ok((read, write))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Buffers one text frame. `text` is masked in place (its content is
/// clobbered). Nothing reaches the socket until [`flush`].
pub async fn send(write: &mut WsWrite, text: &mut [u8]) -> Result<(), WebSocketError> {
    write
        .write_frame(Frame::text(Payload::BorrowedMut(text)))
        .await
}

/// Sends one text frame and flushes.
pub async fn send_now(write: &mut WsWrite, text: &mut [u8]) -> Result<(), WebSocketError> {
    send(write, text).await?;
    write.flush().await
}

/// Sends `{"op":0}` and flushes.
pub async fn heartbeat(write: &mut WsWrite) -> Result<(), WebSocketError> {
    send_now(write, &mut frames::HEARTBEAT.to_vec()).await
}

/// Sends a normal-closure close frame and flushes.
pub async fn close(write: &mut WsWrite) -> Result<(), WebSocketError> {
    write.write_frame(Frame::close(1000, b"")).await?;
    write.flush().await
}

/// How a reader loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd {
    /// The server sent a close frame (with this code, if any).
    Closed(Option<u16>),
    /// The socket ended without a close frame.
    Eof,
    /// A read or protocol error.
    Error(String),
    /// The callback asked to stop.
    Stopped,
}

/// Whether a reader loop should go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
    /// Read nothing for this long (a slow consumer), then go on.
    Pause(std::time::Duration),
}

/// Reads until close/EOF/error, handing each complete text (or binary)
/// message to `on_text`. Pings and pongs are ignored (the protocol's
/// heartbeats are opcode messages). Run this in its own task.
pub async fn read_loop(read: &mut WsRead, mut on_text: impl FnMut(&[u8]) -> Flow) -> ReadEnd {
    let mut partial: Option<Vec<u8>> = None;
    loop {
        let frame = match next_frame(read).await {
            Ok(frame) => frame,
            Err(e) => return end_of(e),
        };
        let flow = match frame.opcode {
            OpCode::Text | OpCode::Binary if frame.fin => on_text(&frame.payload),
            OpCode::Text | OpCode::Binary => {
                partial = Some(frame.payload.to_vec());
                Flow::Continue
            }
            OpCode::Continuation => match partial.as_mut() {
                Some(buf) => {
                    buf.extend_from_slice(&frame.payload);
                    if frame.fin {
                        let msg = partial.take().unwrap_or_default();
                        on_text(&msg)
                    } else {
                        Flow::Continue
                    }
                }
                None => return ReadEnd::Error("continuation frame without a start".into()),
            },
            OpCode::Close => return ReadEnd::Closed(scan::close_code(&frame.payload)),
            OpCode::Ping | OpCode::Pong => Flow::Continue,
        };
        match flow {
            Flow::Stop => return ReadEnd::Stopped,
            Flow::Pause(wait) => tokio::time::sleep(wait).await,
            Flow::Continue => {}
        }
    }
}

fn end_of(e: WebSocketError) -> ReadEnd {
    match e {
        WebSocketError::UnexpectedEOF => ReadEnd::Eof,
        WebSocketError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ReadEnd::Eof
        }
        e => ReadEnd::Error(e.to_string()),
    }
}

async fn next_frame(read: &mut WsRead) -> Result<Frame<'_>, WebSocketError> {
    // auto_close and auto_pong are off, so there is never an obligated send.
    read.read_frame(&mut |_frame| async { Ok::<(), Infallible>(()) })
        .await
}

/// Failure while waiting for a setup message.
enum WaitError {
    Closed(Option<u16>),
    Other(String),
}

impl WaitError {
    fn into_setup(self, stage: Stage) -> SetupError {
        match self {
            WaitError::Closed(code) => SetupError {
                stage,
                close_code: code,
                detail: format!("server closed the connection (code {code:?})"),
            },
            WaitError::Other(detail) => SetupError::new(stage, detail),
        }
    }
}

/// The next complete text message (setup only: unfragmented frames).
async fn next_text(read: &mut WsRead) -> Result<Vec<u8>, WaitError> {
    loop {
        let frame = next_frame(read).await.map_err(|e| match end_of(e) {
            ReadEnd::Eof => WaitError::Other("connection closed".into()),
            ReadEnd::Error(e) => WaitError::Other(e),
            ReadEnd::Closed(code) => WaitError::Closed(code),
            ReadEnd::Stopped => WaitError::Other("stopped".into()),
        })?;
        match frame.opcode {
            OpCode::Text | OpCode::Binary if frame.fin => return Ok(frame.payload.to_vec()),
            OpCode::Close => return Err(WaitError::Closed(scan::close_code(&frame.payload))),
            OpCode::Ping | OpCode::Pong => continue,
            _ => return Err(WaitError::Other("fragmented message during setup".into())),
        }
    }
}

fn snippet(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(&text[..text.len().min(120)]);
    s.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn setup_error_kinds() {
        let e = SetupError {
            stage: Stage::Identify,
            close_code: Some(4001),
            detail: "x".into(),
        };
        assert_eq!(e.kind(), "identify: close 4001");
        assert_eq!(
            SetupError::new(Stage::Connect, "refused").kind(),
            "connect: refused"
        );
    }
}
