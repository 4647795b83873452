//! Seed 003's notification endpoints: the registry of endpoints (one per `/stream` socket
//! that sent a valid token), the progress topics with their last state, and the throttle
//! that paces progress pushes.
//!
//! Owns the endpoint table, each endpoint's registrations, and the progress table. Pushes
//! travel through [`Topics`] like any other message, so fan-out, ordering and the
//! slow-subscriber policy are the hub's usual ones; a registration is a topic subscription
//! whose key says which interface name family and which method it is. Must not know the
//! wire format: callers hand in the encoded push (the endpoint front-end owns the JSON).
//! Time is passed in, so the throttle is tested without sleeping.

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::topics::{Inbox, TopicMessage, Topics, JSON_UTF8};

/// `SLongActionState.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionState {
    Unknown,
    Started,
    AsError,
    Finished,
}

impl ActionState {
    pub const ALL: [ActionState; 4] = [Self::Unknown, Self::Started, Self::AsError, Self::Finished];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Started => "STARTED",
            Self::AsError => "AS_ERROR",
            Self::Finished => "FINISHED",
        }
    }

    fn done(self) -> bool {
        matches!(self, Self::AsError | Self::Finished)
    }
}

/// A progress topic's state: BIMserver's `SLongActionState` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressState {
    /// Percent, or -1 when unknown.
    pub progress: i32,
    pub state: ActionState,
    pub title: String,
    pub stage: i32,
    /// Unix milliseconds.
    pub start: u64,
    pub end: Option<u64>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub infos: Vec<String>,
}

/// What a backend sends: the fields it names replace the topic's, the rest stay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressUpdate {
    pub progress: Option<i32>,
    pub state: Option<ActionState>,
    pub title: Option<String>,
    pub stage: Option<i32>,
    pub start: Option<u64>,
    /// `Some(None)` clears it.
    pub end: Option<Option<u64>>,
    pub errors: Option<Vec<String>>,
    pub warnings: Option<Vec<String>>,
    pub infos: Option<Vec<String>>,
}

impl ProgressState {
    /// A topic's state before any update names a field.
    fn new(now_ms: u64) -> Self {
        Self {
            progress: 0,
            state: ActionState::Started,
            title: String::new(),
            stage: 0,
            start: now_ms,
            end: None,
            errors: Vec::new(),
            warnings: Vec::new(),
            infos: Vec::new(),
        }
    }

    fn apply(&mut self, u: ProgressUpdate, now_ms: u64) {
        let ProgressUpdate {
            progress,
            state,
            title,
            stage,
            start,
            end,
            errors,
            warnings,
            infos,
        } = u;
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = $f { self.$f = v; })* };
        }
        set!(progress, state, title, stage, start, end, errors, warnings, infos);
        // A finished action has an end; the backend may leave it to us.
        if self.state.done() && self.end.is_none() {
            self.end = Some(now_ms);
        }
    }
}

/// The interface name family a client registered with; pushes for that registration use
/// the same family (`NotificationInterface` or `Bimsie1NotificationInterface`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Current = 0,
    Bimsie1 = 1,
}

/// What an endpoint can be notified of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notification {
    Progress(u64),
    NewRevision,
    NewProject,
}

pub use crate::metrics::PUSH_METHODS;

impl Notification {
    fn method(self) -> usize {
        match self {
            Self::Progress(_) => 0,
            Self::NewRevision => 1,
            Self::NewProject => 2,
        }
    }
}

/// A registration's subscription key: its family and method, so a connection writes each
/// push under the right interface name and counts it without looking at the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushKey(pub u64);

impl PushKey {
    fn new(family: Family, what: Notification) -> Self {
        Self(family as u64 | (what.method() as u64) << 1)
    }

    pub fn family(self) -> Family {
        if self.0 & 1 == 0 {
            Family::Current
        } else {
            Family::Bimsie1
        }
    }

    /// Index into [`PUSH_METHODS`], the push metric's `method` label.
    pub fn method(self) -> usize {
        (self.0 >> 1) as usize
    }
}

/// Why a registry call was refused; the message is what the JSON API's `UserException`
/// says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("Endpoint with id {0} not found")]
    NoEndpoint(u64),
    #[error("Topic with id {0} not found")]
    NoTopic(u64),
    #[error("Endpoint {0} has {1} registrations, the limit")]
    TooManyRegistrations(u64, usize),
    #[error("{0} progress topics exist, the limit (endpoint_max_topics)")]
    TooManyTopics(usize),
}

/// The numbers the registry runs by.
#[derive(Debug, Clone)]
pub struct EndpointLimits {
    /// Least time between two pushes of one topic that only move its progress.
    pub progress_interval_ms: u64,
    pub max_topics: usize,
    /// A topic nobody is registered on is dropped this long after its last update.
    pub topic_ttl_ms: u64,
    pub max_registrations: usize,
}

struct Endpoint {
    /// Who opened it ("developer/user", or "token:<id>" for a configured token): only they
    /// may register it.
    owner: Arc<str>,
    /// The developer whose progress topics and project events it may see.
    tenant: Arc<str>,
    inbox: Inbox,
    registrations: HashMap<Notification, Family>,
}

struct Topic {
    destination: Arc<str>,
    state: ProgressState,
    /// What subscribers last got, and when.
    pushed: Option<(ProgressState, u64)>,
    /// A newer state waits for the throttle window to end.
    held: bool,
    updated_ms: u64,
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Pushed to this many registered endpoints.
    Pushed(usize),
    /// Within the throttle window: pushed when it ends, unless superseded.
    Held,
    /// Nothing changed since the last push.
    Unchanged,
}

/// Encodes a progress push for a topic.
pub type EncodeProgress = fn(u64, &ProgressState) -> Vec<u8>;

pub struct Endpoints {
    limits: EndpointLimits,
    next_id: AtomicU64,
    endpoints: DashMap<u64, Mutex<Endpoint>>,
    /// Progress topics by tenant and id: one developer's topic 12 is not another's.
    topics: DashMap<(Arc<str>, u64), Mutex<Topic>>,
    /// Topics with a held state, for [`Endpoints::flush_due`].
    held: Mutex<Vec<(Arc<str>, u64)>>,
}

/// The hub destination a tenant's notification travels on. Outside every STOMP prefix (no
/// leading slash), so no STOMP client can subscribe or send there; the tenant is part of
/// it, so one developer's endpoints never receive another's.
fn destination(tenant: &str, what: Notification) -> String {
    match what {
        Notification::Progress(t) => format!("endpoint:{tenant}:progress:{t}"),
        Notification::NewRevision => format!("endpoint:{tenant}:newRevision"),
        Notification::NewProject => format!("endpoint:{tenant}:newProject"),
    }
}

impl Endpoints {
    pub fn new(limits: EndpointLimits) -> Self {
        Self {
            limits,
            next_id: AtomicU64::new(0),
            endpoints: DashMap::new(),
            topics: DashMap::new(),
            held: Mutex::new(Vec::new()),
        }
    }

    pub fn limits(&self) -> &EndpointLimits {
        &self.limits
    }

    /// Registers an endpoint of `owner`, who sees `tenant`'s notifications, for a socket;
    /// its id is unique for the server's life.
    pub fn open(&self, owner: Arc<str>, tenant: Arc<str>, inbox: Inbox) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.endpoints.insert(
            id,
            Mutex::new(Endpoint {
                owner,
                tenant,
                inbox,
                registrations: HashMap::new(),
            }),
        );
        crate::metrics::handles().endpoints.increment(1.0);
        id
    }

    /// Unregisters an endpoint and everything registered on it.
    pub fn close(&self, id: u64, topics: &Topics) {
        let Some((_, endpoint)) = self.endpoints.remove(&id) else {
            return;
        };
        let endpoint = endpoint.into_inner();
        for what in endpoint.registrations.keys() {
            topics.leave(&destination(&endpoint.tenant, *what), endpoint.inbox.conn);
        }
        crate::metrics::handles().endpoints.decrement(1.0);
    }

    /// Registers endpoint `id` of `owner` for `what`; registering again is a no-op (or
    /// switches the family, without a gap).
    pub fn register(
        &self,
        id: u64,
        owner: &str,
        what: Notification,
        family: Family,
        topics: &Topics,
    ) -> Result<(), EndpointError> {
        let entry = self.owned(id, owner)?;
        let mut endpoint = entry.lock();
        // Held across the topic check, so the topic cannot expire before the subscription.
        let topic = match what {
            Notification::Progress(t) => Some(
                self.topics
                    .get(&(endpoint.tenant.clone(), t))
                    .ok_or(EndpointError::NoTopic(t))?,
            ),
            _ => None,
        };
        let dest: Arc<str> = match &topic {
            Some(t) => t.lock().destination.clone(),
            None => destination(&endpoint.tenant, what).into(),
        };
        let conn = endpoint.inbox.conn;
        match endpoint.registrations.get(&what).copied() {
            Some(f) if f == family => {}
            Some(f) => {
                let (from, to) = (PushKey::new(f, what), PushKey::new(family, what));
                topics.rekey(&dest, conn, from.0, to.0);
                endpoint.registrations.insert(what, family);
            }
            None => {
                if endpoint.registrations.len() >= self.limits.max_registrations {
                    return Err(EndpointError::TooManyRegistrations(
                        id,
                        self.limits.max_registrations,
                    ));
                }
                topics.subscribe(&dest, PushKey::new(family, what).0, &endpoint.inbox);
                endpoint.registrations.insert(what, family);
            }
        }
        Ok(())
    }

    /// Undoes [`Endpoints::register`]; unregistering what is not registered is a no-op.
    pub fn unregister(
        &self,
        id: u64,
        owner: &str,
        what: Notification,
        topics: &Topics,
    ) -> Result<(), EndpointError> {
        let entry = self.owned(id, owner)?;
        let mut endpoint = entry.lock();
        if let Some(family) = endpoint.registrations.remove(&what) {
            let key = PushKey::new(family, what).0;
            let dest = destination(&endpoint.tenant, what);
            topics.unsubscribe(&dest, endpoint.inbox.conn, key);
        }
        Ok(())
    }

    /// The endpoint if `owner` opened it. Another owner's endpoint is "not found" too, so
    /// ids say nothing about who else is connected.
    fn owned(
        &self,
        id: u64,
        owner: &str,
    ) -> Result<dashmap::mapref::one::Ref<'_, u64, Mutex<Endpoint>>, EndpointError> {
        self.endpoints
            .get(&id)
            .filter(|e| &*e.lock().owner == owner)
            .ok_or(EndpointError::NoEndpoint(id))
    }

    /// A topic's current state (`getProgress`), among `tenant`'s topics.
    pub fn progress(&self, tenant: &str, topic: u64) -> Result<ProgressState, EndpointError> {
        let t = self
            .topics
            .get(&(Arc::from(tenant), topic))
            .ok_or(EndpointError::NoTopic(topic))?;
        let state = t.lock().state.clone();
        Ok(state)
    }

    /// Applies a backend's update to a topic (created on first use) and pushes it, unless
    /// the throttle holds it: at most one push per `progress_interval_ms` per topic, except
    /// that a change of state, stage or title, or progress reaching 100, goes at once. A
    /// held state is pushed by [`Endpoints::flush_due`] when its window ends.
    pub fn update(
        &self,
        tenant: &str,
        topic: u64,
        update: ProgressUpdate,
        now_ms: u64,
        topics: &Topics,
        encode: EncodeProgress,
    ) -> Result<Update, EndpointError> {
        let key: (Arc<str>, u64) = (Arc::from(tenant), topic);
        let entry = match self.topics.get(&key) {
            Some(t) => t,
            None => {
                let count = self.topics.len();
                if count >= self.limits.max_topics {
                    return Err(EndpointError::TooManyTopics(count));
                }
                self.topics
                    .entry(key.clone())
                    .or_insert_with(|| {
                        crate::metrics::handles().progress_topics.increment(1.0);
                        Mutex::new(Topic {
                            destination: destination(tenant, Notification::Progress(topic)).into(),
                            state: ProgressState::new(now_ms),
                            pushed: None,
                            held: false,
                            updated_ms: now_ms,
                        })
                    })
                    .downgrade()
            }
        };
        let mut t = entry.lock();
        t.state.apply(update, now_ms);
        t.updated_ms = now_ms;
        let outcome = match decide(&t, now_ms, self.limits.progress_interval_ms) {
            Decision::Push => Update::Pushed(push(&mut t, topic, now_ms, topics, encode)),
            Decision::Hold => {
                if !t.held {
                    t.held = true;
                    self.held.lock().push(key.clone());
                }
                Update::Held
            }
            Decision::Unchanged => {
                t.held = false;
                Update::Unchanged
            }
        };
        crate::metrics::handles().progress_updates[outcome.index()].increment(1);
        Ok(outcome)
    }

    /// Pushes every held state whose throttle window has ended; returns how many topics.
    pub fn flush_due(&self, now_ms: u64, topics: &Topics, encode: EncodeProgress) -> usize {
        let held = std::mem::take(&mut *self.held.lock());
        if held.is_empty() {
            return 0;
        }
        let mut still = Vec::new();
        let mut flushed = 0;
        for key in held {
            let Some(entry) = self.topics.get(&key) else {
                continue;
            };
            let topic = key.1;
            let mut t = entry.lock();
            if !t.held {
                continue;
            }
            let last = t.pushed.as_ref().map_or(0, |(_, at)| *at);
            if now_ms.saturating_sub(last) < self.limits.progress_interval_ms {
                still.push(key.clone());
                continue;
            }
            push(&mut t, topic, now_ms, topics, encode);
            flushed += 1;
        }
        if !still.is_empty() {
            self.held.lock().extend(still);
        }
        flushed
    }

    /// Drops topics that nobody is registered on and that have not been updated for
    /// `topic_ttl_ms`; returns how many.
    pub fn expire(&self, now_ms: u64, topics: &Topics) -> usize {
        let before = self.topics.len();
        self.topics.retain(|_, t| {
            let t = t.get_mut();
            now_ms.saturating_sub(t.updated_ms) < self.limits.topic_ttl_ms
                || topics.subscribers(&t.destination) > 0
        });
        let removed = before.saturating_sub(self.topics.len());
        crate::metrics::handles()
            .progress_topics
            .decrement(removed as f64);
        removed
    }

    /// Pushes `tenant`'s `newRevision` or `newProject` (already encoded) to every endpoint of
    /// that tenant registered for it; returns how many.
    pub fn event(&self, tenant: &str, what: Notification, body: Vec<u8>, topics: &Topics) -> usize {
        if let Notification::Progress(_) = what {
            return 0;
        }
        topics.publish(message(destination(tenant, what).into(), topics, body))
    }
}

fn message(destination: Arc<str>, topics: &Topics, body: Vec<u8>) -> TopicMessage {
    TopicMessage {
        destination,
        id: topics.next_id(),
        content_type: Some(JSON_UTF8.into()),
        headers: Vec::new(),
        body: Bytes::from(body),
        text: true,
    }
}

fn push(t: &mut Topic, id: u64, now_ms: u64, topics: &Topics, encode: EncodeProgress) -> usize {
    t.held = false;
    t.pushed = Some((t.state.clone(), now_ms));
    let body = encode(id, &t.state);
    topics.publish(message(t.destination.clone(), topics, body))
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Push,
    Hold,
    Unchanged,
}

impl Update {
    /// Index into [`crate::metrics::PROGRESS_OUTCOMES`].
    fn index(self) -> usize {
        match self {
            Update::Pushed(_) => 0,
            Update::Held => 1,
            Update::Unchanged => 2,
        }
    }
}

/// The throttle, BIMserver's ProgressTopic rule: what changes the picture (state, stage,
/// title, reaching 100) goes at once; progress alone goes at most once per interval.
fn decide(t: &Topic, now_ms: u64, interval_ms: u64) -> Decision {
    let Some((last, at)) = &t.pushed else {
        return Decision::Push;
    };
    let now = &t.state;
    if now == last {
        return Decision::Unchanged;
    }
    if now.state != last.state
        || now.stage != last.stage
        || now.title != last.title
        || (now.progress >= 100 && last.progress < 100)
        || now_ms.saturating_sub(*at) >= interval_ms
    {
        return Decision::Push;
    }
    Decision::Hold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Kick, Outbox};
    use tokio::sync::mpsc;

    fn encode(topic: u64, s: &ProgressState) -> Vec<u8> {
        format!("{topic}:{}:{}:{}", s.state.as_str(), s.stage, s.progress).into_bytes()
    }

    fn setup() -> (
        Endpoints,
        Topics,
        u64,
        mpsc::UnboundedReceiver<crate::hub::TopicDelivery>,
    ) {
        let e = Endpoints::new(EndpointLimits {
            progress_interval_ms: 200,
            max_topics: 3,
            topic_ttl_ms: 10_000,
            max_registrations: 4,
        });
        let topics = Topics::new();
        let (id, rx) = open(&e, 9, "acme/alice", "acme");
        (e, topics, id, rx)
    }

    /// An endpoint of `owner`, seeing `tenant`'s notifications, on connection `conn`.
    fn open(
        e: &Endpoints,
        conn: u64,
        owner: &str,
        tenant: &str,
    ) -> (u64, mpsc::UnboundedReceiver<crate::hub::TopicDelivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inbox = Inbox {
            conn,
            tx,
            outbox: Outbox::new(100, 1 << 20),
            kick: Kick::new(),
        };
        (e.open(Arc::from(owner), Arc::from(tenant), inbox), rx)
    }

    fn progress(p: i32) -> ProgressUpdate {
        ProgressUpdate {
            progress: Some(p),
            ..Default::default()
        }
    }

    fn bodies(rx: &mut mpsc::UnboundedReceiver<crate::hub::TopicDelivery>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|(_, m)| String::from_utf8(m.body.to_vec()).unwrap())
            .collect()
    }

    /// Progress topics and project events belong to the developer that raised them: the
    /// same topic id is two topics for two developers, and one's events never reach the
    /// other's endpoints.
    #[test]
    fn tenants_do_not_see_each_others_topics_or_events() {
        let (e, topics, acme, mut acme_rx) = setup();
        let t = &topics;
        let (globex, mut globex_rx) = open(&e, 10, "globex/bob", "globex");
        e.update("acme", 7, progress(10), 1_000, t, encode).unwrap();
        assert_eq!(e.progress("acme", 7).unwrap().progress, 10);
        assert_eq!(e.progress("globex", 7), Err(EndpointError::NoTopic(7)));
        // globex cannot register for acme's topic 7, and its own topic 7 is another one.
        assert_eq!(
            e.register(
                globex,
                "globex/bob",
                Notification::Progress(7),
                Family::Current,
                t
            ),
            Err(EndpointError::NoTopic(7))
        );
        e.update("globex", 7, progress(90), 1_000, t, encode)
            .unwrap();
        for (id, owner) in [(acme, "acme/alice"), (globex, "globex/bob")] {
            for what in [Notification::Progress(7), Notification::NewProject] {
                e.register(id, owner, what, Family::Current, t).unwrap();
            }
        }
        e.update(
            "acme",
            7,
            ProgressUpdate {
                stage: Some(2),
                ..progress(20)
            },
            2_000,
            t,
            encode,
        )
        .unwrap();
        assert_eq!(
            e.event("acme", Notification::NewProject, b"p1".to_vec(), t),
            1
        );
        assert_eq!(bodies(&mut acme_rx), vec!["7:STARTED:2:20", "p1"]);
        assert!(bodies(&mut globex_rx).is_empty());
        assert_eq!(e.progress("globex", 7).unwrap().progress, 90);
    }

    #[test]
    fn the_throttle_passes_changes_at_once_and_progress_once_per_interval() {
        let (e, topics, id, mut rx) = setup();
        let t = &topics;
        assert_eq!(
            e.update("acme", 7, progress(1), 1_000, t, encode),
            Ok(Update::Pushed(0))
        );
        e.register(
            id,
            "acme/alice",
            Notification::Progress(7),
            Family::Current,
            t,
        )
        .unwrap();
        // Inside the window: held; the same state again: nothing to tell.
        assert_eq!(
            e.update("acme", 7, progress(2), 1_050, t, encode),
            Ok(Update::Held)
        );
        assert_eq!(
            e.update("acme", 7, progress(1), 1_060, t, encode),
            Ok(Update::Unchanged)
        );
        assert_eq!(
            e.update("acme", 7, progress(3), 1_100, t, encode),
            Ok(Update::Held)
        );
        // The window ends: the latest held state goes, once.
        assert_eq!(e.flush_due(1_150, t, encode), 0);
        assert_eq!(e.flush_due(1_200, t, encode), 1);
        assert_eq!(e.flush_due(1_400, t, encode), 0);
        // Stage and title changes, and reaching 100, go at once.
        let stage = ProgressUpdate {
            stage: Some(2),
            ..progress(4)
        };
        assert_eq!(
            e.update("acme", 7, stage, 1_210, t, encode),
            Ok(Update::Pushed(1))
        );
        let title = ProgressUpdate {
            title: Some("Storing".into()),
            ..Default::default()
        };
        assert_eq!(
            e.update("acme", 7, title, 1_220, t, encode),
            Ok(Update::Pushed(1))
        );
        assert_eq!(
            e.update("acme", 7, progress(100), 1_230, t, encode),
            Ok(Update::Pushed(1))
        );
        let finished = ProgressUpdate {
            state: Some(ActionState::Finished),
            ..Default::default()
        };
        assert_eq!(
            e.update("acme", 7, finished, 1_240, t, encode),
            Ok(Update::Pushed(1))
        );
        // After the window, progress alone goes at once.
        assert_eq!(
            e.update("acme", 7, progress(50), 1_500, t, encode),
            Ok(Update::Pushed(1))
        );
        assert_eq!(
            bodies(&mut rx),
            [
                "7:STARTED:0:3",
                "7:STARTED:2:4",
                "7:STARTED:2:4",
                "7:STARTED:2:100",
                "7:FINISHED:2:100",
                "7:FINISHED:2:50"
            ]
        );
        let state = e.progress("acme", 7).unwrap();
        assert_eq!(state.title, "Storing");
        assert_eq!(state.end, Some(1_240), "a finished action gets an end");
        assert_eq!(state.start, 1_000);
    }

    #[test]
    fn registrations_check_owner_topic_and_limits_and_end_with_the_endpoint() {
        let (e, topics, id, mut rx) = setup();
        let t = &topics;
        let err = e.register(
            id,
            "acme/alice",
            Notification::Progress(1),
            Family::Current,
            t,
        );
        assert_eq!(err, Err(EndpointError::NoTopic(1)));
        e.update("acme", 1, progress(5), 0, t, encode).unwrap();
        let mallory = e.register(
            id,
            "acme/mallory",
            Notification::Progress(1),
            Family::Current,
            t,
        );
        assert_eq!(mallory, Err(EndpointError::NoEndpoint(id)));
        let gone = e.register(
            99,
            "acme/alice",
            Notification::NewProject,
            Family::Current,
            t,
        );
        assert_eq!(
            gone.unwrap_err().to_string(),
            "Endpoint with id 99 not found"
        );
        for what in [Notification::Progress(1), Notification::NewRevision] {
            e.register(id, "acme/alice", what, Family::Bimsie1, t)
                .unwrap();
            // Twice is once.
            e.register(id, "acme/alice", what, Family::Bimsie1, t)
                .unwrap();
        }
        assert_eq!(t.subscribers("endpoint:acme:progress:1"), 1);
        // Switching the family keeps the one subscription.
        e.register(
            id,
            "acme/alice",
            Notification::NewRevision,
            Family::Current,
            t,
        )
        .unwrap();
        assert_eq!(t.subscribers("endpoint:acme:newRevision"), 1);
        assert_eq!(
            e.event("acme", Notification::NewRevision, b"r".to_vec(), t),
            1
        );
        let (key, _) = rx.try_recv().unwrap();
        assert_eq!(PushKey(key).family(), Family::Current);
        assert_eq!(PUSH_METHODS[PushKey(key).method()], "newRevision");
        e.register(
            id,
            "acme/alice",
            Notification::NewProject,
            Family::Current,
            t,
        )
        .unwrap();
        e.update("acme", 2, progress(5), 0, t, encode).unwrap();
        e.register(
            id,
            "acme/alice",
            Notification::Progress(2),
            Family::Current,
            t,
        )
        .unwrap();
        e.update("acme", 3, progress(5), 0, t, encode).unwrap();
        assert_eq!(
            e.register(
                id,
                "acme/alice",
                Notification::Progress(3),
                Family::Current,
                t
            ),
            Err(EndpointError::TooManyRegistrations(id, 4))
        );
        assert_eq!(
            e.update("acme", 4, progress(5), 0, t, encode),
            Err(EndpointError::TooManyTopics(3))
        );
        e.unregister(id, "acme/alice", Notification::Progress(2), t)
            .unwrap();
        e.unregister(id, "acme/alice", Notification::Progress(2), t)
            .unwrap();
        assert_eq!(t.subscribers("endpoint:acme:progress:2"), 0);
        // Topic 2 and 3 have nobody registered: they expire; topic 1 stays while registered.
        assert_eq!(e.expire(20_000, t), 2);
        assert!(e.progress("acme", 1).is_ok());
        e.close(id, t);
        assert_eq!(t.subscribers("endpoint:acme:progress:1"), 0);
        assert_eq!(t.subscribers("endpoint:acme:newProject"), 0);
        assert!(e.endpoints.is_empty());
        assert_eq!(e.expire(20_000, t), 1);
    }
}
