//! A connection's single writer: replies, live deliveries and REPLAY, in one order, in
//! batches.
//!
//! Owns the socket's write half, the batch buffer, and the live/replay bookkeeping that makes
//! "replay, then live, no gap, no duplicate" hold: it knows the next live seq it owes
//! (`next`), holds live batches back while a replay runs, and, if holding them would overflow
//! the outbox, drops them and reads them back from the log instead (they are all there: the
//! hub appends before it dispatches). Must not decide protocol questions: the reader does.

use bytes::Bytes;
use fastwebsockets::OpCode;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{push_close, push_frame};
use crate::frontend::CloseCode;
use crate::hub::{Batch, Outbox, StreamHandle};
use crate::log::Entry;
use crate::metrics::op_out;

/// REPLAY requests a consumer may have waiting before it is closed with 4008.
pub const MAX_QUEUED_REPLAYS: usize = 16;
/// Bytes gathered into one write.
const WRITE_BATCH_BYTES: usize = 256 << 10;
/// A batch buffer larger than this is released after use, so idle connections stay small.
const KEEP_BUFFER_BYTES: usize = 64 << 10;

/// What the reader asks the writer to do, in order.
pub enum Ctl {
    /// A text frame (HELLO, READY, HEARTBEAT_ACK).
    Text(Bytes),
    Pong(Bytes),
    /// Start live delivery: frames with seq > `head` arrive on `live`.
    Attach {
        live: mpsc::UnboundedReceiver<Arc<Batch>>,
        outbox: Arc<Outbox>,
        stream: StreamHandle,
        head: u64,
    },
    /// REPLAY readings with `after < seq < before` (`None`: up to the newest, then live).
    Replay {
        after: u64,
        before: Option<u64>,
    },
    /// Send a close frame and stop.
    Close(CloseCode),
}

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
    closed: bool,
}

struct Range {
    /// The last seq sent (or the request's `after`).
    cursor: u64,
    before: u64,
    /// Up to the newest reading, then live.
    open: bool,
    read_any: bool,
}

pub struct Writer {
    sink: OwnedWriteHalf,
    ctl: mpsc::Receiver<Ctl>,
    out: Vec<u8>,
    live: Option<Live>,
    replays: VecDeque<Range>,
    entries: Vec<Entry>,
    chunk: usize,
}

/// How the writer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// It sent this close frame.
    Closed(CloseCode),
    /// The reader went away without asking for a close.
    Dropped,
    /// The socket failed, or the store did during a replay.
    Failed,
}

impl Writer {
    pub fn new(sink: OwnedWriteHalf, ctl: mpsc::Receiver<Ctl>, replay_chunk: usize) -> Self {
        Self {
            sink,
            ctl,
            out: Vec::new(),
            live: None,
            replays: VecDeque::new(),
            entries: Vec::new(),
            chunk: replay_chunk,
        }
    }

    /// Runs until a close is sent or the connection fails; cancels `done` on the way out so
    /// the reader stops too.
    pub async fn run(mut self, done: CancellationToken) -> Exit {
        let exit = self.serve().await;
        if let Some(live) = &mut self.live {
            for batch in live.pending.drain(..) {
                live.outbox.release(batch.frames.len(), batch.bytes);
            }
            while let Ok(batch) = live.rx.try_recv() {
                live.outbox.release(batch.frames.len(), batch.bytes);
            }
        }
        done.cancel();
        exit
    }

    async fn serve(&mut self) -> Exit {
        loop {
            let step = if self.replays.is_empty() {
                tokio::select! {
                    biased;
                    ctl = self.ctl.recv() => match ctl {
                        Some(ctl) => self.on_ctl(ctl).await,
                        None => return Exit::Dropped,
                    },
                    batch = next_live(&mut self.live) => match batch {
                        Some(batch) => self.write_live(batch).await,
                        None => Ok(None),
                    },
                }
            } else {
                self.replay_step().await
            };
            match step {
                Ok(None) => {}
                Ok(Some(exit)) => return exit,
                Err(()) => return Exit::Failed,
            }
        }
    }

    async fn on_ctl(&mut self, ctl: Ctl) -> Result<Option<Exit>, ()> {
        match ctl {
            Ctl::Text(frame) => {
                push_frame(&mut self.out, OpCode::Text, &frame);
                self.flush().await?;
            }
            Ctl::Pong(payload) => {
                push_frame(&mut self.out, OpCode::Pong, &payload);
                self.flush().await?;
            }
            Ctl::Attach {
                live,
                outbox,
                stream,
                head,
            } => {
                self.live = Some(Live {
                    rx: live,
                    outbox,
                    stream,
                    next: head + 1,
                    pending: VecDeque::new(),
                    pending_frames: 0,
                    dropped_through: None,
                    closed: false,
                });
            }
            Ctl::Replay { after, before } => {
                if self.live.is_none() {
                    return Ok(None);
                }
                if self.replays.len() >= MAX_QUEUED_REPLAYS {
                    return self.close(CloseCode::RateLimited).await;
                }
                crate::metrics::handles().replay_requests.increment(1);
                self.replays.push_back(Range {
                    cursor: after,
                    before: before.unwrap_or(u64::MAX),
                    open: before.is_none(),
                    read_any: false,
                });
            }
            Ctl::Close(code) => return self.close(code).await,
        }
        Ok(None)
    }

    async fn close(&mut self, code: CloseCode) -> Result<Option<Exit>, ()> {
        push_close(&mut self.out, code.code(), code.reason());
        self.flush().await?;
        let _ = self.sink.shutdown().await;
        Ok(Some(Exit::Closed(code)))
    }

    /// Writes a live batch and whatever else is already queued, in one write.
    async fn write_live(&mut self, first: Arc<Batch>) -> Result<Option<Exit>, ()> {
        let Some(live) = &mut self.live else {
            return Ok(None);
        };
        let (mut frames, mut bytes, mut sent) = (0, 0, 0u64);
        let mut batch = Some(first);
        while let Some(b) = batch.take() {
            for (seq, frame) in b.from_seq(live.next) {
                push_frame(&mut self.out, OpCode::Text, frame);
                live.next = seq + 1;
                sent += 1;
            }
            frames += b.frames.len();
            bytes += b.bytes;
            if self.out.len() < WRITE_BATCH_BYTES {
                batch = live.rx.try_recv().ok();
            }
        }
        let outbox = live.outbox.clone();
        let result = self.flush().await;
        outbox.release(frames, bytes);
        crate::metrics::handles().frames_out[op_out::DISPATCH].increment(sent);
        result.map(|()| None)
    }

    /// One step of a replay: take in control frames and live batches without blocking, then
    /// send one chunk from the log (or finish the range).
    async fn replay_step(&mut self) -> Result<Option<Exit>, ()> {
        while let Ok(ctl) = self.ctl.try_recv() {
            if let Some(exit) = self.on_ctl(ctl).await? {
                return Ok(Some(exit));
            }
        }
        let Some(live) = &mut self.live else {
            self.replays.clear();
            return Ok(None);
        };
        hold_live(live);
        let Some(range) = self.replays.front_mut() else {
            return Ok(None);
        };
        self.entries.clear();
        if let Err(e) = live
            .stream
            .read(range.cursor, range.before, self.chunk, &mut self.entries)
        {
            tracing::error!(error = %e, "replay read failed");
            return self.close(CloseCode::Internal).await;
        }
        if self.entries.is_empty() {
            let range = self.replays.pop_front().expect("a range is in progress");
            finish_range(live, &range, &mut self.replays);
            if self.replays.is_empty() {
                return self.release_held().await.map(|()| None);
            }
            return Ok(None);
        }
        for entry in &self.entries {
            push_frame(&mut self.out, OpCode::Text, &entry.frame);
        }
        range.cursor = self.entries.last().map_or(range.cursor, |e| e.seq);
        range.read_any = true;
        let n = self.entries.len() as u64;
        crate::metrics::handles().replay_frames.increment(n);
        crate::metrics::handles().frames_out[op_out::DISPATCH].increment(n);
        self.flush().await?;
        // Let heartbeats and other connections in between chunks.
        tokio::task::yield_now().await;
        Ok(None)
    }

    /// After the last range: the live batches held back go out, minus what the replay sent.
    async fn release_held(&mut self) -> Result<(), ()> {
        let Some(live) = &mut self.live else {
            return Ok(());
        };
        let (mut frames, mut bytes, mut sent) = (0, 0, 0u64);
        for b in live.pending.drain(..) {
            for (seq, frame) in b.from_seq(live.next) {
                push_frame(&mut self.out, OpCode::Text, frame);
                live.next = seq + 1;
                sent += 1;
            }
            frames += b.frames.len();
            bytes += b.bytes;
        }
        live.pending_frames = 0;
        let outbox = live.outbox.clone();
        let result = self.flush().await;
        outbox.release(frames, bytes);
        crate::metrics::handles().frames_out[op_out::DISPATCH].increment(sent);
        result
    }

    async fn flush(&mut self) -> Result<(), ()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.sink.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > KEEP_BUFFER_BYTES {
            self.out = Vec::new();
        }
        result.map_err(|e| tracing::debug!(error = %e, "write failed"))
    }
}

async fn next_live(live: &mut Option<Live>) -> Option<Arc<Batch>> {
    match live {
        Some(l) if !l.closed => {
            let batch = l.rx.recv().await;
            if batch.is_none() {
                l.closed = true;
            }
            batch
        }
        _ => std::future::pending().await,
    }
}

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
