//! BIMserver's JSON API, the part that registers endpoints: the envelope
//! (`{"token","id","request"}` or `"requests":[…]`), interface and method names, parameters
//! matched by name, and the replies (`{"id","response":{"result"}}`, an `exception` in
//! place of `result`, `"responses":[…]` for several).
//!
//! Interface names are accepted short (`NotificationRegistryInterface`), qualified
//! (`org.bimserver.NotificationRegistryInterface`), and under the pre-2016 Bimsie1 names
//! (`Bimsie1NotificationRegistryInterface`, `org.buildingsmart.bimsie1.…`); the family a
//! registration used is the family its pushes use.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::frame::{encode_state, string};
use crate::hub::endpoints::{Family, Notification, ProgressState};
use crate::metrics::ENDPOINT_METHODS;

/// A request body, from `POST /json` or the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RawCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<RawCall>>,
}

/// One call as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawCall {
    pub interface: String,
    pub method: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// Most calls in one `requests` list.
pub const MAX_CALLS: usize = 100;

impl Envelope {
    /// Exactly one of `request` and `requests`, with at most [`MAX_CALLS`] calls.
    pub fn parse(body: &[u8]) -> Result<Envelope, String> {
        let e: Envelope = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        match (&e.request, &e.requests) {
            (Some(_), None) => {}
            (None, Some(list)) if !list.is_empty() && list.len() <= MAX_CALLS => {}
            (None, Some(_)) => return Err(format!("requests: 1 to {MAX_CALLS} calls")),
            _ => return Err("send either \"request\" or \"requests\"".into()),
        }
        Ok(e)
    }

    /// The calls in order, and whether the reply is a `responses` list.
    pub fn calls(&self) -> (&[RawCall], bool) {
        match (&self.request, &self.requests) {
            (Some(one), _) => (std::slice::from_ref(one), false),
            (None, Some(list)) => (list, true),
            (None, None) => (&[], false),
        }
    }
}

/// A call this server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Register {
        what: Notification,
        endpoint: u64,
    },
    Unregister {
        what: Notification,
        endpoint: u64,
    },
    GetProgress {
        topic: u64,
    },
    /// `AuthInterface.getLoggedInUser`: BIMserver's JavaScript client asks it in
    /// `setToken` before it opens the socket.
    LoggedInUser,
}

/// A resolved call: its family, or the exception to answer.
pub type Resolved = Result<(Family, Call), String>;

/// Resolves a call; also returns its method's index in [`ENDPOINT_METHODS`] for metrics.
pub fn resolve(raw: &RawCall) -> (usize, Resolved) {
    let method = ENDPOINT_METHODS[..ENDPOINT_METHODS.len() - 1]
        .iter()
        .position(|m| *m == raw.method)
        .unwrap_or(ENDPOINT_METHODS.len() - 1);
    if matches!(
        raw.interface.as_str(),
        "AuthInterface" | "org.bimserver.AuthInterface"
    ) {
        let resolved = match raw.method.as_str() {
            "getLoggedInUser" => Ok((Family::Current, Call::LoggedInUser)),
            other => Err(format!("Method {other} not found on {}", raw.interface)),
        };
        return (method, resolved);
    }
    let resolved = family(&raw.interface).and_then(|family| {
        let p = &raw.parameters;
        let method = raw.method.as_str();
        let not_found = || format!("Method {method} not found on {}", raw.interface);
        if method == "getProgress" {
            let topic = long(p, "topicId")?;
            return Ok((family, Call::GetProgress { topic }));
        }
        // register… and unregister…: the same parameters, the same notifications.
        let (register, handler) = match method.strip_prefix("un") {
            Some(rest) => (false, rest),
            None => (true, method),
        };
        let what = match handler {
            "registerProgressHandler" => Notification::Progress(long(p, "topicId")?),
            "registerNewRevisionHandler" => Notification::NewRevision,
            "registerNewProjectHandler" => Notification::NewProject,
            _ => return Err(not_found()),
        };
        let endpoint = endpoint(p)?;
        let call = if register {
            Call::Register { what, endpoint }
        } else {
            Call::Unregister { what, endpoint }
        };
        Ok((family, call))
    });
    (method, resolved)
}

fn family(interface: &str) -> Result<Family, String> {
    match interface {
        "NotificationRegistryInterface" | "org.bimserver.NotificationRegistryInterface" => {
            Ok(Family::Current)
        }
        "Bimsie1NotificationRegistryInterface"
        | "org.buildingsmart.bimsie1.Bimsie1NotificationRegistryInterface" => Ok(Family::Bimsie1),
        other => Err(format!("Interface {other} not found")),
    }
}

/// A `long` parameter: a JSON integer, or a string of digits (Java clients send either).
fn long(p: &Map<String, Value>, name: &str) -> Result<u64, String> {
    match p.get(name) {
        None => Err(format!("Missing parameter: {name}")),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or(format!("Parameter {name} must be a non-negative integer")),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| format!("Parameter {name} must be a non-negative integer")),
        Some(_) => Err(format!("Parameter {name} must be a non-negative integer")),
    }
}

/// `endPointId`, with BIMserver's own message for a null one.
fn endpoint(p: &Map<String, Value>) -> Result<u64, String> {
    match p.get("endPointId") {
        Some(Value::Null) => Err("No EndpointId given".into()),
        _ => long(p, "endPointId"),
    }
}

/// What one call answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A void method: `"result":{}`.
    Void,
    Progress(u64, ProgressState),
    /// An `SUserObject` with this user name.
    User(String),
    /// A `UserException` with this message.
    Exception(String),
}

/// The reply to an envelope: one outcome per call, in order.
pub fn encode_reply(id: Option<&Value>, many: bool, outcomes: &[Outcome]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(b'{');
    if let Some(id) = id {
        out.extend_from_slice(br#""id":"#);
        serde_json::to_writer(&mut out, id).expect("a JSON value serializes");
        out.push(b',');
    }
    if many {
        out.extend_from_slice(br#""responses":["#);
    } else {
        out.extend_from_slice(br#""response":"#);
    }
    for (i, outcome) in outcomes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match outcome {
            Outcome::Void => out.extend_from_slice(br#"{"result":{}}"#),
            Outcome::Progress(topic, state) => {
                out.extend_from_slice(br#"{"result":"#);
                encode_state(&mut out, *topic, state);
                out.push(b'}');
            }
            Outcome::User(name) => {
                out.extend_from_slice(
                    br#"{"result":{"__type":"SUserObject","oid":-1,"rid":0,"uuid":null,"name":"#,
                );
                string(&mut out, name);
                out.extend_from_slice(br#","username":"#);
                string(&mut out, name);
                out.extend_from_slice(br#","state":"ACTIVE","userType":"USER"}}"#);
            }
            Outcome::Exception(message) => {
                out.extend_from_slice(br#"{"exception":{"__type":"UserException","message":"#);
                string(&mut out, message);
                out.extend_from_slice(b"}}");
            }
        }
    }
    if many {
        out.push(b']');
    }
    out.push(b'}');
    out
}

/// The reply to a body that is no envelope at all.
pub fn encode_refusal(message: &str) -> Vec<u8> {
    encode_reply(None, false, &[Outcome::Exception(message.to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::endpoints::ActionState;

    fn call(interface: &str, method: &str, parameters: Value) -> RawCall {
        RawCall {
            interface: interface.into(),
            method: method.into(),
            parameters: parameters.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn both_name_families_resolve_and_parameters_go_by_name() {
        let register = Call::Register {
            what: Notification::Progress(12),
            endpoint: 2,
        };
        for (interface, family) in [
            ("NotificationRegistryInterface", Family::Current),
            (
                "org.bimserver.NotificationRegistryInterface",
                Family::Current,
            ),
            ("Bimsie1NotificationRegistryInterface", Family::Bimsie1),
            (
                "org.buildingsmart.bimsie1.Bimsie1NotificationRegistryInterface",
                Family::Bimsie1,
            ),
        ] {
            // Order does not matter; names do.
            let c = call(
                interface,
                "registerProgressHandler",
                serde_json::json!({"endPointId": 2, "topicId": "12"}),
            );
            assert_eq!(resolve(&c), (0, Ok((family, register))));
        }
        let cases = [
            (
                "getProgress",
                serde_json::json!({}),
                "Missing parameter: topicId",
            ),
            (
                "registerNewRevisionHandler",
                serde_json::json!({"endPointId": null}),
                "No EndpointId given",
            ),
            (
                "unregisterNewProjectHandler",
                serde_json::json!({"endPointId": -3}),
                "Parameter endPointId must be a non-negative integer",
            ),
            (
                "checkin",
                serde_json::json!({}),
                "Method checkin not found on NotificationRegistryInterface",
            ),
        ];
        for (method, params, message) in cases {
            let c = call("NotificationRegistryInterface", method, params);
            assert_eq!(resolve(&c).1, Err(message.to_string()), "{method}");
        }
        assert_eq!(
            resolve(&call("AuthInterface", "login", serde_json::json!({}))),
            (8, Err("Method login not found on AuthInterface".into()))
        );
        assert_eq!(
            resolve(&call("ServiceInterface", "checkin", serde_json::json!({}))),
            (8, Err("Interface ServiceInterface not found".into()))
        );
        assert_eq!(
            resolve(&call(
                "org.bimserver.AuthInterface",
                "getLoggedInUser",
                serde_json::json!({})
            ))
            .1,
            Ok((Family::Current, Call::LoggedInUser))
        );
    }

    #[test]
    fn envelopes_round_trip_and_replies_take_the_seed_shapes() {
        let text = br#"{"token":"t","id":4,"requests":[{"interface":"NotificationRegistryInterface","method":"getProgress","parameters":{"topicId":1}}]}"#;
        let e = Envelope::parse(text).unwrap();
        assert_eq!(
            Envelope::parse(&serde_json::to_vec(&e).unwrap()).unwrap(),
            e
        );
        assert!(e.calls().1);
        for bad in [
            &br#"{"token":"t"}"#[..],
            br#"{"requests":[]}"#,
            br#"{"request":{}}"#,
        ] {
            assert!(Envelope::parse(bad).is_err(), "{bad:?}");
        }
        let id = Value::from(4);
        assert_eq!(
            encode_reply(Some(&id), false, &[Outcome::Void]),
            br#"{"id":4,"response":{"result":{}}}"#
        );
        assert_eq!(
            encode_reply(None, false, &[Outcome::User("alice".into())]),
            br#"{"response":{"result":{"__type":"SUserObject","oid":-1,"rid":0,"uuid":null,"name":"alice","username":"alice","state":"ACTIVE","userType":"USER"}}}"#
        );
        assert_eq!(
            encode_reply(None, false, &[Outcome::Exception("Endpoint with id 9 not found".into())]),
            br#"{"response":{"exception":{"__type":"UserException","message":"Endpoint with id 9 not found"}}}"#
        );
        let state = ProgressState {
            progress: 100,
            state: ActionState::Finished,
            title: "Done".into(),
            stage: 3,
            start: 1,
            end: Some(2),
            errors: vec![],
            warnings: vec![],
            infos: vec![],
        };
        let reply = encode_reply(
            Some(&id),
            true,
            &[Outcome::Progress(5, state), Outcome::Exception("x".into())],
        );
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            r#"{"id":4,"responses":[{"result":{"__type":"SLongActionState","progress":100,"state":"FINISHED","title":"Done","stage":3,"start":1,"end":2,"errors":[],"warnings":[],"infos":[],"topicId":5}},{"exception":{"__type":"UserException","message":"x"}}]}"#
        );
    }
}
