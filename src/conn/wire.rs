//! WebSocket messages over fastwebsockets' frame reader, with our own fragment assembly.
//!
//! fastwebsockets 0.10 checks each frame's size but its fragment collector does not cap the
//! joined message, so [`MessageReader`] joins continuation frames itself against
//! `max_frame_bytes` (close 1009). Server frames are written by [`push_frame`] into the
//! writer's batch buffer (headers formatted by fastwebsockets), so many frames go out in one
//! write.

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketRead};
use tokio::io::AsyncRead;

/// One complete client message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    /// The peer went away (EOF or I/O error): no close frame can reach it.
    #[error("connection lost")]
    Closed,
    #[error("message larger than the limit")]
    TooLarge,
    #[error("text is not UTF-8")]
    InvalidUtf8,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Reads whole messages, joining fragments up to `max` bytes.
pub struct MessageReader<R> {
    ws: WebSocketRead<R>,
    max: usize,
    partial: Option<(OpCode, BytesMut)>,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(mut ws: WebSocketRead<R>, max: usize) -> Self {
        // Pings and closes are answered through the connection's single writer.
        ws.set_auto_pong(false);
        ws.set_auto_close(false);
        // fastwebsockets refuses frames of `>= max_message_size`.
        ws.set_max_message_size(max + 1);
        Self {
            ws,
            max,
            partial: None,
        }
    }

    /// The next message. Not cancel-safe: a frame half read is lost, so only race it against
    /// events that end the connection anyway.
    pub async fn next(&mut self) -> Result<Message, ReadError> {
        loop {
            let frame = self
                .ws
                .read_frame(&mut |_| async { Ok::<(), std::convert::Infallible>(()) })
                .await
                .map_err(map_error)?;
            let fin = frame.fin;
            let opcode = frame.opcode;
            let payload = into_bytes_mut(frame.payload);
            match opcode {
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol("new message inside a fragmented one"));
                    }
                    if fin {
                        return finish(opcode, payload);
                    }
                    self.partial = Some((opcode, payload));
                }
                OpCode::Continuation => {
                    let Some((first, mut joined)) = self.partial.take() else {
                        return Err(ReadError::Protocol("continuation without a first frame"));
                    };
                    if joined.len() + payload.len() > self.max {
                        return Err(ReadError::TooLarge);
                    }
                    joined.extend_from_slice(&payload);
                    if fin {
                        return finish(first, joined);
                    }
                    self.partial = Some((first, joined));
                }
                OpCode::Ping => return Ok(Message::Ping(payload.freeze())),
                OpCode::Pong => return Ok(Message::Pong),
                OpCode::Close => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Ok(Message::Close(code));
                }
            }
        }
    }
}

fn finish(opcode: OpCode, payload: BytesMut) -> Result<Message, ReadError> {
    match opcode {
        OpCode::Text => {
            if std::str::from_utf8(&payload).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Message::Text(payload.freeze()))
        }
        _ => Ok(Message::Binary(payload.freeze())),
    }
}

fn into_bytes_mut(payload: Payload<'_>) -> BytesMut {
    match payload {
        Payload::Bytes(b) => b,
        other => BytesMut::from(&other[..]),
    }
}

fn map_error(e: WebSocketError) -> ReadError {
    match e {
        WebSocketError::FrameTooLarge => ReadError::TooLarge,
        WebSocketError::InvalidUTF8 => ReadError::InvalidUtf8,
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => ReadError::Closed,
        WebSocketError::ReservedBitsNotZero => ReadError::Protocol("reserved bits set"),
        WebSocketError::ControlFrameFragmented => ReadError::Protocol("fragmented control frame"),
        WebSocketError::PingFrameTooLarge => ReadError::Protocol("ping larger than 125 bytes"),
        _ => ReadError::Protocol("invalid frame"),
    }
}

/// Appends one unmasked, unfragmented server frame to `out`.
pub fn push_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let mut head = [0u8; 10];
    let n = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and `reason`.
pub fn push_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    push_frame(out, OpCode::Close, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Role;

    /// Client frames as a browser sends them: masked.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![(fin as u8) << 7 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn reader(bytes: Vec<u8>, max: usize) -> MessageReader<std::io::Cursor<Vec<u8>>> {
        let (r, _) = fastwebsockets::after_handshake_split(
            std::io::Cursor::new(bytes),
            tokio::io::sink(),
            Role::Server,
        );
        MessageReader::new(r, max)
    }

    #[tokio::test]
    async fn joins_fragments_around_a_ping() {
        let mut wire = client_frame(false, 1, b"{\"op\":");
        wire.extend(client_frame(true, 9, b"hi"));
        wire.extend(client_frame(false, 0, b"0"));
        wire.extend(client_frame(true, 0, b"}"));
        let mut r = reader(wire, 100);
        assert_eq!(r.next().await, Ok(Message::Ping(Bytes::from_static(b"hi"))));
        assert_eq!(
            r.next().await,
            Ok(Message::Text(Bytes::from_static(b"{\"op\":0}")))
        );
        assert_eq!(r.next().await, Err(ReadError::Closed));
    }

    #[tokio::test]
    async fn caps_whole_frames_and_joined_fragments() {
        let mut r = reader(client_frame(true, 1, &[b'a'; 101]), 100);
        assert_eq!(r.next().await, Err(ReadError::TooLarge));
        let mut wire = Vec::new();
        for _ in 0..3 {
            wire.extend(client_frame(false, 0, &[b'a'; 40]));
        }
        let mut first = client_frame(false, 1, &[b'a'; 40]);
        first.extend(wire);
        let mut r = reader(first, 100);
        assert_eq!(r.next().await, Err(ReadError::TooLarge));
        let mut r = reader(client_frame(true, 1, &[b'a'; 100]), 100);
        assert!(matches!(r.next().await, Ok(Message::Text(b)) if b.len() == 100));
    }

    #[tokio::test]
    async fn rejects_bad_utf8_and_stray_continuations() {
        let mut wire = client_frame(false, 1, &[0xff]);
        wire.extend(client_frame(true, 0, &[0xfe]));
        assert_eq!(reader(wire, 100).next().await, Err(ReadError::InvalidUtf8));
        assert!(matches!(
            reader(client_frame(true, 0, b"x"), 100).next().await,
            Err(ReadError::Protocol(_))
        ));
        let mut wire = client_frame(false, 1, b"a");
        wire.extend(client_frame(true, 1, b"b"));
        assert!(matches!(
            reader(wire, 100).next().await,
            Err(ReadError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn reads_close_codes() {
        let mut r = reader(client_frame(true, 8, &[0x03, 0xe8]), 100);
        assert_eq!(r.next().await, Ok(Message::Close(Some(1000))));
    }

    #[test]
    fn server_frames_are_unmasked() {
        let mut out = Vec::new();
        push_frame(&mut out, OpCode::Text, b"{\"op\":4}");
        assert_eq!(&out[..2], &[0x81, 8]);
        assert_eq!(&out[2..], b"{\"op\":4}");
        out.clear();
        push_frame(&mut out, OpCode::Text, &[b'x'; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        out.clear();
        push_close(&mut out, 4009, "Consumer too slow");
        assert_eq!(&out[..4], &[0x88, 19, 0x0f, 0xa9]);
    }
}
