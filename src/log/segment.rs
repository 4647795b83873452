//! Segment files: the append-only log every stream's readings are written to.
//!
//! Owns the files under `segments/`, the frame format around each record and the scan that
//! recovers them. Must not know what a stream is beyond its name, nor how records are found
//! again: the index (in sled) and the tails live in `sled_store`, the write order in
//! `commit`.
//!
//! One group commit is one `pwrite` of every stream's records, encoded into one reused buffer,
//! and one `fdatasync`: each reading is copied once, from its frame into that buffer. A file
//! is `<id>.seg`, ids ascending; a new one is started (and its directory synced) once the
//! current one passes [`SEGMENT_BYTES`].
//!
//! A record on disk is `[len: u32 LE][crc32: u32 LE][body: len bytes]`, the CRC over the
//! body. The body is `[kind: u8][name_len: u16 LE][stream name][seq: u64 LE]`, then for
//! readings (`kind` 1, `seq` the first) the batch of `record.rs`; for a reservation (`kind`
//! 2, `seq` the reserved high-water mark) nothing. A crash can leave a torn record at the end
//! of the newest file: recovery cuts the file before the first record whose length or CRC
//! does not hold.

use bytes::{BufMut, Bytes};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::record::{decode_batch, encode_batch_into, BatchHeader};
use super::LogError;

/// A file is closed to new records once it holds this much.
pub(super) const SEGMENT_BYTES: u64 = 64 << 20;
const FRAME_HEADER: usize = 8;
const KIND_READINGS: u8 = 1;
const KIND_RESERVE: u8 = 2;
/// No valid record is larger: a torn length field must not make recovery allocate gigabytes.
const MAX_RECORD: u32 = 1 << 30;

/// Where a record lies: its frame's offset in a segment and the frame's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// One record as recovery finds it.
pub(super) enum Item<'a> {
    Readings {
        stream: &'a str,
        first_seq: u64,
        head: BatchHeader,
    },
    Reserve {
        stream: &'a str,
        through: u64,
    },
}

/// Appends a readings record to `buf`; returns its frame's offset in `buf` and length.
pub(super) fn encode_readings(
    buf: &mut Vec<u8>,
    stream: &str,
    first_seq: u64,
    ts_ms: u64,
    frames: &[Bytes],
) -> (usize, u32) {
    let start = begin(buf, KIND_READINGS, stream, first_seq);
    encode_batch_into(buf, ts_ms, frames);
    (start, finish(buf, start))
}

/// Appends a reservation record to `buf`.
pub(super) fn encode_reserve(buf: &mut Vec<u8>, stream: &str, through: u64) {
    let start = begin(buf, KIND_RESERVE, stream, through);
    finish(buf, start);
}

fn begin(buf: &mut Vec<u8>, kind: u8, stream: &str, seq: u64) -> usize {
    let start = buf.len();
    buf.put_u64_le(0); // length and CRC, filled by `finish`
    buf.put_u8(kind);
    buf.put_u16_le(stream.len() as u16);
    buf.put_slice(stream.as_bytes());
    buf.put_u64_le(seq);
    start
}

fn finish(buf: &mut [u8], start: usize) -> u32 {
    let body = &buf[start + FRAME_HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    FRAME_HEADER as u32 + len
}

/// Splits a checked body into its kind, stream, seq and the rest.
fn parse_body(body: &[u8]) -> Option<(u8, &str, u64, usize)> {
    let kind = *body.first()?;
    let name_len = u16::from_le_bytes(body.get(1..3)?.try_into().ok()?) as usize;
    let stream = std::str::from_utf8(body.get(3..3 + name_len)?).ok()?;
    let at = 3 + name_len;
    let seq = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
    Some((kind, stream, seq, at + 8))
}

fn parse_item(body: &[u8]) -> Option<Item<'_>> {
    let (kind, stream, seq, rest) = parse_body(body)?;
    match kind {
        KIND_READINGS => Some(Item::Readings {
            stream,
            first_seq: seq,
            head: super::record::header(&body[rest..])?,
        }),
        KIND_RESERVE => Some(Item::Reserve {
            stream,
            through: seq,
        }),
        _ => None,
    }
}

/// The segment files of one store: read handles for everyone, the directory for the writer.
pub(super) struct Segments {
    dir: PathBuf,
    /// A file is closed to new records once it holds this much ([`SEGMENT_BYTES`]).
    file_bytes: u64,
    files: RwLock<HashMap<u64, Arc<File>>>,
}

impl Segments {
    pub(super) fn new(dir: PathBuf, file_bytes: u64) -> Self {
        Self {
            dir,
            file_bytes,
            files: RwLock::new(HashMap::new()),
        }
    }

    fn path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id)
    }

    /// The ids of the files present, ascending.
    pub(super) fn ids(&self) -> Result<Vec<u64>, LogError> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn handle(&self, id: u64) -> Result<Option<Arc<File>>, LogError> {
        if let Some(f) = self.files.read().get(&id) {
            return Ok(Some(f.clone()));
        }
        match File::open(self.path(id)) {
            Ok(f) => {
                let f = Arc::new(f);
                self.files.write().insert(id, f.clone());
                Ok(Some(f))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the batch of the readings record at `loc`, checked against its CRC, its stream
    /// and its first seq. `None` if retention removed its file meanwhile.
    pub(super) fn read(
        &self,
        loc: Loc,
        stream: &str,
        first_seq: u64,
    ) -> Result<Option<(BatchHeader, Vec<Bytes>)>, LogError> {
        let Some(file) = self.handle(loc.segment)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)?;
        let corrupt = || LogError::Corrupt {
            stream: stream.to_owned(),
            seq: first_seq,
        };
        let body = checked_body(&buf).ok_or_else(corrupt)?;
        match parse_body(body) {
            Some((KIND_READINGS, s, seq, rest)) if s == stream && seq == first_seq => {
                let start = FRAME_HEADER + rest;
                decode_batch(&Bytes::from(buf).slice(start..))
                    .map(Some)
                    .ok_or_else(corrupt)
            }
            _ => Err(corrupt()),
        }
    }

    /// Deletes a file no index entry points into any more.
    pub(super) fn remove(&self, id: u64) -> Result<(), LogError> {
        self.files.write().remove(&id);
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        sync_dir(&self.dir)
    }

    /// Reads every record of file `id` from `from`, in order, calling `each` with its place;
    /// returns where the last whole record ends. Anything after it is a torn write (or
    /// damage): `cut` truncates the file there, which recovery asks for on the newest file.
    pub(super) fn scan(
        &self,
        id: u64,
        from: u64,
        cut: bool,
        mut each: impl FnMut(Loc, Item<'_>) -> Result<(), LogError>,
    ) -> Result<u64, LogError> {
        let path = self.path(id);
        let mut file = std::io::BufReader::with_capacity(1 << 20, File::open(&path)?);
        let size = file.get_ref().metadata()?.len();
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(from))?;
        let mut at = from;
        let mut body = Vec::new();
        // Zeros where a record would start: the unused rest of a preallocated file.
        let mut clean = false;
        loop {
            let mut head = [0u8; FRAME_HEADER];
            if at + FRAME_HEADER as u64 > size || file.read_exact(&mut head).is_err() {
                break;
            }
            if head == [0u8; FRAME_HEADER] {
                clean = true;
                break;
            }
            let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            if len > MAX_RECORD || at + FRAME_HEADER as u64 + u64::from(len) > size {
                break;
            }
            body.resize(len as usize, 0);
            if file.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
                break;
            }
            let Some(item) = parse_item(&body) else { break };
            let loc = Loc {
                segment: id,
                offset: at,
                len: FRAME_HEADER as u32 + len,
            };
            each(loc, item)?;
            at += u64::from(loc.len);
        }
        if at < size {
            if cut {
                // Cut, not zeroed: the writer carries on from `at`, and nothing stale may
                // follow what it writes there.
                if !clean {
                    tracing::warn!(segment = %path.display(), at, size, "cutting a torn write at the end of the log");
                }
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_len(at)?;
                f.sync_all()?;
            } else if !clean {
                tracing::error!(segment = %path.display(), at, size, "damaged record inside the log; the rest of this file is skipped");
            }
        }
        Ok(at)
    }
}

/// The one writer: the commit thread's.
///
/// Files are zero-filled to their full size ahead of use by a helper thread (see
/// [`prepare`]): a write into one neither allocates blocks nor grows the file, so each
/// `fdatasync` is one data write instead of data plus metadata. On this machine's disk that
/// took the sync's p50 from 83 to 65 µs and its p99 from 282 to 164 µs (BENCHMARKS.md).
/// Until a prepared file is ready (the first one after a start, a disk with less than
/// [`PREPARE_MIN_FREE`] files' worth of room) files grow as they are written.
pub(super) struct Writer {
    segments: Arc<Segments>,
    id: u64,
    file: File,
    len: u64,
    /// `file` was prepared (zero-filled to its full size).
    preallocated: bool,
    /// A file being prepared, or prepared and waiting to be used.
    next: Option<Next>,
}

enum Next {
    Preparing(std::sync::mpsc::Receiver<std::io::Result<File>>),
    Ready(File),
}

/// Name of the file being prepared; renamed to its id when it is taken into use.
const PREPARING: &str = "next.seg.tmp";
/// Files are prepared only while the disk has room for this many more.
const PREPARE_MIN_FREE: u64 = 4;

impl Writer {
    /// Continues file `id` at `len` (where recovery found its end), creating it if needed.
    pub(super) fn open(segments: Arc<Segments>, id: u64, len: u64) -> Result<Self, LogError> {
        // A preparation a stop interrupted.
        let _ = std::fs::remove_file(segments.dir.join(PREPARING));
        let path = segments.path(id);
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if created {
            file.sync_all()?;
            sync_dir(&segments.dir)?;
        }
        Ok(Self {
            segments,
            id,
            file,
            len,
            preallocated: false,
            next: None,
        })
    }

    /// Starts preparing the next file once this one is a quarter full (a node that writes
    /// little never prepares any), unless one is on its way or the disk is short of room.
    fn prepare_next(&mut self) {
        let bytes = self.segments.file_bytes;
        if self.next.is_some()
            || self.len < bytes / 4
            || free_bytes(&self.segments.dir) < PREPARE_MIN_FREE * bytes
        {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let path = self.segments.dir.join(PREPARING);
        let spawned = std::thread::Builder::new()
            .name("sensorgate-prealloc".into())
            .spawn(move || {
                let prepared = prepare(&path, bytes);
                if prepared.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                let _ = tx.send(prepared);
            });
        if spawned.is_ok() {
            self.next = Some(Next::Preparing(rx));
        }
    }

    /// A prepared file, if one is ready (without waiting for it).
    fn take_ready(&mut self) -> Option<File> {
        if let Some(Next::Preparing(rx)) = &self.next {
            match rx.try_recv() {
                Ok(Ok(file)) => self.next = Some(Next::Ready(file)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not prepare a log file; files grow as written");
                    self.next = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => self.next = None,
            }
        }
        match self.next.take() {
            Some(Next::Ready(file)) => Some(file),
            other => {
                self.next = other;
                None
            }
        }
    }

    /// Moves on to file `id + 1`: a prepared one if ready, else one that grows as written.
    fn roll(&mut self) -> Result<(), LogError> {
        let id = self.id + 1;
        let path = self.segments.path(id);
        let (file, preallocated) = match self.take_ready() {
            Some(file) => {
                std::fs::rename(self.segments.dir.join(PREPARING), &path)?;
                (file, true)
            }
            None => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)?;
                file.sync_all()?;
                (file, false)
            }
        };
        sync_dir(&self.segments.dir)?;
        if self.preallocated {
            // Give back the part of the old file it did not use (zeros: recovery reads
            // them as the end whether or not this reaches the disk).
            self.file.set_len(self.len)?;
        }
        *self = Self {
            segments: self.segments.clone(),
            id,
            file,
            len: 0,
            preallocated,
            next: self.next.take(),
        };
        Ok(())
    }

    /// The file being written and its length: everything before it is on disk.
    pub(super) fn position(&self) -> (u64, u64) {
        (self.id, self.len)
    }

    /// Writes `buf` (whole records) and syncs it; returns the file and offset it starts at.
    /// On failure the file is cut back to where it was, so nothing of a failed commit is
    /// found by recovery, and the next commit writes at the same place.
    pub(super) fn append(&mut self, buf: &[u8]) -> Result<(u64, u64), LogError> {
        let full = self.len + buf.len() as u64 > self.segments.file_bytes && self.len > 0;
        // A file that grows as written gives way to a prepared one as soon as there is one.
        let upgrade = !self.preallocated && self.next.is_some();
        if full || (upgrade && self.ready_now()) {
            self.roll()?;
        }
        let at = self.len;
        let written = self
            .file
            .write_all_at(buf, at)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Cutting also gives up the file's preallocation: a probe must meet the disk.
            self.preallocated = false;
            if let Err(cut) = self.file.set_len(at).and_then(|()| self.file.sync_data()) {
                tracing::error!(error = %cut, "could not cut a failed commit off the log");
            }
            return Err(e.into());
        }
        self.len += buf.len() as u64;
        self.prepare_next();
        Ok((self.id, at))
    }

    /// Whether a prepared file is ready to be taken.
    fn ready_now(&mut self) -> bool {
        match self.take_ready() {
            Some(file) => {
                self.next = Some(Next::Ready(file));
                true
            }
            None => false,
        }
    }

    /// Cuts the file being written back to `at` (the start of a commit that must not count
    /// after all: its records could not be indexed).
    pub(super) fn cut_back(&mut self, at: u64) -> Result<(), LogError> {
        self.preallocated = false;
        self.file.set_len(at)?;
        self.file.sync_data()?;
        self.len = at;
        Ok(())
    }

    /// Writes `probe` zero bytes past the end and syncs, then cuts them off again: whether
    /// the disk takes writes again after a failure.
    pub(super) fn probe(&mut self, probe: usize) -> Result<(), LogError> {
        let result = self
            .file
            .write_all_at(&vec![0u8; probe], self.len)
            .and_then(|()| self.file.sync_data());
        self.file.set_len(self.len)?;
        result?;
        self.file.sync_data()?;
        Ok(())
    }
}

/// Writes `bytes` of zeros to a new file at `path` and syncs it, a chunk at a time and paced,
/// so that its writeback never queues the commits' syncs behind tens of megabytes.
fn prepare(path: &Path, bytes: u64) -> std::io::Result<File> {
    const CHUNK: usize = 1 << 20;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; CHUNK];
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        file.sync_data()?;
        at += n as u64;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    file.sync_all()?;
    Ok(file)
}

/// Free bytes on the file system holding `dir` (0 if unknown).
fn free_bytes(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0)
}

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The body of a frame whose length and CRC hold.
fn checked_body(frame: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(frame.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(frame.get(4..8)?.try_into().ok()?);
    let body = frame.get(FRAME_HEADER..FRAME_HEADER + len)?;
    (frame.len() == FRAME_HEADER + len && crc32fast::hash(body) == crc).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: u64) -> Vec<Bytes> {
        (1..=n).map(|s| Bytes::from(format!("f{s}"))).collect()
    }

    fn scan_all(s: &Segments, id: u64, cut: bool) -> (Vec<(String, u64)>, u64) {
        let mut seen = Vec::new();
        let end = s
            .scan(id, 0, cut, |_, item| {
                seen.push(match item {
                    Item::Readings {
                        stream, first_seq, ..
                    } => (stream.to_owned(), first_seq),
                    Item::Reserve { stream, through } => (format!("reserve {stream}"), through),
                });
                Ok(())
            })
            .unwrap();
        (seen, end)
    }

    #[test]
    fn records_round_trip_through_a_file_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Arc::new(Segments::new(dir.path().to_path_buf(), 1 << 20));
        let mut w = Writer::open(segments.clone(), 1, 0).unwrap();
        let mut buf = Vec::new();
        let (a, a_len) = encode_readings(&mut buf, "acme", 1, 100, &frames(3));
        encode_reserve(&mut buf, "acme", 70_000);
        let (b, b_len) = encode_readings(&mut buf, "globex", 9, 200, &frames(2));
        let (file, at) = w.append(&buf).unwrap();
        let loc = |start: usize, len| Loc {
            segment: file,
            offset: at + start as u64,
            len,
        };
        let (head, got) = segments.read(loc(a, a_len), "acme", 1).unwrap().unwrap();
        assert_eq!((head.ts_ms, got), (100, frames(3)));
        assert_eq!(
            segments
                .read(loc(b, b_len), "globex", 9)
                .unwrap()
                .unwrap()
                .1,
            frames(2)
        );
        // The wrong stream or seq at a place is damage, not someone else's data.
        assert!(segments.read(loc(b, b_len), "acme", 9).is_err());
        // A torn write: half of a further record.
        let mut more = Vec::new();
        encode_readings(&mut more, "acme", 4, 300, &frames(50));
        w.append(&more[..more.len() / 2]).unwrap();
        let whole = buf.len() as u64;
        let (seen, end) = scan_all(&segments, 1, true);
        assert_eq!(
            seen,
            vec![
                ("acme".into(), 1),
                ("reserve acme".into(), 70_000),
                ("globex".into(), 9)
            ]
        );
        assert_eq!(end, whole);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 1))
                .unwrap()
                .len(),
            whole,
            "the torn record is cut off"
        );
    }

    #[test]
    fn a_flipped_bit_ends_the_scan_there() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Arc::new(Segments::new(dir.path().to_path_buf(), 1 << 20));
        let mut w = Writer::open(segments.clone(), 1, 0).unwrap();
        let mut buf = Vec::new();
        encode_readings(&mut buf, "acme", 1, 100, &frames(3));
        let second = buf.len();
        encode_readings(&mut buf, "acme", 4, 100, &frames(3));
        buf[second + 20] ^= 1;
        w.append(&buf).unwrap();
        let (seen, end) = scan_all(&segments, 1, false);
        assert_eq!(seen, vec![("acme".into(), 1)]);
        assert_eq!(end, second as u64);
    }

    /// Once a file is a quarter full the next is zero-filled in the background; the writer
    /// moves to it as soon as it is ready, and recovery reads its zeros as the end.
    #[test]
    fn a_prepared_file_is_taken_as_soon_as_it_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Arc::new(Segments::new(dir.path().to_path_buf(), 1 << 20));
        let mut w = Writer::open(segments.clone(), 1, 0).unwrap();
        let mut buf = Vec::new();
        encode_readings(
            &mut buf,
            "acme",
            1,
            100,
            &[Bytes::from(vec![b'x'; 300 << 10])],
        );
        w.append(&buf).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !w.ready_now() {
            assert!(std::time::Instant::now() < deadline, "prepared in time");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut small = Vec::new();
        encode_readings(&mut small, "acme", 2, 100, &frames(1));
        assert_eq!(
            w.append(&small).unwrap(),
            (2, 0),
            "moved to the prepared file"
        );
        let path = segment_path(dir.path(), 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            1 << 20,
            "full size"
        );
        let (seen, end) = scan_all(&segments, 2, false);
        assert_eq!((seen, end), (vec![("acme".into(), 2)], small.len() as u64));
        // The newest file's zeros are cut at recovery, silently: nothing was torn.
        scan_all(&segments, 2, true);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), small.len() as u64);
        assert!(!dir.path().join(PREPARING).exists());
    }

    #[test]
    fn a_full_file_rolls_over_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Arc::new(Segments::new(dir.path().to_path_buf(), 1 << 20));
        let mut w = Writer::open(segments.clone(), 7, 1 << 20).unwrap();
        let mut buf = Vec::new();
        encode_reserve(&mut buf, "acme", 5);
        assert_eq!(w.append(&buf).unwrap(), (8, 0));
        assert_eq!(segments.ids().unwrap(), vec![7, 8]);
        segments.remove(7).unwrap();
        assert_eq!(segments.ids().unwrap(), vec![8]);
    }
}
