//! Group commit: one thread that turns many "make it durable" requests into one write.
//!
//! Owns the segment writer of a [`super::SledStore`]. Stream owners ask for a commit and await
//! the answer; every request that arrives while a commit runs shares the next one (and while
//! readings pour in faster than the cores can take much more, the next one starts a little
//! later and takes more: see `Flush::gather`). Each commit
//! encodes every stream's tail into one reused buffer, writes it with one `pwrite`, syncs it
//! with one `fdatasync`, answers the requests, then indexes the records: the segments are the
//! truth and the index is rebuilt from them, so a reading is durable at the sync and its
//! DISPATCH does not wait for sled. In fast durability the same thread also
//! commits on a timer whenever something was appended, and as soon as 256 KiB of appends wait.
//!
//! A failed write is cut off the file (see `segment::Writer::append`). What it held then
//! depends on the mode: in strict mode its readings were never dispatched and are dropped
//! (their owners learn it from [`super::StreamLog::written`]); in fast mode they were, and
//! stay in their tails to be written once the disk takes writes again. While the store
//! cannot write, each timer tick and each commit request probes the disk first (the failed
//! commit's size and more), and nothing is written until a probe succeeds: a small commit
//! that fits in the room the cut freed does not make a full disk look healthy. So the store
//! becomes writable again without a restart once there is room.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::segment::{self, Loc, Writer};
use super::sled_store::{
    checkpoint, raise_reserved, IndexEntry, Scratch, Shared, Tail, CHECKPOINT,
};
use super::LogError;
use crate::config::Durability;

type Waiter = oneshot::Sender<Result<(), LogError>>;

/// A commit buffer larger than this is given back after the commit that grew it.
const KEEP_BUF: usize = 8 << 20;
/// Bytes written (then cut off), beyond the size of the commit that failed, to see whether
/// a disk that failed takes writes again. Cutting a failed commit off frees its own room, so
/// a probe smaller than it would find a full disk "writable".
const PROBE_BYTES: usize = 64 << 10;
/// The store counts as saturated while its last commit held at least this much...
const BUSY_BYTES: usize = 64 << 10;
/// ...and the bytes came in at least this fast (128 MiB/s: some 700,000 readings a second of
/// 180 bytes, near what two cores can take in at all).
const BUSY_BYTES_PER_SEC: u64 = 128 << 20;
/// How often commits start while saturated. Measured as fast as possible in strict mode
/// against starting each commit once the last is done (0 µs): 0.83x `fast`'s throughput
/// with 0 µs, 0.90x with 600 µs, 0.99x with 1.5 ms (BENCHMARKS.md, issue 10).
const BUSY_PERIOD: Duration = Duration::from_micros(1500);
/// How often the checkpoint moves. It only bounds what a restart re-reads, so one sled
/// write per interval instead of one per commit (thousands a second in strict mode).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

pub(super) struct Committer {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Waiter>>>,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// The commit thread's kernel id, for [`Committer::set_nice`].
    tid: rustix::thread::Pid,
    /// Cleared by a failed commit, set by a good one (or a good probe).
    pub(super) writable: Arc<AtomicBool>,
}

impl Committer {
    /// Starts the commit thread. `interval` is the timed commit of fast durability (and the
    /// probe interval of a failed disk).
    pub(super) fn start(
        shared: Arc<Shared>,
        index_file: File,
        writer: Writer,
        interval: Duration,
        durability: Durability,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let writable = Arc::new(AtomicBool::new(true));
        let flush = Flush {
            writable: writable.clone(),
            shared,
            index_file,
            writer,
            keep_failed: durability == Durability::Fast,
            checkpointed: Instant::now(),
            failed_bytes: 0,
            buf: Vec::new(),
            scratch: Scratch::default(),
            staged: Vec::new(),
            tails: Vec::new(),
            through: Vec::new(),
            reserves: Vec::new(),
            written_at: None,
            reindex: false,
            last_start: Instant::now(),
            last_bytes: 0,
            last_window: Duration::MAX,
        };
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("sensorgate-commit".into())
            .spawn(move || {
                let _ = tid_tx.send(rustix::thread::gettid());
                run(flush, rx, interval)
            })
            .expect("the commit thread starts");
        let tid = tid_rx.recv().expect("the commit thread says who it is");
        Self {
            tx: parking_lot::Mutex::new(Some(tx)),
            thread: parking_lot::Mutex::new(Some(thread)),
            tid,
            writable,
        }
    }

    /// Gives the commit thread (only it) the nice value `nice`. In strict mode a SUBMIT's
    /// DISPATCH waits for this thread to be scheduled once its sync returns; on two busy
    /// cores that wait is a visible part of the tail (BENCHMARKS.md, issue 10).
    pub(super) fn set_nice(&self, nice: i32) -> std::io::Result<()> {
        rustix::process::setpriority_process(Some(self.tid), nice).map_err(std::io::Error::from)
    }

    pub(super) fn request(&self) -> oneshot::Receiver<Result<(), LogError>> {
        let (done, wait) = oneshot::channel();
        match &*self.tx.lock() {
            Some(tx) => {
                if let Err(mpsc::SendError(done)) = tx.send(done) {
                    let _ = done.send(Err(LogError::Closed));
                }
            }
            None => {
                let _ = done.send(Err(LogError::Closed));
            }
        }
        wait
    }

    /// Stops the thread after a last commit.
    pub(super) fn stop(&self) {
        self.tx.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// A record encoded into the commit buffer, to index once it is on disk.
struct Staged {
    tail: usize,
    first: u64,
    count: u32,
    ts_ms: u64,
    at: usize,
    len: u32,
}

/// What one commit touches.
struct Flush {
    writable: Arc<AtomicBool>,
    shared: Arc<Shared>,
    /// sled's file, synced before a segment file is deleted.
    index_file: File,
    writer: Writer,
    /// Fast mode: a failed commit's readings were dispatched; keep them to write later.
    keep_failed: bool,
    /// When the checkpoint last moved.
    checkpointed: Instant,
    /// The size of the last commit that failed.
    failed_bytes: usize,
    buf: Vec<u8>,
    scratch: Scratch,
    staged: Vec<Staged>,
    /// What the commit in progress took: its tails, the newest seq it encoded of each, the
    /// reservations it carries (by tail), and where it was written.
    tails: Vec<Arc<Tail>>,
    through: Vec<Option<u64>>,
    reserves: Vec<(usize, u64)>,
    written_at: Option<(u64, u64)>,
    /// A written commit could not be indexed: the index is rebuilt before the next write.
    reindex: bool,
    /// When the last commit started, the bytes it wrote, and how long they took to come
    /// in (from the start of the commit before it): see [`Flush::gather`].
    last_start: Instant,
    last_bytes: usize,
    last_window: Duration,
}

fn run(mut flush: Flush, rx: mpsc::Receiver<Waiter>, interval: Duration) {
    let mut waiters: Vec<Waiter> = Vec::new();
    loop {
        match rx.recv_timeout(interval) {
            Ok(w) => waiters.push(w),
            Err(RecvTimeoutError::Timeout) => {
                if !flush.writable.load(Ordering::Acquire) && !flush.probe() {
                    continue;
                }
                if !flush.shared.dirty.load(Ordering::Acquire) {
                    continue;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let last = flush
                    .write()
                    .and_then(|()| flush.settle())
                    .and_then(|()| flush.checkpoint());
                if let Err(e) = last {
                    tracing::error!(error = %e, "final commit failed");
                }
                return;
            }
        }
        flush.gather();
        waiters.extend(rx.try_iter());
        let was_writable = flush.writable.load(Ordering::Acquire);
        // A store that failed is writable again only once a probe shows room for the
        // failed commit and more: a small commit that happens to fit in the space the cut
        // freed must not make it look healthy while the disk is still full.
        let written = if was_writable || flush.probe() {
            flush.write()
        } else {
            flush.refuse()
        };
        if written.is_err() {
            // Before anyone hears of it: a producer closed for this failure must find the
            // store unwritable (and /readyz 503) already.
            flush.writable.store(false, Ordering::Release);
        }
        // The readings are durable once synced: their owners hear it before the index is
        // updated, so sled's time is never on the way from a SUBMIT to its DISPATCH.
        for w in waiters.drain(..) {
            let answer = match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(LogError::Io(std::io::Error::other(e.to_string()))),
            };
            let _ = w.send(answer);
        }
        // A commit with nothing to write proves nothing about the disk: only a write (or a
        // probe) makes a store that failed writable again.
        let wrote = flush.written_at.is_some();
        let result = written.and_then(|()| flush.settle());
        if result.is_err() || wrote {
            flush.writable.store(result.is_ok(), Ordering::Release);
        }
        match &result {
            Err(e) => {
                crate::metrics::handles().store_errors.increment(1);
                if was_writable {
                    tracing::error!(error = %e, "group commit failed; /readyz is 503 until the disk takes writes again");
                }
            }
            Ok(()) if !was_writable && wrote => tracing::info!("the store writes again"),
            Ok(()) => {}
        }
    }
}

impl Flush {
    /// Under saturation, lets the next group grow before it is written: while readings
    /// arrive faster than [`BUSY_BYTES_PER_SEC`], commits start at most every
    /// [`BUSY_PERIOD`], so the same readings take fewer syncs, wake-ups and index writes (a
    /// reading waits up to that much longer, when the cores are busy anyway). Below that
    /// rate (10,000 readings/s is under 2 MiB/s) a commit starts the moment it is asked for.
    fn gather(&mut self) {
        let rate = self.last_bytes as u128 * 1_000_000 / self.last_window.as_micros().max(1);
        if self.last_bytes >= BUSY_BYTES && rate >= u128::from(BUSY_BYTES_PER_SEC) {
            if let Some(rest) = BUSY_PERIOD.checked_sub(self.last_start.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        let now = Instant::now();
        self.last_window = now - self.last_start;
        self.last_start = now;
    }

    /// Writes and syncs every tail, and marks what it wrote as written. The index follows
    /// in [`Flush::settle`].
    fn write(&mut self) -> Result<(), LogError> {
        self.shared.dirty.store(false, Ordering::Release);
        self.shared.pending_bytes.store(0, Ordering::Release);
        self.tails = self.shared.take_pending();
        self.buf.clear();
        self.staged.clear();
        self.through.clear();
        self.reserves.clear();
        self.written_at = None;
        for (i, tail) in self.tails.iter().enumerate() {
            if let Some(r) = tail.reserve.lock().take() {
                segment::encode_reserve(&mut self.buf, &tail.name, r);
                self.reserves.push((i, r));
            }
            let staged = &mut self.staged;
            self.through.push(tail.encode(
                &mut self.buf,
                &mut self.scratch,
                |first, count, ts_ms, at, len| {
                    staged.push(Staged {
                        tail: i,
                        first,
                        count,
                        ts_ms,
                        at,
                        len,
                    })
                },
            ));
        }
        // The frames go as soon as the tails let go of them, not at the next commit.
        self.scratch.clear();
        self.last_bytes = self.buf.len();
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.reindex && !self.reopen_index() {
            self.failed();
            return Err(LogError::NotWritable);
        }
        let started = Instant::now();
        match self.writer.append(&self.buf) {
            Ok(at) => {
                crate::metrics::handles()
                    .fsync_seconds
                    .record(started.elapsed().as_secs_f64());
                self.written_at = Some(at);
                for (tail, through) in self.tails.iter().zip(&self.through) {
                    if let Some(seq) = through {
                        tail.written.fetch_max(*seq, Ordering::AcqRel);
                    }
                }
                for &(i, r) in &self.reserves {
                    self.tails[i].reserved.fetch_max(r, Ordering::AcqRel);
                }
                Ok(())
            }
            Err(e) => {
                self.failed_bytes = self.buf.len();
                self.failed();
                Err(e)
            }
        }
    }

    /// While the store cannot write: every pending tail is treated as a failed write (strict
    /// mode drops its readings, fast mode keeps them for later), and nothing touches the disk.
    fn refuse(&mut self) -> Result<(), LogError> {
        self.shared.dirty.store(false, Ordering::Release);
        self.tails = self.shared.take_pending();
        self.through.clear();
        self.reserves.clear();
        self.written_at = None;
        for (i, tail) in self.tails.iter().enumerate() {
            if let Some(r) = tail.reserve.lock().take() {
                self.reserves.push((i, r));
            }
            self.through
                .push(tail.runs.lock().back().map(super::sled_store::Run::last));
        }
        self.failed();
        Err(LogError::NotWritable)
    }

    /// Indexes what [`Flush::write`] wrote and lets the tails go of it. An index that fails
    /// here leaves the records where they are — durable, acknowledged, in their tails for
    /// readers, skipped by the next encode — and the store unwritable until the index is
    /// reopened and rebuilt from the segments (the checkpoint has not moved past them).
    fn settle(&mut self) -> Result<(), LogError> {
        let indexed = match self.written_at.take() {
            Some(at) => self.index(at),
            None => Ok(()),
        };
        if self.buf.capacity() > KEEP_BUF {
            self.buf = Vec::new();
        }
        if let Err(e) = indexed {
            tracing::error!(error = %e, "a written commit could not be indexed; rebuilding the index from the segments");
            self.reindex = true;
            if !self.reopen_index() {
                self.tails.clear();
                return Err(e);
            }
        }
        self.tails.clear();
        self.delete_dead_segments()
    }

    /// Reopens the index and re-indexes from the segments everything past the checkpoint,
    /// then lets the commit's tails go of what is indexed now (another stream's written
    /// readings leave its tail at its next commit; reads meanwhile find them in either).
    /// Whether it worked.
    fn reopen_index(&mut self) -> bool {
        if let Err(e) = self.shared.reopen_index() {
            tracing::warn!(error = %e, "the index cannot be reopened yet");
            return false;
        }
        self.reindex = false;
        for tail in &self.tails {
            tail.written_through(tail.written.load(Ordering::Acquire));
        }
        true
    }

    /// Indexes the records just written at `(segment, at)` and moves the checkpoint past
    /// them; then the tails let go of them.
    fn index(&mut self, (segment, at): (u64, u64)) -> Result<(), LogError> {
        let trees = self
            .tails
            .iter()
            .map(|t| self.shared.tree(&t.name))
            .collect::<Result<Vec<_>, _>>()?;
        let meta = self.shared.meta()?;
        for s in &self.staged {
            let entry = IndexEntry {
                loc: Loc {
                    segment,
                    offset: at + s.at as u64,
                    len: s.len,
                },
                count: s.count,
                ts_ms: s.ts_ms,
            };
            trees[s.tail].insert(s.first.to_be_bytes(), &entry.encode())?;
        }
        *self.shared.live.lock().entry(segment).or_default() += self.staged.len() as u64;
        for &(i, r) in &self.reserves {
            raise_reserved(&meta, &self.tails[i].name, r)?;
        }
        if self.checkpointed.elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint()?;
        }
        for (tail, through) in self.tails.iter().zip(&self.through) {
            if let Some(seq) = through {
                tail.written_through(*seq);
            }
        }
        Ok(())
    }

    /// Records that the index covers the log up to the writer's position.
    fn checkpoint(&mut self) -> Result<(), LogError> {
        let (id, end) = self.writer.position();
        self.shared
            .meta()?
            .insert(CHECKPOINT, &checkpoint(id, end))?;
        self.checkpointed = Instant::now();
        Ok(())
    }

    /// A write failed and was cut off: the tails and reservations go back on the list to be
    /// written later (fast), or the readings go (strict; their owners were never told they
    /// were stored, and learn it from `written`).
    fn failed(&mut self) {
        for &(i, r) in &self.reserves {
            let mut pending = self.tails[i].reserve.lock();
            *pending = Some(pending.map_or(r, |p| p.max(r)));
        }
        for (tail, through) in self.tails.iter().zip(&self.through) {
            if let (false, Some(seq)) = (self.keep_failed, through) {
                tail.runs.lock().retain(|r| r.first > *seq);
            }
            self.shared.list(tail);
        }
        self.tails.clear();
        self.shared.dirty.store(true, Ordering::Release);
    }

    /// Whether the disk takes writes again; a good probe makes the store writable. sled
    /// refuses everything once one of its own writes failed, so it is reopened if need be.
    fn probe(&mut self) -> bool {
        if self.writer.probe(self.failed_bytes + PROBE_BYTES).is_err() {
            return false;
        }
        if (self.reindex || !self.shared.index_healthy()) && !self.reopen_index() {
            return false;
        }
        self.writable.store(true, Ordering::Release);
        tracing::info!("the disk takes writes again");
        true
    }

    /// Deletes the segment files retention left with no index entry, once sled has synced
    /// the removals: an index recovered after a crash must not point into a deleted file.
    fn delete_dead_segments(&mut self) -> Result<(), LogError> {
        let (current, _) = self.writer.position();
        let dead: Vec<u64> = self
            .shared
            .live
            .lock()
            .range(..current)
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        self.checkpoint()?;
        self.shared.index(|i| Ok(i.db.flush()?))?;
        self.index_file.sync_data()?;
        for id in dead {
            self.shared.segments.remove(id)?;
            self.shared.live.lock().remove(&id);
        }
        Ok(())
    }
}
