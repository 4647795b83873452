//! The embedded store: one sled database under the data directory.
//!
//! Layout: a tree `stream/<id>` per stream holding one record per group commit keyed by its
//! big-endian first seq, and a tree `meta` holding each stream's reserved seq high-water mark
//! under `reserved/<id>`. Appends go to sled's in-memory log at once; the [`Committer`] makes
//! them durable.

use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

use super::commit::Committer;
use super::record::{decode_batch, encode_batch, header};
use super::{Entry, LogError, Recovered, Store, StreamLog};
use crate::config::Durability;

const STREAM_PREFIX: &str = "stream/";
/// sled's page cache; the log is read mostly at its tail, so a modest cache serves replay.
const CACHE_BYTES: u64 = 256 << 20;

pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    committer: Committer,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        fast_flush: Duration,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            // Our committer flushes (and fsyncs); sled's own timer would only duplicate it.
            .flush_every_ms(None)
            .open()?;
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
        let committer = Committer::start(db.clone(), data_file, interval);
        Ok(Self {
            db,
            meta,
            committer,
        })
    }
}

impl Store for SledStore {
    fn open_stream(&self, stream: &str) -> Result<Arc<dyn StreamLog>, LogError> {
        let tree = self.db.open_tree(format!("{STREAM_PREFIX}{stream}"))?;
        Ok(Arc::new(SledStream {
            name: stream.to_owned(),
            tree,
            meta: self.meta.clone(),
            reserved_key: format!("reserved/{stream}").into_bytes(),
            dirty: self.committer.dirty.clone(),
        }))
    }

    fn commit(&self) -> oneshot::Receiver<Result<(), LogError>> {
        self.committer.request()
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
    tree: sled::Tree,
    meta: sled::Tree,
    reserved_key: Vec<u8>,
    dirty: Arc<std::sync::atomic::AtomicBool>,
}

impl SledStream {
    fn corrupt(&self, seq: u64) -> LogError {
        LogError::Corrupt {
            stream: self.name.clone(),
            seq,
        }
    }

    fn key_seq(&self, key: &[u8]) -> Result<u64, LogError> {
        key.try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| self.corrupt(0))
    }
}

impl StreamLog for SledStream {
    fn recover(&self) -> Result<Recovered, LogError> {
        let stored_last = match self.tree.last()? {
            Some((key, value)) => {
                let first = self.key_seq(&key)?;
                let head = header(&value).ok_or_else(|| self.corrupt(first))?;
                first + u64::from(head.count).saturating_sub(1)
            }
            None => 0,
        };
        let reserved = match self.meta.get(&self.reserved_key)? {
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
        self.tree
            .insert(first_seq.to_be_bytes(), encode_batch(ts_ms, frames))?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn reserve(&self, through: u64) -> Result<(), LogError> {
        self.meta
            .insert(&self.reserved_key, &through.to_be_bytes())?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn read(
        &self,
        after: u64,
        before: u64,
        max: usize,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError> {
        let Some(start) = after.checked_add(1) else {
            return Ok(());
        };
        if start >= before || max == 0 {
            return Ok(());
        }
        // The record holding `start` begins at or before it.
        let from = match self.tree.range(..=start.to_be_bytes()).next_back() {
            Some(item) => self.key_seq(&item?.0)?,
            None => 0,
        };
        let mut taken = 0;
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
                if seq >= before || taken == max {
                    return Ok(());
                }
                out.push(Entry { seq, frame });
                taken += 1;
            }
        }
        Ok(())
    }

    fn trim(&self, through_seq: u64, older_than_ms: u64) -> Result<u64, LogError> {
        let mut removed = 0u64;
        for item in self.tree.iter() {
            let (key, value) = item?;
            let first = self.key_seq(&key)?;
            let head = header(&value).ok_or_else(|| self.corrupt(first))?;
            let last = first + u64::from(head.count).saturating_sub(1);
            if last > through_seq && head.ts_ms >= older_than_ms {
                break;
            }
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
        log.read(after, before, max, &mut out).unwrap();
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
            log.append(1, 100, &frames(1, 3)).unwrap();
            log.append(4, 200, &frames(4, 4)).unwrap();
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
        // Trim by count keeps whole records: seqs 1..=3 go, 4..=7 stay.
        assert_eq!(log.trim(5, 0).unwrap(), 3);
        assert_eq!(seqs(&*log, 0, u64::MAX, 100), vec![4, 5, 6, 7]);
        // Trim by age.
        assert_eq!(log.trim(0, 201).unwrap(), 4);
        assert!(seqs(&*log, 0, u64::MAX, 100).is_empty());
        store.close().unwrap();
    }
}
