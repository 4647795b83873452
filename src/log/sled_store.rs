//! The embedded store: readings in segment files, found again through an index in sled.
//!
//! Layout under the data directory: sled's files, and `segments/` (see `segment.rs`). sled
//! holds a tree `stream/<id>` per stream mapping each record's big-endian first seq to where
//! it lies ([`IndexEntry`]), and a tree `meta` with each stream's reserved seq high-water
//! mark under `reserved/<id>` and the log position the index covers under `checkpoint`.
//!
//! The segment files are the truth; sled is a cache of where things are. A commit writes and
//! syncs the records first, then indexes them and moves the checkpoint; sled persists on its
//! own timer, in order, so whatever prefix of its updates a crash leaves, recovery re-reads
//! the segments from the recovered checkpoint and indexes what follows. Retention removes
//! index entries, and a segment file goes only once no entry points into it and sled has
//! been synced: an index that survives a crash never points into a deleted file.
//!
//! Why not the readings in sled itself, as before: sled rewrites a leaf page per insert and
//! writes any value over a quarter of its 512 KiB segment to an unsynced file of its own, and
//! records kept under that threshold spent two thirds of the server's CPU in sled's flush
//! machinery at 10,000 readings/s in strict mode. BENCHMARKS.md has the figures against this
//! layout.
//!
//! An append does not touch the disk: it lands in the stream's in-memory tail, where reads
//! see it at once (the stream's owner holds readers at its durable mark). The [`Committer`]
//! writes every tail in one go at each flush.

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

use super::commit::Committer;
use super::segment::{self, Item, Loc, Segments};
use super::{Entry, LogError, ReadLimit, Recovered, Store, StreamLog};
use crate::config::Durability;

const STREAM_PREFIX: &str = "stream/";
/// sled's page cache: it holds only the index, 32 bytes per record.
const CACHE_BYTES: u64 = 32 << 20;
/// Most frame bytes in one record (one larger reading is stored alone): the unit a read of
/// the log fetches, so a consumer catching up on a few readings does not read megabytes.
const RECORD_MAX_BYTES: usize = 64 << 10;
/// Appends waiting for a commit past this many bytes ask for one before fast mode's timer
/// does. A commit's frames, its buffer and the kernel's copy of it then stay within a core's
/// 2 MiB L2 cache here: a 5 ms timer alone let commits grow to megabytes as fast as
/// possible, read back cold, and the server spent 1.2x the CPU per reading that a 1 ms
/// timer cost (BENCHMARKS.md, issue 10).
const EARLY_COMMIT_BYTES: usize = 256 << 10;
/// `meta` keys.
pub(super) const CHECKPOINT: &[u8] = b"checkpoint";
const PROBE: &[u8] = b"probe";
const FORMAT: &[u8] = b"format";
/// The on-disk layout this code reads; a directory written by another is refused.
const FORMAT_VERSION: u64 = 2;
/// How often sled persists the index in the background. Its durability is not what commits
/// rely on (see above); it bounds how much of the log a restart re-reads.
const INDEX_FLUSH_MS: u64 = 1000;

pub struct SledStore {
    committer: Arc<Committer>,
    shared: Arc<Shared>,
    /// Every stream opened so far: one tail per stream, whoever opens it.
    streams: Mutex<HashMap<String, Arc<SledStream>>>,
}

/// sled's handles. sled refuses every operation after one of its writes failed (a full
/// disk) until it is opened again; the commit thread does that in place (see
/// [`Shared::reopen_index`]), so the handles are reached through [`Shared`], never kept.
pub(super) struct Index {
    pub(super) db: sled::Db,
    pub(super) meta: sled::Tree,
}

/// What the store, its streams and the commit thread share.
pub(super) struct Shared {
    dir: std::path::PathBuf,
    /// `None` only while it is being reopened.
    index: RwLock<Option<Index>>,
    pub(super) segments: Arc<Segments>,
    /// The streams whose tails hold appends not yet written.
    pending: Mutex<Vec<Arc<Tail>>>,
    /// Index entries pointing into each segment file; a file at zero (and not the one
    /// being written) can go.
    pub(super) live: Mutex<BTreeMap<u64, u64>>,
    /// Set by every append and by retention, cleared by every flush.
    pub(super) dirty: AtomicBool,
    /// The frame bytes appended since the last flush took the tails.
    pub(super) pending_bytes: AtomicUsize,
}

impl Shared {
    /// Runs `f` on the index; an index being reopened cannot be used.
    pub(super) fn index<T>(
        &self,
        f: impl FnOnce(&Index) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        match &*self.index.read() {
            Some(index) => f(index),
            None => Err(LogError::NotWritable),
        }
    }

    pub(super) fn meta(&self) -> Result<sled::Tree, LogError> {
        self.index(|i| Ok(i.meta.clone()))
    }

    /// The index of one stream.
    pub(super) fn tree(&self, stream: &str) -> Result<sled::Tree, LogError> {
        self.index(|i| Ok(i.db.open_tree(format!("{STREAM_PREFIX}{stream}"))?))
    }

    /// Whether sled still takes writes: after a failed write of its own it refuses all.
    pub(super) fn index_healthy(&self) -> bool {
        self.index(|i| {
            i.meta.insert(PROBE, &[][..])?;
            i.db.flush()?;
            Ok(())
        })
        .is_ok()
    }

    /// Opens sled again in place after it failed, and re-indexes from the segments what it
    /// had not persisted. Readers get an error meanwhile (their consumers 1011).
    pub(super) fn reopen_index(&self) -> Result<(), LogError> {
        // Dropped before the new one opens: sled holds a lock on its directory.
        drop(self.index.write().take());
        *self.index.write() = Some(open_index(&self.dir)?);
        recover_log(self, false)?;
        count_live(self)?;
        tracing::warn!("reopened the index after a failed write");
        Ok(())
    }

    /// The tails with something to write, each taken off the list (an append from now on
    /// lists its stream again).
    pub(super) fn take_pending(&self) -> Vec<Arc<Tail>> {
        let tails = std::mem::take(&mut *self.pending.lock());
        for tail in &tails {
            tail.listed.store(false, Ordering::SeqCst);
        }
        tails
    }

    pub(super) fn list(&self, tail: &Arc<Tail>) {
        if !tail.listed.swap(true, Ordering::SeqCst) {
            self.pending.lock().push(tail.clone());
        }
    }
}

/// Where one stored record is, and what retention needs to know of it without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IndexEntry {
    pub loc: Loc,
    pub count: u32,
    pub ts_ms: u64,
}

impl IndexEntry {
    const LEN: usize = 32;

    pub(super) fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0..8].copy_from_slice(&self.loc.segment.to_le_bytes());
        v[8..16].copy_from_slice(&self.loc.offset.to_le_bytes());
        v[16..20].copy_from_slice(&self.loc.len.to_le_bytes());
        v[20..24].copy_from_slice(&self.count.to_le_bytes());
        v[24..32].copy_from_slice(&self.ts_ms.to_le_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| Some(u64::from_le_bytes(v.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(v.get(i..i + 4)?.try_into().ok()?));
        (v.len() == Self::LEN).then_some(())?;
        Some(Self {
            loc: Loc {
                segment: u64_at(0)?,
                offset: u64_at(8)?,
                len: u32_at(16)?,
            },
            count: u32_at(20)?,
            ts_ms: u64_at(24)?,
        })
    }
}

/// One run of consecutive readings appended by the stream's owner.
#[derive(Clone)]
pub(super) struct Run {
    pub first: u64,
    pub ts_ms: u64,
    pub frames: Arc<[Bytes]>,
}

impl Run {
    pub(super) fn last(&self) -> u64 {
        self.first + self.frames.len() as u64 - 1
    }
}

/// One stream's appends that are not written yet, in seq order, and what the commit thread
/// needs to write and index them.
pub(super) struct Tail {
    pub(super) name: String,
    pub(super) runs: Mutex<VecDeque<Run>>,
    /// A reservation to write with the next flush.
    pub(super) reserve: Mutex<Option<u64>>,
    /// On the pending list.
    listed: AtomicBool,
    /// The newest seq a successful commit wrote.
    pub(super) written: AtomicU64,
    /// The highest reservation a successful commit wrote (the index may not have it yet).
    pub(super) reserved: AtomicU64,
}

/// The commit thread's buffers for [`Tail::encode`], kept from commit to commit.
#[derive(Default)]
pub(super) struct Scratch {
    runs: Vec<Run>,
}

impl Scratch {
    /// Lets go of the frames, keeping the capacity.
    pub(super) fn clear(&mut self) {
        self.runs.clear();
    }
}

impl Tail {
    /// Encodes the tail into `buf` as records of consecutive seqs (a skipped seq block
    /// starts a new one) of at most [`RECORD_MAX_BYTES`], each stamped with its newest
    /// reading's time so that age-based retention never drops a reading early. Readings a
    /// commit already wrote (still here because their index update failed) are skipped. Calls
    /// `staged` with each record's first seq, count, stamp and place in `buf`; returns the
    /// newest seq encoded.
    pub(super) fn encode(
        &self,
        buf: &mut Vec<u8>,
        scratch: &mut Scratch,
        mut staged: impl FnMut(u64, u32, u64, usize, u32),
    ) -> Option<u64> {
        let runs = &mut scratch.runs;
        runs.clear();
        runs.extend(self.runs.lock().iter().cloned());
        let through = runs.last().map(Run::last);
        let written = self.written.load(Ordering::Acquire);
        // The record being written, and the stamp of its newest reading.
        let mut open: Option<(segment::ReadingsWriter, u64)> = None;
        let mut close = |open: Option<(segment::ReadingsWriter, u64)>, buf: &mut Vec<u8>| {
            if let Some((record, ts)) = open {
                let (first, count) = (record.first_seq(), record.count());
                let (at, len) = record.finish(buf, ts);
                staged(first, count, ts, at, len);
            }
        };
        for run in runs.iter() {
            for (i, frame) in run.frames.iter().enumerate() {
                let seq = run.first + i as u64;
                if seq <= written {
                    continue;
                }
                let joins = open.as_ref().is_some_and(|(record, _)| {
                    record.next_seq() == seq
                        && record.bytes(buf) + 4 + frame.len() <= RECORD_MAX_BYTES
                });
                if !joins {
                    close(open.take(), buf);
                    open = Some((segment::ReadingsWriter::begin(buf, &self.name, seq), 0));
                }
                let (record, ts) = open.as_mut().expect("a record is open");
                record.push(buf, frame);
                *ts = run.ts_ms;
            }
        }
        close(open, buf);
        through
    }

    /// Drops what a commit wrote (through `seq`) from the tail: reads find it indexed now.
    pub(super) fn written_through(&self, seq: u64) {
        self.written.fetch_max(seq, Ordering::AcqRel);
        let mut runs = self.runs.lock();
        while runs.front().is_some_and(|r| r.last() <= seq) {
            runs.pop_front();
        }
    }
}

/// Tries at opening a directory whose lock is still held (50 ms apart: 5 s).
const LOCK_RETRIES: u32 = 100;

impl SledStore {
    /// Opens (or creates) the store in `dir`, recovering the log's tail after a crash.
    pub fn open(
        dir: &Path,
        durability: Durability,
        fast_flush: Duration,
    ) -> Result<Self, LogError> {
        Self::open_with(dir, durability, fast_flush, segment::SEGMENT_BYTES)
    }

    /// Gives the commit thread the nice value `nice` (config `commit_thread_nice`); an
    /// error says the process may not (no `CAP_SYS_NICE`) and leaves it as it was.
    pub fn set_commit_nice(&self, nice: i32) -> std::io::Result<()> {
        self.committer.set_nice(nice)
    }

    fn open_with(
        dir: &Path,
        durability: Durability,
        fast_flush: Duration,
        segment_bytes: u64,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir)?;
        let index = open_index(dir)?;
        let seg_dir = dir.join("segments");
        std::fs::create_dir_all(&seg_dir)?;
        let data_file = std::fs::File::open(dir.join("db"))?;
        data_file.sync_all()?;
        segment::sync_dir(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            index: RwLock::new(Some(index)),
            segments: Arc::new(Segments::new(seg_dir, segment_bytes)),
            pending: Mutex::new(Vec::new()),
            live: Mutex::new(BTreeMap::new()),
            dirty: AtomicBool::new(false),
            pending_bytes: AtomicUsize::new(0),
        });
        let (segment_id, end) = recover_log(&shared, true)?;
        count_live(&shared)?;
        let interval = match durability {
            Durability::Fast => fast_flush,
            Durability::Strict => Duration::from_millis(1000),
        };
        let committer = Arc::new(Committer::start(
            shared.clone(),
            data_file,
            segment::Writer::open(shared.segments.clone(), segment_id, end)?,
            interval,
            durability,
        ));
        Ok(Self {
            committer,
            shared,
            streams: Mutex::new(HashMap::new()),
        })
    }
}

/// Opens sled in `dir` with its `meta` tree, checking the format.
fn open_index(dir: &Path) -> Result<Index, LogError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(Some(INDEX_FLUSH_MS));
    // sled lets go of its directory's file lock from a background thread after the last
    // handle drops, so a store reopened at once in the same process (a restart in place, or
    // the index after a failed write) can find it still held. Wait for that, boundedly; a
    // directory another process holds stays an error.
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
    check_format(&db, &meta)?;
    // Make the files sled just created durable.
    db.flush()?;
    Ok(Index { db, meta })
}

/// A new directory gets the current format; one with streams but another format is refused
/// rather than misread.
fn check_format(db: &sled::Db, meta: &sled::Tree) -> Result<(), LogError> {
    match meta.get(FORMAT)? {
        Some(v) if v.as_ref() == FORMAT_VERSION.to_be_bytes() => Ok(()),
        Some(_) => Err(LogError::Format),
        None if db
            .tree_names()
            .iter()
            .any(|n| n.starts_with(STREAM_PREFIX.as_bytes())) =>
        {
            Err(LogError::Format)
        }
        None => {
            meta.insert(FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            Ok(())
        }
    }
}

/// Indexes whatever the segments hold past the checkpoint, cutting a torn write off the
/// newest file; returns where the writer carries on.
fn recover_log(shared: &Shared, cut: bool) -> Result<(u64, u64), LogError> {
    let (db, meta) = shared.index(|i| Ok((i.db.clone(), i.meta.clone())))?;
    let (from_id, from_at) = match meta.get(CHECKPOINT)? {
        Some(v) if v.len() == 16 => (
            u64::from_be_bytes(v[0..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(v[8..16].try_into().expect("8 bytes")),
        ),
        _ => (1, 0),
    };
    let ids = shared.segments.ids()?;
    let newest = ids.last().copied();
    let mut end = (from_id.max(1), 0);
    let mut trees: HashMap<String, sled::Tree> = HashMap::new();
    for &id in ids.iter().filter(|&&id| id >= from_id) {
        let from = if id == from_id { from_at } else { 0 };
        let at = shared.segments.scan(
            id,
            from,
            cut && Some(id) == newest,
            |loc, item| match item {
                Item::Readings {
                    stream,
                    first_seq,
                    head,
                } => {
                    let tree = match trees.get(stream) {
                        Some(t) => t.clone(),
                        None => {
                            let t = db.open_tree(format!("{STREAM_PREFIX}{stream}"))?;
                            trees.insert(stream.to_owned(), t.clone());
                            t
                        }
                    };
                    let entry = IndexEntry {
                        loc,
                        count: head.count,
                        ts_ms: head.ts_ms,
                    };
                    tree.insert(first_seq.to_be_bytes(), &entry.encode())?;
                    Ok(())
                }
                Item::Reserve { stream, through } => {
                    raise_reserved(&meta, stream, through)?;
                    Ok(())
                }
            },
        )?;
        end = (id, at);
    }
    if let Some(newest) = newest {
        if newest > end.0 {
            // Files past the checkpoint's were all scanned above; this one only when the
            // checkpoint names a later file than any present (a wiped directory).
            end = (newest, 0);
        }
    }
    meta.insert(CHECKPOINT, &checkpoint(end.0, end.1))?;
    Ok(end)
}

pub(super) fn checkpoint(segment: u64, at: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[0..8].copy_from_slice(&segment.to_be_bytes());
    v[8..16].copy_from_slice(&at.to_be_bytes());
    v
}

/// Stores a reservation unless a higher one is there.
/// `meta` key of a stream's reserved seq high-water mark.
fn reserved_key(stream: &str) -> String {
    format!("reserved/{stream}")
}

pub(super) fn raise_reserved(
    meta: &sled::Tree,
    stream: &str,
    through: u64,
) -> Result<(), LogError> {
    let key = reserved_key(stream);
    let old = meta
        .get(&key)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0);
    if through > old {
        meta.insert(key, &through.to_be_bytes())?;
    }
    Ok(())
}

/// Counts the index entries per segment file, dropping any that point into a file that is
/// gone (its deletion reached the disk, the index's did not).
fn count_live(shared: &Shared) -> Result<(), LogError> {
    let present: std::collections::HashSet<u64> = shared.segments.ids()?.into_iter().collect();
    let db = shared.index(|i| Ok(i.db.clone()))?;
    let mut live = shared.live.lock();
    live.clear();
    live.extend(present.iter().map(|&id| (id, 0)));
    for name in db.tree_names() {
        if !name.starts_with(STREAM_PREFIX.as_bytes()) {
            continue;
        }
        let tree = db.open_tree(&name)?;
        for item in tree.iter() {
            let (key, value) = item?;
            match IndexEntry::decode(&value) {
                Some(e) if present.contains(&e.loc.segment) => {
                    *live.entry(e.loc.segment).or_default() += 1;
                }
                _ => {
                    tracing::warn!(stream = %String::from_utf8_lossy(&name), "dropping an index entry whose segment is gone");
                    tree.remove(key)?;
                }
            }
        }
    }
    Ok(())
}

impl Store for SledStore {
    fn open_stream(&self, stream: &str) -> Result<Arc<dyn StreamLog>, LogError> {
        let mut streams = self.streams.lock();
        if let Some(log) = streams.get(stream) {
            return Ok(log.clone());
        }
        let tree = self.shared.tree(stream)?;
        let first = match tree.first()? {
            Some((key, _)) => key_seq(stream, &key)?,
            None => 1,
        };
        let log = Arc::new(SledStream {
            first: AtomicU64::new(first),
            tail: Arc::new(Tail {
                name: stream.to_owned(),
                runs: Mutex::new(VecDeque::new()),
                reserve: Mutex::new(None),
                listed: AtomicBool::new(false),
                written: AtomicU64::new(0),
                reserved: AtomicU64::new(0),
            }),
            shared: self.shared.clone(),
            committer: self.committer.clone(),
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
        let Ok(db) = self.shared.index(|i| Ok(i.db.clone())) else {
            return Vec::new();
        };
        db.tree_names()
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
        self.shared.index(|i| Ok(i.db.flush()?))?;
        Ok(())
    }
}

struct SledStream {
    /// The lowest seq a read can return; raised by retention.
    first: AtomicU64,
    tail: Arc<Tail>,
    shared: Arc<Shared>,
    /// Asked for a commit once the appends waiting for one pass [`EARLY_COMMIT_BYTES`].
    committer: Arc<Committer>,
}

impl SledStream {
    /// Reads the indexed records for `start <= seq < before`, within `limit`.
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
        let tree = self.tree()?;
        // The record holding `start` begins at or before it.
        let from = match tree.range(..=start.to_be_bytes()).next_back() {
            Some(item) => self.key_seq(&item?.0)?,
            None => 0,
        };
        for item in tree.range(from.to_be_bytes()..) {
            let (key, value) = item?;
            let first = self.key_seq(&key)?;
            if first >= before {
                break;
            }
            let entry = IndexEntry::decode(&value).ok_or_else(|| self.corrupt(first))?;
            if first + u64::from(entry.count) <= start {
                continue;
            }
            let Some((_, frames)) = self
                .shared
                .segments
                .read(entry.loc, &self.tail.name, first)?
            else {
                // Retention removed it since the index was read.
                continue;
            };
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

    fn tree(&self) -> Result<sled::Tree, LogError> {
        self.shared.tree(&self.tail.name)
    }

    fn corrupt(&self, seq: u64) -> LogError {
        LogError::Corrupt {
            stream: self.tail.name.clone(),
            seq,
        }
    }

    fn key_seq(&self, key: &[u8]) -> Result<u64, LogError> {
        key_seq(&self.tail.name, key)
    }

    /// The newest seq stored (tail included), if any.
    fn last_stored(&self) -> Result<Option<u64>, LogError> {
        if let Some(run) = self.tail.runs.lock().back() {
            return Ok(Some(run.last()));
        }
        match self.tree()?.last()? {
            Some((key, value)) => {
                let first = self.key_seq(&key)?;
                let entry = IndexEntry::decode(&value).ok_or_else(|| self.corrupt(first))?;
                Ok(Some(first + u64::from(entry.count).saturating_sub(1)))
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
        let reserved = match self.shared.meta()?.get(reserved_key(&self.tail.name))? {
            Some(v) => self.key_seq(&v)?,
            None => 0,
        }
        .max(self.tail.reserved.load(Ordering::Acquire));
        let first_seq = match self.tree()?.first()? {
            Some((key, _)) => Some(self.key_seq(&key)?),
            None => None,
        };
        Ok(Recovered {
            next_seq: stored_last.max(reserved) + 1,
            first_seq,
        })
    }

    fn append(&self, first_seq: u64, ts_ms: u64, frames: &[Bytes]) -> Result<(), LogError> {
        self.tail.runs.lock().push_back(Run {
            first: first_seq,
            ts_ms,
            frames: Arc::from(frames),
        });
        self.shared.list(&self.tail);
        self.shared.dirty.store(true, Ordering::Release);
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        let before = self.shared.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before < EARLY_COMMIT_BYTES && before + bytes >= EARLY_COMMIT_BYTES {
            // Nobody waits for the answer: the commit is what was wanted.
            drop(self.committer.request());
        }
        Ok(())
    }

    fn discard(&self, first: u64, last: u64) -> Result<(), LogError> {
        self.tail
            .runs
            .lock()
            .retain(|r| r.last() < first || r.first > last);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.tail.written.load(Ordering::Acquire)
    }

    fn reserve(&self, through: u64) -> Result<(), LogError> {
        *self.tail.reserve.lock() = Some(through);
        self.shared.list(&self.tail);
        self.shared.dirty.store(true, Ordering::Release);
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
        // The tail first: whatever leaves it before the index is read below is indexed by
        // then. Its entries are counted against the limit only after the index's, which
        // come first.
        let mut from_tail = Vec::new();
        let tail_first = {
            let tail = self.tail.runs.lock();
            'runs: for run in tail.iter() {
                for (i, frame) in run.frames.iter().enumerate() {
                    let seq = run.first + i as u64;
                    if seq >= before || from_tail.len() == limit.entries {
                        break 'runs;
                    }
                    if seq >= start {
                        from_tail.push(Entry {
                            seq,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            tail.front().map(|r| r.first)
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
        let Some(newest) = self.last_stored()? else {
            return Ok(0);
        };
        let through_seq = if keep_last == 0 {
            0
        } else {
            newest.saturating_sub(keep_last)
        };
        let mut removed = 0u64;
        let tree = self.tree()?;
        for item in tree.iter() {
            let (key, value) = item?;
            let first = self.key_seq(&key)?;
            let entry = IndexEntry::decode(&value).ok_or_else(|| self.corrupt(first))?;
            let last = first + u64::from(entry.count).saturating_sub(1);
            if last > through_seq && entry.ts_ms >= older_than_ms {
                break;
            }
            // Readers stop below the new floor before the record goes.
            self.first.fetch_max(last + 1, Ordering::AcqRel);
            tree.remove(&key)?;
            if let Some(n) = self.shared.live.lock().get_mut(&entry.loc.segment) {
                *n = n.saturating_sub(1);
            }
            removed += u64::from(entry.count);
        }
        if removed > 0 {
            // The commit thread deletes files nothing points into any more.
            self.shared.dirty.store(true, Ordering::Release);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No limit on a read.
    const ALL: ReadLimit = ReadLimit {
        entries: usize::MAX,
        bytes: usize::MAX,
    };

    fn open(dir: &Path, durability: Durability) -> SledStore {
        SledStore::open(dir, durability, Duration::from_millis(5)).unwrap()
    }

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

    /// Fast mode writes on its timer, or as soon as a commit's worth is waiting: a store
    /// whose timer never fires still writes once appends pass [`EARLY_COMMIT_BYTES`], and
    /// not before.
    #[tokio::test]
    async fn fast_mode_commits_early_once_enough_is_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SledStore::open(dir.path(), Durability::Fast, Duration::from_secs(3600)).unwrap();
        let log = store.open_stream("acme").unwrap();
        let frame = Bytes::from(vec![b'x'; 1024]);
        let below = EARLY_COMMIT_BYTES / frame.len() - 1;
        log.append(1, 100, &vec![frame.clone(); below]).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            log.written(),
            0,
            "below the threshold only the timer writes"
        );
        log.append(below as u64 + 1, 100, &[frame.clone(), frame])
            .unwrap();
        let last = below as u64 + 2;
        for _ in 0..500 {
            if log.written() >= last {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            log.written(),
            last,
            "the appends past the threshold are written"
        );
    }

    #[tokio::test]
    async fn append_read_recover_and_trim() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), Durability::Strict);
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
        let store = open(dir.path(), Durability::Strict);
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
        store.commit().await.unwrap().unwrap();
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
        let store = open(dir.path(), Durability::Fast);
        let log = store.open_stream("acme").unwrap();
        log.append(1, 100, &frames(1, 2)).unwrap();
        // A seq block skipped after a store failure leaves a gap.
        log.append(10, 100, &frames(10, 2)).unwrap();
        settled(&store).await;
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
        let store = open(dir.path(), Durability::Fast);
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
        let store = open(dir.path(), Durability::Fast);
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

    /// A commit's records are found again after a restart that lost the whole index: the
    /// segment files are the truth, and a torn write at their end is cut off.
    #[tokio::test]
    async fn the_index_is_rebuilt_from_the_segments_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let big = Bytes::from(vec![b'y'; 300 << 10]);
        {
            let store = open(dir.path(), Durability::Strict);
            let log = store.open_stream("acme").unwrap();
            log.append(1, 100, &frames(1, 3)).unwrap();
            log.reserve(5000).unwrap();
            store.commit().await.unwrap().unwrap();
            log.append(4, 100, std::slice::from_ref(&big)).unwrap();
            store.commit().await.unwrap().unwrap();
            assert_eq!(log.written(), 4);
            store.close().unwrap();
        }
        // Lose the index and the checkpoint, and tear a record onto the end of the log.
        {
            let db = sled::open(dir.path()).unwrap();
            db.drop_tree("stream/acme").unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.remove(CHECKPOINT).unwrap();
            meta.remove("reserved/acme").unwrap();
            db.flush().unwrap();
        }
        let seg = segment::segment_path(&dir.path().join("segments"), 1);
        let whole = std::fs::metadata(&seg).unwrap().len();
        let mut torn = Vec::new();
        segment::encode_readings(&mut torn, "acme", 5, 100, &frames(5, 100));
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &torn[..torn.len() - 3]).unwrap();
        drop(f);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let store = open(dir.path(), Durability::Strict);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            whole,
            "torn record cut"
        );
        let log = store.open_stream("acme").unwrap();
        assert_eq!(
            log.recover().unwrap(),
            Recovered {
                next_seq: 5001,
                first_seq: Some(1)
            }
        );
        let mut out = Vec::new();
        log.read(0, u64::MAX, ALL, &mut out).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[3].frame, big);
        store.close().unwrap();
    }

    /// sled refuses everything after a failed write of its own until it is opened again;
    /// the store does that in place and re-reads from the segments what the index lost.
    #[tokio::test]
    async fn the_index_reopens_in_place_and_recovers_what_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Strict);
        let log = store.open_stream("acme").unwrap();
        log.append(1, 100, &frames(1, 3)).unwrap();
        settled(&store).await;
        // What a crash of sled's own would lose: entries and the checkpoint past them.
        store
            .shared
            .index(|i| {
                i.db.drop_tree("stream/acme")?;
                i.meta.remove(CHECKPOINT)?;
                Ok(())
            })
            .unwrap();
        assert!(seqs(&*log, 0, u64::MAX, 100).is_empty());
        store.shared.reopen_index().unwrap();
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![1, 2, 3]);
        assert!(store.shared.index_healthy());
        log.append(4, 100, &frames(4, 1)).unwrap();
        store.commit().await.unwrap().unwrap();
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![1, 2, 3, 4]);
        store.close().unwrap();
    }

    /// Retention deletes a segment file once no record in it is kept.
    #[tokio::test]
    async fn retention_deletes_segment_files_nothing_points_into() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            SledStore::open_with(
                dir.path(),
                Durability::Fast,
                Duration::from_millis(5),
                1 << 20,
            )
            .unwrap()
        };
        let store = open();
        let log = store.open_stream("acme").unwrap();
        // Three files' worth (each record 60 KiB, a file rolls past 1 MiB).
        let reading = Bytes::from(vec![b'x'; 60 << 10]);
        let per_file = (1 << 20) / (60 << 10) + 1;
        let mut next = 1;
        for _ in 0..3 * per_file {
            log.append(next, 100, std::slice::from_ref(&reading))
                .unwrap();
            next += 1;
            if next % 4 == 0 {
                store.commit().await.unwrap().unwrap();
            }
        }
        settled(&store).await;
        let segments = || {
            std::fs::read_dir(dir.path().join("segments"))
                .unwrap()
                .count()
        };
        assert!(segments() >= 3);
        assert_eq!(log.trim(10, 0).unwrap(), next - 1 - 10);
        settled(&store).await;
        assert_eq!(segments(), 1, "only the file being written is left");
        assert_eq!(seqs_len(&*log), 10);
        store.close().unwrap();
        drop((log, store));
        // And after a restart the index still finds everything kept.
        let store = open();
        let log = store.open_stream("acme").unwrap();
        assert_eq!(seqs_len(&*log), 10);
        store.close().unwrap();
    }

    /// A commit is answered once its records are synced. An index update that fails after
    /// that must not cost what was acknowledged: the index is rebuilt from the segments in
    /// place, nothing is written twice, and a restart finds each reading once.
    #[tokio::test]
    async fn a_commit_whose_index_fails_after_the_sync_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), Durability::Strict);
            let log = store.open_stream("acme").unwrap();
            log.append(1, 100, &frames(1, 3)).unwrap();
            settled(&store).await;
            // The index goes away between the sync and the index update.
            drop(store.shared.index.write().take());
            log.append(4, 100, &frames(4, 2)).unwrap();
            store.commit().await.unwrap().unwrap();
            assert_eq!(log.written(), 5);
            settled(&store).await;
            assert!(store.writable());
            assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![1, 2, 3, 4, 5]);
            log.append(6, 100, &frames(6, 1)).unwrap();
            settled(&store).await;
            assert_eq!(seqs(&*log, 0, u64::MAX, 100), (1..=6).collect::<Vec<_>>());
            store.close().unwrap();
        }
        let store = open(dir.path(), Durability::Strict);
        let log = store.open_stream("acme").unwrap();
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), (1..=6).collect::<Vec<_>>());
        assert_eq!(log.recover().unwrap().next_seq, 7);
        store.close().unwrap();
    }

    /// Commits, then waits until the commit thread has indexed it too (and deleted what
    /// retention left): a commit is answered once synced, and the next request only after
    /// the thread has finished with the previous one.
    async fn settled(store: &SledStore) {
        store.commit().await.unwrap().unwrap();
        store.commit().await.unwrap().unwrap();
    }

    fn seqs_len(log: &dyn StreamLog) -> usize {
        let mut out = Vec::new();
        log.read(0, u64::MAX, ALL, &mut out).unwrap();
        out.len()
    }

    /// A directory written by the earlier layout (readings inside sled) is refused.
    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("stream/acme")
                .unwrap()
                .insert(1u64.to_be_bytes(), &b"old"[..])
                .unwrap();
            db.flush().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(
            SledStore::open(dir.path(), Durability::Fast, Duration::from_millis(5)),
            Err(LogError::Format)
        ));
    }
}
