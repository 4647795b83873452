//! Named topics (`/topic/workout/record`, `/v1/topic/conversation/42`): live pub/sub for
//! the STOMP and endpoint front-ends, with no log behind them.
//!
//! Owns the topic table and each topic's subscriber list. A publish takes the topic's lock
//! for the few pushes of one fan-out, so every subscriber sees a topic's messages in one
//! order; the lock is never held across an await. Each subscription's connection has one
//! bounded inbox ([`Outbox`], shared by all its subscriptions).
//!
//! A topic keeps no log, so a full inbox cannot be caught up later. Clients' publishes
//! (STOMP SEND, `POST /api/publish`) are flow-controlled instead: one mechanism for both,
//! [`Topics::publish_or_hold`] then [`Topics::poll_held`]. A message goes to every
//! subscriber or to none ([`Topics::try_publish`]); one that finds an inbox full is held
//! until that inbox makes room, at most `stomp_publish_wait_ms`, and then
//! [`Topics::publish_now`] cuts whoever is still full (kicked as too slow). The server's own
//! events (chat services, endpoint pushes) cannot wait and use [`Topics::publish`], which
//! cuts a full subscriber at once.
//! Must not know about frames: a message is a body and its headers, encoded by the
//! front-end of each subscriber.

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::mpsc;
use tokio::time::{sleep, Sleep};

use super::types::{Kick, Outbox};

/// The content type of JSON bodies, as seed 000's MESSAGE frames show it.
pub const JSON_UTF8: &str = "application/json;charset=UTF-8";

/// One published message, shared by every subscriber.
#[derive(Debug)]
pub struct TopicMessage {
    pub destination: Arc<str>,
    /// Unique for the server's life.
    pub id: u64,
    /// Borrowed when it is [`JSON_UTF8`] (the publish API, the services), so those
    /// messages allocate no header.
    pub content_type: Option<Cow<'static, str>>,
    /// Further headers to pass through (a SEND's own headers, say).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The body is UTF-8, so front-ends may send it in a text frame; worked out once per
    /// message, not once per subscriber.
    pub text: bool,
}

/// A client's publish that found an inbox full: it waits for room until `deadline`.
pub struct Held {
    message: Arc<TopicMessage>,
    deadline: Pin<Box<Sleep>>,
    /// The full inbox's next release of room, once armed.
    room: Option<Pin<Box<OwnedNotified>>>,
}

/// What a connection's inbox receives: which of its subscriptions, and the message.
pub type Delivery = (u64, Arc<TopicMessage>);

/// A connection's side of its topic subscriptions: one inbox for all of them.
#[derive(Clone)]
pub struct Inbox {
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<Delivery>,
    pub outbox: Arc<Outbox>,
    pub kick: Arc<Kick>,
}

struct Sub {
    /// The connection's own key for this subscription.
    key: u64,
    inbox: Inbox,
}

#[derive(Default)]
struct Topic {
    subs: Mutex<Vec<Sub>>,
}

#[derive(Default)]
pub struct Topics {
    topics: DashMap<Arc<str>, Arc<Topic>>,
    next_id: AtomicU64,
}

impl Topics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a subscription; its deliveries arrive on `inbox` tagged with `key`.
    pub fn subscribe(&self, destination: &str, key: u64, inbox: &Inbox) {
        self.subscribe_with(destination, key, inbox, None);
    }

    /// [`Topics::subscribe`], delivering `first` to this subscription alone before anything
    /// published after it (a service's current value, say).
    pub fn subscribe_with(
        &self,
        destination: &str,
        key: u64,
        inbox: &Inbox,
        first: Option<TopicMessage>,
    ) {
        let topic = self
            .topics
            .entry(Arc::from(destination))
            .or_default()
            .clone();
        let mut subs = topic.subs.lock();
        if let Some(first) = first {
            let bytes = first.body.len();
            let item = (key, Arc::new(first));
            if !inbox
                .outbox
                .offer(&inbox.kick, &inbox.tx, item, 1, bytes, inbox.conn)
            {
                return;
            }
        }
        subs.push(Sub {
            key,
            inbox: inbox.clone(),
        });
    }

    /// Changes the key of a connection's subscription in place, so no message falls between
    /// an unsubscribe and a subscribe.
    pub fn rekey(&self, destination: &str, conn: u64, from: u64, to: u64) {
        if let Some(topic) = self.topics.get(destination) {
            for s in topic.subs.lock().iter_mut() {
                if s.inbox.conn == conn && s.key == from {
                    s.key = to;
                }
            }
        }
    }

    /// Removes one subscription of a connection.
    pub fn unsubscribe(&self, destination: &str, conn: u64, key: u64) {
        self.remove(destination, |s| s.inbox.conn == conn && s.key == key);
    }

    /// Removes every subscription a connection holds on `destination`.
    pub fn leave(&self, destination: &str, conn: u64) {
        self.remove(destination, |s| s.inbox.conn == conn);
    }

    fn remove(&self, destination: &str, gone: impl Fn(&Sub) -> bool) {
        // Under the table's entry lock, so a topic emptied here is not concurrently joined.
        if let dashmap::Entry::Occupied(entry) = self.topics.entry(Arc::from(destination)) {
            let mut subs = entry.get().subs.lock();
            subs.retain(|s| !gone(s));
            if subs.is_empty() {
                drop(subs);
                entry.remove();
            }
        }
    }

    /// A fresh message id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Delivers to every subscriber of the message's destination, cutting any whose inbox is
    /// full; returns how many got it.
    pub fn publish(&self, message: TopicMessage) -> usize {
        self.publish_now(&Arc::new(message))
    }

    /// [`Topics::publish`] of a shared message: what a flow-controlled publish does once its
    /// wait is over.
    pub fn publish_now(&self, message: &Arc<TopicMessage>) -> usize {
        let Some(topic) = self.topic(&message.destination) else {
            return 0;
        };
        let bytes = message.body.len();
        let mut subs = topic.subs.lock();
        subs.retain(|s| {
            let inbox = &s.inbox;
            let item = (s.key, message.clone());
            inbox
                .outbox
                .offer(&inbox.kick, &inbox.tx, item, 1, bytes, inbox.conn)
        });
        subs.len()
    }

    /// Delivers to every subscriber, or, if any one's inbox is full, to none: then the
    /// publisher waits for that inbox's room ([`Outbox::room_released`]) and tries again.
    /// All or nothing keeps the topic's one order for everyone.
    pub fn try_publish(&self, message: &Arc<TopicMessage>) -> Result<usize, Arc<Outbox>> {
        let Some(topic) = self.topic(&message.destination) else {
            return Ok(0);
        };
        let bytes = message.body.len();
        let mut subs = topic.subs.lock();
        // A subscriber already cut will never make room.
        subs.retain(|s| !s.inbox.kick.is_kicked());
        for (i, s) in subs.iter().enumerate() {
            if !s.inbox.outbox.try_claim(1, bytes) {
                for claimed in &subs[..i] {
                    claimed.inbox.outbox.unclaim(1, bytes);
                }
                return Err(s.inbox.outbox.clone());
            }
        }
        subs.retain(|s| {
            let inbox = &s.inbox;
            let sent = inbox.tx.send((s.key, message.clone())).is_ok();
            if !sent {
                inbox.outbox.release(1, bytes);
            }
            sent
        });
        Ok(subs.len())
    }

    /// A client's publish with flow control: delivered now if every inbox has room, or
    /// handed back [`Held`] for [`Topics::poll_held`] to finish.
    pub fn publish_or_hold(
        &self,
        message: Arc<TopicMessage>,
        wait: Duration,
    ) -> Result<usize, Held> {
        match self.try_publish(&message) {
            Ok(n) => Ok(n),
            Err(_) => {
                crate::metrics::handles().topic_publish_waits.increment(1);
                Err(Held {
                    message,
                    deadline: Box::pin(sleep(wait)),
                    room: None,
                })
            }
        }
    }

    /// Ready with how many subscribers got the held message: once every inbox has room, or
    /// at its deadline, when whoever is still full is cut.
    pub fn poll_held(&self, held: &mut Held, cx: &mut Context<'_>) -> Poll<usize> {
        loop {
            let full = match self.try_publish(&held.message) {
                Ok(n) => return Poll::Ready(n),
                Err(full) => full,
            };
            if held.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(self.publish_now(&held.message));
            }
            match &mut held.room {
                Some(room) => {
                    ready!(room.as_mut().poll(cx));
                    held.room = None;
                }
                // Armed, then tried once more before it is awaited: no release is missed.
                None => held.room = Some(Box::pin(full.room_released())),
            }
        }
    }

    /// [`Topics::publish_or_hold`] from a task that may wait (the HTTP publish API).
    pub async fn publish_within(&self, message: TopicMessage, wait: Duration) -> usize {
        match self.publish_or_hold(Arc::new(message), wait) {
            Ok(n) => n,
            Err(mut held) => std::future::poll_fn(|cx| self.poll_held(&mut held, cx)).await,
        }
    }

    fn topic(&self, destination: &str) -> Option<Arc<Topic>> {
        self.topics.get(destination).map(|t| t.value().clone())
    }

    /// Subscribers of `destination` right now.
    pub fn subscribers(&self, destination: &str) -> usize {
        self.topic(destination).map_or(0, |t| t.subs.lock().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::KickReason;

    fn inbox(conn: u64, max: usize) -> (Inbox, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Inbox {
                conn,
                tx,
                outbox: Outbox::new(max, 1 << 20),
                kick: Kick::new(),
            },
            rx,
        )
    }

    fn message(topics: &Topics, destination: &str, body: &'static str) -> TopicMessage {
        TopicMessage {
            destination: Arc::from(destination),
            id: topics.next_id(),
            content_type: None,
            headers: vec![],
            body: Bytes::from_static(body.as_bytes()),
            text: true,
        }
    }

    #[test]
    fn publish_reaches_each_subscription_in_order_and_only_its_topic() {
        let t = Topics::new();
        let (a, mut a_rx) = inbox(1, 100);
        let (b, mut b_rx) = inbox(2, 100);
        t.subscribe("/topic/x", 7, &a);
        t.subscribe("/topic/x", 8, &a);
        t.subscribe("/topic/x", 1, &b);
        t.subscribe("/topic/y", 2, &b);
        assert_eq!(t.publish(message(&t, "/topic/x", "1")), 3);
        assert_eq!(t.publish(message(&t, "/topic/x", "2")), 3);
        assert_eq!(t.publish(message(&t, "/topic/nobody", "3")), 0);
        let keys: Vec<_> = std::iter::from_fn(|| a_rx.try_recv().ok())
            .map(|(k, m)| (k, m.body.clone()))
            .collect();
        assert_eq!(
            keys,
            vec![
                (7, Bytes::from("1")),
                (8, Bytes::from("1")),
                (7, Bytes::from("2")),
                (8, Bytes::from("2"))
            ]
        );
        assert_eq!(b_rx.try_recv().unwrap().1.body, Bytes::from("1"));
        t.unsubscribe("/topic/x", 1, 7);
        assert_eq!(t.subscribers("/topic/x"), 2);
        t.leave("/topic/x", 1);
        t.leave("/topic/x", 2);
        // An emptied topic is gone from the table.
        assert_eq!(t.topics.len(), 1);
    }

    #[test]
    fn a_flow_controlled_publish_reaches_everyone_or_nobody() {
        let t = Topics::new();
        let (slow, mut slow_rx) = inbox(1, 2);
        let (fast, mut fast_rx) = inbox(2, 100);
        t.subscribe("/topic/x", 1, &slow);
        t.subscribe("/topic/x", 1, &fast);
        let m = |body| Arc::new(message(&t, "/topic/x", body));
        assert_eq!(t.try_publish(&m("1")).ok(), Some(2));
        assert_eq!(t.try_publish(&m("2")).ok(), Some(2));
        // The slow inbox is full: nobody gets "3", nobody is cut, and its room is named.
        let third = m("3");
        let full = t.try_publish(&third).unwrap_err();
        assert!(Arc::ptr_eq(&full, &slow.outbox));
        assert!(!slow.kick.is_kicked());
        assert_eq!(std::iter::from_fn(|| fast_rx.try_recv().ok()).count(), 2);
        // Its connection takes one message: the waiting publisher is woken and gets through.
        let room = full.room_released();
        slow_rx.try_recv().unwrap();
        slow.outbox.release(1, 1);
        futures_ready(room);
        assert_eq!(t.try_publish(&third).ok(), Some(2));
        assert_eq!(fast_rx.try_recv().unwrap().1.body, Bytes::from("3"));
        // Past the wait, whoever is still full is cut and the rest carry on.
        assert!(t.try_publish(&m("4")).is_err());
        assert_eq!(t.publish_now(&m("4")), 1);
        assert_eq!(slow.kick.reason(), Some(KickReason::TooSlow));
    }

    /// Polls a future once with a no-op waker and asserts it is ready.
    fn futures_ready(f: impl std::future::Future<Output = ()>) {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_full_inbox_kicks_only_that_subscriber() {
        let t = Topics::new();
        let (slow, _slow_rx) = inbox(1, 2);
        let (fast, mut fast_rx) = inbox(2, 100);
        t.subscribe("/topic/x", 1, &slow);
        t.subscribe("/topic/x", 1, &fast);
        for _ in 0..5 {
            t.publish(message(&t, "/topic/x", "m"));
        }
        assert_eq!(slow.kick.reason(), Some(KickReason::TooSlow));
        assert!(!fast.kick.is_kicked());
        assert_eq!(std::iter::from_fn(|| fast_rx.try_recv().ok()).count(), 5);
        assert_eq!(t.subscribers("/topic/x"), 1);
    }
}
