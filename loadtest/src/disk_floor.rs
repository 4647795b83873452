//! `sensorgate-load disk-floor`: what `durability = "strict"` could at best promise on a disk.
//!
//! Readings arrive at `--rate` on one thread; one commit thread does what strict mode's
//! commit thread does at the least — gathers every reading that has arrived, writes them
//! with one `pwrite` after the previous ones in one file (preallocated with `fallocate`, as
//! the server's segments are, unless `--append`) and waits for one `fdatasync` — and
//! records each reading's arrival→synced time. `--lanes N` runs N such threads, so N syncs
//! can be in flight (what a strict server would need to stop waiting behind a slow sync;
//! BENCHMARKS.md says why the server does not); `--spin` has them poll for arrivals
//! instead of sleeping until woken, which separates waking a thread from waiting for the
//! disk. No network, no parsing, no index: the latency that is left is the disk's. A strict
//! server's SUBMIT→DISPATCH tail divided by this one is the cost of everything else. Owns
//! its file (created in `--dir`, removed at the end); shares no code with the server on
//! purpose.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cli::DiskFloorArgs;
use crate::report::{Outcome, Table};
use crate::stats::{latency_histogram, Latency};

#[derive(Debug, Serialize)]
pub struct DiskFloorReport {
    pub file: PathBuf,
    pub readings: u64,
    pub syncs: u64,
    /// Arrival → `fdatasync` returned, per reading.
    pub latency: Option<Latency>,
    /// Each `fdatasync` alone.
    pub sync: Option<Latency>,
}

impl Outcome for DiskFloorReport {
    fn passed(&self) -> bool {
        self.readings > 0
    }

    fn table(&self) -> Table {
        let mut t = Table::new("disk-floor: arrival → fdatasync, one commit thread");
        t.row("file", self.file.display().to_string())
            .row("readings", self.readings.to_string())
            .row("syncs", self.syncs.to_string())
            .latency(self.latency.as_ref())
            .gap()
            .row("fdatasync alone", "");
        t.latency(self.sync.as_ref());
        t
    }
}

/// Readings that arrived and wait for the next commit, by arrival time.
#[derive(Default)]
struct Queue {
    arrived: Mutex<(Vec<Instant>, bool)>,
    ready: Condvar,
}

pub fn run(args: &DiskFloorArgs) -> Result<DiskFloorReport> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of readings per second");
    }
    let duration = Duration::try_from_secs_f64(args.duration)
        .context("--duration must be a positive number of seconds")?;
    let path = args
        .dir
        .join(format!("sensorgate-disk-floor-{}.seg", std::process::id()));
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    if !args.append {
        let needed = (args.rate * duration.as_secs_f64()) as u64 * args.size as u64;
        let len = needed.max(64 << 20);
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len)
            .context("fallocate (try --append on a file system without it)")?;
        file.sync_all().context("syncing the preallocated file")?;
    }
    let queue = Arc::new(Queue::default());
    let committer = {
        let queue = Arc::clone(&queue);
        let size = args.size;
        let lanes = args.lanes.max(1);
        let spin = args.spin;
        std::thread::spawn(move || commit(&file, &queue, size, lanes, spin))
    };
    arrive(&queue, args.rate, duration);
    let result = committer.join();
    let _ = std::fs::remove_file(&path);
    let (latency, sync, syncs) = match result {
        Ok(done) => done?,
        Err(_) => bail!("the commit thread panicked"),
    };
    Ok(DiskFloorReport {
        file: path,
        readings: latency.len(),
        syncs,
        latency: Latency::of(&latency),
        sync: Latency::of(&sync),
    })
}

/// Paces arrivals over `duration`, every reading stamped when it arrives; then tells the
/// commit thread to finish.
fn arrive(queue: &Queue, rate: f64, duration: Duration) {
    let start = Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        if due > sent {
            let now = Instant::now();
            let mut arrived = queue.arrived.lock().expect("queue lock");
            arrived.0.extend((sent..due).map(|_| now));
            drop(arrived);
            queue.ready.notify_one();
            sent = due;
        }
        std::thread::sleep(Duration::from_secs_f64(1.0 / rate).min(Duration::from_micros(100)));
    }
    queue.arrived.lock().expect("queue lock").1 = true;
    queue.ready.notify_all();
}

type Histograms = (
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
    u64,
);

/// The writing side the lanes take turns at: the file's end, the next batch's number and
/// the buffers reused for each write.
struct Written {
    offset: u64,
    next: u64,
    buf: Vec<u8>,
    batch: Vec<Instant>,
}

/// The syncing side: batches written but not yet known synced (oldest first, each with its
/// number and its readings' arrival times) and what was measured.
struct Synced {
    pending: std::collections::VecDeque<(u64, Vec<Instant>)>,
    latency: hdrhistogram::Histogram<u64>,
    sync: hdrhistogram::Histogram<u64>,
    syncs: u64,
}

/// `lanes` threads commit; each takes whatever has arrived and writes it after the previous
/// batch (one at a time, so the file is written in order), then syncs outside the lock,
/// so up to `lanes` syncs are in flight. A sync that returns makes every batch written
/// before it started durable (`fdatasync` covers everything written before the call).
fn commit(file: &File, queue: &Queue, size: usize, lanes: usize, spin: bool) -> Result<Histograms> {
    let written = Mutex::new(Written {
        offset: 0,
        next: 0,
        buf: Vec::new(),
        batch: Vec::new(),
    });
    let synced = Mutex::new(Synced {
        pending: Default::default(),
        latency: latency_histogram(),
        sync: latency_histogram(),
        syncs: 0,
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|_| s.spawn(|| lane(file, queue, size, spin, &written, &synced)))
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a commit lane panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let synced = synced.into_inner().expect("synced lock");
    Ok((synced.latency, synced.sync, synced.syncs))
}

fn lane(
    file: &File,
    queue: &Queue,
    size: usize,
    spin: bool,
    written: &Mutex<Written>,
    synced: &Mutex<Synced>,
) -> Result<()> {
    loop {
        let id = {
            let mut w = written.lock().expect("written lock");
            let w = &mut *w;
            let done = {
                let mut arrived = queue.arrived.lock().expect("queue lock");
                while arrived.0.is_empty() && !arrived.1 {
                    if spin {
                        drop(arrived);
                        std::hint::spin_loop();
                        arrived = queue.arrived.lock().expect("queue lock");
                    } else {
                        arrived = queue.ready.wait(arrived).expect("queue lock");
                    }
                }
                std::mem::swap(&mut w.batch, &mut arrived.0);
                arrived.0.is_empty() && arrived.1 && w.batch.is_empty()
            };
            if done {
                // Wake the next lane, which finds the same.
                queue.ready.notify_one();
                return Ok(());
            }
            w.buf.clear();
            w.buf.resize(w.batch.len() * size, b'r');
            file.write_all_at(&w.buf, w.offset).context("pwrite")?;
            w.offset += w.buf.len() as u64;
            let id = w.next;
            w.next += 1;
            let batch = std::mem::take(&mut w.batch);
            synced
                .lock()
                .expect("synced lock")
                .pending
                .push_back((id, batch));
            id
        };
        let before = Instant::now();
        file.sync_data().context("fdatasync")?;
        let now = Instant::now();
        let mut guard = synced.lock().expect("synced lock");
        let s = &mut *guard;
        s.syncs += 1;
        s.sync
            .saturating_record((now - before).as_micros().max(1) as u64);
        // Batches before this one whose own syncs are still running are durable too.
        while s.pending.front().is_some_and(|(b, _)| *b <= id) {
            let (_, batch) = s.pending.pop_front().expect("a pending batch");
            for t in batch {
                s.latency
                    .saturating_record((now - t).as_micros().max(1) as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reading is synced and counted once, whatever the number of lanes and however
    /// the lanes wait for arrivals.
    #[test]
    fn every_reading_is_counted_once_in_any_lane_count() {
        let dir = std::env::temp_dir().join(format!("sg-floor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (lanes, spin) in [(1, false), (3, false), (1, true), (2, true)] {
            let report = run(&DiskFloorArgs {
                dir: dir.clone(),
                rate: 4_000.0,
                duration: 0.5,
                size: 100,
                append: false,
                lanes,
                spin,
            })
            .unwrap();
            assert_eq!(report.readings, 2_000, "lanes {lanes} spin {spin}");
            assert!(
                report.syncs > 0 && report.syncs <= 2_000,
                "lanes {lanes} spin {spin}"
            );
        }
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the file is removed"
        );
        std::fs::remove_dir(&dir).unwrap();
    }
}
