//! The `/stream` socket's messages, every one a JSON text message, parsed and encoded here.
//!
//! Client to server: `{"token":"…"}` (become an endpoint), `{"hb":true}` (keep-alive), or a
//! JSON API envelope (`{"request":…}` / `{"requests":[…]}`, see [`super::api`]). Server to
//! client: `{"welcome":<ms>}` on open, `{"type":"endpoint","payload":{"endpointid":N},
//! "endpointid":N}` for a good token (current clients read the top-level id, BIMbots the
//! payload), `{"error":"…"}`, API replies, and the pushes: one-way requests without an `id`
//! whose parameter keys keep one order, because BIMserver's JavaScript client hands their
//! values to the handler positionally.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

use super::api::Envelope;
use crate::hub::endpoints::{ActionState, Family, ProgressState};

/// A client message.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Token(String),
    Heartbeat,
    /// A JSON API envelope, answered on the socket.
    Call(Envelope),
}

/// Why a client message was refused; the socket answers `{"error":…}` and stays open,
/// except for text that is not JSON at all (close 1007).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("expected {{\"token\":…}}, {{\"hb\":true}} or a JSON API request")]
    Unrecognised,
    #[error("invalid request: {0}")]
    BadCall(String),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    token: Option<Value>,
    #[serde(default)]
    hb: Option<IgnoredAny>,
    #[serde(default)]
    request: Option<IgnoredAny>,
    #[serde(default)]
    requests: Option<IgnoredAny>,
}

impl Inbound {
    /// A request wins over a token beside it (the token then authenticates the call), a
    /// token over `hb`.
    pub fn parse(data: &[u8]) -> Result<Inbound, FrameError> {
        let probe: Probe = match serde_json::from_slice(data) {
            Ok(p) => p,
            Err(e) if e.is_data() => return Err(FrameError::Unrecognised),
            Err(e) => return Err(FrameError::NotJson(e.to_string())),
        };
        if probe.request.is_some() || probe.requests.is_some() {
            return Envelope::parse(data)
                .map(Inbound::Call)
                .map_err(FrameError::BadCall);
        }
        match probe.token {
            Some(Value::String(t)) => Ok(Inbound::Token(t)),
            Some(_) => Err(FrameError::Unrecognised),
            None if probe.hb.is_some() => Ok(Inbound::Heartbeat),
            None => Err(FrameError::Unrecognised),
        }
    }

    /// As a client sends it.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Inbound::Token(t) => serde_json::to_vec(&serde_json::json!({ "token": t })),
            Inbound::Heartbeat => Ok(br#"{"hb":true}"#.to_vec()),
            Inbound::Call(envelope) => serde_json::to_vec(envelope),
        }
        .expect("strings and JSON values always serialize")
    }
}

/// A server message other than an API reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound<'a> {
    Welcome { now_ms: u64 },
    Endpoint { id: u64 },
    Error { message: Cow<'a, str> },
    Push { family: Family, push: Push<'a> },
}

/// A notification, as the hub hands it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Push<'a> {
    Progress {
        topic_id: u64,
        state: Cow<'a, ProgressState>,
    },
    NewRevision {
        poid: i64,
        roid: i64,
    },
    NewProject {
        poid: i64,
    },
}

/// Every push starts with this; the interface name follows.
const PUSH_HEAD: &[u8] = br#"{"request":{"interface":""#;
const BIMSIE1: &[u8] = b"Bimsie1";

/// A push encoded for [`Family::Current`], as the three pieces to write for `family`:
/// the Bimsie1 name is the current one with a prefix, so one encoding serves both and a
/// connection splices the name in as it writes.
pub fn push_parts(body: &[u8], family: Family) -> [&[u8]; 3] {
    match family {
        Family::Bimsie1 if body.starts_with(PUSH_HEAD) => {
            let (head, rest) = body.split_at(PUSH_HEAD.len());
            [head, BIMSIE1, rest]
        }
        _ => [body, &[], &[]],
    }
}

impl Outbound<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        match self {
            Outbound::Welcome { now_ms } => {
                out.extend_from_slice(br#"{"welcome":"#);
                number(&mut out, *now_ms);
                out.push(b'}');
            }
            Outbound::Endpoint { id } => {
                out.extend_from_slice(br#"{"type":"endpoint","payload":{"endpointid":"#);
                number(&mut out, *id);
                out.extend_from_slice(br#"},"endpointid":"#);
                number(&mut out, *id);
                out.push(b'}');
            }
            Outbound::Error { message } => {
                out.extend_from_slice(br#"{"error":"#);
                string(&mut out, message);
                out.push(b'}');
            }
            Outbound::Push { family, push } => {
                out.extend_from_slice(PUSH_HEAD);
                if *family == Family::Bimsie1 {
                    out.extend_from_slice(BIMSIE1);
                }
                out.extend_from_slice(br#"NotificationInterface","method":""#);
                match push {
                    Push::Progress { topic_id, state } => {
                        out.extend_from_slice(br#"progress","parameters":{"topicId":"#);
                        number(&mut out, *topic_id);
                        out.extend_from_slice(br#","state":"#);
                        encode_state(&mut out, *topic_id, state);
                    }
                    Push::NewRevision { poid, roid } => {
                        out.extend_from_slice(br#"newRevision","parameters":{"poid":"#);
                        number(&mut out, *poid);
                        out.extend_from_slice(br#","roid":"#);
                        number(&mut out, *roid);
                    }
                    Push::NewProject { poid } => {
                        out.extend_from_slice(br#"newProject","parameters":{"poid":"#);
                        number(&mut out, *poid);
                    }
                }
                out.extend_from_slice(b"}}}");
            }
        }
        out
    }

    /// As a client reads it: the other half of the round trip the tests check.
    pub fn parse(data: &[u8]) -> Result<Outbound<'static>, String> {
        let v: Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if let Some(ms) = v.get("welcome") {
            return Ok(Outbound::Welcome {
                now_ms: ms.as_u64().ok_or("welcome is not a number")?,
            });
        }
        if let Some(message) = v.get("error").and_then(Value::as_str) {
            return Ok(Outbound::Error {
                message: Cow::Owned(message.to_owned()),
            });
        }
        if v.get("type").and_then(Value::as_str) == Some("endpoint") {
            let id = v["endpointid"].as_u64().ok_or("endpointid")?;
            if v["payload"]["endpointid"].as_u64() != Some(id) {
                return Err("payload.endpointid differs".into());
            }
            return Ok(Outbound::Endpoint { id });
        }
        let request = v.get("request").ok_or("not a server message")?;
        let family = match request["interface"].as_str() {
            Some("NotificationInterface") => Family::Current,
            Some("Bimsie1NotificationInterface") => Family::Bimsie1,
            other => return Err(format!("interface {other:?}")),
        };
        let p = &request["parameters"];
        let long = |k: &str| p[k].as_i64().ok_or(format!("parameter {k}"));
        let push = match request["method"].as_str() {
            Some("progress") => Push::Progress {
                topic_id: p["topicId"].as_u64().ok_or("topicId")?,
                state: Cow::Owned(parse_state(&p["state"])?),
            },
            Some("newRevision") => Push::NewRevision {
                poid: long("poid")?,
                roid: long("roid")?,
            },
            Some("newProject") => Push::NewProject {
                poid: long("poid")?,
            },
            other => return Err(format!("method {other:?}")),
        };
        Ok(Outbound::Push { family, push })
    }
}

/// `SLongActionState` with its fields in one order, `topicId` last (as BIMserver sends it).
pub fn encode_state(out: &mut Vec<u8>, topic_id: u64, s: &ProgressState) {
    out.extend_from_slice(br#"{"__type":"SLongActionState","progress":"#);
    number(out, s.progress);
    out.extend_from_slice(br#","state":""#);
    out.extend_from_slice(s.state.as_str().as_bytes());
    out.extend_from_slice(br#"","title":"#);
    string(out, &s.title);
    out.extend_from_slice(br#","stage":"#);
    number(out, s.stage);
    out.extend_from_slice(br#","start":"#);
    number(out, s.start);
    out.extend_from_slice(br#","end":"#);
    match s.end {
        Some(end) => number(out, end),
        None => out.extend_from_slice(b"null"),
    }
    for (name, list) in [
        (&br#","errors":["#[..], &s.errors),
        (br#"],"warnings":["#, &s.warnings),
        (br#"],"infos":["#, &s.infos),
    ] {
        out.extend_from_slice(name);
        for (i, item) in list.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, item);
        }
    }
    out.extend_from_slice(br#"],"topicId":"#);
    number(out, topic_id);
    out.push(b'}');
}

/// A progress push for the hub to fan out (always the current family; see [`push_parts`]).
pub fn progress_push(topic_id: u64, state: &ProgressState) -> Vec<u8> {
    Outbound::Push {
        family: Family::Current,
        push: Push::Progress {
            topic_id,
            state: Cow::Borrowed(state),
        },
    }
    .encode()
}

/// Reads an `SLongActionState` object back.
pub fn parse_state(v: &Value) -> Result<ProgressState, String> {
    let int = |k: &str| {
        v[k].as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or(format!("state.{k}"))
    };
    let list = |k: &str| -> Result<Vec<String>, String> {
        v[k].as_array()
            .ok_or(format!("state.{k}"))?
            .iter()
            .map(|s| s.as_str().map(str::to_owned).ok_or(format!("state.{k}")))
            .collect()
    };
    if v["__type"] != "SLongActionState" {
        return Err("state.__type".into());
    }
    Ok(ProgressState {
        progress: int("progress")?,
        state: action_state(v["state"].as_str().unwrap_or("")).ok_or("state.state")?,
        title: v["title"].as_str().ok_or("state.title")?.to_owned(),
        stage: int("stage")?,
        start: v["start"].as_u64().ok_or("state.start")?,
        end: match &v["end"] {
            Value::Null => None,
            e => Some(e.as_u64().ok_or("state.end")?),
        },
        errors: list("errors")?,
        warnings: list("warnings")?,
        infos: list("infos")?,
    })
}

/// An `SLongActionState.state` name.
pub fn action_state(name: &str) -> Option<ActionState> {
    ActionState::ALL.into_iter().find(|s| s.as_str() == name)
}

pub(super) fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ProgressState {
        ProgressState {
            progress: 42,
            state: ActionState::Started,
            title: "Checking in \"model.ifc\"".into(),
            stage: 1,
            start: 1_700_000_000_000,
            end: None,
            errors: vec![],
            warnings: vec!["unit guessed".into()],
            infos: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn every_server_message_round_trips() {
        let s = state();
        let messages = [
            Outbound::Welcome {
                now_ms: 1_700_000_000_123,
            },
            Outbound::Endpoint { id: 2 },
            Outbound::Error {
                message: "Invalid token".into(),
            },
            Outbound::Push {
                family: Family::Current,
                push: Push::Progress {
                    topic_id: 12,
                    state: Cow::Borrowed(&s),
                },
            },
            Outbound::Push {
                family: Family::Bimsie1,
                push: Push::NewRevision {
                    poid: 65539,
                    roid: 131075,
                },
            },
            Outbound::Push {
                family: Family::Current,
                push: Push::NewProject { poid: -1 },
            },
        ];
        for m in messages {
            let bytes = m.encode();
            assert_eq!(
                Outbound::parse(&bytes).unwrap(),
                m,
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn the_handshake_and_push_shapes_are_the_seeds() {
        assert_eq!(
            Outbound::Endpoint { id: 7 }.encode(),
            br#"{"type":"endpoint","payload":{"endpointid":7},"endpointid":7}"#
        );
        assert_eq!(
            Outbound::Error {
                message: "Invalid token".into()
            }
            .encode(),
            br#"{"error":"Invalid token"}"#
        );
        assert_eq!(
            Outbound::Push {
                family: Family::Current,
                push: Push::NewRevision { poid: 1, roid: 2 },
            }
            .encode(),
            br#"{"request":{"interface":"NotificationInterface","method":"newRevision","parameters":{"poid":1,"roid":2}}}"#
        );
    }

    #[test]
    fn one_encoding_serves_both_interface_families() {
        let body = progress_push(12, &state());
        let spliced: Vec<u8> = push_parts(&body, Family::Bimsie1).concat();
        let bimsie1 = Outbound::Push {
            family: Family::Bimsie1,
            push: Push::Progress {
                topic_id: 12,
                state: Cow::Owned(state()),
            },
        };
        assert_eq!(spliced, bimsie1.encode());
        assert_eq!(push_parts(&body, Family::Current).concat(), body);
    }

    #[test]
    fn client_messages_round_trip_and_bad_ones_are_named() {
        for m in [Inbound::Token("abc".into()), Inbound::Heartbeat] {
            assert_eq!(Inbound::parse(&m.encode()).unwrap(), m);
        }
        let call = br#"{"token":"t","id":3,"request":{"interface":"NotificationRegistryInterface","method":"getProgress","parameters":{"topicId":1}}}"#;
        let Inbound::Call(envelope) = Inbound::parse(call).unwrap() else {
            panic!("a request is a call");
        };
        assert_eq!(
            Inbound::parse(&Inbound::Call(envelope.clone()).encode()).unwrap(),
            Inbound::Call(envelope)
        );
        assert!(matches!(
            Inbound::parse(b"{nope"),
            Err(FrameError::NotJson(_))
        ));
        for bad in [&br#"{}"#[..], br#"{"token":5}"#, br#"[1]"#, br#""x""#] {
            assert_eq!(
                Inbound::parse(bad),
                Err(FrameError::Unrecognised),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Inbound::parse(br#"{"request":{"method":"x"}}"#),
            Err(FrameError::BadCall(_))
        ));
    }
}
