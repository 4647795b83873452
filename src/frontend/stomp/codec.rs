//! STOMP 1.0/1.1/1.2 frames as bytes: the grammar, header escaping, `content-length`
//! framing and heart-beat EOLs, in both directions.
//!
//! Owns nothing but the byte rules; which headers a command needs is [`super::frame`]'s
//! business. Decoding is incremental over the connection's buffer, because one WebSocket
//! message may hold several frames or part of one, and every input has a bound.

use bytes::{Buf, Bytes, BytesMut};
use memchr::memchr;

/// A negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    pub const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "1.0" => Some(Version::V1_0),
            "1.1" => Some(Version::V1_1),
            "1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

/// Every command of the protocol, client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Connected,
    Message,
    Receipt,
    Error,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    /// Commands are case-sensitive.
    pub fn parse(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"SEND" => Command::Send,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"DISCONNECT" => Command::Disconnect,
            b"CONNECTED" => Command::Connected,
            b"MESSAGE" => Command::Message,
            b"RECEIPT" => Command::Receipt,
            b"ERROR" => Command::Error,
            _ => return None,
        })
    }

    /// Only these may carry a body.
    pub fn has_body(self) -> bool {
        matches!(self, Command::Send | Command::Message | Command::Error)
    }

    /// CONNECT, STOMP and CONNECTED headers are never escaped, for 1.0 compatibility.
    fn escapes(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

/// One frame: its command, headers in wire order (a repeated name keeps every occurrence;
/// the first one counts) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub command: Command,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RawFrame {
    pub fn new(command: Command) -> Self {
        Self {
            command,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// The first occurrence of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

/// What the front of the buffer held.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(RawFrame),
    /// One or more bare EOLs: a heart-beat (or the EOLs that may follow a frame).
    HeartBeat,
}

/// The bounds a decoder enforces; each violation is an ERROR and a close.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Command, headers and body together.
    pub max_frame_bytes: usize,
    pub max_headers: usize,
    pub max_header_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 10,
            max_headers: 64,
            max_header_line: 8 << 10,
        }
    }
}

/// Why bytes are not a STOMP frame. Each is fatal: ERROR with this message, then close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown command")]
    UnknownCommand,
    #[error("header without a colon")]
    HeaderWithoutColon,
    #[error("undefined escape sequence in a header")]
    BadEscape,
    #[error("header is not UTF-8")]
    NotUtf8,
    #[error("carriage return inside a header line")]
    BareCarriageReturn,
    #[error("NUL inside a header")]
    NulInHeader,
    #[error("frame larger than {0} bytes")]
    FrameTooLarge(usize),
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    #[error("header line longer than {0} bytes")]
    HeaderLineTooLong(usize),
    #[error("invalid content-length")]
    BadContentLength,
    #[error("frame does not end with NUL")]
    MissingNul,
    #[error("{0} frames must not have a body")]
    UnexpectedBody(&'static str),
}

/// Decodes the frame at the front of `buf`, consuming it; `Ok(None)` when more bytes are
/// needed. `version` sets the EOL and escape rules (before CONNECT, pass [`Version::V1_2`]:
/// the most permissive grammar, since the client's version is not known yet).
pub fn decode(
    buf: &mut BytesMut,
    version: Version,
    limits: &Limits,
) -> Result<Option<Decoded>, CodecError> {
    // Heart-beats, and the EOLs allowed after a frame's NUL.
    let eols = buf
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    if eols > 0 {
        // A CR that ends the buffer may be the start of a CRLF still on its way.
        let whole = if eols == buf.len() && buf[eols - 1] == b'\r' {
            eols - 1
        } else {
            eols
        };
        if whole == 0 {
            return Ok(None);
        }
        buf.advance(whole);
        return Ok(Some(Decoded::HeartBeat));
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((command, headers, head_len)) = decode_head(buf, version, limits)? else {
        return Ok(None);
    };
    let content_length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => Some(
            v.parse::<usize>()
                .map_err(|_| CodecError::BadContentLength)?,
        ),
        None => None,
    };
    let (body_len, total) = match content_length {
        Some(len) => {
            let total = len
                .checked_add(head_len + 1)
                .filter(|&t| t <= limits.max_frame_bytes)
                .ok_or(CodecError::FrameTooLarge(limits.max_frame_bytes))?;
            if buf.len() < total {
                return Ok(None);
            }
            if buf[total - 1] != 0 {
                return Err(CodecError::MissingNul);
            }
            (len, total)
        }
        None => match memchr(0, &buf[head_len..]) {
            Some(len) => (len, head_len + len + 1),
            None if buf.len() >= limits.max_frame_bytes => {
                return Err(CodecError::FrameTooLarge(limits.max_frame_bytes))
            }
            None => return Ok(None),
        },
    };
    if body_len > 0 && !command.has_body() {
        return Err(CodecError::UnexpectedBody(command.as_str()));
    }
    let mut frame = buf.split_to(total);
    frame.advance(head_len);
    frame.truncate(body_len);
    Ok(Some(Decoded::Frame(RawFrame {
        command,
        headers,
        body: frame.freeze(),
    })))
}

type Head = (Command, Vec<(String, String)>, usize);

/// The command and headers, and the length of everything up to the blank line.
fn decode_head(buf: &[u8], version: Version, limits: &Limits) -> Result<Option<Head>, CodecError> {
    let mut lines = Vec::new();
    let mut at = 0;
    let head_len = loop {
        let Some(nl) = memchr(b'\n', &buf[at..]) else {
            if buf.len() - at > limits.max_header_line {
                return Err(CodecError::HeaderLineTooLong(limits.max_header_line));
            }
            if buf.len() > limits.max_frame_bytes {
                return Err(CodecError::FrameTooLarge(limits.max_frame_bytes));
            }
            return Ok(None);
        };
        let mut line = &buf[at..at + nl];
        at += nl + 1;
        if version == Version::V1_2 {
            line = line.strip_suffix(b"\r").unwrap_or(line);
        }
        // No version can carry a raw CR in a command or header: 1.2 escapes it as `\r`,
        // 1.0 and 1.1 have no way to write one, and before the terminator it would read
        // as CRLF. Refused, so that whatever is accepted goes out to any subscriber intact.
        if memchr(b'\r', line).is_some() {
            return Err(CodecError::BareCarriageReturn);
        }
        if line.len() > limits.max_header_line {
            return Err(CodecError::HeaderLineTooLong(limits.max_header_line));
        }
        // No version can carry a NUL in a header: it ends the frame for whoever reads it.
        if memchr(0, line).is_some() {
            return Err(CodecError::NulInHeader);
        }
        if line.is_empty() {
            break at;
        }
        // Refuse garbage at its first line, not once it has filled the frame limit.
        if lines.is_empty() && Command::parse(line).is_none() {
            return Err(CodecError::UnknownCommand);
        }
        if lines.len() > limits.max_headers {
            return Err(CodecError::TooManyHeaders(limits.max_headers));
        }
        lines.push(line);
    };
    let command = Command::parse(lines[0]).ok_or(CodecError::UnknownCommand)?;
    let escaped = command.escapes() && version != Version::V1_0;
    let mut headers = Vec::with_capacity(lines.len() - 1);
    for line in &lines[1..] {
        let colon = memchr(b':', line).ok_or(CodecError::HeaderWithoutColon)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (name, value) = if escaped {
            (unescape(name, version)?, unescape(value, version)?)
        } else {
            (utf8(name)?, utf8(value)?)
        };
        headers.push((name, value));
    }
    Ok(Some((command, headers, head_len)))
}

fn utf8(b: &[u8]) -> Result<String, CodecError> {
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::NotUtf8)
}

fn unescape(b: &[u8], version: Version) -> Result<String, CodecError> {
    if memchr(b'\\', b).is_none() {
        return utf8(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut bytes = b.iter();
    while let Some(&c) = bytes.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        out.push(match bytes.next() {
            Some(b'n') => b'\n',
            Some(b'c') => b':',
            Some(b'\\') => b'\\',
            Some(b'r') if version == Version::V1_2 => b'\r',
            _ => return Err(CodecError::BadEscape),
        });
    }
    String::from_utf8(out).map_err(|_| CodecError::NotUtf8)
}

/// Appends `frame` to `out`. Bodies always get a `content-length` (replacing any given), so
/// they may hold NULs.
pub fn encode(frame: &RawFrame, version: Version, out: &mut Vec<u8>) {
    let headers = frame.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    encode_parts(frame.command, headers, &frame.body, version, out)
}

/// [`encode`] from borrowed parts, so a frame built per recipient (a MESSAGE for each
/// subscriber) costs no allocation.
pub fn encode_parts<'a>(
    command: Command,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
    version: Version,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(command.as_str().as_bytes());
    out.push(b'\n');
    let escaped = command.escapes() && version != Version::V1_0;
    for (name, value) in headers {
        if name == "content-length" || !carries(name, value, escaped, version) {
            continue;
        }
        push_escaped(out, name, escaped, version);
        out.push(b':');
        push_escaped(out, value, escaped, version);
        out.push(b'\n');
    }
    if command.has_body() {
        out.extend_from_slice(b"content-length:");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
}

/// Whether a header survives this version's framing as it is. 1.0 (and the unescaped
/// CONNECT/CONNECTED) cannot carry a newline, a carriage return, or a colon in a name; 1.1
/// escapes all but the carriage return; 1.2 escapes everything. NUL ends a frame in every
/// version. A header that does not survive is left out of this recipient's copy: written
/// raw, it would end the header early or start a frame of the sender's making.
fn carries(name: &str, value: &str, escaped: bool, version: Version) -> bool {
    let ok = |s: &str, is_name: bool| {
        s.bytes().all(|b| match b {
            0 => false,
            b'\r' => escaped && version == Version::V1_2,
            b'\n' => escaped,
            b':' => escaped || !is_name,
            _ => true,
        })
    };
    ok(name, true) && ok(value, false)
}

fn push_escaped(out: &mut Vec<u8>, s: &str, escaped: bool, version: Version) {
    if !escaped {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for &b in s.as_bytes() {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b':' => out.extend_from_slice(b"\\c"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\r' if version == Version::V1_2 => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(wire: &[u8], version: Version) -> Result<Option<Decoded>, CodecError> {
        decode(&mut BytesMut::from(wire), version, &Limits::default())
    }

    fn frame(wire: &[u8], version: Version) -> RawFrame {
        match one(wire, version) {
            Ok(Some(Decoded::Frame(f))) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn seed_000_connect_and_subscribe() {
        let f = frame(b"CONNECT\n\n\0", Version::V1_2);
        assert_eq!(f, RawFrame::new(Command::Connect));
        let f = frame(
            b"SUBSCRIBE\nid:any_client_id\ndestination:/topic/workout/record\n\n\0",
            Version::V1_1,
        );
        assert_eq!(f.command, Command::Subscribe);
        assert_eq!(f.header("id"), Some("any_client_id"));
        assert_eq!(f.header("destination"), Some("/topic/workout/record"));
    }

    #[test]
    fn golden_message_as_seed_000_shows_it() {
        let f = RawFrame::new(Command::Message)
            .with("content-type", "application/json;charset=UTF-8")
            .with("subscription", "any_client_id")
            .with("destination", "/topic/workout/record")
            .with("message-id", "7");
        let mut f = f;
        f.body = Bytes::from_static(b"{\"workout\":{\"id\":4711}}");
        let mut out = Vec::new();
        encode(&f, Version::V1_1, &mut out);
        assert_eq!(
            out,
            b"MESSAGE\ncontent-type:application/json;charset=UTF-8\nsubscription:any_client_id\n\
              destination:/topic/workout/record\nmessage-id:7\ncontent-length:23\n\n\
              {\"workout\":{\"id\":4711}}\0"
                .to_vec()
        );
    }

    #[test]
    fn every_command_round_trips_in_every_version() {
        let commands = [
            Command::Connect,
            Command::Stomp,
            Command::Send,
            Command::Subscribe,
            Command::Unsubscribe,
            Command::Ack,
            Command::Nack,
            Command::Begin,
            Command::Commit,
            Command::Abort,
            Command::Disconnect,
            Command::Connected,
            Command::Message,
            Command::Receipt,
            Command::Error,
        ];
        for version in Version::ALL {
            for command in commands {
                let mut f = RawFrame::new(command).with("a", "1").with("a", "2");
                if version != Version::V1_0 && command.escapes() {
                    f = f.with("odd:name", "line\nbreak:colon\\slash");
                }
                if command.has_body() {
                    f.body = Bytes::from_static(b"body with \0 NUL");
                }
                let mut wire = Vec::new();
                encode(&f, version, &mut wire);
                let mut back = frame(&wire, version);
                back.headers.retain(|(n, _)| n != "content-length");
                assert_eq!(back, f, "{command:?} {version:?}");
                assert_eq!(back.header("a"), Some("1"), "first repeated header wins");
            }
        }
    }

    #[test]
    fn escapes_by_version() {
        let wire = b"SEND\ndestination:/a\\cb\\n\\\\\n\n\0";
        assert_eq!(
            frame(wire, Version::V1_1).header("destination"),
            Some("/a:b\n\\")
        );
        // 1.0 has no escapes: the bytes are the value.
        assert_eq!(
            frame(wire, Version::V1_0).header("destination"),
            Some("/a\\cb\\n\\\\")
        );
        // `\r` is defined in 1.2 only; any other escape is fatal.
        let cr = b"SEND\ndestination:/a\\r\n\n\0";
        assert_eq!(frame(cr, Version::V1_2).header("destination"), Some("/a\r"));
        assert_eq!(one(cr, Version::V1_1), Err(CodecError::BadEscape));
        assert_eq!(
            one(b"SEND\ndestination:/a\\t\n\n\0", Version::V1_2),
            Err(CodecError::BadEscape)
        );
        // CONNECT headers are never unescaped.
        assert_eq!(
            frame(b"CONNECT\nlogin:a\\tb\n\n\0", Version::V1_2).header("login"),
            Some("a\\tb")
        );
    }

    /// A value a 1.2 client escaped must not become a second frame for a 1.0 subscriber:
    /// what a version cannot carry is left out of its copy, and each copy decodes as
    /// exactly one frame with every other header intact.
    #[test]
    fn a_header_a_version_cannot_carry_is_left_out_of_its_copy() {
        let sent = frame(
            b"SEND\ndestination:/topic/a\nx:a\\n\\nMESSAGE\\nforged\\cyes\ny:ok\ncr:a\\rb\n\nbody\0",
            Version::V1_2,
        );
        assert_eq!(sent.header("x"), Some("a\n\nMESSAGE\nforged:yes"));
        assert_eq!(sent.header("cr"), Some("a\rb"));
        let headers = || {
            sent.headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .chain([("line\nname", "v"), ("colon:name", "v")])
        };
        for (version, kept) in [
            (Version::V1_0, vec!["destination", "y"]),
            (
                Version::V1_1,
                vec!["destination", "x", "y", "line\nname", "colon:name"],
            ),
            (
                Version::V1_2,
                vec!["destination", "x", "y", "cr", "line\nname", "colon:name"],
            ),
        ] {
            let mut wire = Vec::new();
            encode_parts(Command::Message, headers(), b"body", version, &mut wire);
            let mut buf = BytesMut::from(&wire[..]);
            let Some(Decoded::Frame(got)) = decode(&mut buf, version, &Limits::default()).unwrap()
            else {
                panic!("{version:?}: no frame");
            };
            assert!(buf.is_empty(), "{version:?}: bytes left after one frame");
            let names: Vec<&str> = got.headers.iter().map(|(n, _)| n.as_str()).collect();
            let want: Vec<&str> = kept.into_iter().chain(["content-length"]).collect();
            assert_eq!(names, want, "{version:?}");
            assert_eq!(&got.body[..], b"body");
        }
    }

    #[test]
    fn nul_in_a_header_is_refused_in_every_version() {
        for version in Version::ALL {
            assert_eq!(
                one(b"SEND\ndestination:/a\nx:a\0b\n\nhi\0", version),
                Err(CodecError::NulInHeader),
                "{version:?}"
            );
        }
    }

    #[test]
    fn crlf_in_1_2_only() {
        let wire = b"SEND\r\ndestination:/a\r\n\r\nhi\0";
        let f = frame(wire, Version::V1_2);
        assert_eq!(
            (f.header("destination"), &f.body[..]),
            (Some("/a"), &b"hi"[..])
        );
        // 1.1 has no CRLF: the CR would be part of the command, and is refused.
        assert_eq!(
            one(wire, Version::V1_1),
            Err(CodecError::BareCarriageReturn)
        );
    }

    #[test]
    fn a_raw_cr_in_a_header_is_refused_in_every_version() {
        // Found by the stomp_decode fuzz target: an unescaped CONNECT header ending in CR
        // decoded, then re-encoded into a CRLF that lost it.
        let wire = b"CONNECT\naccept-version:1.2\r\r\n\n\0";
        assert_eq!(
            one(wire, Version::V1_2),
            Err(CodecError::BareCarriageReturn)
        );
        let wire = b"SEND\ndestination:/a\rb\n\n\0";
        assert_eq!(
            one(wire, Version::V1_2),
            Err(CodecError::BareCarriageReturn)
        );
        // 1.0 and 1.1 cannot write a CR in a header either, so it is refused there too:
        // what is accepted must reach a subscriber of any version intact (found by the
        // fuzzer as a 1.1 CONNECT, fuzz/seeds/stomp_decode/raw-cr-in-1.1-connect).
        for version in [Version::V1_0, Version::V1_1] {
            assert_eq!(one(wire, version), Err(CodecError::BareCarriageReturn));
            assert_eq!(
                one(b"CONNECT\n:1\r\r,1.1\nx:1\n\n\0", version),
                Err(CodecError::BareCarriageReturn)
            );
        }
    }

    #[test]
    fn content_length_frames_bodies_with_nul() {
        let f = frame(
            b"SEND\ndestination:/a\ncontent-length:3\n\na\0b\0",
            Version::V1_2,
        );
        assert_eq!(&f.body[..], b"a\0b");
        assert_eq!(
            one(
                b"SEND\ndestination:/a\ncontent-length:2\n\nabc\0",
                Version::V1_2
            ),
            Err(CodecError::MissingNul)
        );
        assert_eq!(
            one(
                b"SEND\ndestination:/a\ncontent-length:x\n\nabc\0",
                Version::V1_2
            ),
            Err(CodecError::BadContentLength)
        );
    }

    #[test]
    fn several_frames_and_heart_beats_in_one_buffer_and_one_frame_in_pieces() {
        let wire = b"\nSEND\ndestination:/a\n\nx\0\r\n\nSEND\ndestination:/b\n\ny\0";
        for step in [1, 2, 5, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                buf.extend_from_slice(chunk);
                while let Some(d) = decode(&mut buf, Version::V1_2, &Limits::default()).unwrap() {
                    got.push(d);
                }
            }
            let frames: Vec<_> = got
                .iter()
                .filter_map(|d| match d {
                    Decoded::Frame(f) => Some((f.header("destination").unwrap(), &f.body[..])),
                    Decoded::HeartBeat => None,
                })
                .collect();
            assert_eq!(
                frames,
                vec![("/a", &b"x"[..]), ("/b", &b"y"[..])],
                "step {step}"
            );
            assert!(got.contains(&Decoded::HeartBeat));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn malformed_frames_have_named_errors() {
        let v = Version::V1_2;
        assert_eq!(one(b"PUBLISH\n\n\0", v), Err(CodecError::UnknownCommand));
        assert_eq!(one(b"send\n\n\0", v), Err(CodecError::UnknownCommand));
        assert_eq!(
            one(b"SEND\ndestination\n\n\0", v),
            Err(CodecError::HeaderWithoutColon)
        );
        assert_eq!(
            one(b"SUBSCRIBE\nid:1\n\nbody\0", v),
            Err(CodecError::UnexpectedBody("SUBSCRIBE"))
        );
        assert_eq!(one(b"SEND\nd:\xff\n\n\0", v), Err(CodecError::NotUtf8));
        let limits = Limits {
            max_frame_bytes: 64,
            max_headers: 2,
            max_header_line: 24,
        };
        let mut big = BytesMut::from(&b"SEND\ndestination:/a\n\n"[..]);
        big.extend_from_slice(&[b'x'; 100]);
        assert_eq!(
            decode(&mut big, v, &limits),
            Err(CodecError::FrameTooLarge(64))
        );
        let mut declared = BytesMut::from(&b"SEND\ncontent-length:1000\n\n"[..]);
        assert_eq!(
            decode(&mut declared, v, &limits),
            Err(CodecError::FrameTooLarge(64))
        );
        // A length near usize::MAX is refused, not overflowed.
        assert_eq!(
            one(b"SEND\ncontent-length:18446744073709551615\n\n", v),
            Err(CodecError::FrameTooLarge(64 << 10))
        );
        let mut many = BytesMut::from(&b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0"[..]);
        assert_eq!(
            decode(&mut many, v, &limits),
            Err(CodecError::TooManyHeaders(2))
        );
        let mut long = BytesMut::from(&b"SEND\ndestination:/a-very-long-name-indeed\n\n\0"[..]);
        assert_eq!(
            decode(&mut long, v, &limits),
            Err(CodecError::HeaderLineTooLong(24))
        );
        // Garbage is refused at its first line.
        assert_eq!(
            one(b"GET / HTTP/1.1\r\n", v),
            Err(CodecError::UnknownCommand)
        );
        // An unfinished frame is not an error until it passes a bound.
        assert_eq!(one(b"SEND\ndestination:/a\n\nno NUL yet", v), Ok(None));
    }
}
