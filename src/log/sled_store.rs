//! The embedded store: one sled database under the data directory.
//!
//! Layout: a tree `stream/<id>` per stream holding records keyed by their big-endian first
//! seq, and a tree `meta` holding each stream's reserved seq high-water mark under
//! `reserved/<id>`.
//!
//! An append does not touch sled: it lands in the stream's in-memory tail, where reads see it
//! at once. The [`Committer`] moves every tail into sled, one record per stream, right before
//! each flush. A sled insert costs a tree descent, a page rewrite and, with sequential keys, a
//! node split every ninth record (its leaves hold 16 entries); profiled under 2,000 producers
//! it was 29 % of the server's CPU at one insert per group commit. Moving tails per flush
//! makes it one insert per stream per flush interval instead.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

use super::commit::Committer;
use super::record::{decode_batch, encode_batch, header};
use super::{Entry, LogError, ReadLimit, Recovered, Store, StreamLog};
use crate::config::Durability;

const STREAM_PREFIX: &str = "stream/";
/// sled's page cache; the log is read mostly at its tail, so a modest cache serves replay.
const CACHE_BYTES: u64 = 256 << 20;
/// Most frame bytes in one stored record (one larger reading is stored alone). sled writes
/// any log message over a quarter of its 512 KiB segment to a separate, never-synced file
/// under `blobs/`, and a leaf node's consolidation (up to 17 records) is one message: 17
/// records of 6 KiB stay under it.
const RECORD_MAX_BYTES: usize = 6 << 10;

pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    committer: Committer,
    pending: Arc<Pending>,
    /// Every stream opened so far: one tail per stream, whoever opens it.
    streams: Mutex<HashMap<String, Arc<SledStream>>>,
}

/// The streams whose tails hold appends not yet in sled.
#[derive(Default)]
pub(super) struct Pending {
    streams: Mutex<Vec<Arc<Tail>>>,
}

impl Pending {
    /// Moves every listed tail into sled; called by the committer before it flushes.
    pub(super) fn move_all(&self) -> Result<(), LogError> {
        let streams = std::mem::take(&mut *self.streams.lock());
        let mut result = Ok(());
        for tail in streams {
            // Cleared first: an append from now on lists the stream again, and one that came
            // just before is moved below.
            tail.listed.store(false, Ordering::SeqCst);
            if let Err(e) = tail.move_to_sled() {
                // Keep it listed so its appends are tried again at the next flush.
                self.list(&tail);
                result = Err(e);
            }
        }
        result
    }

    fn list(&self, tail: &Arc<Tail>) {
        if !tail.listed.swap(true, Ordering::SeqCst) {
            self.streams.lock().push(tail.clone());
        }
    }
}

/// One stream's appends that are not in sled yet, in seq order.
pub(super) struct Tail {
    tree: sled::Tree,
    meta: sled::Tree,
    /// `committed/<stream>`: the newest seq moved into sled, written with every move.
    committed_key: Vec<u8>,
    batches: Mutex<VecDeque<(u64, u64, Vec<Bytes>)>>,
    /// On the [`Pending`] list.
    listed: AtomicBool,
    /// Held while moving: the committer and retention both move, and two moves of one tail
    /// at once could store a shorter record over a longer one.
    moving: Mutex<()>,
}

impl Tail {
    /// Stores the tail as records of consecutive seqs, then drops what was stored. Readers
    /// never miss a reading: it leaves the tail only once it is in sled.
    fn move_to_sled(&self) -> Result<(), LogError> {
        let _moving = self.moving.lock();
        let records = self.records();
        let Some(through) = records
            .last()
            .map(|(first, _, frames)| first + frames.len() as u64 - 1)
        else {
            return Ok(());
        };
        for (first, ts, frames) in &records {
            self.tree
                .insert(first.to_be_bytes(), encode_batch(*ts, frames))?;
        }
        // After the records, in sled's one log: a recovered mark means its records were
        // recovered too, and records past the recovered mark belong to a flush that never
        // finished (see `SledStream::recover`).
        self.meta
            .insert(&self.committed_key, &through.to_be_bytes())?;
        let mut tail = self.batches.lock();
        while tail
            .front()
            .is_some_and(|(first, _, frames)| first + frames.len() as u64 <= through + 1)
        {
            tail.pop_front();
        }
        Ok(())
    }

    /// The tail as records to store: runs of consecutive seqs (a skipped seq block starts a
    /// new one) of at most [`RECORD_MAX_BYTES`], stamped with their newest reading's time so
    /// that age-based retention never drops a reading early. The frames are shared, not
    /// copied.
    fn records(&self) -> Vec<(u64, u64, Vec<Bytes>)> {
        let tail = self.batches.lock();
        let mut records: Vec<(u64, u64, Vec<Bytes>)> = Vec::new();
        let mut bytes = 0;
        for (first, ts, frames) in tail.iter() {
            for (i, frame) in frames.iter().enumerate() {
                let seq = first + i as u64;
                let size = 4 + frame.len();
                match records.last_mut() {
                    Some((start, stamp, run))
                        if *start + run.len() as u64 == seq && bytes + size <= RECORD_MAX_BYTES =>
                    {
                        *stamp = *ts;
                        run.push(frame.clone());
                        bytes += size;
                    }
                    _ => {
                        records.push((seq, *ts, vec![frame.clone()]));
                        bytes = size;
                    }
                }
            }
        }
        records
    }
}

/// Tries at opening a directory whose lock is still held (50 ms apart: 5 s).
const LOCK_RETRIES: u32 = 100;

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        fast_flush: Duration,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir)?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            // Our committer flushes (and fsyncs); sled's own timer would only duplicate it.
            .flush_every_ms(None);
        // sled lets go of its directory's file lock from a background thread after the last
        // handle drops, so a store reopened at once in the same process (a restart in place)
        // can find it still held. Wait for that, boundedly; a directory another process
        // holds stays an error.
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if tries < LOCK_RETRIES && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        let meta = db.open_tree("meta")?;
        // Make the files sled just created durable, directory entries included.
        db.flush()?;
        let data_file = std::fs::File::open(dir.join("db"))?;
        data_file.sync_all()?;
        std::fs::File::open(dir)?.sync_all()?;
        let interval = match durability {
            Durability::Fast => Some(fast_flush),
            Durability::Strict => Some(Duration::from_millis(1000)),
        };
        let pending = Arc::new(Pending::default());
        let committer = Committer::start(
            db.clone(),
            dir.to_path_buf(),
            data_file,
            interval,
            pending.clone(),
        );
        Ok(Self {
            db,
            meta,
            committer,
            pending,
            streams: Mutex::new(HashMap::new()),
        })
    }
}

impl Store for SledStore {
    fn open_stream(&self, stream: &str) -> Result<Arc<dyn StreamLog>, LogError> {
        let mut streams = self.streams.lock();
        if let Some(log) = streams.get(stream) {
            return Ok(log.clone());
        }
        let tree = self.db.open_tree(format!("{STREAM_PREFIX}{stream}"))?;
        let first = match tree.first()? {
            Some((key, _)) => key_seq(stream, &key)?,
            None => 1,
        };
        let log = Arc::new(SledStream {
            name: stream.to_owned(),
            first: AtomicU64::new(first),
            tail: Arc::new(Tail {
                tree: tree.clone(),
                meta: self.meta.clone(),
                committed_key: format!("committed/{stream}").into_bytes(),
                batches: Mutex::new(VecDeque::new()),
                listed: AtomicBool::new(false),
                moving: Mutex::new(()),
            }),
            pending: self.pending.clone(),
            tree,
            reserved_key: format!("reserved/{stream}").into_bytes(),
            dirty: self.committer.dirty.clone(),
        });
        streams.insert(stream.to_owned(), log.clone());
        Ok(log)
    }

    fn commit(&self) -> oneshot::Receiver<Result<(), LogError>> {
        self.committer.request()
    }

    fn writable(&self) -> bool {
        self.committer.writable.load(Ordering::Acquire)
    }

    fn stream_names(&self) -> Vec<String> {
        self.db
            .tree_names()
            .iter()
            .filter_map(|n| {
                std::str::from_utf8(n)
                    .ok()?
                    .strip_prefix(STREAM_PREFIX)
                    .map(str::to_owned)
            })
            .collect()
    }

    fn close(&self) -> Result<(), LogError> {
        self.committer.stop();
        self.db.flush()?;
        Ok(())
    }
}

struct SledStream {
    name: String,
    /// The lowest seq a read can return; raised by retention.
    first: AtomicU64,
    tree: sled::Tree,
    tail: Arc<Tail>,
    pending: Arc<Pending>,
    reserved_key: Vec<u8>,
    dirty: Arc<AtomicBool>,
}

impl SledStream {
    /// Reads sled's records for `start <= seq < before`, at most `max` readings.
    fn read_stored(
        &self,
        start: u64,
        before: u64,
        limit: &mut Budget,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError> {
        if start >= before {
            return Ok(());
        }
        // The record holding `start` begins at or before it.
        let from = match self.tree.range(..=start.to_be_bytes()).next_back() {
            Some(item) => self.key_seq(&item?.0)?,
            None => 0,
        };
        for item in self.tree.range(from.to_be_bytes()..) {
            let (key, value) = item?;
            let first = self.key_seq(&key)?;
            if first >= before {
                break;
            }
            let record = Bytes::from(value.to_vec());
            let (_, frames) = decode_batch(&record).ok_or_else(|| self.corrupt(first))?;
            for (i, frame) in frames.into_iter().enumerate() {
                let seq = first + i as u64;
                if seq < start {
                    continue;
                }
                if seq >= before || !limit.take(frame.len()) {
                    return Ok(());
                }
                out.push(Entry { seq, frame });
            }
        }
        Ok(())
    }

    fn corrupt(&self, seq: u64) -> LogError {
        LogError::Corrupt {
            stream: self.name.clone(),
            seq,
        }
    }

    fn key_seq(&self, key: &[u8]) -> Result<u64, LogError> {
        key_seq(&self.name, key)
    }

    /// Removes the stored records whose first seq is in `first..=last`; returns how many.
    fn remove_records(&self, first: u64, last: u64) -> Result<usize, LogError> {
        let keys: Vec<_> = self
            .tree
            .range(first.to_be_bytes()..=last.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        for key in &keys {
            self.tree.remove(key)?;
        }
        Ok(keys.len())
    }

    /// The newest seq stored (tail included), if any.
    fn last_stored(&self) -> Result<Option<u64>, LogError> {
        if let Some((first, _, frames)) = self.tail.batches.lock().back() {
            return Ok(Some(first + frames.len() as u64 - 1));
        }
        match self.tree.last()? {
            Some((key, value)) => {
                let first = self.key_seq(&key)?;
                let head = header(&value).ok_or_else(|| self.corrupt(first))?;
                Ok(Some(first + u64::from(head.count).saturating_sub(1)))
            }
            None => Ok(None),
        }
    }
}

fn key_seq(stream: &str, key: &[u8]) -> Result<u64, LogError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| LogError::Corrupt {
            stream: stream.to_owned(),
            seq: 0,
        })
}

/// What is left of a [`ReadLimit`] while a read fills its output.
struct Budget {
    entries: usize,
    bytes: usize,
    taken: usize,
}

impl Budget {
    fn new(limit: ReadLimit) -> Self {
        Self {
            entries: limit.entries,
            bytes: limit.bytes,
            taken: 0,
        }
    }

    /// Takes one entry of `len` bytes if the limit allows it.
    fn take(&mut self, len: usize) -> bool {
        if self.entries == 0 || (self.taken > 0 && len > self.bytes) {
            return false;
        }
        self.entries -= 1;
        self.bytes = self.bytes.saturating_sub(len);
        self.taken += 1;
        true
    }
}

impl StreamLog for SledStream {
    fn recover(&self) -> Result<Recovered, LogError> {
        let stored_last = self.last_stored()?.unwrap_or(0);
        // Records past the committed mark were written by a flush that failed (a full
        // disk): they were never dispatched, so they go. Their seqs are not reused.
        if let Some(mark) = self.tail.meta.get(&self.tail.committed_key)? {
            let mark = self.key_seq(&mark)?;
            let stale = self.remove_records(mark.saturating_add(1), u64::MAX)?;
            if stale > 0 {
                tracing::warn!(stream = %self.name, mark, records = stale, "dropped records of a commit that never finished");
            }
        }
        let reserved = match self.tail.meta.get(&self.reserved_key)? {
            Some(v) => self.key_seq(&v)?,
            None => 0,
        };
        let first_seq = match self.tree.first()? {
            Some((key, _)) => Some(self.key_seq(&key)?),
            None => None,
        };
        Ok(Recovered {
            next_seq: stored_last.max(reserved) + 1,
            first_seq,
        })
    }

    fn append(&self, first_seq: u64, ts_ms: u64, frames: &[Bytes]) -> Result<(), LogError> {
        self.tail
            .batches
            .lock()
            .push_back((first_seq, ts_ms, frames.to_vec()));
        self.pending.list(&self.tail);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn discard(&self, first: u64, last: u64) -> Result<(), LogError> {
        let _moving = self.tail.moving.lock();
        self.tail.batches.lock().retain(|(start, _, frames)| {
            let end = start + frames.len() as u64 - 1;
            end < first || *start > last
        });
        // What the failed commit had already moved into sled: records of these seqs only,
        // since in strict mode the tail held nothing else.
        self.remove_records(first, last)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn reserve(&self, through: u64) -> Result<(), LogError> {
        self.tail
            .meta
            .insert(&self.reserved_key, &through.to_be_bytes())?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn read(
        &self,
        after: u64,
        before: u64,
        limit: ReadLimit,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError> {
        let Some(start) = after.checked_add(1) else {
            return Ok(());
        };
        let start = start.max(self.first.load(Ordering::Acquire));
        if start >= before || limit.entries == 0 {
            return Ok(());
        }
        // The tail first: whatever leaves it before sled is read below is in sled by then.
        // Its entries are counted against the limit only after sled's, which come first.
        let mut from_tail = Vec::new();
        let tail_first = {
            let tail = self.tail.batches.lock();
            'batches: for (first, _, frames) in tail.iter() {
                for (i, frame) in frames.iter().enumerate() {
                    let seq = first + i as u64;
                    if seq >= before || from_tail.len() == limit.entries {
                        break 'batches;
                    }
                    if seq >= start {
                        from_tail.push(Entry {
                            seq,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            tail.front().map(|(first, _, _)| *first)
        };
        let stored_before = tail_first.map_or(before, |t| before.min(t));
        let mut budget = Budget::new(limit);
        self.read_stored(start, stored_before, &mut budget, out)?;
        for entry in from_tail {
            if !budget.take(entry.frame.len()) {
                break;
            }
            out.push(entry);
        }
        Ok(())
    }

    fn first_seq(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    fn trim(&self, keep_last: u64, older_than_ms: u64) -> Result<u64, LogError> {
        // Retention counts whole stored records; the tail becomes one first.
        self.tail.move_to_sled()?;
        let Some(newest) = self.last_stored()? else {
            return Ok(0);
        };
        let through_seq = if keep_last == 0 {
            0
        } else {
            newest.saturating_sub(keep_last)
        };
        let mut removed = 0u64;
        for item in self.tree.iter() {
            let (key, value) = item?;
            let first = self.key_seq(&key)?;
            let head = header(&value).ok_or_else(|| self.corrupt(first))?;
            let last = first + u64::from(head.count).saturating_sub(1);
            if last > through_seq && head.ts_ms >= older_than_ms {
                break;
            }
            // Readers stop below the new floor before the record goes.
            self.first.fetch_max(last + 1, Ordering::AcqRel);
            self.tree.remove(&key)?;
            removed += u64::from(head.count);
        }
        if removed > 0 {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(from: u64, n: u64) -> Vec<Bytes> {
        (from..from + n)
            .map(|s| Bytes::from(format!("f{s}")))
            .collect()
    }

    fn seqs(log: &dyn StreamLog, after: u64, before: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let limit = ReadLimit {
            entries: max,
            bytes: usize::MAX,
        };
        log.read(after, before, limit, &mut out).unwrap();
        for e in &out {
            assert_eq!(e.frame, Bytes::from(format!("f{}", e.seq)));
        }
        out.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn append_read_recover_and_trim() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store =
                SledStore::open(dir.path(), Durability::Strict, Duration::from_millis(5)).unwrap();
            let log = store.open_stream("acme").unwrap();
            assert_eq!(
                log.recover().unwrap(),
                Recovered {
                    next_seq: 1,
                    first_seq: None
                }
            );
            // Appends are readable at once, from the tail; a commit moves them into sled as
            // one record, and reads then span sled and the tail alike.
            log.append(1, 100, &frames(1, 3)).unwrap();
            assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![1, 2, 3]);
            store.commit().await.unwrap().unwrap();
            log.append(4, 200, &frames(4, 4)).unwrap();
            assert_eq!(seqs(&*log, 2, u64::MAX, 3), vec![3, 4, 5]);
            assert_eq!(seqs(&*log, 0, 3, 100), vec![1, 2]);
            assert_eq!(seqs(&*log, 4, 7, 100), vec![5, 6]);
            store.commit().await.unwrap().unwrap();
            assert_eq!(seqs(&*log, 0, u64::MAX, 100), (1..=7).collect::<Vec<_>>());
            assert_eq!(seqs(&*log, 2, 6, 100), vec![3, 4, 5]);
            assert_eq!(seqs(&*log, 4, u64::MAX, 2), vec![5, 6]);
            assert_eq!(seqs(&*log, 7, u64::MAX, 10), Vec::<u64>::new());
            assert_eq!(seqs(&*log, 3, 4, 10), Vec::<u64>::new());
            assert_eq!(store.stream_names(), vec!["acme".to_string()]);
            store.close().unwrap();
        }
        let store =
            SledStore::open(dir.path(), Durability::Strict, Duration::from_millis(5)).unwrap();
        let log = store.open_stream("acme").unwrap();
        assert_eq!(
            log.recover().unwrap(),
            Recovered {
                next_seq: 8,
                first_seq: Some(1)
            }
        );
        // A reservation beyond the tail wins: seqs handed out in fast mode are never reused.
        log.reserve(1000).unwrap();
        assert_eq!(log.recover().unwrap().next_seq, 1001);
        // Trim by count keeps whole records (one per commit here): keeping the last 2
        // readings keeps their record, so seqs 1..=3 go, 4..=7 stay. The reservation does
        // not count.
        assert_eq!(log.trim(2, 0).unwrap(), 3);
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![4, 5, 6, 7]);
        assert_eq!(log.first_seq(), 4);
        // Trim by age.
        assert_eq!(log.trim(0, 201).unwrap(), 4);
        assert!(seqs(&*log, 0, u64::MAX, 100).is_empty());
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_tail_with_a_gap_is_stored_as_separate_records() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SledStore::open(dir.path(), Durability::Fast, Duration::from_millis(5)).unwrap();
        let log = store.open_stream("acme").unwrap();
        log.append(1, 100, &frames(1, 2)).unwrap();
        // A seq block skipped after a store failure leaves a gap.
        log.append(10, 100, &frames(10, 2)).unwrap();
        store.commit().await.unwrap().unwrap();
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![1, 2, 10, 11]);
        // Two records: keeping the last 9 seqs (3..=11) removes exactly the first.
        assert_eq!(log.trim(9, 0).unwrap(), 2);
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![10, 11]);
        store.close().unwrap();
    }

    /// Fast durability reserves seqs a block ahead of the newest reading; retention by
    /// count must count from what is stored, or it removes the whole stream.
    #[tokio::test]
    async fn fast_mode_retention_counts_stored_seqs_not_reserved_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SledStore::open(dir.path(), Durability::Fast, Duration::from_millis(5)).unwrap();
        let log = store.open_stream("acme").unwrap();
        log.reserve(20_000 + (1 << 16)).unwrap();
        for first in (1..=20_000).step_by(1000) {
            log.append(first, 100, &frames(first, 1000)).unwrap();
            store.commit().await.unwrap().unwrap();
        }
        // Retention sees the same log as the owner, whoever opens it.
        let again = store.open_stream("acme").unwrap();
        assert_eq!(again.trim(10_000, 0).unwrap(), 10_000);
        let kept = seqs(&*log, 0, u64::MAX, 100_000);
        assert_eq!(kept, (10_001..=20_000).collect::<Vec<_>>());
        assert_eq!(log.first_seq(), 10_001);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn reads_stop_at_their_byte_limit_but_return_at_least_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SledStore::open(dir.path(), Durability::Fast, Duration::from_millis(5)).unwrap();
        let log = store.open_stream("acme").unwrap();
        log.append(1, 100, &frames(1, 5)).unwrap();
        store.commit().await.unwrap().unwrap();
        log.append(6, 100, &frames(6, 5)).unwrap();
        let mut out = Vec::new();
        let limit = ReadLimit {
            entries: 100,
            bytes: 5,
        };
        // Each frame is "fN": 2 bytes, so two fit in 5 bytes, from sled and from the tail.
        log.read(0, u64::MAX, limit, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        out.clear();
        log.read(4, u64::MAX, limit, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
        out.clear();
        let tiny = ReadLimit {
            entries: 100,
            bytes: 0,
        };
        log.read(7, u64::MAX, tiny, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![8]);
        store.close().unwrap();
    }

    /// sled writes a log message larger than a quarter of its segment (a record, or a leaf
    /// node holding several) to a file of its own under `blobs/`, which its flush never
    /// syncs. Records are kept small enough that none ever is.
    #[tokio::test]
    async fn large_commits_leave_no_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SledStore::open(dir.path(), Durability::Fast, Duration::from_millis(5)).unwrap();
        let log = store.open_stream("acme").unwrap();
        let reading = Bytes::from(vec![b'x'; 100]);
        let mut next = 1;
        for _ in 0..50 {
            log.append(next, 100, &vec![reading.clone(); 4096]).unwrap();
            next += 4096;
            store.commit().await.unwrap().unwrap();
        }
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0, "sled wrote blob files");
        let mut out = Vec::new();
        let all = ReadLimit {
            entries: usize::MAX,
            bytes: usize::MAX,
        };
        log.read(0, u64::MAX, all, &mut out).unwrap();
        assert_eq!(out.len(), 50 * 4096);
        // A reading too large for any record goes to a blob, which the commit syncs.
        let big = Bytes::from(vec![b'y'; 300 << 10]);
        log.append(next, 100, std::slice::from_ref(&big)).unwrap();
        store.commit().await.unwrap().unwrap();
        out.clear();
        log.read(next - 1, u64::MAX, all, &mut out).unwrap();
        assert_eq!(out[0].frame, big);
        store.close().unwrap();
    }
}
