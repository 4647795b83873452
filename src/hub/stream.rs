//! One developer stream: its owner task, the only place its seqs are assigned, and the
//! stream's durable mark.
//!
//! The owner takes commands from a bounded queue, in order: publishes become a group commit
//! (seq assignment, one log append, a commit in strict durability) and then one shared
//! [`Batch`] offered to every subscriber. In strict durability up to [`MAX_IN_FLIGHT`]
//! commits are on their way at once, settled in order: the owner assigns and appends the
//! next batch while the commit thread syncs the previous one. Subscribers live in the owner's own `Vec`: no lock
//! is taken on the way from a SUBMIT to the outboxes.
//!
//! **The durable mark** is the highest seq that is as durable as the mode promises: in
//! `strict`, synced by the group commit that holds it; in `fast`, appended (its seq reserved
//! durably beforehand). The owner raises it, and only then offers the batch to live
//! subscribers; every read of the log through [`StreamHandle::read`] stops at it. So no
//! reader — live delivery, REPLAY, a consumer catching up, a STOMP `replay-after` — ever
//! sees a reading a crash could take back or give to another seq.
//!
//! A subscriber whose outbox is full is not closed: it is marked lagging and skipped
//! ([`Subscriber::offer`]); its connection catches up from the log and rejoins. A slow
//! consumer never slows the owner down.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::types::{seq_len, Batch, Kick, Outbox, Publish};
use super::HubError;
use crate::config::Durability;
use crate::log::jetstream::JsStream;
use crate::log::{Entry, LogError, ReadLimit, Store, StreamLog};

/// Seqs reserved at a time in fast durability; one extra flush per block.
const SEQ_BLOCK: u64 = 1 << 16;
/// How long publishes are refused after a store failure before the owner tries again.
pub(super) const FAILED_BACKOFF_MS: u64 = 1000;

/// A consumer connection as the owner sees it.
pub struct Subscriber {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Arc<Batch>>,
    pub outbox: Arc<Outbox>,
    pub kick: Arc<Kick>,
}

impl Subscriber {
    /// Queues a batch if the outbox has room; if not, marks the subscriber lagging (its
    /// connection catches up from the log) and skips it until the connection clears the
    /// mark. Nothing is dropped: every skipped batch is in the log below the durable mark.
    /// False only when the subscriber is gone (kicked or disconnected).
    pub(super) fn offer(&self, batch: &Arc<Batch>) -> bool {
        if self.kick.is_kicked() {
            return false;
        }
        if self.outbox.is_lagging() {
            return true;
        }
        let (frames, bytes) = (batch.frames.len(), batch.bytes);
        if !self.outbox.try_claim(frames, bytes) {
            self.outbox.set_lagging(true);
            crate::metrics::handles().consumer_lags.increment(1);
            tracing::debug!(
                conn = self.id,
                "consumer behind; it catches up from the log"
            );
            self.kick.nudge();
            return true;
        }
        self.outbox
            .send_claimed(&self.tx, batch.clone(), frames, bytes)
    }
}

/// Why [`StreamHandle::try_publish`] did not queue a reading.
#[derive(Debug)]
pub enum TryPublishError {
    /// The owner's queue is full; here is the reading back.
    Full(Publish),
    Hub(HubError),
}

pub(super) enum Command {
    Publish(Publish),
    Subscribe {
        sub: Subscriber,
        /// Answered with the last seq dispatched before this subscriber joined.
        head: oneshot::Sender<u64>,
    },
    Unsubscribe(u64),
}

pub(super) struct Shared {
    pub id: Arc<str>,
    pub source: Source,
    /// The durable mark (see the module doc): raised by the owner before it dispatches.
    pub durable: AtomicU64,
    /// Unix ms until which publishes are refused after a store failure.
    pub failed_until_ms: AtomicU64,
}

/// Where a stream's readings are read back from.
pub(super) enum Source {
    /// The embedded store.
    Local(Arc<dyn StreamLog>),
    /// The stream's JetStream stream, once its owner has opened it (before that nobody has
    /// subscribed, so nobody reads), and the lowest seq it was last seen to keep.
    Cluster {
        stream: OnceLock<Arc<JsStream>>,
        first: AtomicU64,
    },
}

/// A cheap handle on a stream: publish, subscribe, read its log.
#[derive(Clone)]
pub struct StreamHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) shared: Arc<Shared>,
}

impl StreamHandle {
    pub fn id(&self) -> &Arc<str> {
        &self.shared.id
    }

    /// Queues a reading for its seq. Waits only for room in the owner's queue, so a flood
    /// pushes back through the producer's TCP window.
    pub async fn publish(&self, publish: Publish) -> Result<(), HubError> {
        let until = self.shared.failed_until_ms.load(Ordering::Relaxed);
        if until != 0 && now_ms() < until {
            return Err(HubError::StoreFailed);
        }
        self.tx
            .send(Command::Publish(publish))
            .await
            .map_err(|_| HubError::Closed)
    }

    /// Queues a reading if the owner's queue has room, without waiting: a connection reads
    /// and publishes in one synchronous pass. On `Full` the reading comes back, for
    /// [`StreamHandle::publish`] to wait with.
    pub fn try_publish(&self, publish: Publish) -> Result<(), TryPublishError> {
        let until = self.shared.failed_until_ms.load(Ordering::Relaxed);
        if until != 0 && now_ms() < until {
            return Err(TryPublishError::Hub(HubError::StoreFailed));
        }
        self.tx
            .try_send(Command::Publish(publish))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(Command::Publish(p)) => TryPublishError::Full(p),
                _ => TryPublishError::Hub(HubError::Closed),
            })
    }

    /// Adds a subscriber; returns the last seq it will not receive live.
    pub async fn subscribe(&self, sub: Subscriber) -> Result<u64, HubError> {
        let (head, answer) = oneshot::channel();
        self.tx
            .send(Command::Subscribe { sub, head })
            .await
            .map_err(|_| HubError::Closed)?;
        answer.await.map_err(|_| HubError::Closed)
    }

    pub async fn unsubscribe(&self, id: u64) {
        let _ = self.tx.send(Command::Unsubscribe(id)).await;
    }

    /// Reads stored readings with `after < seq < before`, up to `limit`, never past the
    /// durable mark, into `out` (cleared first) and hands it back: the one way anything
    /// reads the stream. Runs off the async workers: the embedded store on the blocking
    /// pool (a read that misses the page cache must not stall every connection on a
    /// worker), JetStream as a task of its own.
    pub fn read(
        &self,
        after: u64,
        before: u64,
        limit: ReadLimit,
        mut out: Vec<Entry>,
    ) -> JoinHandle<(Vec<Entry>, Result<(), HubError>)> {
        out.clear();
        // SeqCst pairs with the owner's store of the mark before it reads a subscriber's
        // lagging flag: a consumer that clears its flag and then reads here sees every
        // batch the owner skipped while the flag was set.
        let mark = self.shared.durable.load(Ordering::SeqCst);
        let before = before.min(mark.saturating_add(1));
        let shared = self.shared.clone();
        match &self.shared.source {
            Source::Local(log) => {
                let log = log.clone();
                tokio::task::spawn_blocking(move || {
                    let result = log.read(after, before, limit, &mut out);
                    (out, result.map_err(HubError::Store))
                })
            }
            Source::Cluster { .. } => tokio::spawn(async move {
                let Source::Cluster { stream, first } = &shared.source else {
                    unreachable!("matched above")
                };
                let Some(stream) = stream.get() else {
                    return (out, Ok(()));
                };
                let result = stream.read(after, before, limit, &mut out).await;
                if let Some(e) = out.first().filter(|e| e.seq > after + 1) {
                    // JetStream's retention removed what lay between.
                    first.fetch_max(e.seq, Ordering::Relaxed);
                }
                (out, result.map_err(HubError::Store))
            }),
        }
    }

    /// The durable mark: the newest seq any reader may see.
    pub fn durable_mark(&self) -> u64 {
        self.shared.durable.load(Ordering::SeqCst)
    }

    /// The lowest seq still kept: retention removed everything below it.
    pub fn first_seq(&self) -> u64 {
        match &self.shared.source {
            Source::Local(log) => log.first_seq(),
            Source::Cluster { first, .. } => first.load(Ordering::Relaxed),
        }
    }
}

pub(super) struct Owner {
    pub rx: mpsc::Receiver<Command>,
    pub shared: Arc<Shared>,
    pub log: Arc<dyn StreamLog>,
    pub store: Arc<dyn Store>,
    pub durability: Durability,
    pub batch_max: usize,
    pub next: u64,
}

/// A strict group commit on its way to the disk: dispatched once its commit answers.
struct InFlight {
    first: u64,
    frames: Vec<Bytes>,
    oldest: Option<Instant>,
    done: oneshot::Receiver<Result<(), LogError>>,
}

/// Strict group commits an owner keeps in flight: it assigns and appends the next while the
/// commit thread syncs the previous, so the disk never waits for the owner's round trip.
const MAX_IN_FLIGHT: usize = 4;

/// What the owner's loop woke up for.
enum Wake {
    /// The oldest commit in flight answered.
    Settled(Result<(), LogError>),
    /// This many commands arrived (0: every handle is gone).
    Commands(usize),
}

impl Owner {
    pub async fn run(mut self) {
        let mut subs: Vec<Subscriber> = Vec::new();
        let mut cmds = Vec::with_capacity(self.batch_max);
        let mut reserved = Reservation::new(self.next - 1);
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        loop {
            let wake = tokio::select! {
                biased;
                done = settled(&mut in_flight), if !in_flight.is_empty() => Wake::Settled(done),
                n = self.rx.recv_many(&mut cmds, self.batch_max), if in_flight.len() < MAX_IN_FLIGHT => {
                    Wake::Commands(n)
                }
            };
            match wake {
                Wake::Settled(done) => {
                    let flight = in_flight.pop_front().expect("a commit was in flight");
                    self.settle(flight, done, &mut subs);
                    continue;
                }
                Wake::Commands(0) => break,
                Wake::Commands(_) => {}
            }
            if cmds.len() < self.batch_max {
                // Let the readers that are already runnable publish too, so a busy stream
                // commits (and its consumers write) once per scheduler round, not once per
                // reading. An idle stream pays one trip through the run queue.
                yield_once().await;
                while cmds.len() < self.batch_max {
                    match self.rx.try_recv() {
                        Ok(cmd) => cmds.push(cmd),
                        Err(_) => break,
                    }
                }
            }
            // The batch's frames go into one buffer: a reading costs a copy, not an
            // allocation of its own (nor a free on whichever thread lets go of it last).
            // No seq in the batch is longer than its last possible one.
            let digits = seq_len(self.next + cmds.len() as u64);
            let room = cmds
                .iter()
                .map(|cmd| match cmd {
                    Command::Publish(p) => p.frame.len() + digits,
                    _ => 0,
                })
                .sum();
            let mut arena = BytesMut::with_capacity(room);
            let mut frames: Vec<Bytes> = Vec::with_capacity(cmds.len());
            let mut oldest: Option<Instant> = None;
            for cmd in cmds.drain(..) {
                match cmd {
                    Command::Publish(p) => {
                        oldest.get_or_insert(p.received);
                        let seq = self.next + frames.len() as u64;
                        frames.push(p.frame.fill_into(seq, &mut arena));
                    }
                    Command::Subscribe { sub, head } => {
                        // From the mark: batches still in flight reach it when they land.
                        if head
                            .send(self.shared.durable.load(Ordering::SeqCst))
                            .is_ok()
                        {
                            subs.push(sub);
                        }
                    }
                    Command::Unsubscribe(id) => subs.retain(|s| s.id != id),
                }
            }
            if frames.is_empty() {
                continue;
            }
            let first = self.next;
            let last = first + frames.len() as u64 - 1;
            // Whatever happens, these seqs are not handed out again.
            self.next = last + 1;
            match self.append(first, last, &frames, &mut reserved).await {
                Ok(None) => self.dispatch(first, frames, oldest, &mut subs),
                Ok(Some(done)) => in_flight.push_back(InFlight {
                    first,
                    frames,
                    oldest,
                    done,
                }),
                Err(e) => self.failed(first, last, &e),
            }
        }
        while let Some(mut flight) = in_flight.pop_front() {
            let done = (&mut flight.done).await.unwrap_or(Err(LogError::Closed));
            self.settle(flight, done, &mut subs);
        }
        // Clean stop: the high-water mark drops back to the tail so the next start carries
        // on contiguously. The store's final flush makes it durable.
        if let Err(e) = self.log.reserve(self.next - 1) {
            tracing::warn!(stream = %self.shared.id, error = %e, "could not record the stream tail");
        }
    }

    /// Appends one group commit. Fast mode: dispatchable at once (`None`). Strict mode: the
    /// commit it waits for (`Some`).
    async fn append(
        &self,
        first: u64,
        last: u64,
        frames: &[Bytes],
        reserved: &mut Reservation,
    ) -> Result<Option<oneshot::Receiver<Result<(), LogError>>>, LogError> {
        if self.durability == Durability::Fast {
            // Fast mode dispatches before the flush: while the disk refuses writes it takes
            // nothing in, so producers get 1011 instead of memory growing.
            if !self.store.writable() {
                return Err(LogError::NotWritable);
            }
            reserved.ensure(last, &*self.log, &*self.store).await?;
        }
        self.log.append(first, now_ms(), frames)?;
        Ok((self.durability == Durability::Strict).then(|| self.store.commit()))
    }

    /// A strict commit answered: dispatch its batch, or drop it if it did not reach the disk.
    fn settle(&mut self, flight: InFlight, done: Result<(), LogError>, subs: &mut Vec<Subscriber>) {
        let last = flight.first + flight.frames.len() as u64 - 1;
        // The commit that answered may have come after one that failed with these readings
        // in it (and dropped them).
        let done = done.and_then(|()| {
            if self.log.written() < last {
                Err(LogError::NotWritable)
            } else {
                Ok(())
            }
        });
        match done {
            Ok(()) => self.dispatch(flight.first, flight.frames, flight.oldest, subs),
            Err(e) => self.failed(flight.first, last, &e),
        }
    }

    /// Raises the mark past a durable batch, then offers it to the subscribers.
    fn dispatch(
        &self,
        first: u64,
        frames: Vec<Bytes>,
        oldest: Option<Instant>,
        subs: &mut Vec<Subscriber>,
    ) {
        let metrics = crate::metrics::handles();
        metrics.readings_stored.increment(frames.len() as u64);
        offer_durable(&self.shared, first, frames, subs);
        if let Some(t) = oldest {
            metrics.dispatch_latency.record(t.elapsed().as_secs_f64());
        }
    }

    /// A batch that did not reach the disk: never dispatched, so never readable.
    fn failed(&self, first: u64, last: u64, e: &LogError) {
        crate::metrics::handles().store_errors.increment(1);
        tracing::error!(stream = %self.shared.id, error = %e, "commit failed; refusing publishes for a while");
        self.shared
            .failed_until_ms
            .store(now_ms() + FAILED_BACKOFF_MS, Ordering::Relaxed);
        // The mark stays below them, and they leave the log before a later commit could
        // make them durable.
        if let Err(e) = self.log.discard(first, last) {
            tracing::error!(stream = %self.shared.id, error = %e, "could not discard a failed commit");
        }
    }
}

/// The answer to the oldest commit in flight (there is one).
async fn settled(in_flight: &mut VecDeque<InFlight>) -> Result<(), LogError> {
    match in_flight.front_mut() {
        Some(flight) => (&mut flight.done).await.unwrap_or(Err(LogError::Closed)),
        None => std::future::pending().await,
    }
}

/// Fast durability hands out seqs before their readings are on disk; a durable high-water
/// mark, reserved a block ahead, makes sure none is handed out twice across a crash.
struct Reservation {
    durable: u64,
    pending: Option<(u64, oneshot::Receiver<Result<(), LogError>>)>,
}

impl Reservation {
    fn new(durable: u64) -> Self {
        Self {
            durable,
            pending: None,
        }
    }

    async fn ensure(
        &mut self,
        last: u64,
        log: &dyn StreamLog,
        store: &dyn Store,
    ) -> Result<(), LogError> {
        if let Some((target, rx)) = &mut self.pending {
            if let Ok(done) = rx.try_recv() {
                done?;
                self.durable = *target;
                self.pending = None;
            }
        }
        // Ask for the next block while half of this one is left, so the wait is rare.
        if self.pending.is_none() && last + SEQ_BLOCK / 2 > self.durable {
            let target = last + SEQ_BLOCK;
            log.reserve(target)?;
            self.pending = Some((target, store.commit()));
        }
        if last > self.durable {
            if let Some((target, rx)) = self.pending.take() {
                rx.await.map_err(|_| LogError::Closed)??;
                self.durable = target;
            }
        }
        Ok(())
    }
}

fn fan_out(subs: &mut Vec<Subscriber>, batch: &Arc<Batch>) {
    subs.retain(|s| s.offer(batch));
}

/// Raises the stream's mark past readings `first..` (durable as the mode promises), then
/// offers them to the subscribers as one shared batch. The mark first: see
/// `StreamHandle::read`. Both owners, embedded and cluster, dispatch through here.
pub(super) fn offer_durable(
    shared: &Shared,
    first: u64,
    frames: Vec<Bytes>,
    subs: &mut Vec<Subscriber>,
) {
    let last = first + frames.len() as u64 - 1;
    shared.durable.fetch_max(last, Ordering::SeqCst);
    crate::metrics::handles()
        .commit_readings
        .record(frames.len() as f64);
    let bytes = frames.iter().map(Bytes::len).sum();
    let batch = Arc::new(Batch {
        first_seq: first,
        frames,
        bytes,
    });
    fan_out(subs, &batch);
}

/// Goes to the back of the run queue once. Unlike `tokio::task::yield_now`, which defers
/// the task until its worker has nothing else to do (up to dozens of task polls under load),
/// a self-wake returns after one round of the tasks already runnable.
fn yield_once() -> impl std::future::Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::KickReason;

    fn batch(seq: u64) -> Arc<Batch> {
        Arc::new(Batch {
            first_seq: seq,
            frames: vec![Bytes::from_static(b"x")],
            bytes: 1,
        })
    }

    #[test]
    fn a_full_outbox_lags_instead_of_kicking() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = Subscriber {
            id: 7,
            tx,
            outbox: Outbox::new(2, 1 << 20),
            kick: Kick::new(),
        };
        assert!(s.offer(&batch(1)));
        assert!(s.offer(&batch(2)));
        // Full: marked lagging and skipped, but kept.
        assert!(s.offer(&batch(3)));
        assert!(s.outbox.is_lagging());
        assert!(!s.kick.is_kicked());
        // Room again does not end the lag: only the connection does, once caught up.
        s.outbox.release(2, 2);
        assert!(s.offer(&batch(4)));
        let seqs = |rx: &mut mpsc::UnboundedReceiver<Arc<Batch>>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|b| b.first_seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&mut rx), [1, 2]);
        s.outbox.set_lagging(false);
        assert!(s.offer(&batch(5)));
        assert_eq!(seqs(&mut rx), [5]);
        // A kicked subscriber is dropped.
        s.kick.kick(KickReason::Duplicate);
        assert!(!s.offer(&batch(6)));
    }
}
