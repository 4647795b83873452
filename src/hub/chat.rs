//! Seed 002's chat services, built into the topics under `/v1`: ticks on
//! `/v1/topic/heartbeat`, the employee count on `/v1/topic/online-employees`, presence
//! (`userConnected` / `userDisconnected`) on `/v1/topic/conversation/{id}`, and typing events
//! raised by SENDs to `/v1/app/conversation/{id}/typing/start|stop`.
//!
//! Owns the table of online employees. Publishes through [`Topics`] like any backend, so
//! subscribers cannot tell a service's message from a published one. Must not know about
//! frames or connections: callers name the user and the subscription. The chat's own events
//! (`message`, `read`, `received`) are not here: the chat backend raises them through
//! `POST /api/publish`.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::topics::{Inbox, TopicMessage, Topics, JSON_UTF8};

pub const HEARTBEAT: &str = "/v1/topic/heartbeat";
pub const ONLINE_EMPLOYEES: &str = "/v1/topic/online-employees";
pub const CONVERSATION: &str = "/v1/topic/conversation/";
/// SENDs here (with `{id}/typing/start` or `{id}/typing/stop`) raise typing events.
pub const APP_CONVERSATION: &str = "/v1/app/conversation/";

/// A SEND to an application destination that no service handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no service at this destination")]
pub struct UnknownService;

/// A typing event a SEND asked for: its conversation topic and event name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppEvent {
    topic: String,
    event: &'static str,
}

/// What the services remember between calls.
pub struct ChatState {
    heartbeat_every: Duration,
    /// Connected employees ("developer/user") with their connection counts. Its lock also
    /// orders each count's publication against new subscribers' first value, so nobody
    /// sees the count go back.
    online: Mutex<HashMap<Arc<str>, usize>>,
}

impl ChatState {
    pub fn new(heartbeat_every: Duration) -> Self {
        Self {
            heartbeat_every,
            online: Mutex::new(HashMap::new()),
        }
    }
}

/// The services, over the hub's topics.
#[derive(Clone, Copy)]
pub struct Chat<'a> {
    pub(super) state: &'a ChatState,
    pub(super) topics: &'a Topics,
}

impl Chat<'_> {
    /// Time between heartbeat ticks; zero for none.
    pub fn heartbeat_every(&self) -> Duration {
        self.state.heartbeat_every
    }

    /// One tick on `/v1/topic/heartbeat`: `{"heartbeat":<unix ms>}`.
    pub fn heartbeat(&self, now_ms: u64) {
        self.publish(HEARTBEAT, format!("{{\"heartbeat\":{now_ms}}}"));
    }

    /// An employee's connection is up; `who` names the employee across connections.
    pub fn employee_joined(&self, who: &str) {
        let mut online = self.state.online.lock();
        let before = online.len();
        *online.entry(Arc::from(who)).or_insert(0) += 1;
        if online.len() != before {
            self.publish(ONLINE_EMPLOYEES, online_body(online.len()));
        }
    }

    /// An employee's connection is gone.
    pub fn employee_left(&self, who: &str) {
        let mut online = self.state.online.lock();
        let Some(count) = online.get_mut(who) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            online.remove(who);
            self.publish(ONLINE_EMPLOYEES, online_body(online.len()));
        }
    }

    /// Subscribes, with what the service owes a new subscriber: the current count on
    /// `/v1/topic/online-employees`, a `userConnected` to the conversation for a user.
    pub fn join(&self, destination: &str, key: u64, inbox: &Inbox, user: Option<&str>) {
        if destination == ONLINE_EMPLOYEES {
            let online = self.state.online.lock();
            let first = self.message(destination, online_body(online.len()));
            self.topics
                .subscribe_with(destination, key, inbox, Some(first));
            return;
        }
        self.topics.subscribe(destination, key, inbox);
        if let (Some(user), true) = (user, destination.starts_with(CONVERSATION)) {
            self.publish(destination, user_event("userConnected", user));
        }
    }

    /// Unsubscribes (UNSUBSCRIBE or disconnect); the conversation hears `userDisconnected`.
    pub fn part(&self, destination: &str, conn: u64, key: u64, user: Option<&str>) {
        self.topics.unsubscribe(destination, conn, key);
        if let (Some(user), true) = (user, destination.starts_with(CONVERSATION)) {
            self.publish(destination, user_event("userDisconnected", user));
        }
    }

    /// What a SEND to an application destination raises, checked before it is applied
    /// (a SEND inside a transaction is refused at once, not at COMMIT).
    pub fn route(&self, destination: &str) -> Result<AppEvent, UnknownService> {
        let rest = destination
            .strip_prefix(APP_CONVERSATION)
            .ok_or(UnknownService)?;
        let (id, event) = match rest.split_once('/') {
            Some((id, "typing/start")) => (id, "startTyping"),
            Some((id, "typing/stop")) => (id, "stopTyping"),
            _ => return Err(UnknownService),
        };
        if id.is_empty() {
            return Err(UnknownService);
        }
        Ok(AppEvent {
            topic: format!("{CONVERSATION}{id}"),
            event,
        })
    }

    /// Publishes a routed SEND from `user`; the SEND's body is not used.
    pub fn raise(&self, event: &AppEvent, user: &str) {
        self.publish(&event.topic, user_event(event.event, user));
    }

    fn message(&self, destination: &str, body: String) -> TopicMessage {
        TopicMessage {
            destination: Arc::from(destination),
            id: self.topics.next_id(),
            content_type: Some(JSON_UTF8.into()),
            headers: Vec::new(),
            body: Bytes::from(body),
            text: true,
        }
    }

    fn publish(&self, destination: &str, body: String) {
        if self.topics.subscribers(destination) == 0 {
            return;
        }
        self.topics.publish(self.message(destination, body));
        crate::metrics::handles().topic_messages[2].increment(1);
    }
}

fn online_body(n: usize) -> String {
    format!("{{\"online\":{n}}}")
}

/// `{"<event>":{"userId":"<user>"}}`, the user id JSON-escaped.
fn user_event(event: &str, user: &str) -> String {
    let user = serde_json::Value::from(user);
    format!("{{\"{event}\":{{\"userId\":{user}}}}}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::types::{Kick, Outbox};
    use tokio::sync::mpsc;

    fn inbox(
        conn: u64,
    ) -> (
        Inbox,
        mpsc::UnboundedReceiver<super::super::topics::Delivery>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inbox = Inbox {
            conn,
            tx,
            outbox: Outbox::new(100, 1 << 20),
            kick: Kick::new(),
        };
        (inbox, rx)
    }

    fn bodies(rx: &mut mpsc::UnboundedReceiver<super::super::topics::Delivery>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|(_, m)| String::from_utf8(m.body.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn online_count_changes_once_per_employee_and_new_subscribers_get_the_current_value() {
        let topics = Topics::new();
        let state = ChatState::new(Duration::ZERO);
        let chat = Chat {
            state: &state,
            topics: &topics,
        };
        let (early, mut early_rx) = inbox(1);
        chat.join(ONLINE_EMPLOYEES, 1, &early, None);
        chat.employee_joined("acme/e1");
        // A second connection of the same employee changes nothing.
        chat.employee_joined("acme/e1");
        chat.employee_joined("acme/e2");
        chat.employee_left("acme/e1");
        chat.employee_left("acme/e1");
        let (late, mut late_rx) = inbox(2);
        chat.join(ONLINE_EMPLOYEES, 1, &late, None);
        // Never joined: no change, no message.
        chat.employee_left("acme/nobody");
        assert_eq!(
            bodies(&mut early_rx),
            [
                "{\"online\":0}",
                "{\"online\":1}",
                "{\"online\":2}",
                "{\"online\":1}"
            ]
        );
        assert_eq!(bodies(&mut late_rx), ["{\"online\":1}"]);
    }

    #[test]
    fn presence_and_typing_reach_the_conversation() {
        let topics = Topics::new();
        let state = ChatState::new(Duration::ZERO);
        let chat = Chat {
            state: &state,
            topics: &topics,
        };
        let (watcher, mut rx) = inbox(1);
        let (customer, _customer_rx) = inbox(2);
        let conversation = "/v1/topic/conversation/c-1";
        chat.join(conversation, 1, &watcher, None);
        chat.join(conversation, 1, &customer, Some("u-\"1"));
        let start = chat.route("/v1/app/conversation/c-1/typing/start").unwrap();
        chat.raise(&start, "u-\"1");
        let stop = chat.route("/v1/app/conversation/c-1/typing/stop").unwrap();
        chat.raise(&stop, "u-2");
        for unknown in [
            "/v1/app/conversation/c-1/typing/maybe",
            "/v1/app/conversation//typing/start",
            "/v1/app/other",
        ] {
            assert_eq!(chat.route(unknown), Err(UnknownService), "{unknown}");
        }
        chat.part(conversation, 2, 1, Some("u-\"1"));
        assert_eq!(
            bodies(&mut rx),
            [
                r#"{"userConnected":{"userId":"u-\"1"}}"#,
                r#"{"startTyping":{"userId":"u-\"1"}}"#,
                r#"{"stopTyping":{"userId":"u-2"}}"#,
                r#"{"userDisconnected":{"userId":"u-\"1"}}"#,
            ]
        );
    }
}
