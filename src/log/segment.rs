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
//! A file is preallocated to [`SEGMENT_BYTES`] (`fallocate`, synced once) when the writer
//! opens it, so a commit writes into blocks the file already owns and its `fdatasync` never
//! has to allocate blocks or grow the file: on ext4 that halves the p99 of strict mode's
//! arrival-to-synced time (BENCHMARKS.md). Where the file system cannot (or the disk has no
//! room for a whole file), the writer appends as before. The unwritten rest reads as zeros,
//! and a zero frame header ends a scan like any torn record.
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

use super::record::{decode_batch, BatchHeader, BatchWriter};
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
#[cfg(test)]
pub(super) fn encode_readings(
    buf: &mut Vec<u8>,
    stream: &str,
    first_seq: u64,
    ts_ms: u64,
    frames: &[Bytes],
) -> (usize, u32) {
    let mut record = ReadingsWriter::begin(buf, stream, first_seq);
    for frame in frames {
        record.push(buf, frame);
    }
    record.finish(buf, ts_ms)
}

/// A readings record being appended to a buffer frame by frame (see [`BatchWriter`]).
pub(super) struct ReadingsWriter {
    start: usize,
    first_seq: u64,
    batch: BatchWriter,
}

impl ReadingsWriter {
    pub(super) fn begin(buf: &mut Vec<u8>, stream: &str, first_seq: u64) -> Self {
        let start = begin(buf, KIND_READINGS, stream, first_seq);
        let batch = BatchWriter::begin(buf);
        Self {
            start,
            first_seq,
            batch,
        }
    }

    pub(super) fn push(&mut self, buf: &mut Vec<u8>, frame: &[u8]) {
        self.batch.push(buf, frame);
    }

    pub(super) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub(super) fn count(&self) -> u32 {
        self.batch.count()
    }

    /// The seq a frame pushed now must have to belong here.
    pub(super) fn next_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count())
    }

    /// The frames' bytes so far, length prefixes included (`buf` is the one pushed to).
    pub(super) fn bytes(&self, buf: &[u8]) -> usize {
        self.batch.body_len(buf)
    }

    /// Closes the record, stamped `ts_ms`; returns its frame's offset in `buf` and length,
    /// as [`encode_readings`] does.
    pub(super) fn finish(self, buf: &mut [u8], ts_ms: u64) -> (usize, u32) {
        self.batch.finish(buf, ts_ms);
        (self.start, finish(buf, self.start))
    }
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
        loop {
            let mut head = [0u8; FRAME_HEADER];
            if at + FRAME_HEADER as u64 > size || file.read_exact(&mut head).is_err() {
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
            // The unwritten rest of a preallocated file reads as zeros: nothing torn there.
            let torn = !zeros_from(file.get_ref(), at)?;
            if cut {
                if torn {
                    tracing::warn!(segment = %path.display(), at, size, "cutting a torn write at the end of the log");
                }
                // Cut either way: whatever a failed or torn commit left there must not be
                // found by a later scan once new records end next to it. The writer
                // preallocates the file again.
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_len(at)?;
                f.sync_all()?;
            } else if torn {
                tracing::error!(segment = %path.display(), at, size, "damaged record inside the log; the rest of this file is skipped");
            }
        }
        Ok(at)
    }
}

/// The one writer: the commit thread's.
pub(super) struct Writer {
    segments: Arc<Segments>,
    id: u64,
    file: File,
    len: u64,
}

impl Writer {
    /// Continues file `id` at `len` (where recovery found its end), creating it if needed.
    pub(super) fn open(segments: Arc<Segments>, id: u64, len: u64) -> Result<Self, LogError> {
        let path = segments.path(id);
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let w = Self {
            segments,
            id,
            file,
            len,
        };
        // One sync makes the file's size and blocks durable before any commit relies on them.
        if w.preallocate() || created {
            w.file.sync_all()?;
        }
        if created {
            sync_dir(&w.segments.dir)?;
        }
        Ok(w)
    }

    /// Gives the file all of its [`SEGMENT_BYTES`] on disk; whether it had to. Not done (and
    /// logged) where the file system cannot or the disk lacks the room: commits then
    /// append, which costs more per sync but is as safe.
    fn preallocate(&self) -> bool {
        let want = self.segments.file_bytes;
        match self.file.metadata() {
            Ok(m) if m.len() >= want => return false,
            Ok(_) => {}
            Err(_) => return false,
        }
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, want) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(segment = self.id, error = %e, "cannot preallocate the log file; appending instead");
                false
            }
        }
    }

    /// The file being written and its length: everything before it is on disk.
    pub(super) fn position(&self) -> (u64, u64) {
        (self.id, self.len)
    }

    /// Writes `buf` (whole records) and syncs it; returns the file and offset it starts at.
    /// On failure the file is cut back to where it was, so nothing of a failed commit is
    /// found by recovery, and the next commit writes at the same place.
    pub(super) fn append(&mut self, buf: &[u8]) -> Result<(u64, u64), LogError> {
        if self.len >= self.segments.file_bytes {
            *self = Self::open(self.segments.clone(), self.id + 1, 0)?;
        }
        let at = self.len;
        let written = self
            .file
            .write_all_at(buf, at)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            if let Err(cut) = self.file.set_len(at).and_then(|()| self.file.sync_data()) {
                tracing::error!(error = %cut, "could not cut a failed commit off the log");
            }
            return Err(e.into());
        }
        self.len += buf.len() as u64;
        Ok((self.id, at))
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
        // The disk has room again: the rest of the file is taken back while there is.
        if self.preallocate() {
            self.file.sync_all()?;
        }
        Ok(())
    }
}

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Whether the next 64 KiB of `file` after `at` (or what there is of them) are all zero: the
/// unwritten rest of a preallocated file rather than a torn write.
fn zeros_from(file: &File, at: u64) -> Result<bool, LogError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64)? {
            0 => break,
            read => n += read,
        }
    }
    Ok(buf[..n].iter().all(|b| *b == 0))
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

    /// The segments of `dir` and a writer starting file 1.
    fn writer(dir: &Path) -> (Arc<Segments>, Writer) {
        let segments = Arc::new(Segments::new(dir.to_path_buf(), SEGMENT_BYTES));
        let w = Writer::open(segments.clone(), 1, 0).unwrap();
        (segments, w)
    }

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
        let (segments, mut w) = writer(dir.path());
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
    fn a_preallocated_file_ends_at_its_last_record_and_is_taken_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, mut w) = writer(dir.path());
        let path = segment_path(dir.path(), 1);
        let size = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            size(),
            SEGMENT_BYTES,
            "the whole segment is the file's from the start"
        );
        let mut buf = Vec::new();
        encode_readings(&mut buf, "acme", 1, 100, &frames(3));
        w.append(&buf).unwrap();
        let first = buf.len() as u64;
        assert_eq!(size(), SEGMENT_BYTES, "a commit writes inside the file");
        // A crash here: recovery finds the record, stops at the zeros, cuts them off.
        drop(w);
        let (seen, end) = scan_all(&segments, 1, true);
        assert_eq!((seen, end), (vec![("acme".into(), 1)], first));
        assert_eq!(size(), first);
        // The writer carries on where the log ends, preallocating the file again.
        let mut w = Writer::open(segments.clone(), 1, end).unwrap();
        assert_eq!(size(), SEGMENT_BYTES);
        buf.clear();
        encode_readings(&mut buf, "acme", 4, 200, &frames(2));
        assert_eq!(w.append(&buf).unwrap(), (1, first));
        let (seen, end) = scan_all(&segments, 1, false);
        assert_eq!(seen, vec![("acme".into(), 1), ("acme".into(), 4)]);
        assert_eq!(end, first + buf.len() as u64);
    }

    #[test]
    fn a_flipped_bit_ends_the_scan_there() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, mut w) = writer(dir.path());
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

    #[test]
    fn a_full_file_rolls_over_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Arc::new(Segments::new(dir.path().to_path_buf(), SEGMENT_BYTES));
        let mut w = Writer::open(segments.clone(), 7, SEGMENT_BYTES).unwrap();
        let mut buf = Vec::new();
        encode_reserve(&mut buf, "acme", 5);
        assert_eq!(w.append(&buf).unwrap(), (8, 0));
        assert_eq!(segments.ids().unwrap(), vec![7, 8]);
        segments.remove(7).unwrap();
        assert_eq!(segments.ids().unwrap(), vec![8]);
    }
}
