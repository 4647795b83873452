//! STOMP frames as a session sees them: [`Inbound`] (client → server) with the headers each
//! command requires checked per version, and [`Outbound`] (server → client) encoded exactly as
//! Spring's broker sends them, plus CONNECT's version and heart-beat negotiation.
//!
//! Owns the meaning of headers; the byte rules are [`super::codec`]'s. No I/O, no clock.

use bytes::Bytes;

use super::codec::{encode_parts, Command, RawFrame, Version};

/// How a subscription's messages are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    Auto,
    /// Cumulative: an ACK covers its message and every earlier one.
    Client,
    ClientIndividual,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

/// CONNECT (or STOMP) as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The versions the client accepts; `[1.0]` when it names none.
    pub accept: Vec<Version>,
    pub host: Option<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// `Authorization` header, for clients that send a bearer token there.
    pub authorization: Option<String>,
    /// `(cx, cy)`: the client can send every `cx` ms and wants to hear every `cy` ms.
    pub heart_beat: (u64, u64),
}

/// A client frame, its required headers present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Connect(Connect),
    Send {
        destination: String,
        transaction: Option<String>,
        /// Every header as sent, for pass-through to subscribers.
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    Subscribe {
        destination: String,
        id: String,
        ack: AckMode,
        /// `replay-after`: resume a stream topic after this seq.
        replay_after: Option<u64>,
    },
    Unsubscribe {
        id: String,
    },
    /// ACK or NACK: 1.2 names the message by `id` (the MESSAGE's `ack` header); 1.0 and 1.1
    /// by `message-id`, with `subscription` in 1.1.
    Ack {
        nack: bool,
        id: String,
        subscription: Option<String>,
        transaction: Option<String>,
    },
    Begin {
        transaction: String,
    },
    Commit {
        transaction: String,
    },
    Abort {
        transaction: String,
    },
    Disconnect,
}

/// A frame the server refuses; the ERROR's `message` header says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{command} frame needs a '{header}' header")]
    MissingHeader {
        command: &'static str,
        header: &'static str,
    },
    #[error("invalid '{header}' header")]
    InvalidHeader { header: &'static str },
    #[error("{0} is a server frame")]
    ServerCommand(&'static str),
}

impl Inbound {
    /// Reads a decoded frame under the negotiated `version` (CONNECT: any).
    pub fn from_raw(raw: RawFrame, version: Version) -> Result<Self, FrameError> {
        let command = raw.command;
        let need = |header: &'static str| -> Result<String, FrameError> {
            raw.header(header)
                .map(str::to_owned)
                .ok_or(FrameError::MissingHeader {
                    command: command.as_str(),
                    header,
                })
        };
        let optional = |header: &str| raw.header(header).map(str::to_owned);
        Ok(match command {
            Command::Connect | Command::Stomp => Inbound::Connect(Connect {
                accept: match raw.header("accept-version") {
                    None => vec![Version::V1_0],
                    Some(list) => list.split(',').filter_map(Version::parse).collect(),
                },
                host: optional("host"),
                login: optional("login"),
                passcode: optional("passcode"),
                authorization: optional("Authorization").or_else(|| optional("authorization")),
                heart_beat: match raw.header("heart-beat") {
                    None => (0, 0),
                    Some(v) => parse_heart_beat(v).ok_or(FrameError::InvalidHeader {
                        header: "heart-beat",
                    })?,
                },
            }),
            Command::Send => {
                let destination = need("destination")?;
                let transaction = optional("transaction");
                Inbound::Send {
                    destination,
                    transaction,
                    headers: raw.headers,
                    body: raw.body,
                }
            }
            Command::Subscribe => Inbound::Subscribe {
                destination: need("destination")?,
                // 1.0 made the id optional; the destination then identifies the subscription.
                id: match version {
                    Version::V1_0 => optional("id").unwrap_or_else(|| {
                        raw.header("destination").unwrap_or_default().to_owned()
                    }),
                    _ => need("id")?,
                },
                ack: match raw.header("ack") {
                    None | Some("auto") => AckMode::Auto,
                    Some("client") => AckMode::Client,
                    Some("client-individual") if version != Version::V1_0 => {
                        AckMode::ClientIndividual
                    }
                    Some(_) => return Err(FrameError::InvalidHeader { header: "ack" }),
                },
                replay_after: match raw.header("replay-after") {
                    None => None,
                    Some(v) => Some(v.parse().map_err(|_| FrameError::InvalidHeader {
                        header: "replay-after",
                    })?),
                },
            },
            Command::Unsubscribe => Inbound::Unsubscribe {
                id: match version {
                    Version::V1_0 => optional("id").or_else(|| optional("destination")).ok_or(
                        FrameError::MissingHeader {
                            command: "UNSUBSCRIBE",
                            header: "id",
                        },
                    )?,
                    _ => need("id")?,
                },
            },
            Command::Ack | Command::Nack => Inbound::Ack {
                nack: command == Command::Nack,
                id: match version {
                    Version::V1_2 => need("id")?,
                    _ => need("message-id")?,
                },
                subscription: match version {
                    Version::V1_1 => Some(need("subscription")?),
                    _ => optional("subscription"),
                },
                transaction: optional("transaction"),
            },
            Command::Begin => Inbound::Begin {
                transaction: need("transaction")?,
            },
            Command::Commit => Inbound::Commit {
                transaction: need("transaction")?,
            },
            Command::Abort => Inbound::Abort {
                transaction: need("transaction")?,
            },
            Command::Disconnect => Inbound::Disconnect,
            Command::Connected | Command::Message | Command::Receipt | Command::Error => {
                return Err(FrameError::ServerCommand(command.as_str()))
            }
        })
    }
}

fn parse_heart_beat(v: &str) -> Option<(u64, u64)> {
    let (x, y) = v.split_once(',')?;
    Some((x.trim().parse().ok()?, y.trim().parse().ok()?))
}

/// A server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Connected {
        version: Version,
        /// `(sx, sy)` as sent: the server sends every `sx` ms, wants to hear every `sy` ms.
        heart_beat: (u64, u64),
        session: String,
        server: String,
    },
    Message {
        destination: String,
        subscription: String,
        message_id: String,
        /// The `ack` header of 1.2, for subscriptions that are not `auto`.
        ack: Option<String>,
        content_type: Option<String>,
        /// Further headers passed through from the SEND, or `seq` for stream topics.
        extra: Vec<(String, String)>,
        body: Bytes,
    },
    Receipt {
        receipt_id: String,
    },
    Error {
        message: String,
        receipt_id: Option<String>,
        /// The versions the server speaks, when negotiation failed.
        version: Option<String>,
        body: Bytes,
    },
}

impl Outbound {
    /// Appends the encoded frame (escaped for `version`) to `out`.
    pub fn encode(&self, version: Version, out: &mut Vec<u8>) {
        match self {
            Outbound::Connected {
                version: v,
                heart_beat,
                session,
                server,
            } => {
                let beat = format!("{},{}", heart_beat.0, heart_beat.1);
                let headers = [
                    ("version", v.as_str()),
                    ("heart-beat", beat.as_str()),
                    ("session", session.as_str()),
                    ("server", server.as_str()),
                ];
                encode_parts(Command::Connected, headers, b"", version, out)
            }
            Outbound::Message {
                destination,
                subscription,
                message_id,
                ack,
                content_type,
                extra,
                body,
            } => MessageView {
                destination,
                subscription,
                message_id,
                ack: ack.as_deref(),
                content_type: content_type.as_deref(),
                seq: None,
                extra,
                body,
            }
            .encode(version, out),
            Outbound::Receipt { receipt_id } => encode_parts(
                Command::Receipt,
                [("receipt-id", receipt_id.as_str())],
                b"",
                version,
                out,
            ),
            Outbound::Error {
                message,
                receipt_id,
                version: supported,
                body,
            } => {
                let headers = std::iter::once(("message", message.as_str()))
                    .chain(receipt_id.as_deref().map(|r| ("receipt-id", r)))
                    .chain(supported.as_deref().map(|v| ("version", v)))
                    .chain([("content-type", "text/plain")]);
                encode_parts(Command::Error, headers, body, version, out)
            }
        }
    }
}

/// A MESSAGE as borrowed parts: what [`Outbound::Message`] encodes, and what a topic
/// delivery encodes for each subscriber without allocating. Header order is Spring's:
/// `content-type`, `subscription`, `destination`, `message-id`, then `ack` and the rest.
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    pub destination: &'a str,
    pub subscription: &'a str,
    pub message_id: &'a str,
    pub ack: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// A stream topic's sequence number.
    pub seq: Option<&'a str>,
    pub extra: &'a [(String, String)],
    pub body: &'a [u8],
}

impl MessageView<'_> {
    pub fn encode(&self, version: Version, out: &mut Vec<u8>) {
        let headers = self
            .content_type
            .map(|c| ("content-type", c))
            .into_iter()
            .chain([
                ("subscription", self.subscription),
                ("destination", self.destination),
                ("message-id", self.message_id),
            ])
            .chain(self.ack.map(|a| ("ack", a)))
            .chain(self.seq.map(|s| ("seq", s)))
            .chain(self.extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        encode_parts(Command::Message, headers, self.body, version, out)
    }
}

/// The highest version both sides speak, or `None` (then: ERROR with [`supported_versions`]).
pub fn negotiate_version(accept: &[Version]) -> Option<Version> {
    accept.iter().copied().max()
}

/// The `version` header of a failed negotiation.
pub fn supported_versions() -> String {
    Version::ALL.map(Version::as_str).join(",")
}

/// The spec's heart-beat rule, from the client's `(cx, cy)` and the server's `(sx, sy)`:
/// returns `(send_every_ms, expect_every_ms)` for the server, 0 meaning never.
pub fn negotiate_heart_beat(client: (u64, u64), server: (u64, u64)) -> (u64, u64) {
    let (cx, cy) = client;
    let (sx, sy) = server;
    let send = if sx == 0 || cy == 0 { 0 } else { sx.max(cy) };
    let expect = if cx == 0 || sy == 0 { 0 } else { cx.max(sy) };
    (send, expect)
}

/// The SEND headers a MESSAGE carries on: everything but the frame's own plumbing.
pub fn pass_through(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                "destination"
                    | "content-length"
                    | "content-type"
                    | "receipt"
                    | "transaction"
                    | "subscription"
                    | "message-id"
                    | "ack"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::codec::{decode, Decoded, Limits};
    use super::*;
    use bytes::BytesMut;

    fn inbound(wire: &[u8], version: Version) -> Result<Inbound, FrameError> {
        let mut buf = BytesMut::from(wire);
        match decode(&mut buf, version, &Limits::default()).unwrap() {
            Some(Decoded::Frame(raw)) => Inbound::from_raw(raw, version),
            other => panic!("no frame: {other:?}"),
        }
    }

    fn wire(frame: &Outbound, version: Version) -> String {
        let mut out = Vec::new();
        frame.encode(version, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn connect_reads_versions_credentials_and_heart_beat() {
        let c = inbound(
            b"STOMP\naccept-version:1.1,1.2\nhost:h\nlogin:l\npasscode:p\nheart-beat:10000,10000\n\n\0",
            Version::V1_2,
        )
        .unwrap();
        assert_eq!(
            c,
            Inbound::Connect(Connect {
                accept: vec![Version::V1_1, Version::V1_2],
                host: Some("h".into()),
                login: Some("l".into()),
                passcode: Some("p".into()),
                authorization: None,
                heart_beat: (10000, 10000),
            })
        );
        // Seed 000 sends a bare CONNECT: a 1.0 client with no heart-beats.
        let Inbound::Connect(bare) = inbound(b"CONNECT\n\n\0", Version::V1_2).unwrap() else {
            panic!()
        };
        assert_eq!(
            (bare.accept, bare.heart_beat),
            (vec![Version::V1_0], (0, 0))
        );
        assert_eq!(
            inbound(b"CONNECT\nheart-beat:x\n\n\0", Version::V1_2),
            Err(FrameError::InvalidHeader {
                header: "heart-beat"
            })
        );
    }

    #[test]
    fn required_headers_per_command_and_version() {
        assert_eq!(
            inbound(b"SEND\n\nhi\0", Version::V1_2),
            Err(FrameError::MissingHeader {
                command: "SEND",
                header: "destination"
            })
        );
        assert_eq!(
            inbound(b"SUBSCRIBE\ndestination:/topic/a\n\n\0", Version::V1_1),
            Err(FrameError::MissingHeader {
                command: "SUBSCRIBE",
                header: "id"
            })
        );
        // 1.0 lets the destination stand for the id.
        assert!(matches!(
            inbound(b"SUBSCRIBE\ndestination:/topic/a\n\n\0", Version::V1_0),
            Ok(Inbound::Subscribe { id, .. }) if id == "/topic/a"
        ));
        assert_eq!(
            inbound(b"ACK\nid:7\n\n\0", Version::V1_1),
            Err(FrameError::MissingHeader {
                command: "ACK",
                header: "message-id"
            })
        );
        assert!(matches!(
            inbound(b"NACK\nid:7\n\n\0", Version::V1_2),
            Ok(Inbound::Ack { nack: true, id, .. }) if id == "7"
        ));
        assert!(matches!(
            inbound(b"ACK\nmessage-id:7\nsubscription:s\n\n\0", Version::V1_1),
            Ok(Inbound::Ack { nack: false, id, subscription: Some(s), .. }) if id == "7" && s == "s"
        ));
        assert_eq!(
            inbound(
                b"SUBSCRIBE\nid:1\ndestination:/a\nack:sometimes\n\n\0",
                Version::V1_2
            ),
            Err(FrameError::InvalidHeader { header: "ack" })
        );
        assert_eq!(
            inbound(b"BEGIN\n\n\0", Version::V1_2),
            Err(FrameError::MissingHeader {
                command: "BEGIN",
                header: "transaction"
            })
        );
        assert_eq!(
            inbound(b"MESSAGE\n\n\0", Version::V1_2),
            Err(FrameError::ServerCommand("MESSAGE"))
        );
    }

    #[test]
    fn subscribe_reads_ack_mode_and_replay_after() {
        let s = inbound(
            b"SUBSCRIBE\nid:s1\ndestination:/topic/streams/acme\nack:client-individual\nreplay-after:41\n\n\0",
            Version::V1_2,
        )
        .unwrap();
        assert_eq!(
            s,
            Inbound::Subscribe {
                destination: "/topic/streams/acme".into(),
                id: "s1".into(),
                ack: AckMode::ClientIndividual,
                replay_after: Some(41),
            }
        );
    }

    #[test]
    fn golden_server_frames() {
        let connected = Outbound::Connected {
            version: Version::V1_1,
            heart_beat: (10000, 10000),
            session: "s-1".into(),
            server: "sensorgate/0.1.0".into(),
        };
        assert_eq!(
            wire(&connected, Version::V1_1),
            "CONNECTED\nversion:1.1\nheart-beat:10000,10000\nsession:s-1\nserver:sensorgate/0.1.0\n\n\0"
        );
        let message = Outbound::Message {
            destination: "/topic/workout/record".into(),
            subscription: "any_client_id".into(),
            message_id: "m-1".into(),
            ack: None,
            content_type: Some("application/json;charset=UTF-8".into()),
            extra: vec![],
            body: Bytes::from_static(b"{\"workout\":{}}"),
        };
        assert_eq!(
            wire(&message, Version::V1_1),
            "MESSAGE\ncontent-type:application/json;charset=UTF-8\nsubscription:any_client_id\n\
             destination:/topic/workout/record\nmessage-id:m-1\ncontent-length:14\n\n{\"workout\":{}}\0"
        );
        assert_eq!(
            wire(
                &Outbound::Receipt {
                    receipt_id: "r:1".into()
                },
                Version::V1_2
            ),
            "RECEIPT\nreceipt-id:r\\c1\n\n\0"
        );
        let error = Outbound::Error {
            message: "unsupported version".into(),
            receipt_id: None,
            version: Some(supported_versions()),
            body: Bytes::from_static(b"Supported: 1.0,1.1,1.2"),
        };
        assert_eq!(
            wire(&error, Version::V1_0),
            "ERROR\nmessage:unsupported version\nversion:1.0,1.1,1.2\ncontent-type:text/plain\n\
             content-length:22\n\nSupported: 1.0,1.1,1.2\0"
        );
    }

    #[test]
    fn server_frames_round_trip_through_the_decoder() {
        for version in Version::ALL {
            let m = Outbound::Message {
                destination: "/v1/topic/conversation/42".into(),
                subscription: "sub-0".into(),
                message_id: "9".into(),
                ack: Some("9".into()),
                content_type: None,
                extra: vec![("seq".into(), "73".into())],
                body: Bytes::from_static(b"{\"startTyping\":{\"userId\":\"u\"}}"),
            };
            let mut out = Vec::new();
            m.encode(version, &mut out);
            let mut buf = BytesMut::from(&out[..]);
            let Some(Decoded::Frame(raw)) = decode(&mut buf, version, &Limits::default()).unwrap()
            else {
                panic!()
            };
            assert_eq!(raw.header("subscription"), Some("sub-0"));
            assert_eq!(raw.header("seq"), Some("73"));
            assert_eq!(raw.header("content-length"), Some("30"));
            assert_eq!(&raw.body[..], b"{\"startTyping\":{\"userId\":\"u\"}}");
        }
    }

    #[test]
    fn negotiation_follows_the_spec() {
        assert_eq!(
            negotiate_version(&[Version::V1_0, Version::V1_2]),
            Some(Version::V1_2)
        );
        assert_eq!(negotiate_version(&[]), None);
        assert_eq!(supported_versions(), "1.0,1.1,1.2");
        // stompjs (10000,10000) against a server offering (10000,10000).
        assert_eq!(
            negotiate_heart_beat((10000, 10000), (10000, 10000)),
            (10000, 10000)
        );
        // The larger of what one side can do and the other wants; 0 on either side: none.
        assert_eq!(
            negotiate_heart_beat((5000, 20000), (10000, 10000)),
            (20000, 10000)
        );
        assert_eq!(negotiate_heart_beat((0, 0), (10000, 10000)), (0, 0));
        assert_eq!(negotiate_heart_beat((1000, 1000), (0, 10000)), (0, 10000));
    }
}
