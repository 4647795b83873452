//! WebSocket frames on the wire: client frames parsed in place, server frames appended to
//! the connection's write buffer.
//!
//! Our own parser rather than fastwebsockets' reader, for two reasons measured on this
//! server: that reader owns a fixed 8 KiB buffer per connection (most of an idle
//! connection's memory), and its fragment collector does not cap the joined message. Here a
//! frame is parsed from whatever buffer the connection read it into, its payload is unmasked
//! in place and handed out borrowed; fragments are joined against `max_frame_bytes`
//! (close 1009). fastwebsockets still provides the opcode type and unmasking; the server
//! frame header is written here. Owns no socket: the connection reads and writes.

use fastwebsockets::{unmask, OpCode};
use std::borrow::Cow;

/// One complete client message, borrowed from the read buffer where it can be.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Checked here, so no later stage checks it again.
    Text(Cow<'a, str>),
    Binary(Cow<'a, [u8]>),
    Ping(&'a [u8]),
    Pong,
    Close(Option<u16>),
}

/// What the front of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A message, which used this many bytes.
    Message(Message<'a>, usize),
    /// A fragment of a message, taken in; this many bytes used.
    Fragment(usize),
    /// Not a whole frame yet: the buffer needs at least this many bytes.
    Incomplete(usize),
}

/// Why a client's bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("message larger than the limit")]
    TooLarge,
    #[error("text is not UTF-8")]
    InvalidUtf8,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Largest frame header a client sends: 2 + 8 length bytes + 4 mask bytes.
pub const MAX_HEADER: usize = 14;

/// Parses client (masked) frames and joins fragments up to `max` bytes.
#[derive(Debug)]
pub struct FrameParser {
    max: usize,
    /// The first frame's opcode and the payload joined so far.
    partial: Option<(OpCode, Vec<u8>)>,
}

impl FrameParser {
    pub fn new(max: usize) -> Self {
        Self { max, partial: None }
    }

    /// Parses the frame at the front of `buf`, unmasking its payload in place.
    pub fn parse<'a>(&mut self, buf: &'a mut [u8]) -> Result<Parsed<'a>, ReadError> {
        if buf.len() < 2 {
            return Ok(Parsed::Incomplete(2));
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode =
            OpCode::try_from(b0 & 0x0f).map_err(|_| ReadError::Protocol("unknown opcode"))?;
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frame not masked"));
        }
        let (len, at) = match b1 & 0x7f {
            126 if buf.len() < 4 => return Ok(Parsed::Incomplete(4)),
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() < 10 => return Ok(Parsed::Incomplete(10)),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            n => (u64::from(n), 2),
        };
        let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
        if control && !fin {
            return Err(ReadError::Protocol("fragmented control frame"));
        }
        if control && len > 125 {
            return Err(ReadError::Protocol("control frame larger than 125 bytes"));
        }
        // Refused before its bytes arrive: the buffer never grows past the limit.
        if len > self.max as u64 {
            return Err(ReadError::TooLarge);
        }
        let len = len as usize;
        let total = at + 4 + len;
        if buf.len() < total {
            return Ok(Parsed::Incomplete(total));
        }
        let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        let payload = &mut buf[at + 4..total];
        unmask(payload, mask);
        let payload: &'a [u8] = payload;

        let message = match opcode {
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message inside a fragmented one"));
                }
                if !fin {
                    self.partial = Some((opcode, payload.to_vec()));
                    return Ok(Parsed::Fragment(total));
                }
                finish(opcode, Cow::Borrowed(payload))?
            }
            OpCode::Continuation => {
                let Some((first, mut joined)) = self.partial.take() else {
                    return Err(ReadError::Protocol("continuation without a first frame"));
                };
                if joined.len() + len > self.max {
                    return Err(ReadError::TooLarge);
                }
                joined.extend_from_slice(payload);
                if !fin {
                    self.partial = Some((first, joined));
                    return Ok(Parsed::Fragment(total));
                }
                finish(first, Cow::Owned(joined))?
            }
            OpCode::Ping => Message::Ping(payload),
            OpCode::Pong => Message::Pong,
            OpCode::Close => match payload.len() {
                0 => Message::Close(None),
                1 => return Err(ReadError::Protocol("close frame with a one-byte body")),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !close_code_allowed(code) {
                        return Err(ReadError::Protocol("close frame with an invalid code"));
                    }
                    if std::str::from_utf8(&payload[2..]).is_err() {
                        return Err(ReadError::InvalidUtf8);
                    }
                    Message::Close(Some(code))
                }
            },
        };
        Ok(Parsed::Message(message, total))
    }
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4): the defined codes a
/// peer may put on the wire (1000–1003, 1007–1014) and the ranges for libraries and
/// applications (3000–4999). 1004–1006 and 1015 must never be sent; everything else is
/// unassigned. Anything else is a protocol error, answered with 1002.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn finish(opcode: OpCode, payload: Cow<'_, [u8]>) -> Result<Message<'_>, ReadError> {
    match opcode {
        OpCode::Text => {
            let text = match payload {
                Cow::Borrowed(b) => std::str::from_utf8(b).map(Cow::Borrowed).ok(),
                Cow::Owned(v) => String::from_utf8(v).map(Cow::Owned).ok(),
            };
            text.map(Message::Text).ok_or(ReadError::InvalidUtf8)
        }
        _ => Ok(Message::Binary(payload)),
    }
}

/// Appends one unmasked, unfragmented server frame to `out`.
pub fn push_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    push_frame_parts(out, opcode, &[payload]);
}

/// Appends one frame whose payload is `parts` joined, without joining them first. Server
/// frames are final and unmasked: one byte of FIN and opcode, then the length in 7, 16 or
/// 64 bits.
pub fn push_frame_parts(out: &mut Vec<u8>, opcode: OpCode, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(10 + len);
    out.push(0x80 | opcode as u8);
    match len {
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
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// Appends a close frame with `code` and `reason`.
pub fn push_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = [0u8; 125];
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    push_frame(out, OpCode::Close, &payload[..2 + reason.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::{Frame, Payload};

    #[test]
    fn a_frame_in_parts_is_the_frame_of_the_joined_payload() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let (a, b) = payload.split_at(len / 3);
            // What fastwebsockets writes for the whole payload.
            let mut head = [0u8; 10];
            let n = Frame::new(true, OpCode::Text, None, Payload::Borrowed(&payload))
                .fmt_head(&mut head);
            let whole = [&head[..n], &payload].concat();
            let mut parts = Vec::new();
            push_frame_parts(&mut parts, OpCode::Text, &[a, &[], b]);
            assert_eq!(whole, parts, "{len}");
        }
    }

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

    /// Owned form of a parse result, for comparing whole sequences.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
        Err(ReadError),
    }

    /// Parses `wire` as it would arrive in pieces of `step` bytes, the way the connection
    /// does: keep the unparsed tail, append the next read, parse again.
    fn parse_all(wire: &[u8], max: usize, step: usize) -> Vec<Got> {
        let mut parser = FrameParser::new(max);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                let mut work = buf.clone();
                match parser.parse(&mut work) {
                    Err(e) => {
                        got.push(Got::Err(e));
                        return got;
                    }
                    Ok(Parsed::Incomplete(need)) => {
                        assert!(need > buf.len());
                        break;
                    }
                    Ok(Parsed::Fragment(used)) => {
                        buf.drain(..used);
                    }
                    Ok(Parsed::Message(m, used)) => {
                        got.push(match m {
                            Message::Text(t) => Got::Text(t.into_owned().into_bytes()),
                            Message::Binary(b) => Got::Binary(b.into_owned()),
                            Message::Ping(p) => Got::Ping(p.to_vec()),
                            Message::Pong => Got::Pong,
                            Message::Close(c) => Got::Close(c),
                        });
                        buf.drain(..used);
                    }
                }
            }
        }
        got
    }

    #[test]
    fn parses_whole_and_split_frames_alike() {
        let mut wire = client_frame(true, 1, b"{\"op\":1}");
        wire.extend(client_frame(true, 2, &[7u8; 300]));
        wire.extend(client_frame(true, 1, &[b'a'; 70_000]));
        wire.extend(client_frame(true, 10, b""));
        wire.extend(client_frame(true, 8, &[0x03, 0xe8, b'b', b'y', b'e']));
        let want = vec![
            Got::Text(b"{\"op\":1}".to_vec()),
            Got::Binary(vec![7u8; 300]),
            Got::Text(vec![b'a'; 70_000]),
            Got::Pong,
            Got::Close(Some(1000)),
        ];
        for step in [1, 3, 7, 64, 4096, wire.len()] {
            assert_eq!(parse_all(&wire, 100_000, step), want, "step {step}");
        }
    }

    /// Autobahn 7.7.x and 7.9.x: a close code a peer may not send is a protocol error.
    #[test]
    fn a_close_with_an_invalid_code_is_a_protocol_error() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999,
        ] {
            let wire = client_frame(true, 8, &code.to_be_bytes());
            assert_eq!(
                parse_all(&wire, 100, 1),
                vec![Got::Close(Some(code))],
                "{code}"
            );
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let wire = client_frame(true, 8, &code.to_be_bytes());
            assert_eq!(
                parse_all(&wire, 100, 1),
                vec![Got::Err(ReadError::Protocol(
                    "close frame with an invalid code"
                ))],
                "{code}"
            );
        }
    }

    #[test]
    fn joins_fragments_around_a_ping() {
        let mut wire = client_frame(false, 1, b"{\"op\":");
        wire.extend(client_frame(true, 9, b"hi"));
        wire.extend(client_frame(false, 0, b"0"));
        wire.extend(client_frame(true, 0, b"}"));
        for step in [1, wire.len()] {
            assert_eq!(
                parse_all(&wire, 100, step),
                vec![Got::Ping(b"hi".to_vec()), Got::Text(b"{\"op\":0}".to_vec())]
            );
        }
    }

    #[test]
    fn caps_whole_frames_and_joined_fragments() {
        // The length alone is refused: the payload never has to arrive.
        let frame = client_frame(true, 1, &[b'a'; 101]);
        assert_eq!(
            parse_all(&frame[..8], 100, 8),
            vec![Got::Err(ReadError::TooLarge)]
        );
        let mut wire = client_frame(false, 1, &[b'a'; 40]);
        for _ in 0..3 {
            wire.extend(client_frame(false, 0, &[b'a'; 40]));
        }
        assert_eq!(
            parse_all(&wire, 100, wire.len()),
            vec![Got::Err(ReadError::TooLarge)]
        );
        assert_eq!(
            parse_all(&client_frame(true, 1, &[b'a'; 100]), 100, 200),
            vec![Got::Text(vec![b'a'; 100])]
        );
    }

    #[test]
    fn rejects_bad_utf8_and_stray_or_nested_fragments() {
        let mut wire = client_frame(false, 1, &[0xff]);
        wire.extend(client_frame(true, 0, &[0xfe]));
        assert_eq!(
            parse_all(&wire, 100, 100),
            vec![Got::Err(ReadError::InvalidUtf8)]
        );
        assert!(matches!(
            parse_all(&client_frame(true, 0, b"x"), 100, 100)[..],
            [Got::Err(ReadError::Protocol(_))]
        ));
        let mut wire = client_frame(false, 1, b"a");
        wire.extend(client_frame(true, 1, b"b"));
        assert!(matches!(
            parse_all(&wire, 100, 100)[..],
            [Got::Err(ReadError::Protocol(_))]
        ));
    }

    #[test]
    fn rejects_what_rfc_6455_forbids() {
        let cases: [(&str, Vec<u8>); 5] = [
            ("reserved bit", {
                let mut f = client_frame(true, 1, b"x");
                f[0] |= 0x40;
                f
            }),
            ("unknown opcode", client_frame(true, 3, b"x")),
            ("unmasked", vec![0x81, 0x01, b'x']),
            ("fragmented ping", client_frame(false, 9, b"x")),
            ("long ping", client_frame(true, 9, &[0u8; 126])),
        ];
        for (what, wire) in cases {
            assert!(
                matches!(
                    parse_all(&wire, 1000, wire.len())[..],
                    [Got::Err(ReadError::Protocol(_))]
                ),
                "{what}"
            );
        }
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
        assert_eq!(&out[4..], b"Consumer too slow");
    }
}
