//! The opcode protocol's frames (seed 001): [`Inbound`] decoded from client text, [`Outbound`]
//! encoded for the server's replies, and the DISPATCH template the hub fills with a seq.
//!
//! Decoding uses serde_json with borrowed fields and `d` kept as a `RawValue`: it checks the
//! whole frame is valid JSON and hands `d` on byte-for-byte without copying it. On frames of
//! this size this beat simd-json in the same criterion run (see BENCHMARKS.md); the simd-json
//! decoder is kept beside it ([`decode_simd`]) so the comparison stays measurable.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

use crate::hub::SeqTemplate;

/// Opcodes, as numbered by the seed.
pub mod op {
    pub const HEARTBEAT: u64 = 0;
    pub const HEARTBEAT_ACK: u64 = 1;
    pub const HELLO: u64 = 2;
    pub const IDENTIFY: u64 = 3;
    pub const READY: u64 = 4;
    pub const DISPATCH: u64 = 5;
    pub const SUBMIT: u64 = 6;
    pub const REPLAY: u64 = 7;
}

/// IDENTIFY's `type`: 0 is a user (producer), 1 a developer (consumer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentifyType {
    User,
    Developer,
}

/// A frame from a client.
#[derive(Debug)]
pub enum Inbound<'a> {
    Heartbeat,
    Identify {
        /// `None` when the token is missing or not a string (close 4001).
        token: Option<Cow<'a, str>>,
        kind: IdentifyType,
    },
    Submit {
        /// Upper-cased data type (borrowed when the client already sent it upper-case).
        t: Cow<'a, str>,
        /// The sample exactly as sent; always a JSON object or array.
        d: &'a RawValue,
    },
    Replay {
        after: u64,
        before: Option<u64>,
    },
    /// A well-formed frame whose opcode a client may not send (close 4004).
    Other(u64),
}

impl PartialEq for Inbound<'_> {
    fn eq(&self, other: &Self) -> bool {
        use Inbound::*;
        match (self, other) {
            (Heartbeat, Heartbeat) => true,
            (Identify { token: a, kind: k }, Identify { token: b, kind: l }) => a == b && k == l,
            (Submit { t: a, d: x }, Submit { t: b, d: y }) => a == b && x.get() == y.get(),
            (
                Replay {
                    after: a,
                    before: x,
                },
                Replay {
                    after: b,
                    before: y,
                },
            ) => a == b && x == y,
            (Other(a), Other(b)) => a == b,
            _ => false,
        }
    }
}

/// Why a client frame is not one of [`Inbound`]: every variant closes with 1007.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("{op}: {what}")]
    Shape {
        op: &'static str,
        what: &'static str,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    op: u64,
    #[serde(borrow, default)]
    d: Option<&'a RawValue>,
    #[serde(borrow, default)]
    t: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct IdentifyData {
    #[serde(default)]
    token: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: u8,
}

#[derive(Deserialize)]
struct ReplayData {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    before: Option<u64>,
}

fn shape(op: &'static str, what: &'static str) -> DecodeError {
    DecodeError::Shape { op, what }
}

impl<'a> Inbound<'a> {
    /// Decodes one text message. Borrows from `text` where it can; taking `str` (checked
    /// once, by the frame parser) spares serde_json checking the UTF-8 of `d` again.
    pub fn decode(text: &'a str) -> Result<Self, DecodeError> {
        let env: Envelope<'a> =
            serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
        Self::from_parts(env.op, env.d, env.t)
    }

    fn from_parts(
        op: u64,
        d: Option<&'a RawValue>,
        t: Option<Cow<'a, str>>,
    ) -> Result<Self, DecodeError> {
        match op {
            op::HEARTBEAT => Ok(Inbound::Heartbeat),
            op::IDENTIFY => {
                let d = d.ok_or(shape("IDENTIFY", "missing d"))?;
                let data: IdentifyData = serde_json::from_str(d.get())
                    .map_err(|_| shape("IDENTIFY", "d must be {\"token\":…,\"type\":0|1}"))?;
                let kind = match data.kind {
                    0 => IdentifyType::User,
                    1 => IdentifyType::Developer,
                    _ => return Err(shape("IDENTIFY", "type must be 0 or 1")),
                };
                let token = match data.token {
                    Some(serde_json::Value::String(s)) => Some(Cow::Owned(s)),
                    _ => None,
                };
                Ok(Inbound::Identify { token, kind })
            }
            op::SUBMIT => {
                let d = d.ok_or(shape("SUBMIT", "missing d"))?;
                if !matches!(d.get().as_bytes().first(), Some(b'{' | b'[')) {
                    return Err(shape("SUBMIT", "d must be an object or an array"));
                }
                let t = t.ok_or(shape("SUBMIT", "missing t"))?;
                Ok(Inbound::Submit {
                    t: normalise_type(t)?,
                    d,
                })
            }
            op::REPLAY => {
                let data = match d {
                    Some(d) => serde_json::from_str::<ReplayData>(d.get()).map_err(|_| {
                        shape(
                            "REPLAY",
                            "d must be {\"after\":N,\"before\":M} with non-negative integers",
                        )
                    })?,
                    None => ReplayData {
                        after: None,
                        before: None,
                    },
                };
                Ok(Inbound::Replay {
                    after: data.after.unwrap_or(0),
                    before: data.before,
                })
            }
            other => Ok(Inbound::Other(other)),
        }
    }
}

/// Data types are matched without case and sent upper-case: `heart_rate` is `HEART_RATE`.
fn normalise_type(t: Cow<'_, str>) -> Result<Cow<'_, str>, DecodeError> {
    if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(shape("SUBMIT", "t must be 1-64 letters, digits or '_'"));
    }
    if t.bytes().any(|b| b.is_ascii_lowercase()) {
        return Ok(Cow::Owned(t.to_ascii_uppercase()));
    }
    Ok(t)
}

/// What [`decode_simd`] extracts: op, upper-cased `t`, re-serialised `d`.
#[doc(hidden)]
pub type SimdFrame = (u64, Option<String>, Option<Vec<u8>>);

/// The simd-json decoder, kept for the benchmark comparison and checked against
/// [`Inbound::decode`] in tests. It parses a copy (simd-json rewrites its input) and
/// re-serialises `d`, so `d` is not byte-for-byte: production uses [`Inbound::decode`].
#[doc(hidden)]
pub fn decode_simd(
    text: &[u8],
    scratch: &mut Vec<u8>,
    buffers: &mut simd_json::Buffers,
) -> Result<SimdFrame, DecodeError> {
    use simd_json::prelude::*;
    scratch.clear();
    scratch.extend_from_slice(text);
    let value = simd_json::to_borrowed_value_with_buffers(scratch, buffers)
        .map_err(|e| DecodeError::Json(e.to_string()))?;
    let op = value
        .get("op")
        .and_then(|v| v.as_u64())
        .ok_or(shape("frame", "op must be a non-negative integer"))?;
    let t = value
        .get("t")
        .and_then(|v| v.as_str())
        .map(str::to_ascii_uppercase);
    let d = value
        .get("d")
        .map(|d| simd_json::to_vec(d).unwrap_or_default());
    Ok((op, t, d))
}

/// A frame from the server, other than DISPATCH (see [`dispatch_template`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    HeartbeatAck,
    Hello { heartbeat_interval: u64 },
    Ready,
}

impl Outbound {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Outbound::HeartbeatAck => br#"{"op":1}"#.to_vec(),
            Outbound::Hello { heartbeat_interval } => {
                format!(r#"{{"op":2,"d":{{"heartbeat_interval":{heartbeat_interval}}}}}"#)
                    .into_bytes()
            }
            Outbound::Ready => br#"{"op":4}"#.to_vec(),
        }
    }
}

/// Encodes `{"op":5,"d":…,"uid":"…","seq":,"t":"…"}` with a hole for the seq, in the seed's
/// field order. `uid` must already be a valid user id (no characters needing escapes) and
/// `t` normalised; `d` is copied once, here, and never again on its way to consumers.
pub fn dispatch_template(uid: &str, t: &str, d: &RawValue) -> SeqTemplate {
    const HEAD: &[u8] = br#"{"op":5,"d":"#;
    let d = d.get().as_bytes();
    let len = HEAD.len() + d.len() + 9 + uid.len() + 8 + 7 + t.len() + 2;
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(HEAD);
    buf.extend_from_slice(d);
    buf.extend_from_slice(br#","uid":""#);
    buf.extend_from_slice(uid.as_bytes());
    buf.extend_from_slice(br#"","seq":"#);
    let seq_at = buf.len();
    buf.extend_from_slice(br#","t":""#);
    buf.extend_from_slice(t.as_bytes());
    buf.extend_from_slice(br#""}"#);
    SeqTemplate::new(buf, seq_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<Inbound<'_>, DecodeError> {
        Inbound::decode(s)
    }

    #[test]
    fn golden_outbound() {
        assert_eq!(
            Outbound::Hello {
                heartbeat_interval: 40000
            }
            .encode(),
            br#"{"op":2,"d":{"heartbeat_interval":40000}}"#
        );
        assert_eq!(Outbound::HeartbeatAck.encode(), br#"{"op":1}"#);
        assert_eq!(Outbound::Ready.encode(), br#"{"op":4}"#);
    }

    #[test]
    fn golden_dispatch_matches_the_seed_example() {
        let d =
            RawValue::from_string(r#"{"ts":"2022-05-04T10:26:11.268507+01:00","val":95}"#.into())
                .unwrap();
        let frame =
            dispatch_template("8e864e3a-979a-4d04-b4e9-b6d020f20ba0", "HEART_RATE", &d).fill(73);
        assert_eq!(
            std::str::from_utf8(&frame).unwrap(),
            r#"{"op":5,"d":{"ts":"2022-05-04T10:26:11.268507+01:00","val":95},"uid":"8e864e3a-979a-4d04-b4e9-b6d020f20ba0","seq":73,"t":"HEART_RATE"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["seq"], 73);
    }

    #[test]
    fn inbound_golden_frames() {
        assert_eq!(decode(r#"{"op":0}"#), Ok(Inbound::Heartbeat));
        assert_eq!(decode(r#"{"op":0,"d":null}"#), Ok(Inbound::Heartbeat));
        assert_eq!(
            decode(r#"{"op":3,"d":{"token":"abc","type":1}}"#),
            Ok(Inbound::Identify {
                token: Some("abc".into()),
                kind: IdentifyType::Developer
            })
        );
        assert_eq!(
            decode(r#"{"op":3,"d":{"type":0}}"#),
            Ok(Inbound::Identify {
                token: None,
                kind: IdentifyType::User
            })
        );
        assert_eq!(
            decode(r#"{"op":3,"d":{"token":5,"type":0}}"#),
            Ok(Inbound::Identify {
                token: None,
                kind: IdentifyType::User
            })
        );
        assert_eq!(
            decode(r#"{"op":7,"d":{"after":28,"before":43}}"#),
            Ok(Inbound::Replay {
                after: 28,
                before: Some(43)
            })
        );
        assert_eq!(
            decode(r#"{"op":7,"d":{"after":28}}"#),
            Ok(Inbound::Replay {
                after: 28,
                before: None
            })
        );
        assert_eq!(
            decode(r#"{"op":7}"#),
            Ok(Inbound::Replay {
                after: 0,
                before: None
            })
        );
        assert_eq!(decode(r#"{"op":9,"d":{}}"#), Ok(Inbound::Other(9)));
        assert_eq!(decode(r#"{"op":5}"#), Ok(Inbound::Other(5)));
    }

    #[test]
    fn submit_keeps_d_byte_for_byte_and_uppercases_t() {
        let text = r#"{"op":6,"t":"heart_rate","d":{"val": 95, "x":[1.50,2e3]}}"#;
        match decode(text).unwrap() {
            Inbound::Submit { t, d } => {
                assert_eq!(t, "HEART_RATE");
                assert_eq!(d.get(), r#"{"val": 95, "x":[1.50,2e3]}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode(r#"{"d":[0.1,0.2,9.8],"t":"ACCELERATION","op":6,"extra":true}"#).unwrap() {
            Inbound::Submit { t, d } => {
                assert_eq!((&*t, d.get()), ("ACCELERATION", "[0.1,0.2,9.8]"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        for bad in [
            r#"{"op":"#,
            "[]",
            r#"{"op":"6"}"#,
            r#"{"op":-1}"#,
            r#"{"op":1.5}"#,
            r#"{"d":{}}"#,
            r#"{"op":6,"d":1e999,"t":"X"}"#,
            r#"{"op":6,"d":5,"t":"X"}"#,
            r#"{"op":6,"d":"s","t":"X"}"#,
            r#"{"op":6,"d":{}}"#,
            r#"{"op":6,"d":{},"t":""}"#,
            r#"{"op":6,"d":{},"t":"a b"}"#,
            r#"{"op":3,"d":{"token":"x","type":2}}"#,
            r#"{"op":3}"#,
            r#"{"op":7,"d":{"after":-1}}"#,
            r#"{"op":7,"d":{"after":"1"}}"#,
            r#"{"op":0} trailing"#,
            "\u{0}",
        ] {
            assert!(decode(bad).is_err(), "accepted {bad}");
        }
        let bomb = "[".repeat(100_000);
        assert!(decode(&format!(r#"{{"op":6,"t":"X","d":{bomb}}}"#)).is_err());
    }

    #[test]
    fn simd_decoder_agrees_on_meaning() {
        let mut scratch = Vec::new();
        let mut buffers = simd_json::Buffers::default();
        let text = r#"{"op":6,"t":"steps","d":{"val":95,"ts":"2022"}}"#;
        let (op, t, d) = decode_simd(text.as_bytes(), &mut scratch, &mut buffers).unwrap();
        assert_eq!((op, t.as_deref()), (6, Some("STEPS")));
        let a: serde_json::Value = serde_json::from_slice(&d.unwrap()).unwrap();
        let Inbound::Submit { d, .. } = decode(text).unwrap() else {
            panic!()
        };
        assert_eq!(
            a,
            serde_json::from_str::<serde_json::Value>(d.get()).unwrap()
        );
        assert!(decode_simd(b"{\"op\":", &mut scratch, &mut buffers).is_err());
    }
}
