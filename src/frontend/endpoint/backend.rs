//! What backends publish for endpoints, through the same `POST /api/publish` as STOMP
//! topics, under reserved destinations:
//!
//! - `/bimserver/progress/{topicId}`: data holds `SLongActionState` fields (`progress`,
//!   `state`, `title`, `stage`, `start`, `end`, `errors`, `warnings`, `infos`); those given
//!   replace the topic's, the rest stay. The first update creates the topic.
//! - `/bimserver/newRevision`: data `{"poid":…,"roid":…}`.
//! - `/bimserver/newProject`: data `{"poid":…}`.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use super::frame::action_state;
use crate::hub::endpoints::ProgressUpdate;

/// Destinations under this prefix are endpoint notifications, never STOMP topics.
pub const PREFIX: &str = "/bimserver/";
const PROGRESS: &str = "/bimserver/progress/";
const NEW_REVISION: &str = "/bimserver/newRevision";
const NEW_PROJECT: &str = "/bimserver/newProject";

/// A notification a backend raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Progress { topic: u64, update: ProgressUpdate },
    NewRevision { poid: i64, roid: i64 },
    NewProject { poid: i64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Progress {
    #[serde(default, rename = "__type")]
    kind: Option<String>,
    #[serde(default, rename = "topicId")]
    topic_id: Option<u64>,
    #[serde(default)]
    progress: Option<i32>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    stage: Option<i32>,
    #[serde(default)]
    start: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    end: Option<Option<u64>>,
    #[serde(default)]
    errors: Option<Vec<String>>,
    #[serde(default)]
    warnings: Option<Vec<String>>,
    #[serde(default)]
    infos: Option<Vec<String>>,
}

/// Tells `"end":null` (clear it) from no `end` (keep it).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revision {
    poid: i64,
    roid: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Project {
    poid: i64,
}

/// Parses one published message under [`PREFIX`]; the error says what is wrong.
pub fn parse(destination: &str, data: &str) -> Result<Event, String> {
    let bad = |e: serde_json::Error| format!("{destination}: {e}");
    if let Some(id) = destination.strip_prefix(PROGRESS) {
        let topic: u64 = id
            .parse()
            .map_err(|_| format!("{destination}: the topic id must be a non-negative integer"))?;
        let p: Progress = serde_json::from_str(data).map_err(bad)?;
        return progress(topic, p).map_err(|e| format!("{destination}: {e}"));
    }
    match destination {
        NEW_REVISION => {
            let r: Revision = serde_json::from_str(data).map_err(bad)?;
            Ok(Event::NewRevision {
                poid: r.poid,
                roid: r.roid,
            })
        }
        NEW_PROJECT => {
            let p: Project = serde_json::from_str(data).map_err(bad)?;
            Ok(Event::NewProject { poid: p.poid })
        }
        _ => Err(format!(
            "unknown destination: {destination} (use {PROGRESS}{{topicId}}, {NEW_REVISION} or {NEW_PROJECT})"
        )),
    }
}

fn progress(topic: u64, p: Progress) -> Result<Event, serde_json::Error> {
    if p.kind.as_deref().is_some_and(|k| k != "SLongActionState") {
        return Err(serde_json::Error::custom("__type must be SLongActionState"));
    }
    if p.topic_id.is_some_and(|t| t != topic) {
        return Err(serde_json::Error::custom(
            "topicId differs from the destination's",
        ));
    }
    if p.progress.is_some_and(|n| !(-1..=100).contains(&n)) {
        return Err(serde_json::Error::custom(
            "progress must be -1 (unknown) to 100",
        ));
    }
    let state = match p.state.as_deref() {
        None => None,
        Some(name) => Some(action_state(name).ok_or_else(|| {
            serde_json::Error::custom("state must be UNKNOWN, STARTED, AS_ERROR or FINISHED")
        })?),
    };
    Ok(Event::Progress {
        topic,
        update: ProgressUpdate {
            progress: p.progress,
            state,
            title: p.title,
            stage: p.stage,
            start: p.start,
            end: p.end,
            errors: p.errors,
            warnings: p.warnings,
            infos: p.infos,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::endpoints::ActionState;

    #[test]
    fn reserved_destinations_parse_and_bad_data_is_named() {
        let e = parse(
            "/bimserver/progress/12",
            r#"{"__type":"SLongActionState","progress":42,"state":"STARTED","title":"Checking in","stage":1,"end":null,"topicId":12}"#,
        )
        .unwrap();
        assert_eq!(
            e,
            Event::Progress {
                topic: 12,
                update: ProgressUpdate {
                    progress: Some(42),
                    state: Some(ActionState::Started),
                    title: Some("Checking in".into()),
                    stage: Some(1),
                    end: Some(None),
                    ..Default::default()
                }
            }
        );
        assert_eq!(
            parse("/bimserver/newRevision", r#"{"poid":1,"roid":2}"#),
            Ok(Event::NewRevision { poid: 1, roid: 2 })
        );
        assert_eq!(
            parse("/bimserver/newProject", r#"{"poid":1}"#),
            Ok(Event::NewProject { poid: 1 })
        );
        for (dest, data, want) in [
            ("/bimserver/progress/x", "{}", "topic id"),
            (
                "/bimserver/progress/1",
                r#"{"progress":101}"#,
                "progress must be",
            ),
            (
                "/bimserver/progress/1",
                r#"{"state":"DONE"}"#,
                "state must be",
            ),
            ("/bimserver/progress/1", r#"{"topicId":2}"#, "differs"),
            (
                "/bimserver/progress/1",
                r#"{"colour":"red"}"#,
                "unknown field",
            ),
            ("/bimserver/newRevision", r#"{"poid":1}"#, "roid"),
            ("/bimserver/other", "{}", "unknown destination"),
        ] {
            let err = parse(dest, data).unwrap_err();
            assert!(err.contains(want), "{dest} {data}: {err}");
        }
    }
}
