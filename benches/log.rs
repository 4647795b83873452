//! Log append benchmark: what storing a group commit costs per reading, in both durability
//! modes and at two batch sizes.
//!
//! `log_append/<fast|strict>/<batch>`: a [`SledStore`] in a temporary directory under cargo's
//! target tmp dir (the build's disk, so `fsync` is real), one stream, and per iteration one
//! `StreamLog::append` of `batch` (64 or 1024) frames of 120 bytes under consecutive seqs, as
//! the stream owner does per group commit. In strict mode the iteration also waits for
//! `Store::commit` (one `pwrite` + `fdatasync`), as the owner does before dispatching; in fast
//! mode the store's own flush thread writes every 5 ms in the background, as in production.
//! Throughput is per reading, so the strict rows show what a group commit costs per reading
//! at each batch size.
//!
//! To keep the disk from filling during long runs, every 64 MiB appended the stream is
//! trimmed and committed outside the timed region (`iter_custom`).
//!
//! Run: `cargo bench --bench log -- --warm-up-time 1 --measurement-time 3`
//! (1 s warm-up, 3 s measurement, 30 flat samples by default; see `config`).

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use std::time::{Duration, Instant};

use sensorgate::config::Durability;
use sensorgate::hub::now_ms;
use sensorgate::log::{SledStore, Store};

/// Bytes of one stored frame.
const FRAME_BYTES: usize = 120;
/// Appended bytes after which the stream is trimmed (untimed).
const TRIM_EVERY_BYTES: usize = 64 << 20;

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

/// `n` distinct 120-byte DISPATCH-like frames.
fn frames(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let head = format!(r#"{{"op":5,"d":{{"val":{i},"pad":""#);
            let tail = r#""},"seq":1,"t":"HEART_RATE"}"#;
            let pad = "x".repeat(FRAME_BYTES - head.len() - tail.len());
            let frame = format!("{head}{pad}{tail}");
            assert_eq!(frame.len(), FRAME_BYTES);
            Bytes::from(frame)
        })
        .collect()
}

fn wait_commit(store: &SledStore) {
    store
        .commit()
        .blocking_recv()
        .expect("the committer answers")
        .expect("the commit succeeds");
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_append");
    group.sampling_mode(SamplingMode::Flat);
    for (mode, durability) in [("fast", Durability::Fast), ("strict", Durability::Strict)] {
        for batch in [64usize, 1024] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir");
            let store = SledStore::open(dir.path(), durability, Duration::from_millis(5))
                .expect("the store opens");
            let log = store.open_stream("bench").expect("the stream opens");
            let frames = frames(batch);
            let mut next = 1u64;
            let mut since_trim = 0usize;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(mode, batch), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        log.append(next, now_ms(), &frames).expect("appended");
                        if durability == Durability::Strict {
                            wait_commit(&store);
                        }
                        timed += start.elapsed();
                        next += batch as u64;
                        since_trim += batch * FRAME_BYTES;
                        if since_trim >= TRIM_EVERY_BYTES {
                            log.trim(next - 1, 0).expect("trimmed");
                            wait_commit(&store);
                            since_trim = 0;
                        }
                    }
                    timed
                })
            });
            store.close().expect("the store closes");
        }
    }
    group.finish();
}

criterion_group! {
    name = log;
    config = config();
    targets = append
}
criterion_main!(log);
