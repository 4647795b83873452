//! What a consumer connection owes its client: live batches from the hub and REPLAY ranges
//! from the log, merged into one ordered run of frames: DISPATCH on `/connect`, MESSAGE on
//! a STOMP stream topic (each front-end frames a reading through [`Encode`]).
//!
//! Owns the live/replay bookkeeping that makes "replay, then live, no gap, no duplicate"
//! hold: it knows the next live seq it owes (`next`), holds live batches back while a replay
//! runs, and, if holding them would fill half the outbox, drops them and reads them back from
//! the log instead (they are all there: the hub appends before it dispatches). Writes frames
//! into the connection's buffer and never touches the socket; must not decide protocol
//! questions (the session does).

use fastwebsockets::OpCode;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

use super::wire::push_frame;
use crate::frontend::CloseCode;
use crate::hub::{Batch, HubError, Kick, Outbox, StreamHandle, Subscriber};
use crate::log::Entry;
use crate::metrics::op_out;

/// How a front-end frames one reading for its client.
pub trait Encode {
    /// Appends the frame of reading `seq` to `out`; `dispatch` is its DISPATCH JSON.
    fn frame(&mut self, out: &mut Vec<u8>, seq: u64, dispatch: &[u8]);
    /// Counts `n` frames sent, in the front-end's own metric.
    fn count(&self, n: u64);
}

/// The opcode protocol's framing: the DISPATCH itself, in a text frame.
pub struct Dispatch;

impl Encode for Dispatch {
    fn frame(&mut self, out: &mut Vec<u8>, _seq: u64, dispatch: &[u8]) {
        push_frame(out, OpCode::Text, dispatch);
    }

    fn count(&self, n: u64) {
        crate::metrics::handles().frames_out[op_out::DISPATCH].increment(n);
    }
}

/// REPLAY requests a consumer may have waiting before it is closed with 4008.
pub const MAX_QUEUED_REPLAYS: usize = 16;

struct Live {
    rx: mpsc::UnboundedReceiver<Arc<Batch>>,
    outbox: Arc<Outbox>,
    stream: StreamHandle,
    /// The next live seq owed to the client.
    next: u64,
    /// Live batches held back while a replay runs.
    pending: VecDeque<Arc<Batch>>,
    pending_frames: usize,
    /// Highest seq dropped from `pending` because it grew too large.
    dropped_through: Option<u64>,
}

struct Range {
    /// The last seq sent (or the request's `after`).
    cursor: u64,
    before: u64,
    /// Up to the newest reading, then live.
    open: bool,
    read_any: bool,
}

#[derive(Default)]
pub struct Delivery {
    live: Option<Live>,
    replays: VecDeque<Range>,
    entries: Vec<Entry>,
}

impl Delivery {
    /// Joins `stream` as consumer `conn`: its live batches are bounded by `outbox`, and
    /// `kick` ends the connection if they overflow it.
    pub async fn join(
        stream: &StreamHandle,
        conn: u64,
        outbox: Arc<Outbox>,
        kick: Arc<Kick>,
    ) -> Result<Self, HubError> {
        let (tx, live) = mpsc::unbounded_channel();
        let sub = Subscriber {
            id: conn,
            tx,
            outbox: outbox.clone(),
            kick,
        };
        let head = stream.subscribe(sub).await?;
        let mut delivery = Self::default();
        delivery.attach(live, outbox, stream.clone(), head);
        Ok(delivery)
    }

    /// Starts live delivery: frames with seq > `head` arrive on `rx`.
    fn attach(
        &mut self,
        rx: mpsc::UnboundedReceiver<Arc<Batch>>,
        outbox: Arc<Outbox>,
        stream: StreamHandle,
        head: u64,
    ) {
        self.live = Some(Live {
            rx,
            outbox,
            stream,
            next: head + 1,
            pending: VecDeque::new(),
            pending_frames: 0,
            dropped_through: None,
        });
    }

    /// Queues a REPLAY of readings with `after < seq < before` (`None`: up to the newest,
    /// then live).
    pub fn request_replay(&mut self, after: u64, before: Option<u64>) -> Result<(), CloseCode> {
        if self.live.is_none() {
            return Ok(());
        }
        if self.replays.len() >= MAX_QUEUED_REPLAYS {
            return Err(CloseCode::RateLimited);
        }
        crate::metrics::handles().replay_requests.increment(1);
        self.replays.push_back(Range {
            cursor: after,
            before: before.unwrap_or(u64::MAX),
            open: before.is_none(),
            read_any: false,
        });
        Ok(())
    }

    /// True while a REPLAY has frames to send: [`Delivery::replay_step`] then has work.
    pub fn replaying(&self) -> bool {
        !self.replays.is_empty()
    }

    /// Writes live batches that are ready into `out` until it holds `high` bytes. Ready
    /// when it wrote something, or when the hub dropped this subscriber (`Err`).
    pub fn poll_live(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
        high: usize,
        enc: &mut impl Encode,
    ) -> Poll<Result<(), Gone>> {
        let Some(live) = &mut self.live else {
            return Poll::Pending;
        };
        let mut sent = 0u64;
        while out.len() < high {
            match live.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => sent += write_batch(live, &batch, out, enc),
                Poll::Ready(None) if sent == 0 => return Poll::Ready(Err(Gone)),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if sent == 0 {
            return Poll::Pending;
        }
        enc.count(sent);
        Poll::Ready(Ok(()))
    }

    /// One step of a replay: set arriving live batches aside, then write one chunk of up to
    /// `chunk` readings from the log into `out` (or finish the range).
    pub fn replay_step(
        &mut self,
        out: &mut Vec<u8>,
        chunk: usize,
        enc: &mut impl Encode,
    ) -> Result<(), CloseCode> {
        let Some(live) = &mut self.live else {
            self.replays.clear();
            return Ok(());
        };
        hold_live(live);
        let Some(range) = self.replays.front_mut() else {
            return Ok(());
        };
        self.entries.clear();
        if let Err(e) = live
            .stream
            .read(range.cursor, range.before, chunk, &mut self.entries)
        {
            tracing::error!(error = %e, "replay read failed");
            return Err(CloseCode::Internal);
        }
        if self.entries.is_empty() {
            let range = self.replays.pop_front().expect("a range is in progress");
            finish_range(live, &range, &mut self.replays);
            if self.replays.is_empty() {
                release_held(live, out, enc);
            }
            return Ok(());
        }
        for entry in &self.entries {
            enc.frame(out, entry.seq, &entry.frame);
        }
        range.cursor = self.entries.last().map_or(range.cursor, |e| e.seq);
        range.read_any = true;
        let n = self.entries.len() as u64;
        crate::metrics::handles().replay_frames.increment(n);
        enc.count(n);
        Ok(())
    }

    /// Gives back the outbox room of everything still queued, so the hub's accounting of a
    /// closed connection ends at zero.
    pub fn finish(&mut self) {
        if let Some(live) = &mut self.live {
            for batch in live.pending.drain(..) {
                live.outbox.release(batch.frames.len(), batch.bytes);
            }
            live.rx.close();
            while let Ok(batch) = live.rx.try_recv() {
                live.outbox.release(batch.frames.len(), batch.bytes);
            }
        }
    }
}

/// The hub dropped the subscription (its stream is closing).
#[derive(Debug)]
pub struct Gone;

/// Moves queued live batches aside during a replay. If they would fill half the outbox, they
/// are dropped (their room returned) and remembered as owed: the log has them.
fn hold_live(live: &mut Live) {
    while let Ok(batch) = live.rx.try_recv() {
        live.pending_frames += batch.frames.len();
        live.pending.push_back(batch);
    }
    if live.pending_frames > live.outbox.max_frames() / 2 {
        for batch in live.pending.drain(..) {
            live.dropped_through = Some(live.dropped_through.unwrap_or(0).max(batch.last_seq()));
            live.outbox.release(batch.frames.len(), batch.bytes);
        }
        live.pending_frames = 0;
    }
}

/// After the last range: the live batches held back go out, minus what the replay sent.
fn release_held(live: &mut Live, out: &mut Vec<u8>, enc: &mut impl Encode) {
    let mut sent = 0u64;
    while let Some(batch) = live.pending.pop_front() {
        sent += write_batch(live, &batch, out, enc);
    }
    live.pending_frames = 0;
    enc.count(sent);
}

/// Writes a live batch's frames from the next seq owed (the rest went out with a replay)
/// and gives its outbox room back; returns the frames written.
fn write_batch(live: &mut Live, batch: &Batch, out: &mut Vec<u8>, enc: &mut impl Encode) -> u64 {
    let mut sent = 0;
    for (seq, frame) in batch.from_seq(live.next) {
        enc.frame(out, seq, frame);
        live.next = seq + 1;
        sent += 1;
    }
    live.outbox.release(batch.frames.len(), batch.bytes);
    sent
}

/// Settles what live frames are still owed once a range is done.
fn finish_range(live: &mut Live, range: &Range, replays: &mut VecDeque<Range>) {
    if range.open {
        // Everything dispatched before the range's last (empty) read is in the log and was
        // either sent now or lies at or below the client's `after`.
        if range.read_any {
            live.next = live.next.max(range.cursor + 1);
        }
        if let Some(dropped) = live.dropped_through.take() {
            live.next = live.next.max(dropped + 1);
        }
    } else if live.dropped_through.take().is_some() {
        // A bounded range ran while live frames were dropped: fetch them from the log.
        replays.push_back(Range {
            cursor: live.next - 1,
            before: u64::MAX,
            open: true,
            read_any: false,
        });
    }
}
