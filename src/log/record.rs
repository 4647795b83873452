//! The on-disk format of one stored record: a header, then length-prefixed frames.
//!
//! `[ts_ms: u64 LE][count: u32 LE]` then `count` times `[len: u32 LE][frame bytes]`, inside a
//! segment record (see `segment.rs`). A record holds a run of one stream's readings from
//! one flush, which keeps the index's per-entry cost off the per-reading path.

use bytes::{BufMut, Bytes};

/// The fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub ts_ms: u64,
    pub count: u32,
}

const HEADER: usize = 12;

/// A batch record being appended to a buffer frame by frame, its header written last: the
/// commit thread copies each frame straight from its stream's tail, with no list of frames
/// (and no reference count taken per frame) in between.
pub struct BatchWriter {
    at: usize,
    count: u32,
}

impl BatchWriter {
    /// Leaves room for the header at the end of `out`.
    pub fn begin(out: &mut Vec<u8>) -> Self {
        let at = out.len();
        out.put_bytes(0, HEADER);
        Self { at, count: 0 }
    }

    pub fn push(&mut self, out: &mut Vec<u8>, frame: &[u8]) {
        out.put_u32_le(frame.len() as u32);
        out.put_slice(frame);
        self.count += 1;
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The bytes pushed so far, length prefixes included (`out` is the buffer pushed to).
    pub fn body_len(&self, out: &[u8]) -> usize {
        out.len() - self.at - HEADER
    }

    /// Writes the header; the record ends at the end of `out`.
    pub fn finish(self, out: &mut [u8], ts_ms: u64) {
        out[self.at..self.at + 8].copy_from_slice(&ts_ms.to_le_bytes());
        out[self.at + 8..self.at + HEADER].copy_from_slice(&self.count.to_le_bytes());
    }
}

/// Reads a record's header, or `None` if it is too short to hold one.
pub fn header(record: &[u8]) -> Option<BatchHeader> {
    if record.len() < HEADER {
        return None;
    }
    let ts_ms = u64::from_le_bytes(record[0..8].try_into().ok()?);
    let count = u32::from_le_bytes(record[8..12].try_into().ok()?);
    Some(BatchHeader { ts_ms, count })
}

/// Splits a record into its frames without copying them; `None` if it is malformed.
pub fn decode_batch(record: &Bytes) -> Option<(BatchHeader, Vec<Bytes>)> {
    let head = header(record)?;
    let mut frames = Vec::with_capacity(head.count as usize);
    let mut at = HEADER;
    for _ in 0..head.count {
        let len_bytes: [u8; 4] = record.get(at..at + 4)?.try_into().ok()?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        at += 4;
        if at + len > record.len() {
            return None;
        }
        frames.push(record.slice(at..at + len));
        at += len;
    }
    (at == record.len()).then_some((head, frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_batch(ts_ms: u64, frames: &[Bytes]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut batch = BatchWriter::begin(&mut out);
        for frame in frames {
            batch.push(&mut out, frame);
        }
        batch.finish(&mut out, ts_ms);
        out
    }

    #[test]
    fn round_trip() {
        let frames = vec![
            Bytes::from_static(b"{\"a\":1}"),
            Bytes::new(),
            Bytes::from(vec![7u8; 300]),
        ];
        let rec = Bytes::from(encode_batch(42, &frames));
        let (head, back) = decode_batch(&rec).unwrap();
        assert_eq!(
            head,
            BatchHeader {
                ts_ms: 42,
                count: 3
            }
        );
        assert_eq!(back, frames);
    }

    #[test]
    fn golden_bytes() {
        let rec = encode_batch(1, &[Bytes::from_static(b"xy")]);
        assert_eq!(
            rec,
            [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'x', b'y']
        );
    }

    #[test]
    fn malformed_records_are_refused() {
        assert!(decode_batch(&Bytes::from_static(b"short")).is_none());
        let mut rec = encode_batch(1, &[Bytes::from_static(b"xy")]);
        rec.pop();
        assert!(decode_batch(&Bytes::from(rec.clone())).is_none());
        rec.extend_from_slice(b"yz");
        assert!(decode_batch(&Bytes::from(rec)).is_none());
    }
}
