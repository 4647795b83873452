//! `POST /api/publish`: how a backend raises events on STOMP topics (seed 000's workout and
//! waiting-list messages, seed 002's chat events) and for notification endpoints (seed
//! 003's progress, newRevision and newProject, under the reserved `/bimserver/`
//! destinations of [`backend`]): one mechanism for every front-end.
//!
//! Body: `{"destination": "...", "data": <json>, "headers": {...}}`, or `{"messages": [...]}`
//! of those. Authenticated like the token endpoints (developer API key), or by a configured
//! publisher's key as `Authorization: Bearer <key>`. `data` is relayed
//! byte for byte as the MESSAGE body with `content-type:application/json;charset=UTF-8`;
//! `headers` become MESSAGE headers (the frame's own, such as `destination`, are dropped).
//! Answers 200 `{"message_ids": [...]}` in order. Owns no state: it validates and hands
//! every message to the hub's topics.

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::http::{credentials, error, json, read_body, Body};
use super::App;
use crate::frontend::endpoint::backend::{self, Event};
use crate::frontend::endpoint::frame::{progress_push, Outbound, Push};
use crate::frontend::stomp::destination;
use crate::frontend::stomp::frame::pass_through;
use crate::hub::endpoints::{EndpointError, Family, Notification};
use crate::hub::{TopicMessage, JSON_UTF8};

/// Largest request body.
const MAX_BODY: usize = 1 << 20;
/// Most messages in one request.
const MAX_MESSAGES: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<One<'a>>>,
    #[serde(default)]
    destination: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct One<'a> {
    destination: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

pub(super) async fn publish(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let auth = &app.ctx.auth;
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Whose endpoint notifications this caller raises: the developer it is, or the one a
    // publisher key is configured for (none: it raises none).
    // Who is publishing (a developer id, or "publisher:<id>", for its grants), and whose
    // endpoint notifications it raises.
    let checked: Result<(String, Option<String>), _> = match (bearer, credentials(&req)) {
        (Some(key), _) => auth.check_publisher(key.trim()).map(|id| {
            let tenant = auth.publisher_tenant(id).map(str::to_owned);
            (format!("publisher:{id}"), tenant)
        }),
        (None, Some((developer, key))) => auth
            .check_key(&developer, &key)
            .map(|()| (developer.clone(), Some(developer))),
        (None, None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "missing credentials: send a publisher key as Authorization: Bearer, \
                 or dev-id and x-api-key headers, or HTTP Basic",
            );
        }
    };
    let (who, tenant) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            crate::metrics::handles().auth_failed(crate::metrics::AuthPlace::Publish, &e);
            return error(
                StatusCode::FORBIDDEN,
                "unknown publisher or developer, or wrong key",
            );
        }
    };
    let body = match read_body(req, MAX_BODY, &app).await {
        Ok(b) => b,
        Err(e) => return error(e.status(), &e.message(MAX_BODY)),
    };
    let limits = &app.ctx.limits;
    let messages = match parse(&body, limits.max_frame_bytes, &limits.stomp_broker_prefixes) {
        Ok(m) => m,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    // All or nothing: a message outside the caller's grants refuses the whole request.
    if let Some(refused) = messages.iter().find_map(|item| match item {
        Item::Topic(destination, ..) if !auth.may_publish(&who, destination) => Some(destination),
        _ => None,
    }) {
        return error(
            StatusCode::FORBIDDEN,
            &format!("not granted: {refused} is outside this key's prefixes"),
        );
    }
    let hub = &app.ctx.hub;
    let topics = hub.topics();
    let mut ids = Vec::with_capacity(messages.len());
    for item in messages {
        let id = topics.next_id();
        match item {
            Item::Topic(destination, data, headers) => {
                let message = TopicMessage {
                    destination: Arc::from(destination),
                    id,
                    content_type: Some(JSON_UTF8.into()),
                    headers,
                    body: data,
                    // `data` is JSON text.
                    text: true,
                };
                // Flow control: the answer waits until every subscriber has room.
                topics
                    .publish_within(message, limits.stomp_publish_wait)
                    .await;
            }
            Item::Endpoint(event) => {
                let Some(tenant) = tenant.as_deref() else {
                    let body = serde_json::json!({
                        "error": "this publisher key raises no endpoint notifications: give it a developer",
                        "message_ids": ids,
                    });
                    return json(StatusCode::FORBIDDEN, body.to_string());
                };
                if let Err(e) = notify(hub, tenant, event) {
                    // Messages before this one went out; say which.
                    let body = serde_json::json!({ "error": e.to_string(), "message_ids": ids });
                    return json(StatusCode::TOO_MANY_REQUESTS, body.to_string());
                }
            }
        }
        ids.push(id.to_string());
    }
    crate::metrics::handles().topic_messages[1].increment(ids.len() as u64);
    json(
        StatusCode::OK,
        serde_json::json!({ "message_ids": ids }).to_string(),
    )
}

/// Raises one of `tenant`'s endpoint notifications.
fn notify(hub: &crate::hub::Hub, tenant: &str, event: Event) -> Result<(), EndpointError> {
    let (endpoints, topics) = (hub.endpoints(), hub.topics());
    let (what, push) = match event {
        Event::Progress { topic, update } => {
            let now = crate::hub::now_ms();
            return endpoints
                .update(tenant, topic, update, now, topics, progress_push)
                .map(drop);
        }
        Event::NewRevision { poid, roid } => {
            (Notification::NewRevision, Push::NewRevision { poid, roid })
        }
        Event::NewProject { poid } => (Notification::NewProject, Push::NewProject { poid }),
    };
    let body = Outbound::Push {
        family: Family::Current,
        push,
    }
    .encode();
    endpoints.event(tenant, what, body, topics);
    Ok(())
}

/// One message of a request.
#[derive(Debug)]
enum Item {
    /// A STOMP topic message: destination, data, headers.
    Topic(String, Bytes, Vec<(String, String)>),
    /// An endpoint notification.
    Endpoint(Event),
}

type Parsed = Vec<Item>;

/// The messages of a request, each checked against the broker `prefixes`; the error names
/// what is wrong.
fn parse(body: &Bytes, max_data: usize, prefixes: &[String]) -> Result<Parsed, String> {
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let list = match (envelope.messages, envelope.destination, envelope.data) {
        (Some(list), None, None) => list,
        (None, Some(destination), Some(data)) => vec![One {
            destination,
            data,
            headers: envelope.headers,
        }],
        _ => {
            return Err(
                "send either {\"destination\", \"data\", \"headers\"} or {\"messages\": [...]}"
                    .into(),
            )
        }
    };
    if list.is_empty() || list.len() > MAX_MESSAGES {
        return Err(format!("between 1 and {MAX_MESSAGES} messages per request"));
    }
    list.into_iter()
        .map(|one| {
            if one.destination.starts_with(backend::PREFIX) {
                if one.data.get().len() > max_data {
                    return Err(format!("data larger than {max_data} bytes"));
                }
                if !one.headers.is_empty() {
                    return Err(format!(
                        "{}: endpoint notifications take no headers",
                        one.destination
                    ));
                }
                return backend::parse(&one.destination, one.data.get()).map(Item::Endpoint);
            }
            destination::check(&one.destination, prefixes)
                .map_err(|e| format!("{e}: {}", one.destination))?;
            if one.destination.starts_with(destination::STREAMS) {
                return Err(format!(
                    "streams are written by their producers on /connect: {}",
                    one.destination
                ));
            }
            let data = one.data.get();
            if data.len() > max_data {
                return Err(format!("data larger than {max_data} bytes"));
            }
            let headers = pass_through(one.headers.into_iter().collect());
            // NUL, CR and LF are what a subscriber's framing could mistake for its own.
            let framing = ['\0', '\r', '\n'];
            if headers.iter().any(|(n, v)| {
                n.is_empty() || n.contains(':') || n.contains(framing) || v.contains(framing)
            }) {
                return Err(
                    "header names must be non-empty and without ':'; names and values without NUL, CR or LF"
                        .into(),
                );
            }
            // `data` borrows from the request body: the message shares it, uncopied.
            Ok(Item::Topic(
                one.destination,
                body.slice_ref(data.as_bytes()),
                headers,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &Bytes, max_data: usize) -> Result<Parsed, String> {
        super::parse(body, max_data, &["/topic/".into(), "/v1/topic/".into()])
    }

    #[test]
    fn one_or_many_messages_and_what_is_refused() {
        let one = parse(
            &Bytes::from_static(br#"{"destination":"/topic/workout/record","data":{ "workout": {"id":4711} },"headers":{"x":"1","destination":"/evil"}}"#),
            1000,
        )
        .unwrap();
        let [Item::Topic(destination, data, headers)] = &one[..] else {
            panic!("one topic message");
        };
        assert_eq!(destination, "/topic/workout/record");
        // `data` is kept byte for byte; the frame's own headers are dropped.
        assert_eq!(&data[..], br#"{ "workout": {"id":4711} }"#);
        assert_eq!(headers, &vec![("x".to_string(), "1".to_string())]);
        let many = parse(
            &Bytes::from_static(br#"{"messages":[{"destination":"/topic/a","data":1},{"destination":"/v1/topic/b","data":"x"}]}"#),
            1000,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        let mixed = parse(
            &Bytes::from_static(br#"{"messages":[{"destination":"/topic/a","data":1},{"destination":"/bimserver/newProject","data":{"poid":7}}]}"#),
            1000,
        )
        .unwrap();
        assert!(matches!(
            mixed[1],
            Item::Endpoint(Event::NewProject { poid: 7 })
        ));
        for (body, want) in [
            (
                &br#"{"destination":"/queue/a","data":1}"#[..],
                "unknown destination: /queue/a",
            ),
            (
                br#"{"destination":"/topic/../x","data":1}"#,
                "invalid destination",
            ),
            (br#"{"destination":"/topic/a"}"#, "either"),
            (br#"{"messages":[]}"#, "between 1 and"),
            (
                br#"{"destination":"/topic/a","data":"long"}"#,
                "data larger than",
            ),
            (
                br#"{"destination":"/topic/a","data":1,"extra":2}"#,
                "invalid JSON",
            ),
            (br#"not json"#, "invalid JSON"),
            (
                br#"{"destination":"/topic/streams/acme","data":1}"#,
                "streams are written by their producers",
            ),
            (
                br#"{"destination":"/bimserver/progress/1","data":{"state":"NOPE"}}"#,
                "state must be",
            ),
            (
                br#"{"destination":"/bimserver/newProject","data":{"poid":1},"headers":{"a":"b"}}"#,
                "take no headers",
            ),
            (
                br#"{"destination":"/topic/a","data":1,"headers":{"x":"a\u0000b"}}"#,
                "without NUL, CR or LF",
            ),
            (
                br#"{"destination":"/topic/a","data":1,"headers":{"x":"a\rb"}}"#,
                "without NUL, CR or LF",
            ),
            (
                br#"{"destination":"/topic/a","data":1,"headers":{"x":"a\nb"}}"#,
                "without NUL, CR or LF",
            ),
            (
                br#"{"destination":"/topic/a","data":1,"headers":{"x\r":"b"}}"#,
                "without NUL, CR or LF",
            ),
        ] {
            let max = if want == "data larger than" { 3 } else { 1000 };
            let err = parse(&Bytes::from_static(body), max).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}
