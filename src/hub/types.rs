//! The hub's value types: what front-ends hand in and what subscribers get out.
//!
//! Kept free of any wire protocol: a [`SeqTemplate`] is an already-encoded frame with a hole
//! for the seq, a [`Batch`] is a run of encoded frames with consecutive seqs.

use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use atomic_waker::AtomicWaker;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{mpsc, Notify};

/// An encoded frame waiting for its seq: the bytes before and after the number, and where
/// the number goes. The stream owner writes the finished frames of a whole group commit
/// into one buffer ([`SeqTemplate::fill_into`]).
#[derive(Debug, Clone)]
pub struct SeqTemplate {
    buf: Vec<u8>,
    seq_at: usize,
}

/// Most digits a u64 has in decimal.
const SEQ_DIGITS: usize = 20;

/// `seq` in decimal, without allocating.
struct Digits {
    buf: [u8; SEQ_DIGITS],
    at: usize,
}

impl Digits {
    fn new(mut n: u64) -> Self {
        let mut buf = [0u8; SEQ_DIGITS];
        let mut at = SEQ_DIGITS;
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Self { buf, at }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

/// How many bytes `seq` takes in a frame: a template's finished frame is its
/// [`SeqTemplate::len`] plus this.
pub fn seq_len(seq: u64) -> usize {
    Digits::new(seq).as_bytes().len()
}

impl SeqTemplate {
    /// `buf` holds the frame with nothing at `seq_at`.
    pub fn new(buf: Vec<u8>, seq_at: usize) -> Self {
        debug_assert!(seq_at <= buf.len());
        Self { buf, seq_at }
    }

    /// Appends the frame with `seq` in its hole to `out` and cuts it off as its own `Bytes`,
    /// which shares `out`'s buffer. Reserve room for a whole batch in `out` first and the
    /// batch's frames are one allocation (freed with the last of them), not one each.
    pub fn fill_into(&self, seq: u64, out: &mut BytesMut) -> Bytes {
        out.extend_from_slice(&self.buf[..self.seq_at]);
        out.extend_from_slice(Digits::new(seq).as_bytes());
        out.extend_from_slice(&self.buf[self.seq_at..]);
        out.split().freeze()
    }

    /// One frame alone, in a buffer of its own: what a group commit of one reading costs.
    pub fn fill(&self, seq: u64) -> Bytes {
        self.fill_into(seq, &mut BytesMut::with_capacity(self.len() + seq_len(seq)))
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The frame without its seq, and where the digits go.
    pub fn parts(&self) -> (&[u8], usize) {
        (&self.buf, self.seq_at)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// One SUBMIT on its way to the stream owner.
#[derive(Debug)]
pub struct Publish {
    pub frame: SeqTemplate,
    /// When the front-end received it, for the SUBMIT→DISPATCH histogram.
    pub received: Instant,
}

/// Frames with consecutive seqs from one group commit, shared by every subscriber: one
/// allocation per commit, never one per recipient.
#[derive(Debug)]
pub struct Batch {
    pub first_seq: u64,
    pub frames: Vec<Bytes>,
    pub bytes: usize,
}

impl Batch {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.frames.len() as u64 - 1
    }

    /// The frames with their seqs, skipping those below `from`.
    pub fn from_seq(&self, from: u64) -> impl Iterator<Item = (u64, &Bytes)> {
        let skip = from.saturating_sub(self.first_seq) as usize;
        self.frames
            .iter()
            .enumerate()
            .skip(skip)
            .map(move |(i, f)| (self.first_seq + i as u64, f))
    }
}

/// Why the hub (or a newer session) ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KickReason {
    /// A newer connection took this one's place (user already connected, or consumers
    /// beyond the developer's limit).
    Duplicate = 1,
    /// Its outbox filled: it reads slower than its stream is written.
    TooSlow = 2,
    /// The stream's store failed.
    StoreFailed = 3,
    /// The server is shutting down.
    Shutdown = 4,
}

/// A connection's off switch, shared with the hub and the server so either can end the
/// connection from outside. A flag and a waker: the connection checks it on every wake-up,
/// so it must cost an atomic load, not a lock.
#[derive(Debug, Default)]
pub struct Kick {
    reason: AtomicU8,
    waker: AtomicWaker,
}

impl Kick {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Ends the connection; the first reason given is the one reported.
    pub fn kick(&self, reason: KickReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }

    pub fn reason(&self) -> Option<KickReason> {
        match self.reason.load(Ordering::Acquire) {
            1 => Some(KickReason::Duplicate),
            2 => Some(KickReason::TooSlow),
            3 => Some(KickReason::StoreFailed),
            4 => Some(KickReason::Shutdown),
            _ => None,
        }
    }

    pub fn is_kicked(&self) -> bool {
        self.reason.load(Ordering::Acquire) != 0
    }

    /// Wakes the connection without ending it, so it looks at what changed (its outbox
    /// went lagging, say).
    pub fn nudge(&self) {
        self.waker.wake();
    }

    /// Ready once kicked; otherwise wakes the task of `cx` when it is.
    pub fn poll_kicked(&self, cx: &mut Context<'_>) -> Poll<KickReason> {
        if let Some(r) = self.reason() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        match self.reason() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// The bound on one subscriber's queue, counted in frames and bytes: the hub adds what it
/// queues, the connection subtracts what it has taken into its write buffer.
///
/// For a stream consumer it also carries the cursor's switch: while `lagging` is set the
/// stream's owner skips this subscriber, and the connection reads what it missed from the
/// log instead (`conn::delivery`).
#[derive(Debug)]
pub struct Outbox {
    frames: AtomicUsize,
    bytes: AtomicUsize,
    max_frames: usize,
    max_bytes: usize,
    lagging: AtomicBool,
    /// Publishers waiting for room (live topics' flow control); `wanted` keeps
    /// [`Outbox::release`] to one atomic load while nobody waits.
    room: Arc<Notify>,
    wanted: AtomicBool,
}

impl Outbox {
    pub fn new(max_frames: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            frames: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_frames,
            max_bytes,
            lagging: AtomicBool::new(false),
            room: Arc::new(Notify::new()),
            wanted: AtomicBool::new(false),
        })
    }

    /// Resolves at the next release of room. Create it, then check for room once more,
    /// then await it: a release in between is not missed.
    pub fn room_released(&self) -> OwnedNotified {
        let notified = self.room.clone().notified_owned();
        self.wanted.store(true, Ordering::SeqCst);
        notified
    }

    /// Claims room for a batch; false when the outbox is already full (the subscriber is
    /// too slow). A batch is taken whole, so the queue may pass the bound by one group
    /// commit (`commit_batch_max`), never more.
    pub fn try_claim(&self, frames: usize, bytes: usize) -> bool {
        let f = self.frames.fetch_add(frames, Ordering::AcqRel);
        let b = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if f >= self.max_frames || b >= self.max_bytes {
            self.unclaim(frames, bytes);
            return false;
        }
        true
    }

    /// Takes back a claim that was never used. Unlike [`Outbox::release`] it wakes no
    /// waiting publisher: no room was made, and a publisher whose own failed claim woke
    /// itself would spin.
    pub fn unclaim(&self, frames: usize, bytes: usize) {
        self.frames.fetch_sub(frames, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The one policy every fan-out follows: queue `item` on `tx` if this outbox has room
    /// for it; a subscriber whose outbox is full is kicked as too slow (closed with 4009 or
    /// an ERROR, counted), one that is gone is dropped. True while the subscriber stays.
    pub fn offer<T>(
        &self,
        kick: &Kick,
        tx: &mpsc::UnboundedSender<T>,
        item: T,
        frames: usize,
        bytes: usize,
        conn: u64,
    ) -> bool {
        if kick.is_kicked() {
            return false;
        }
        if !self.try_claim(frames, bytes) {
            crate::metrics::handles().slow_consumer_closes.increment(1);
            tracing::info!(
                conn,
                queued = self.queued_frames(),
                "subscriber too slow, closing it"
            );
            kick.kick(KickReason::TooSlow);
            return false;
        }
        self.send_claimed(tx, item, frames, bytes)
    }

    /// Sends what room was claimed for; a receiver that is gone gives the room back.
    pub(super) fn send_claimed<T>(
        &self,
        tx: &mpsc::UnboundedSender<T>,
        item: T,
        frames: usize,
        bytes: usize,
    ) -> bool {
        if tx.send(item).is_err() {
            self.release(frames, bytes);
            return false;
        }
        true
    }

    /// True while the stream's owner skips this subscriber.
    pub fn is_lagging(&self) -> bool {
        self.lagging.load(Ordering::SeqCst)
    }

    /// Set by the stream's owner when the outbox is full and by the connection when it stops
    /// taking live batches (a REPLAY runs); cleared by the connection when it rejoins. See
    /// `hub::stream::Subscriber::offer`.
    pub fn set_lagging(&self, lagging: bool) {
        self.lagging.store(lagging, Ordering::SeqCst);
    }

    pub fn release(&self, frames: usize, bytes: usize) {
        self.unclaim(frames, bytes);
        if self.wanted.load(Ordering::SeqCst) && self.wanted.swap(false, Ordering::SeqCst) {
            self.room.notify_waiters();
        }
    }

    pub fn queued_frames(&self) -> usize {
        self.frames.load(Ordering::Acquire)
    }

    pub fn max_frames(&self) -> usize {
        self.max_frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_writes_the_seq_in_place() {
        let t = SeqTemplate::new(b"{\"seq\":,\"t\":\"X\"}".to_vec(), 7);
        let seqs = [0u64, 7, 73, 1_000_000, u64::MAX];
        let room = seqs.iter().map(|&s| t.len() + seq_len(s)).sum();
        let mut out = BytesMut::with_capacity(room);
        let frames: Vec<Bytes> = seqs.iter().map(|&s| t.fill_into(s, &mut out)).collect();
        for (seq, frame) in seqs.iter().zip(&frames) {
            assert_eq!(frame, format!("{{\"seq\":{seq},\"t\":\"X\"}}").as_bytes());
        }
        // Reserved exactly: every frame came out of the one buffer.
        assert_eq!(out.capacity(), 0);
    }

    #[test]
    fn outbox_bounds_frames_and_bytes() {
        let o = Outbox::new(3, 100);
        // A batch larger than the bound is taken when the queue is empty.
        assert!(o.try_claim(5, 10));
        assert!(!o.try_claim(1, 10));
        o.release(5, 10);
        assert!(o.try_claim(2, 10));
        assert!(o.try_claim(2, 10));
        assert!(!o.try_claim(1, 10));
        o.release(4, 20);
        assert!(o.try_claim(1, 150));
        assert!(!o.try_claim(1, 1));
        o.release(1, 150);
        assert_eq!(o.queued_frames(), 0);
    }

    #[test]
    fn kick_keeps_the_first_reason() {
        let k = Kick::new();
        assert_eq!(k.reason(), None);
        k.kick(KickReason::TooSlow);
        k.kick(KickReason::Duplicate);
        assert!(k.is_kicked());
        assert_eq!(k.reason(), Some(KickReason::TooSlow));
    }

    #[test]
    fn batch_skips_below_a_seq() {
        let b = Batch {
            first_seq: 10,
            frames: vec![
                Bytes::from_static(b"a"),
                Bytes::from_static(b"b"),
                Bytes::from_static(b"c"),
            ],
            bytes: 3,
        };
        assert_eq!(b.last_seq(), 12);
        let seqs: Vec<u64> = b.from_seq(11).map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![11, 12]);
        assert_eq!(b.from_seq(0).count(), 3);
        assert_eq!(b.from_seq(13).count(), 0);
    }
}
