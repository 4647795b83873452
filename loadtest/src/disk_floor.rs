//! `sensorgate-load disk-floor`: what `durability = "strict"` could at best promise on a disk.
//!
//! Readings arrive at `--rate` on one thread; one commit thread does what strict mode's
//! commit thread does at the least — gathers every reading that has arrived, writes them
//! with one `pwrite` after the previous ones in one file (preallocated with `fallocate`, as
//! the server's segments are, unless `--append`) and waits for one `fdatasync` — and
//! records each reading's
//! arrival→synced time. No network, no parsing, no index: the latency that is left is the
//! disk's. A strict server's SUBMIT→DISPATCH tail divided by this one is the cost of
//! everything else. Owns its file (created in `--dir`, removed at the end); shares no code
//! with the server on purpose.

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
        std::thread::spawn(move || commit(&file, &queue, size))
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
    queue.ready.notify_one();
}

type Histograms = (
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
    u64,
);

/// One commit per wake-up: everything that arrived, one `pwrite`, one `fdatasync`.
fn commit(file: &File, queue: &Queue, size: usize) -> Result<Histograms> {
    let mut latency = latency_histogram();
    let mut sync = latency_histogram();
    let mut syncs = 0u64;
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    let mut offset = 0u64;
    loop {
        let done = {
            let mut arrived = queue.arrived.lock().expect("queue lock");
            while arrived.0.is_empty() && !arrived.1 {
                arrived = queue.ready.wait(arrived).expect("queue lock");
            }
            std::mem::swap(&mut batch, &mut arrived.0);
            arrived.0.is_empty() && arrived.1 && batch.is_empty()
        };
        if done {
            return Ok((latency, sync, syncs));
        }
        buf.clear();
        buf.resize(batch.len() * size, b'r');
        file.write_all_at(&buf, offset).context("pwrite")?;
        offset += buf.len() as u64;
        let before = Instant::now();
        file.sync_data().context("fdatasync")?;
        let now = Instant::now();
        syncs += 1;
        sync.saturating_record((now - before).as_micros().max(1) as u64);
        for t in batch.drain(..) {
            latency.saturating_record((now - t).as_micros().max(1) as u64);
        }
    }
}
