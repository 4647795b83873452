//! A WebSocket connection's bytes, shared by every protocol's connection: reading frames
//! into a [`Handler`], answering pings, the write buffer and its bounds, the close handshake.
//!
//! Owns the socket, the frame parser, the read buffer and the write buffer ([`Out`]). Must
//! not know what a message means: text and binary messages go to the protocol's handler,
//! which replies through [`Out`]. Reads land in a stack buffer and are handled in the same
//! pass; only an unfinished frame is copied to the connection's own buffer, released again
//! once empty, so an idle connection holds no buffer at all.

use bytes::{Buf, BytesMut};
use fastwebsockets::OpCode;
use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant, Sleep};

use super::wire::{push_close, push_frame, FrameParser, Message, Parsed, ReadError, MAX_HEADER};
use super::{Limits, CLOSE_TIMEOUT, REPLY_BACKLOG};
use crate::frontend::CloseCode;

/// Bytes read per wake-up into the stack buffer.
const READ_STACK: usize = 16 << 10;
/// Unsent bytes above which a connection takes in no more deliveries: the socket sets the
/// pace and the hub's outbox (then 4009) bounds the rest.
pub const WRITE_HIGH: usize = 256 << 10;
/// A read buffer larger than this is released once empty, so idle connections stay small.
const KEEP_READ: usize = 4 << 10;
/// A write buffer is kept up to this size: a busy consumer reuses it round after round
/// instead of growing a fresh one (and faulting in its pages) for every write. Producers'
/// buffers never grow past a few replies.
const KEEP_WRITE: usize = 2 * WRITE_HIGH;

/// How a connection ends.
pub enum End {
    /// Close with this code.
    Close(CloseCode),
    /// The peer is gone: nothing more to send.
    Gone,
}

impl From<CloseCode> for End {
    fn from(code: CloseCode) -> Self {
        End::Close(code)
    }
}

/// What a protocol does with the messages of its connection.
pub trait Handler {
    /// Work that must wait for something other than this socket; the connection's loop
    /// does it, then parsing resumes where it stopped.
    type Wait;

    /// One binary message, or a text one if the protocol has no [`Handler::on_text`] of its
    /// own. Replies go into `out`.
    fn on_data(&mut self, data: &[u8], out: &mut Out) -> Result<Option<Self::Wait>, End>;

    /// One text message, its UTF-8 already checked by the frame parser.
    fn on_text(&mut self, text: &str, out: &mut Out) -> Result<Option<Self::Wait>, End> {
        self.on_data(text.as_bytes(), out)
    }

    /// A ping, pong or close arrived (a sign of life, and a metric); the socket answers
    /// pings itself.
    fn on_control(&mut self) {}

    /// True while the protocol takes no input (a publisher held back by flow control): the
    /// socket is not read, so TCP pushes back on the client. Call [`WsSocket::resume`] once
    /// it is false again.
    fn paused(&self) -> bool {
        false
    }
}

/// The write buffer: frames not yet written, and the replies among them.
#[derive(Default)]
pub struct Out {
    buf: Vec<u8>,
    /// `buf[..at]` is already sent.
    at: usize,
    /// Replies (ACK, RECEIPT, pong) in `buf` since it last drained.
    replies: usize,
    /// This write round already yielded once to gather more deliveries.
    pub coalesced: bool,
}

impl Out {
    pub fn unsent(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The buffer deliveries append their frames to.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Queues a reply. At most `REPLY_BACKLOG` wait unsent: then input pauses until they
    /// are written, and a client whose socket stays full meanwhile is closed with 4008, so
    /// one that sends but never reads cannot grow the server.
    pub fn reply(&mut self, opcode: OpCode, payload: &[u8]) {
        self.replies += 1;
        push_frame(&mut self.buf, opcode, payload);
    }

    fn backed_up(&self) -> bool {
        self.replies >= REPLY_BACKLOG
    }
}

pub struct WsSocket {
    sock: TcpStream,
    parser: FrameParser,
    /// An unfinished frame (and, after a `Wait`, what followed it).
    rbuf: BytesMut,
    /// Total bytes `rbuf` must hold for its first frame to be whole.
    need: usize,
    /// `rbuf` may hold whole frames that were not handled yet.
    parse_buffered: bool,
    pub out: Out,
    /// After our close frame: only the client's close matters.
    closing: bool,
    id: u64,
    stall: Stall,
}

/// The "reads nothing" deadline: armed when a write finds the socket full, disarmed by the
/// next write that moves a byte. Armed and disarmed on those transitions only, so a busy
/// connection does not touch the timer per write; its timer is allocated the first time
/// the socket fills, so an idle connection carries none.
struct Stall {
    after: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Stall {
    fn new(after: Duration) -> Self {
        Self {
            after,
            timer: None,
            armed: false,
        }
    }

    fn blocked(&mut self) {
        if self.armed {
            return;
        }
        self.armed = true;
        let at = Instant::now() + self.after;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(at),
            None => self.timer = Some(Box::pin(sleep_until(at))),
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.timer {
            Some(timer) if self.armed => timer.as_mut().poll(cx).is_ready(),
            _ => false,
        }
    }
}

impl WsSocket {
    /// `leftover` holds bytes the client sent right behind its upgrade request.
    pub fn new(sock: TcpStream, leftover: &[u8], limits: &Limits, id: u64) -> Self {
        Self {
            sock,
            parser: FrameParser::new(limits.max_frame_bytes),
            parse_buffered: !leftover.is_empty(),
            rbuf: BytesMut::from(leftover),
            need: 0,
            out: Out::default(),
            closing: false,
            id,
            stall: Stall::new(limits.consumer_stall_timeout),
        }
    }

    /// After a `Wait`: whatever followed the frame that had to wait is still buffered.
    pub fn resume(&mut self) {
        self.parse_buffered = true;
    }

    /// One round of socket work: handle buffered frames, write, read. Ready with a `Wait`,
    /// the end, or `Ok(None)` when it made progress; pending when neither side can move.
    pub fn poll_round<H: Handler>(
        &mut self,
        cx: &mut Context<'_>,
        handler: &mut H,
    ) -> Poll<Result<Option<H::Wait>, End>> {
        let mut progress = false;
        if self.stall.expired(cx) {
            crate::metrics::handles().slow_consumer_closes.increment(1);
            tracing::info!(
                conn = self.id,
                unsent = self.out.unsent(),
                "client reads nothing"
            );
            return Poll::Ready(Err(CloseCode::TooSlow.into()));
        }
        if self.parse_buffered && !handler.paused() {
            self.parse_buffered = false;
            if let Some(wait) = self.parse_rbuf(handler)? {
                return Poll::Ready(Ok(Some(wait)));
            }
            progress = true;
        }
        match self.poll_write(cx) {
            Poll::Ready(Ok(())) => progress = true,
            Poll::Ready(Err(())) => return Poll::Ready(Err(End::Gone)),
            // The socket is full and the client has asked for more replies than may wait:
            // it sends but does not read.
            Poll::Pending if self.out.backed_up() => {
                return Poll::Ready(Err(CloseCode::RateLimited.into()))
            }
            Poll::Pending => {}
        }
        // Input waits while replies are backed up, or the protocol is paused.
        if !self.out.backed_up() && !handler.paused() {
            match self.poll_read(cx, handler) {
                Poll::Ready(Ok(Some(wait))) => return Poll::Ready(Ok(Some(wait))),
                Poll::Ready(Ok(None)) => progress = true,
                Poll::Ready(Err(end)) => return Poll::Ready(Err(end)),
                Poll::Pending => {}
            }
        }
        if progress {
            Poll::Ready(Ok(None))
        } else {
            Poll::Pending
        }
    }

    /// Writes some of `out`; ready when it wrote something, pending when there is nothing
    /// to write or the socket is full.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        let out = &mut self.out;
        if out.unsent() == 0 {
            return Poll::Pending;
        }
        let written = Pin::new(&mut self.sock).poll_write(cx, &out.buf[out.at..]);
        match written {
            Poll::Pending => {
                self.stall.blocked();
                return Poll::Pending;
            }
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(())),
            Poll::Ready(Ok(n)) => {
                out.at += n;
                self.stall.armed = false;
            }
        }
        if out.unsent() == 0 {
            if out.backed_up() {
                // Parsing stopped there; what was read meanwhile is in `rbuf`.
                self.parse_buffered = true;
            }
            out.buf.clear();
            out.at = 0;
            out.replies = 0;
            out.coalesced = false;
            if out.buf.capacity() > KEEP_WRITE {
                out.buf = Vec::new();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes everything in `out`.
    async fn flush(&mut self) -> Result<(), ()> {
        poll_fn(|cx| {
            while self.out.unsent() > 0 {
                ready!(self.poll_write(cx))?;
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Reads what the socket has and handles every whole frame in it.
    fn poll_read<H: Handler>(
        &mut self,
        cx: &mut Context<'_>,
        handler: &mut H,
    ) -> Poll<Result<Option<H::Wait>, End>> {
        if !self.rbuf.is_empty() {
            let want = self.need.max(self.rbuf.len() + MAX_HEADER).max(KEEP_READ);
            self.rbuf.reserve(want - self.rbuf.len());
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.sock),
                cx,
                &mut self.rbuf
            )) {
                Ok(0) | Err(_) => return Poll::Ready(Err(End::Gone)),
                Ok(_) if self.rbuf.len() < self.need => return Poll::Ready(Ok(None)),
                Ok(_) => {}
            }
            return Poll::Ready(self.parse_rbuf(handler));
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_STACK];
        let mut buf = ReadBuf::uninit(&mut stack);
        match ready!(Pin::new(&mut self.sock).poll_read(cx, &mut buf)) {
            Ok(()) if !buf.filled().is_empty() => {}
            _ => return Poll::Ready(Err(End::Gone)),
        }
        let bytes = buf.filled_mut();
        let (used, wait) = self.on_bytes(bytes, handler)?;
        self.rbuf.extend_from_slice(&bytes[used..]);
        Poll::Ready(Ok(wait))
    }

    /// Handles the whole frames in `rbuf` and keeps the rest.
    fn parse_rbuf<H: Handler>(&mut self, handler: &mut H) -> Result<Option<H::Wait>, End> {
        let mut buf = std::mem::take(&mut self.rbuf);
        let result = self.on_bytes(&mut buf, handler);
        if let Ok((used, _)) = &result {
            buf.advance(*used);
        }
        if buf.is_empty() && buf.capacity() > KEEP_READ {
            buf = BytesMut::new();
        }
        self.rbuf = buf;
        result.map(|(_, wait)| wait)
    }

    /// Handles whole frames from the front of `bytes` until one needs a `Wait` or only part
    /// of a frame is left; returns the bytes used.
    fn on_bytes<H: Handler>(
        &mut self,
        bytes: &mut [u8],
        handler: &mut H,
    ) -> Result<(usize, Option<H::Wait>), End> {
        let mut used = 0;
        self.need = 0;
        // Stops early once replies back up: the rest is parsed after they are written.
        while used < bytes.len() && !self.out.backed_up() && !handler.paused() {
            let message = match self.parser.parse(&mut bytes[used..]) {
                Ok(Parsed::Incomplete(need)) => {
                    self.need = need;
                    break;
                }
                Ok(Parsed::Fragment(n)) => {
                    used += n;
                    continue;
                }
                Ok(Parsed::Message(message, n)) => {
                    used += n;
                    message
                }
                Err(e) => return Err(self.read_error(e)),
            };
            if self.closing {
                // Our close is out; the client's answer is all that is still awaited.
                if matches!(message, Message::Close(_)) {
                    return Err(End::Gone);
                }
                continue;
            }
            let wait = match message {
                Message::Text(text) => handler.on_text(&text, &mut self.out)?,
                Message::Binary(data) => handler.on_data(&data, &mut self.out)?,
                Message::Ping(payload) => {
                    handler.on_control();
                    self.out.reply(OpCode::Pong, payload);
                    None
                }
                Message::Pong => {
                    handler.on_control();
                    None
                }
                Message::Close(_) => {
                    handler.on_control();
                    return Err(CloseCode::Normal.into());
                }
            };
            if let Some(wait) = wait {
                return Ok((used, Some(wait)));
            }
        }
        Ok((used, None))
    }

    fn read_error(&self, e: ReadError) -> End {
        if self.closing {
            return End::Gone;
        }
        match e {
            ReadError::TooLarge => CloseCode::TooLarge.into(),
            ReadError::InvalidUtf8 => CloseCode::InvalidJson.into(),
            ReadError::Protocol(_) => {
                tracing::debug!(conn = self.id, error = %e, "websocket protocol error");
                CloseCode::Protocol.into()
            }
        }
    }

    /// Sends a close frame after everything queued (waiting at most [`CLOSE_TIMEOUT`]);
    /// true if it went out.
    pub async fn close(&mut self, code: CloseCode) -> bool {
        push_close(&mut self.out.buf, code.code(), code.reason());
        let sent = matches!(
            tokio::time::timeout(CLOSE_TIMEOUT, self.flush()).await,
            Ok(Ok(()))
        );
        let _ = self.sock.shutdown().await;
        sent
    }

    /// Gives the client a moment to answer our close, so it sees a clean close: reads until
    /// its close frame, EOF or an error, for at most a second.
    pub async fn await_close(&mut self) {
        self.closing = true;
        let mut ignore = Ignore;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            poll_fn(|cx| loop {
                match self.poll_read(cx, &mut ignore) {
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }),
        )
        .await;
    }
}

/// The handler while closing: nothing reaches it.
struct Ignore;

impl Handler for Ignore {
    type Wait = ();

    fn on_data(&mut self, _: &[u8], _: &mut Out) -> Result<Option<()>, End> {
        Ok(None)
    }
}
