//! The durable sequenced log: what a stream's owner appends to and REPLAY reads from.
//!
//! Owns the storage traits ([`Store`], [`StreamLog`]), the on-disk record format and the
//! embedded implementation on sled, and the cluster's log on NATS JetStream ([`jetstream`]),
//! where JetStream, not the node, assigns seqs. Must not know about connections, protocols or the hub's
//! subscribers: it stores opaque frames under sequence numbers.

mod commit;
pub mod jetstream;
mod record;
mod segment;
mod sled_store;

pub use record::{decode_batch, BatchHeader};
pub use sled_store::SledStore;

use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Why the log could not do what was asked. Connections map every variant to close 1011.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream {stream}: corrupt record at seq {seq}")]
    Corrupt { stream: String, seq: u64 },
    #[error("store is closed")]
    Closed,
    #[error("store cannot write (an earlier commit failed)")]
    NotWritable,
    #[error("the data directory was written by another version of sensorgate; move it aside or point data_dir elsewhere")]
    Format,
    #[error("jetstream: {0}")]
    JetStream(Box<dyn std::error::Error + Send + Sync>),
}

/// Where a stream stands when its owner starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The seq the next reading gets: above everything stored and everything ever reserved.
    pub next_seq: u64,
    /// The oldest retained seq, if any reading is stored.
    pub first_seq: Option<u64>,
}

/// One stored reading as REPLAY hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub frame: Bytes,
}

/// How much one [`StreamLog::read`] may return.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimit {
    pub entries: usize,
    /// Frame bytes; the first entry is returned whatever its size.
    pub bytes: usize,
}

/// A whole store: opens streams and makes their appends durable together (group commit).
pub trait Store: Send + Sync + 'static {
    /// Opens (or creates) the log of one stream; the same name gives the same log, so the
    /// stream's owner and retention see one state.
    fn open_stream(&self, stream: &str) -> Result<Arc<dyn StreamLog>, LogError>;
    /// Requests that every append made so far becomes durable. The receiver resolves once it
    /// is; many requests in flight share one flush.
    fn commit(&self) -> oneshot::Receiver<Result<(), LogError>>;
    /// The names of the streams that have a log, for retention.
    fn stream_names(&self) -> Vec<String>;
    /// False from a failed commit (disk full, I/O error) until a commit succeeds again.
    fn writable(&self) -> bool;
    /// Makes everything durable and stops background work; used once at shutdown.
    fn close(&self) -> Result<(), LogError>;
}

/// The log of one stream. Appends come from the stream's single owner; reads from anyone.
pub trait StreamLog: Send + Sync + 'static {
    /// The stream's position after a restart (clean or not).
    fn recover(&self) -> Result<Recovered, LogError>;
    /// Appends frames carrying seqs `first_seq..first_seq + frames.len()`, stamped `ts_ms`.
    /// Visible to reads at once; durable after the next [`Store::commit`].
    fn append(&self, first_seq: u64, ts_ms: u64, frames: &[Bytes]) -> Result<(), LogError>;
    /// Drops readings `first..=last` that were appended but whose commit failed: they were
    /// never dispatched, so no read may ever return them.
    fn discard(&self, first: u64, last: u64) -> Result<(), LogError>;
    /// The newest seq a successful commit has written. A commit that succeeds after an
    /// earlier one failed does not vouch for readings the failed one dropped: in strict
    /// mode the owner checks its readings against this.
    fn written(&self) -> u64;
    /// Records that seqs up to `through` may be handed out before their readings are durable,
    /// so that no seq is reused after a crash. Durable after the next [`Store::commit`].
    fn reserve(&self, through: u64) -> Result<(), LogError>;
    /// Reads entries with `after < seq < before`, in seq order, into `out`, within `limit`
    /// (the first entry is returned whatever its size). Sees every append, durable
    /// or not: holding readers at the durable mark is the caller's job (the stream's owner
    /// knows the mark; see `hub::stream`).
    fn read(
        &self,
        after: u64,
        before: u64,
        limit: ReadLimit,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError>;
    /// The lowest seq a read can still return: everything below it was removed by
    /// retention (or never existed).
    fn first_seq(&self) -> u64;
    /// Retention: removes whole stored records whose readings all lie more than
    /// `keep_last` readings below the newest stored seq (0: no count limit) or are older
    /// than `older_than_ms`; returns how many readings went. Counted from seqs actually
    /// stored, never from reserved ones.
    fn trim(&self, keep_last: u64, older_than_ms: u64) -> Result<u64, LogError>;
}
