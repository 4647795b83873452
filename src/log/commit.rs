//! Group commit: one thread that turns many "make it durable" requests into one flush.
//!
//! Owns the flush thread of a [`super::SledStore`]. Stream owners ask for a commit and await
//! the answer; every request that arrives while a flush runs shares the next one. Each flush
//! first moves the streams' in-memory tails into sled, then flushes and syncs. In fast
//! durability the same thread also flushes on a timer whenever something was appended.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::sled_store::Pending;
use super::LogError;

type Waiter = oneshot::Sender<Result<(), LogError>>;

pub(super) struct Committer {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Waiter>>>,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// Set by every append, cleared by every flush: the timer flushes only when it is set.
    pub(super) dirty: Arc<AtomicBool>,
    /// Cleared by a failed flush, set by a good one.
    pub(super) writable: Arc<AtomicBool>,
}

impl Committer {
    /// Starts the flush thread. `interval` is the timed flush of fast durability.
    pub(super) fn start(
        db: sled::Db,
        dir: PathBuf,
        data_file: File,
        interval: Option<Duration>,
        pending: Arc<Pending>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let dirty = Arc::new(AtomicBool::new(false));
        let writable = Arc::new(AtomicBool::new(true));
        let store = Flush {
            writable: writable.clone(),
            db,
            data_file,
            blobs: dir.join("blobs"),
            synced_blobs: HashSet::new(),
            dirty: dirty.clone(),
            pending,
        };
        let thread = std::thread::Builder::new()
            .name("sensorgate-commit".into())
            .spawn(move || run(store, rx, interval))
            .expect("the commit thread starts");
        Self {
            tx: parking_lot::Mutex::new(Some(tx)),
            thread: parking_lot::Mutex::new(Some(thread)),
            dirty,
            writable,
        }
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

    /// Stops the thread after a last flush.
    pub(super) fn stop(&self) {
        self.tx.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// What one flush touches.
struct Flush {
    writable: Arc<AtomicBool>,
    db: sled::Db,
    data_file: File,
    /// sled's directory of values too large for its log.
    blobs: PathBuf,
    /// Blob files already synced.
    synced_blobs: HashSet<OsString>,
    dirty: Arc<AtomicBool>,
    pending: Arc<Pending>,
}

fn run(mut store: Flush, rx: mpsc::Receiver<Waiter>, interval: Option<Duration>) {
    let mut waiters: Vec<Waiter> = Vec::new();
    loop {
        let first = match interval {
            Some(every) => rx.recv_timeout(every),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match first {
            Ok(w) => waiters.push(w),
            Err(RecvTimeoutError::Timeout) => {
                if !store.dirty.load(Ordering::Acquire) {
                    continue;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if let Err(e) = store.flush() {
                    tracing::error!(error = %e, "final flush failed");
                }
                return;
            }
        }
        waiters.extend(rx.try_iter());
        let result = store.flush();
        // sled refuses every write after an I/O error until it is reopened, so a store that
        // failed stays unwritable (and `/readyz` 503) until the restart; no retry loop.
        let was_writable = store.writable.swap(result.is_ok(), Ordering::AcqRel);
        if let Err(e) = &result {
            crate::metrics::handles().store_errors.increment(1);
            if was_writable {
                tracing::error!(error = %e, "group commit failed; /readyz is 503 until a restart");
            }
        }
        for w in waiters.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(LogError::Io(std::io::Error::other(e.to_string()))),
            };
            let _ = w.send(answer);
        }
    }
}

impl Flush {
    /// sled's own flush uses `sync_file_range`, which neither writes metadata nor flushes the
    /// device cache; the explicit `fdatasync` of its data file is what survives a power cut.
    fn flush(&mut self) -> Result<(), LogError> {
        self.dirty.store(false, Ordering::Release);
        self.pending.move_all()?;
        let started = Instant::now();
        self.db.flush()?;
        self.data_file.sync_data()?;
        self.sync_blobs()?;
        crate::metrics::handles()
            .fsync_seconds
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// sled writes a value too large for its log (a reading near `max_frame_bytes`, whose
    /// leaf then outgrows a quarter segment) to a file of its own and never syncs it or its
    /// directory; the commit depends on it, so it is synced here. Records are sized so that
    /// this is rare (see `sled_store`); when nothing new is there it costs one `readdir`.
    fn sync_blobs(&mut self) -> Result<(), LogError> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut created = false;
        for entry in entries {
            let entry = entry?;
            // Blob names are log offsets, never reused: one entry per blob ever written.
            if !self.synced_blobs.contains(&entry.file_name()) {
                File::open(entry.path())?.sync_all()?;
                self.synced_blobs.insert(entry.file_name());
                created = true;
            }
        }
        if created {
            File::open(&self.blobs)?.sync_all()?;
            if let Some(parent) = self.blobs.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(())
    }
}
