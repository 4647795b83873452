//! One developer stream in cluster mode: its owner task on this node.
//!
//! JetStream, not the node, assigns seqs, so the owner has two jobs that do not wait on each
//! other. **Publishing**: the node's SUBMITs for the stream go to JetStream in the order they
//! were queued, on the node's own subject, with up to `max_acks_pending` acks outstanding;
//! the acks come back on a subscription of the owner's own ([`Acks`]), in order, and the
//! front's is given `ack_timeout_ms`. When JetStream does not acknowledge one (a server
//! lost, a leader being elected; a dropped NATS connection loses every ack on its way),
//! the owner stops taking new readings, reads back which of the unacknowledged ones the
//! stream holds all the same (`log::jetstream`: a retry stores nothing twice), and sends
//! the rest again, one at a time and in order, for up to `publish_retry_ms`; then it gives
//! up: the stream refuses publishes for a while (producers get 1011) and what was not
//! acknowledged is never dispatched. **Live delivery**: while this node has subscribers, an
//! ordered consumer tails the stream; what it delivers is stored on a quorum of the
//! stream's replicas, so its seq is the durable mark, raised before the batch is offered
//! to the subscribers, exactly as in the embedded owner (`hub::stream`). A reading
//! published on any node reaches every node's consumers this way; a `Watchdog` restarts
//! a tail that went silent with its server.
//!
//! Must not know about connections or protocols: it shares [`Subscriber`] and [`Batch`] with
//! the embedded owner.

use async_nats::Subject;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Sleep};

use super::claims::Claims;
use super::stream::{
    now_ms, offer_durable, Command, Shared, Source, Subscriber, FAILED_BACKOFF_MS,
};
use crate::log::jetstream::{self, Ack, Acks, JetStream, JsStream, Tail};
use crate::log::LogError;

/// What the hub needs to run streams on JetStream.
pub struct Cluster {
    pub js: JetStream,
    /// The cluster-wide rules (tokens, duplicate connections, consumer counts).
    pub claims: Arc<Claims>,
    pub node_id: String,
    /// How long unacknowledged readings are retried before their producers get 1011.
    pub publish_retry: Duration,
    pub max_acks_pending: usize,
    /// Reading ids start at a random number per process: unique across nodes and restarts
    /// for as long as anyone looks (a retry window).
    boot: u64,
    sent: AtomicU64,
}

impl Cluster {
    pub fn new(
        js: JetStream,
        claims: Arc<Claims>,
        node_id: String,
        publish_retry: Duration,
        max_acks_pending: usize,
    ) -> Self {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        Self {
            js,
            claims,
            node_id,
            publish_retry,
            max_acks_pending,
            boot: u64::from_le_bytes(nonce),
            sent: AtomicU64::new(0),
        }
    }

    fn next_id(&self) -> u64 {
        self.boot
            .wrapping_add(self.sent.fetch_add(1, Ordering::Relaxed))
    }
}

/// How long a tail with no subscriber is kept, so a consumer that reconnects at once (a
/// duplicate connection taking over, a client's quick retry) finds it. Short, because an
/// idle tail still takes every reading of the stream from JetStream only to drop it: behind a
/// load balancer the consumer usually comes back on another node, and each node it left
/// would cost the engine and itself a second delivery of everything for as long as this.
const TAIL_LINGER: Duration = Duration::from_secs(2);
/// How often a stream with subscribers checks that its tail still delivers, while readings
/// flow (or JetStream is ahead of the mark)...
const WATCHDOG_EVERY: Duration = Duration::from_millis(750);
/// ...and at most how seldom while the stream is idle: each check is a JetStream API request,
/// and a node may hold many idle streams with subscribers.
const WATCHDOG_IDLE: Duration = Duration::from_secs(8);
/// First wait before sending an unacknowledged reading again; doubles up to a second.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// A reading sent to JetStream and not yet acknowledged.
struct Sent {
    id: u64,
    stored: Bytes,
    /// When its SUBMIT arrived.
    at: Instant,
    /// The slot of its publish on the way ([`Replies`]); None once answered, or while it
    /// waits to be sent again.
    slot: Option<u64>,
    /// When that publish went.
    sent_at: Instant,
    /// Its seq once acknowledged. Acks may overtake one another; readings leave (and
    /// `last_acked` rises) from the front only, so `last_acked` never passes a reading whose
    /// fate is unknown.
    seq: Option<u64>,
}

/// Where this owner's publishes are answered. A publish holds a slot, its reply
/// subject `<inbox>.<slot>`, and a slot is taken again only once the ack naming it came
/// back (JetStream answers a publish once): an ack can only answer the publish holding its
/// slot. Each slot's subject is made once, so a publish formats and allocates no reply
/// subject, and the servers see a handful of subjects instead of a new one per ack (which
/// did not measurably change JetStream's p99: BENCHMARKS.md, "Cluster: acks on reused reply
/// subjects"). The slots of publishes whose acks never come (lost with a connection) are let
/// go by moving to a fresh inbox after a failure.
struct Replies {
    acks: Acks,
    slots: Slots,
    /// Each slot's reply subject, made once.
    subjects: Vec<Subject>,
    /// A failure abandoned publishes on their way: their slots go with a fresh inbox.
    stale: bool,
}

impl Replies {
    fn new(acks: Acks) -> Self {
        Self {
            acks,
            slots: Slots::default(),
            subjects: Vec::new(),
            stale: false,
        }
    }

    fn take(&mut self) -> (u64, Subject) {
        let slot = self.slots.take();
        if slot == self.subjects.len() {
            self.subjects.push(self.acks.reply(slot as u64));
        }
        (slot as u64, self.subjects[slot].clone())
    }

    /// The ack naming `slot` came back: frees the slot and returns which reading's publish
    /// held it. None for an ack nobody waits for: a second one naming the slot, or one for a
    /// publish given up on (its reading is sent again).
    fn answer(&mut self, sent: &mut VecDeque<Sent>, slot: u64) -> Option<usize> {
        if !self.slots.answered(slot) {
            return None;
        }
        // Usually the front.
        let i = sent.iter().position(|s| s.slot == Some(slot))?;
        sent[i].slot = None;
        Some(i)
    }

    /// Moves to a fresh inbox (after a failure): acks still on their way to the old one are
    /// dropped with it, which the read-back makes up for. Tried once per failure: keeping
    /// the old inbox is still correct (an abandoned slot stays held), it only keeps those
    /// slots from being used again.
    async fn renew(&mut self, js: &JsStream) {
        self.stale = false;
        match js.acks().await {
            Ok(acks) => *self = Self::new(acks),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to a fresh ack inbox; keeping the old one")
            }
        }
    }
}

/// Which reply slots the publishes on their way hold.
#[derive(Default)]
struct Slots {
    held: Vec<bool>,
    free: Vec<usize>,
}

impl Slots {
    /// The slot freed last, or a new one: while acks keep up, the same few slots go round.
    fn take(&mut self) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.held[slot] = true;
                slot
            }
            None => {
                self.held.push(true);
                self.held.len() - 1
            }
        }
    }

    /// The ack naming `slot` came back: no other will, so it is free. False if nobody held it.
    fn answered(&mut self, slot: u64) -> bool {
        match usize::try_from(slot)
            .ok()
            .and_then(|i| self.held.get_mut(i))
        {
            Some(held) if *held => {
                *held = false;
                self.free.push(slot as usize);
                true
            }
            _ => false,
        }
    }
}

/// Sending unacknowledged readings again, one at a time.
struct Resend {
    deadline: Instant,
    backoff: Duration,
    /// When the front is sent again (None: it is on its way).
    at: Option<Instant>,
    /// The newest seq on this node's subject, once the stream was read back since the last
    /// failure (see `send_front`): what the next resend expects to follow.
    last: Option<u64>,
}

pub(super) struct ClusterOwner {
    pub rx: mpsc::Receiver<Command>,
    pub shared: Arc<Shared>,
    pub cluster: Arc<Cluster>,
    pub batch_max: usize,
    /// The newest seq JetStream acknowledged to this owner: readings it sent later and whose
    /// acks were lost can only be stored above it.
    pub last_acked: u64,
}

/// Whether a stream's tail still delivers: a tail whose consumer vanished with a server
/// may stay silent until its client notices missed heartbeats (ten seconds or more), so
/// JetStream ahead of the mark for two checks in a row with nothing delivered restarts it.
struct Watchdog {
    /// The mark at the last check, and whether JetStream was ahead of it then.
    mark: u64,
    behind: bool,
    every: Duration,
    next: Instant,
}

impl Watchdog {
    fn new() -> Self {
        Self {
            mark: 0,
            behind: false,
            every: WATCHDOG_EVERY,
            next: Instant::now() + WATCHDOG_EVERY,
        }
    }

    /// Something may have taken the tail's consumer (a dropped NATS connection): the first
    /// check that finds JetStream ahead of `mark` restarts the tail.
    fn suspect(&mut self, mark: u64) {
        self.mark = mark;
        self.behind = true;
        self.every = WATCHDOG_EVERY;
        self.next = Instant::now() + WATCHDOG_EVERY;
    }

    /// Records a check (`last`: JetStream's newest seq, None if it did not answer); true if
    /// the tail is to be restarted. Checks back off while nothing happens.
    fn checked(&mut self, mark: u64, last: Option<u64>) -> bool {
        let mut restart = false;
        if mark != self.mark {
            (self.mark, self.behind, self.every) = (mark, false, WATCHDOG_EVERY);
        } else if let Some(last) = last {
            let behind = last > mark;
            restart = behind && self.behind;
            self.behind = behind && !restart;
            self.every = if behind {
                WATCHDOG_EVERY
            } else {
                (self.every * 2).min(WATCHDOG_IDLE)
            };
        }
        self.next = Instant::now() + self.every;
        restart
    }
}

/// A deadline the owner's loop waits on, kept from one turn of the loop to the next: four
/// `Sleep`s built (and the enabled ones registered and dropped) per turn cost a runtime
/// lookup and a timer-wheel registration per message. Moving a kept one later is a store
/// (timer code in a node's profile as fast as possible: 4.7 % of samples before, 3.1 %).
struct Timer(Pin<Box<Sleep>>);

impl Timer {
    fn new() -> Self {
        Self(Box::pin(sleep_until(tokio::time::Instant::now())))
    }

    /// The timer, moved to `when` if that is set and new. Unset: its branch is disabled
    /// this turn, and the timer stays as it is.
    fn at(&mut self, when: Option<Instant>) -> &mut Pin<Box<Sleep>> {
        if let Some(when) = when.map(tokio::time::Instant::from_std) {
            if self.0.deadline() != when {
                self.0.as_mut().reset(when);
            }
        }
        &mut self.0
    }
}

/// What the owner's loop woke up for.
enum Wake {
    Acked(u64, Ack),
    AckLost,
    Disconnected,
    Resend,
    Live(Option<Result<Box<async_nats::jetstream::Message>, LogError>>),
    Linger,
    Watchdog,
    Commands(usize),
}

impl ClusterOwner {
    pub async fn run(mut self) {
        let mut waiting = Vec::new();
        let Some((js, acks)) = self.open(&mut waiting).await else {
            return;
        };
        let mut replies = Replies::new(acks);
        let ack_timeout = js.ack_timeout();
        let mut disconnects = js.disconnects();
        let mut subs: Vec<Subscriber> = Vec::new();
        let mut tail: Option<Tail> = None;
        if !waiting.is_empty() {
            tail = self.open_tail(&js, true).await;
            let head = self.shared.durable.load(Ordering::SeqCst);
            for (sub, answer) in waiting {
                if tail.is_some() && answer.send(head).is_ok() {
                    subs.push(sub);
                }
            }
        }
        let mut idle_since = Instant::now();
        let mut watchdog = Watchdog::new();
        let mut sent: VecDeque<Sent> = VecDeque::new();
        let mut resend: Option<Resend> = None;
        let mut cmds = Vec::with_capacity(self.batch_max);
        let (mut ack_timer, mut resend_timer) = (Timer::new(), Timer::new());
        let (mut linger_timer, mut watchdog_timer) = (Timer::new(), Timer::new());
        loop {
            if replies.stale {
                replies.renew(&js).await;
            }
            // Acks come in order; the front's tells whether one is lost.
            let ack_due = sent
                .front()
                .filter(|s| s.slot.is_some())
                .map(|s| s.sent_at + ack_timeout);
            let resend_at = resend.as_ref().and_then(|r| r.at);
            let linger = (tail.is_some() && subs.is_empty()).then(|| idle_since + TAIL_LINGER);
            let watch = (tail.is_some() && !subs.is_empty()).then_some(watchdog.next);
            let taking = resend.is_none() && sent.len() < self.cluster.max_acks_pending;
            let wake = tokio::select! {
                biased;
                (slot, ack) = replies.acks.next() => Wake::Acked(slot, ack),
                _ = ack_timer.at(ack_due), if ack_due.is_some() => Wake::AckLost,
                Ok(()) = disconnects.changed() => Wake::Disconnected,
                _ = resend_timer.at(resend_at), if resend_at.is_some() => Wake::Resend,
                m = next_live(&mut tail), if tail.is_some() => Wake::Live(m),
                _ = linger_timer.at(linger), if linger.is_some() => Wake::Linger,
                _ = watchdog_timer.at(watch), if watch.is_some() => Wake::Watchdog,
                n = self.rx.recv_many(&mut cmds, self.batch_max), if taking => Wake::Commands(n),
            };
            match wake {
                Wake::Acked(slot, ack) => {
                    self.acked(&js, &mut replies, slot, ack, &mut sent, &mut resend)
                        .await
                }
                Wake::AckLost => {
                    tracing::warn!(stream = %self.shared.id, "publish not acknowledged in time; sending it again");
                    self.failed(0, &mut replies, &mut sent, &mut resend);
                }
                Wake::Disconnected => {
                    // The acks on their way went with the connection: read back now rather
                    // than wait out `ack_timeout_ms`.
                    if let Some(i) = sent.iter().position(|s| s.slot.is_some()) {
                        tracing::warn!(stream = %self.shared.id, unacknowledged = sent.len(), "NATS connection lost with publishes unacknowledged; reading back");
                        self.failed(i, &mut replies, &mut sent, &mut resend);
                    }
                    // The tail's consumer may have been on the server that went.
                    watchdog.suspect(self.shared.durable.load(Ordering::SeqCst));
                }
                Wake::Resend => {
                    self.send_front(&js, &mut replies, &mut sent, &mut resend)
                        .await
                }
                Wake::Live(Some(Ok(first))) => self.deliver(*first, &mut tail, &mut subs),
                Wake::Live(end) => {
                    if let Some(Err(e)) = end {
                        tracing::warn!(stream = %self.shared.id, error = %e, "stream tail failed; reopening");
                    }
                    tail = None;
                    if !subs.is_empty() {
                        tail = self.open_tail(&js, false).await;
                        if tail.is_none() {
                            // Without a tail the subscribers would wait forever: end them,
                            // they reconnect and REPLAY.
                            subs.clear();
                        }
                    }
                }
                Wake::Linger => tail = None,
                Wake::Watchdog => {
                    let mark = self.shared.durable.load(Ordering::SeqCst);
                    let last = if mark == watchdog.mark {
                        // Not the owner's whole request timeout: a stream without a leader
                        // leaves the question unanswered, and the owner has acks to read.
                        match tokio::time::timeout(WATCHDOG_EVERY, js.bounds()).await {
                            Ok(Ok((_, last))) => Some(last),
                            _ => None,
                        }
                    } else {
                        None
                    };
                    if watchdog.checked(mark, last) {
                        tracing::warn!(stream = %self.shared.id, mark, last = ?last, "stream tail stalled; reopening");
                        tail = self.open_tail(&js, false).await;
                        if tail.is_none() {
                            subs.clear();
                        }
                    }
                }
                Wake::Commands(0) => break,
                Wake::Commands(_) => {
                    let now = Instant::now();
                    for cmd in cmds.drain(..) {
                        match cmd {
                            Command::Publish(p) => {
                                let (frame, at) = p.frame.parts();
                                let id = self.cluster.next_id();
                                let stored = jetstream::stored(id, frame, at);
                                crate::metrics::handles().js_acks_pending.increment(1.0);
                                // After a failure earlier in this batch the rest wait
                                // their turn to be sent again, in order.
                                let slot = match resend {
                                    Some(_) => None,
                                    None => {
                                        let (slot, reply) = replies.take();
                                        match js.publish(stored.clone(), reply, None).await {
                                            Ok(()) => Some(slot),
                                            Err(e) => {
                                                tracing::warn!(stream = %self.shared.id, error = %e, "publish not sent");
                                                None
                                            }
                                        }
                                    }
                                };
                                sent.push_back(Sent {
                                    id,
                                    stored,
                                    at: p.received,
                                    slot,
                                    sent_at: now,
                                    seq: None,
                                });
                                if slot.is_none() && resend.is_none() {
                                    self.start_resend(&mut replies, &mut sent, &mut resend);
                                }
                            }
                            Command::Subscribe { sub, head } => {
                                if tail.is_none() {
                                    tail = self.open_tail(&js, subs.is_empty()).await;
                                }
                                // Without a tail the subscriber's `head` is dropped: its
                                // connection closes (1011) and the client comes back.
                                if tail.is_some()
                                    && head
                                        .send(self.shared.durable.load(Ordering::SeqCst))
                                        .is_ok()
                                {
                                    subs.push(sub);
                                }
                            }
                            Command::Unsubscribe(id) => {
                                subs.retain(|s| s.id != id);
                                if subs.is_empty() {
                                    idle_since = Instant::now();
                                }
                            }
                        }
                    }
                }
            }
        }
        // Shutting down: wait (up to `ack_timeout_ms`) for what is on its way, so the
        // readings a producer sent before 1001 are not left in doubt.
        let until = tokio::time::Instant::now() + ack_timeout;
        while sent.iter().any(|s| s.slot.is_some()) {
            let Ok((slot, ack)) = tokio::time::timeout_at(until, replies.acks.next()).await else {
                break;
            };
            if let (Some(i), Ack::Stored(seq)) = (replies.answer(&mut sent, slot), ack) {
                sent[i].seq = Some(seq);
            }
            self.settle_front(&mut sent);
        }
        // What is left waits behind a publish that was not answered.
        let metrics = crate::metrics::handles();
        metrics.js_acks_pending.decrement(sent.len() as f64);
        let stored = sent.iter().filter(|s| s.seq.is_some()).count();
        metrics.readings_stored.increment(stored as u64);
        if stored < sent.len() {
            tracing::warn!(stream = %self.shared.id, unacked = sent.len() - stored, "publishes not acknowledged before shutdown");
        }
    }

    /// Lets the acknowledged readings at the front go, in order: `last_acked` rises past
    /// them and nothing behind an unanswered one.
    fn settle_front(&mut self, sent: &mut VecDeque<Sent>) {
        let metrics = crate::metrics::handles();
        while let Some(seq) = sent.front().and_then(|s| s.seq) {
            let s = sent.pop_front().expect("a front");
            self.last_acked = self.last_acked.max(seq);
            metrics.js_acks_pending.decrement(1.0);
            metrics.readings_stored.increment(1);
            metrics
                .js_publish_seconds
                .record(s.at.elapsed().as_secs_f64());
        }
    }

    /// Opens the stream and the subscription its acks come back on.
    async fn open_once(&self) -> Result<(JsStream, Acks), LogError> {
        let js = self.cluster.js.open(&self.shared.id).await?;
        let acks = js.acks().await?;
        Ok((js, acks))
    }

    /// Opens the stream's JetStream stream, retrying while JetStream is unreachable or not
    /// ready. Subscribers that arrive meanwhile wait in `waiting` for up to
    /// `publish_retry_ms` (then they are refused: 1011); publishes are refused (their
    /// producers get 1011). None: the hub closed first.
    async fn open(
        &mut self,
        waiting: &mut Vec<(Subscriber, oneshot::Sender<u64>)>,
    ) -> Option<(Arc<JsStream>, Acks)> {
        let started = Instant::now();
        let mut backoff = RETRY_FIRST;
        loop {
            match self.open_once().await {
                Ok((js, acks)) => {
                    let js = Arc::new(js);
                    // What this owner publishes can only be stored above the stream's end now.
                    if let Ok((_, last)) = js.bounds().await {
                        self.last_acked = last;
                    }
                    if let Source::Cluster { stream, .. } = &self.shared.source {
                        let _ = stream.set(js.clone());
                    }
                    return Some((js, acks));
                }
                Err(e) => {
                    tracing::warn!(stream = %self.shared.id, error = %e, "cannot open the JetStream stream; retrying");
                    crate::metrics::handles().store_errors.increment(1);
                    self.refuse_for_a_while();
                }
            }
            if started.elapsed() > self.cluster.publish_retry {
                // Dropping the answers ends those joins.
                waiting.clear();
            }
            let until = tokio::time::Instant::now() + backoff;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return None,
                        Some(Command::Subscribe { sub, head }) => waiting.push((sub, head)),
                        Some(Command::Unsubscribe(id)) => waiting.retain(|(s, _)| s.id != id),
                        Some(Command::Publish(_)) => {}
                    },
                }
            }
        }
    }

    fn refuse_for_a_while(&self) {
        self.shared
            .failed_until_ms
            .store(now_ms() + FAILED_BACKOFF_MS, Ordering::Relaxed);
    }

    /// Starts a tail right after the durable mark. For a stream without subscribers the mark
    /// first jumps to the stream's newest seq (nobody here is owed anything older: a new
    /// subscriber starts at the mark and REPLAYs the rest); with subscribers (a tail that
    /// failed) it stays, so they get every reading in between live. Retried while JetStream
    /// cannot answer (a leader being elected), for up to `publish_retry_ms`.
    async fn open_tail(&self, js: &JsStream, jump: bool) -> Option<Tail> {
        let started = Instant::now();
        let mut backoff = RETRY_FIRST;
        loop {
            let opened = async {
                let (first, last) = js.bounds().await?;
                if let Source::Cluster { first: f, .. } = &self.shared.source {
                    f.fetch_max(first, Ordering::Relaxed);
                }
                let mark = if jump {
                    self.shared
                        .durable
                        .fetch_max(last, Ordering::SeqCst)
                        .max(last)
                } else {
                    self.shared.durable.load(Ordering::SeqCst)
                };
                js.tail(mark + 1).await
            };
            match opened.await {
                Ok(tail) => return Some(tail),
                Err(e) if started.elapsed() < self.cluster.publish_retry => {
                    tracing::warn!(stream = %self.shared.id, error = %e, "cannot tail the JetStream stream; retrying");
                }
                Err(e) => {
                    tracing::error!(stream = %self.shared.id, error = %e, "cannot tail the JetStream stream");
                    crate::metrics::handles().store_errors.increment(1);
                    return None;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Takes `first` and every message already here behind it (up to a batch), raises the
    /// mark past them, and offers them to the subscribers as batches of consecutive seqs.
    fn deliver(
        &self,
        first: async_nats::jetstream::Message,
        tail: &mut Option<Tail>,
        subs: &mut Vec<Subscriber>,
    ) {
        let mut frames: Vec<Bytes> = Vec::new();
        let mut first_seq = 0;
        let mut oldest_ns: Option<i128> = None;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(m) = next.take() {
            taken += 1;
            match m.info() {
                Ok(info) => {
                    let seq = info.stream_sequence;
                    let mark = self.shared.durable.load(Ordering::SeqCst);
                    if seq > mark {
                        if !frames.is_empty() && seq != first_seq + frames.len() as u64 {
                            self.dispatch(first_seq, std::mem::take(&mut frames), oldest_ns, subs);
                        }
                        match jetstream::frame_at(&m.payload, seq) {
                            Ok(frame) => {
                                if frames.is_empty() {
                                    first_seq = seq;
                                    oldest_ns = Some(info.published.unix_timestamp_nanos());
                                }
                                frames.push(frame);
                            }
                            Err(e) => {
                                tracing::error!(stream = %self.shared.id, seq, error = %e, "a stored reading is unreadable; skipped");
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(stream = %self.shared.id, error = %e, "a message without JetStream metadata")
                }
            }
            if taken < self.batch_max {
                if let Some(Some(Ok(m))) = tail.as_mut().and_then(|t| t.next().now_or_never()) {
                    next = Some(m);
                }
            }
        }
        if !frames.is_empty() {
            self.dispatch(first_seq, frames, oldest_ns, subs);
        }
    }

    fn dispatch(
        &self,
        first: u64,
        frames: Vec<Bytes>,
        published_ns: Option<i128>,
        subs: &mut Vec<Subscriber>,
    ) {
        offer_durable(&self.shared, first, frames, subs);
        if let Some(ns) = published_ns {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            crate::metrics::handles()
                .dispatch_latency
                .record((now - ns).max(0) as f64 / 1e9);
        }
    }

    /// A publish answered.
    async fn acked(
        &mut self,
        js: &JsStream,
        replies: &mut Replies,
        slot: u64,
        ack: Ack,
        sent: &mut VecDeque<Sent>,
        resend: &mut Option<Resend>,
    ) {
        let Some(i) = replies.answer(sent, slot) else {
            return;
        };
        match ack {
            Ack::Stored(seq) => {
                sent[i].seq = Some(seq);
                self.settle_front(sent);
                if let Some(r) = resend {
                    if sent.is_empty() {
                        tracing::info!(stream = %self.shared.id, "JetStream takes writes again");
                        *resend = None;
                    } else {
                        r.last = Some(seq);
                        self.send_front(js, replies, sent, resend).await;
                    }
                }
            }
            Ack::WrongLastSequence => {
                // A publish from before the failure landed ahead of this resend, which was
                // refused: read the stream back again before the next.
                tracing::info!(stream = %self.shared.id, "a reading from before the failure was stored meanwhile; checking again");
                self.failed(i, replies, sent, resend);
            }
            Ack::Refused(reason) => {
                tracing::warn!(stream = %self.shared.id, %reason, "publish refused; sending it again");
                self.failed(i, replies, sent, resend);
            }
        }
    }

    /// The publish of `sent[i]` failed or its ack is lost: its reading may or may not be
    /// stored, so the owner stops pipelining and sends everything unacknowledged again
    /// (after reading the stream back), or retries later if it was doing so already.
    fn failed(
        &self,
        i: usize,
        replies: &mut Replies,
        sent: &mut VecDeque<Sent>,
        resend: &mut Option<Resend>,
    ) {
        sent[i].slot = None;
        if resend.is_none() {
            self.start_resend(replies, sent, resend);
        } else {
            self.retry_later(sent, resend);
        }
    }

    /// Stops pipelining: every reading still unacknowledged is sent again in order, one at a
    /// time, so none lands ahead of one queued before it.
    fn start_resend(
        &self,
        replies: &mut Replies,
        sent: &mut VecDeque<Sent>,
        resend: &mut Option<Resend>,
    ) {
        // Acks still coming are ignored: the read-back says what was stored.
        for s in sent.iter_mut() {
            s.slot = None;
            s.seq = None;
        }
        replies.stale = true;
        *resend = Some(Resend {
            deadline: Instant::now() + self.cluster.publish_retry,
            backoff: RETRY_FIRST,
            at: Some(Instant::now() + RETRY_FIRST),
            last: None,
        });
    }

    fn retry_later(&self, sent: &mut VecDeque<Sent>, resend: &mut Option<Resend>) {
        let Some(r) = resend else { return };
        if Instant::now() >= r.deadline {
            self.give_up(sent);
            *resend = None;
            return;
        }
        r.at = Some(Instant::now() + r.backoff);
        r.backoff = (r.backoff * 2).min(Duration::from_secs(1));
        r.last = None;
    }

    /// Sends the front reading again. After a failure, first asks the stream which of this
    /// node's readings it holds past the last acknowledged seq: those were stored (only
    /// their acks were lost) and are not sent again, so none is stored twice. The resend
    /// expects the newest seq on the node's subject to be the one the read-back (or the
    /// previous resend) saw.
    async fn send_front(
        &mut self,
        js: &JsStream,
        replies: &mut Replies,
        sent: &mut VecDeque<Sent>,
        resend: &mut Option<Resend>,
    ) {
        crate::metrics::handles().js_retries.increment(1);
        let Some(r) = resend.as_mut() else { return };
        let last = match r.last {
            Some(last) => last,
            None => match js.stored_since(self.last_acked, r.deadline).await {
                Ok((ids, last)) => {
                    let before = sent.len();
                    sent.retain(|s| !ids.contains(&s.id));
                    let stored = (before - sent.len()) as u64;
                    tracing::info!(stream = %self.shared.id, unacknowledged = before, stored, last, "read the stream back before sending again");
                    let metrics = crate::metrics::handles();
                    metrics.js_acks_pending.decrement(stored as f64);
                    metrics.readings_stored.increment(stored);
                    r.last = Some(last);
                    last
                }
                Err(e) => {
                    tracing::warn!(stream = %self.shared.id, error = %e, "cannot read the stream back before a retry");
                    self.retry_later(sent, resend);
                    return;
                }
            },
        };
        let Some(front) = sent.front_mut() else {
            tracing::info!(stream = %self.shared.id, "JetStream takes writes again");
            *resend = None;
            return;
        };
        let (slot, reply) = replies.take();
        match js.publish(front.stored.clone(), reply, Some(last)).await {
            Ok(()) => {
                front.slot = Some(slot);
                front.sent_at = Instant::now();
                r.at = None;
            }
            Err(e) => {
                tracing::warn!(stream = %self.shared.id, error = %e, "publish not sent");
                self.retry_later(sent, resend);
            }
        }
    }

    /// JetStream did not take the readings within `publish_retry_ms`: they are dropped
    /// (never dispatched, since JetStream never stored them), publishes are refused for a
    /// while so producers get 1011, and what queued meanwhile goes too.
    fn give_up(&self, sent: &mut VecDeque<Sent>) {
        let metrics = crate::metrics::handles();
        metrics.store_errors.increment(1);
        metrics.js_acks_pending.decrement(sent.len() as f64);
        tracing::error!(
            stream = %self.shared.id,
            readings = sent.len(),
            "JetStream did not acknowledge readings in time; refusing publishes for a while"
        );
        sent.clear();
        self.refuse_for_a_while();
    }
}

async fn next_live(
    tail: &mut Option<Tail>,
) -> Option<Result<Box<async_nats::jetstream::Message>, LogError>> {
    match tail {
        Some(t) => t.next().await.map(|m| {
            m.map(Box::new)
                .map_err(|e| LogError::JetStream(Box::new(e)))
        }),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_restarts_a_silent_tail_and_backs_off_while_idle() {
        let mut w = Watchdog::new();
        // Readings flow: checked at the base rate, nothing restarted.
        assert!(!w.checked(10, None));
        assert!(!w.checked(20, None));
        assert_eq!(w.every, WATCHDOG_EVERY);
        // Idle and JetStream agrees: checks back off, up to WATCHDOG_IDLE.
        let mut every = Vec::new();
        for _ in 0..6 {
            assert!(!w.checked(20, Some(20)));
            every.push(w.every.as_millis());
        }
        assert_eq!(every, [1500, 3000, 6000, 8000, 8000, 8000]);
        // JetStream ahead with nothing delivered: once may be a reading on its way, twice
        // is a silent tail.
        assert!(!w.checked(20, Some(25)));
        assert_eq!(w.every, WATCHDOG_EVERY);
        assert!(w.checked(20, Some(26)));
        // Restarted: the next check starts over.
        assert!(!w.checked(20, Some(26)));
        // An unanswered check changes nothing.
        assert!(!w.checked(20, None));
        assert!(w.checked(20, Some(27)));
        // A dropped connection: the first check that finds JetStream ahead restarts it.
        w.suspect(30);
        assert_eq!(w.every, WATCHDOG_EVERY);
        assert!(w.checked(30, Some(31)));
        // Delivery resumed meanwhile: nothing to restart.
        w.suspect(40);
        assert!(!w.checked(45, Some(50)));
    }

    #[test]
    fn a_reply_slot_is_taken_again_only_after_its_ack() {
        let mut s = Slots::default();
        assert_eq!([s.take(), s.take(), s.take()], [0, 1, 2]);
        assert!(s.answered(1));
        // A second ack naming slot 1, or one naming a slot never taken, frees nothing.
        assert!(!s.answered(1));
        assert!(!s.answered(7));
        assert_eq!([s.take(), s.take()], [1, 3]);
        // While acks keep up the subjects stay few: 10,000 publishes, at most two on
        // their way at once, use two slots besides the four still held.
        let mut on_the_way = std::collections::VecDeque::new();
        for _ in 0..10_000 {
            on_the_way.push_back(s.take());
            if on_the_way.len() == 2 {
                assert!(s.answered(on_the_way.pop_front().unwrap() as u64));
            }
        }
        assert_eq!(s.held.len(), 6);
    }
}
