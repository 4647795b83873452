//! The `relay` scenario (also the fill phase of `replay`): consumers connect
//! first, then producers submit padded, timestamped readings at a target
//! rate or as fast as TCP backpressure allows; consumers measure
//! SUBMIT→DISPATCH latency and check exactly-once, in-order delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use super::{connect_all, lock, Job, LiveConn, CONTROL_BUFFERS};
use crate::check::Checker;
use crate::cli::RelayArgs;
use crate::creds::Developer;
use crate::ctx::{Ctx, Stop};
use crate::frames::{self, ClientKind, SubmitBuilder};
use crate::progress::Progress;
use crate::report::{self, Outcome, Table};
use crate::scan::Parser;
use crate::stats::{end_key, latency_histogram, record_latency, Latency, Tally};
use crate::ws::{self, Buffers, Flow, Session, WsWrite};

/// Producer write buffer: batches are flushed well before it fills.
const PRODUCER_WRITE_BUFFER: usize = 64 * 1024;
/// Parallel connection setups for producers and consumers.
const SETUP_CONCURRENCY: usize = 16;

/// A fully resolved relay run.
#[derive(Clone, Debug)]
pub struct RelayPlan {
    pub developers: Vec<Developer>,
    pub producers: usize,
    pub consumers: usize,
    /// Total readings/s, `None` for as fast as possible.
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub size: usize,
    pub batch: usize,
    /// All producers on one schedule (bursts) instead of phased over a period.
    pub aligned: bool,
    /// Producer SO_SNDBUF.
    pub inflight: u32,
    pub drain: Duration,
    /// Readings/s each consumer takes while producers run (`None`: as fast as it can).
    pub consumer_rate: Option<f64>,
    pub parser: Parser,
    /// Producer uids are `<prefix>-<developer>-<i>`.
    pub uid_prefix: &'static str,
}

impl RelayPlan {
    pub fn from_args(ctx: &Ctx, a: &RelayArgs) -> Result<Self> {
        let available = ctx.developers.len();
        let d = a.developers.unwrap_or(available);
        if d == 0 || d > available {
            bail!("--developers {d}: between 1 and the {available} developer(s) given");
        }
        if a.producers == 0 {
            bail!("--producers must be at least 1");
        }
        if a.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if let Some(r) = a.rate {
            if !r.is_finite() || r < 0.0 {
                bail!("--rate must be a non-negative number");
            }
        }
        let duration = match (a.duration, a.count) {
            (Some(s), _) => Some(secs("--duration", s)?),
            (None, None) => Some(Duration::from_secs(10)),
            (None, Some(_)) => None,
        };
        Ok(Self {
            developers: ctx.developers[..d].to_vec(),
            producers: a.producers,
            consumers: a.consumers.unwrap_or(d),
            rate: a.rate.filter(|r| *r > 0.0),
            duration,
            count: a.count,
            size: a.size,
            batch: a.batch,
            aligned: a.aligned,
            inflight: a.inflight,
            drain: secs("--drain", a.drain)?,
            consumer_rate: match a.consumer_rate {
                Some(r) if !r.is_finite() || r <= 0.0 => bail!("--consumer-rate must be positive"),
                r => r,
            },
            parser: a.parser,
            uid_prefix: "load",
        })
    }
}

/// Converts a seconds option to a duration, rejecting negatives and NaN.
pub fn secs(flag: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow!("{flag} must be a non-negative number of seconds"))
}

/// Results of a relay run.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub scenario: &'static str,
    pub developers: usize,
    pub producers: usize,
    pub producers_connected: usize,
    pub consumers: usize,
    pub rate_target: Option<f64>,
    /// Producers submitted on one shared schedule (bursts).
    pub aligned: bool,
    pub frame_bytes: usize,
    /// Producer SO_SNDBUF as requested.
    pub inflight_bytes: u32,
    pub parser: Parser,
    /// From releasing the producers to the last one stopping.
    pub window_secs: f64,
    pub sent: u64,
    pub sent_per_sec: f64,
    /// Readings the consumers should receive (sent × consumers of that developer).
    pub expected: u64,
    pub delivered: u64,
    pub delivered_in_window: u64,
    /// Deliveries during the producing window per second of it.
    pub delivered_per_sec: f64,
    pub drained: bool,
    pub drain_secs: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub seq_regressions: u64,
    pub seq_gaps: u64,
    pub malformed: u64,
    pub foreign: u64,
    pub latency: Option<Latency>,
    /// Closes the server initiated, by code.
    pub close_codes: Tally,
    pub setup_failures: Tally,
    pub errors: Tally,
    /// Highest seq each consumer saw, by developer.
    pub last_seq: Vec<(String, Option<u64>)>,
    pub passed: bool,
}

impl RelayReport {
    fn check_passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.seq_regressions == 0
            && self.malformed == 0
            && self.close_codes.is_empty()
            && self.setup_failures.is_empty()
            && self.errors.is_empty()
    }

    /// Rows shared with the replay fill summary.
    pub fn add_rows(&self, t: &mut Table) {
        t.row(
            "connections",
            format!(
                "{} developer(s), {}/{} producers, {} consumer(s)",
                self.developers, self.producers_connected, self.producers, self.consumers
            ),
        );
        t.row(
            "load",
            format!(
                "{} B frames, rate {}{}, {} in flight per producer",
                self.frame_bytes,
                self.rate_target.map_or("unlimited".into(), report::rate),
                match (self.rate_target, self.aligned) {
                    (Some(_), true) => " (aligned bursts)",
                    (Some(_), false) => " (phased)",
                    (None, _) => "",
                },
                report::bytes(f64::from(self.inflight_bytes))
            ),
        );
        t.row("window", format!("{:.2} s", self.window_secs));
        t.row(
            "sent",
            format!(
                "{} ({})",
                report::count(self.sent),
                report::rate(self.sent_per_sec)
            ),
        );
        t.row(
            "delivered",
            format!(
                "{} of {} expected ({} in window: {})",
                report::count(self.delivered),
                report::count(self.expected),
                report::count(self.delivered_in_window),
                report::rate(self.delivered_per_sec)
            ),
        );
        t.row(
            "drain",
            format!(
                "{:.2} s{}",
                self.drain_secs,
                if self.drained { "" } else { " (incomplete)" }
            ),
        );
        t.latency(self.latency.as_ref());
        let check = |n: u64| format!("{} {}", report::count(n), report::verdict(n == 0));
        t.row("lost", check(self.lost));
        t.row("duplicated", check(self.duplicated));
        t.row("out of order", check(self.out_of_order));
        t.row("seq regressions", check(self.seq_regressions));
        t.row("seq gaps (info)", report::count(self.seq_gaps));
        if self.malformed > 0 {
            t.row("malformed", check(self.malformed));
        }
        if self.foreign > 0 {
            t.row("foreign readings", report::count(self.foreign));
        }
        t.row("server closes", self.close_codes.describe());
        if !self.setup_failures.is_empty() {
            t.row("setup failures", self.setup_failures.describe());
        }
        if !self.errors.is_empty() {
            t.row("errors", self.errors.describe());
        }
    }
}

impl Outcome for RelayReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn table(&self) -> Table {
        let mut t = Table::new("sensorgate-load relay");
        self.add_rows(&mut t);
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t
    }
}

pub async fn run(ctx: &Ctx, args: &RelayArgs) -> Result<RelayReport> {
    let plan = RelayPlan::from_args(ctx, args)?;
    execute(ctx, &plan, "relay").await
}

/// What a consumer's reader accumulates.
struct ConsumerState {
    checker: Checker,
    latency: Histogram<u64>,
    unexpected: Tally,
}

/// Runs a relay plan end to end; `label` prefixes the progress display.
pub async fn execute(ctx: &Ctx, plan: &RelayPlan, label: &str) -> Result<RelayReport> {
    let d = plan.developers.len();
    let uids: Vec<(usize, String)> = (0..plan.producers)
        .map(|i| {
            let dev = i % d;
            (
                dev,
                format!("{}-{}-{i}", plan.uid_prefix, plan.developers[dev].id),
            )
        })
        .collect();
    let progress = Arc::new(Progress::spinner(ctx.progress, label));

    // Consumers first, all READY before any reading is sent.
    progress.set_message(format!("connecting {} consumer(s)", plan.consumers));
    let jobs = (0..plan.consumers)
        .map(|j| Job {
            dev: plan.developers[j % d].clone(),
            kind: ClientKind::Consumer,
            uid: None,
        })
        .collect();
    let tracked_delivered = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for (j, result) in connect_all(ctx, jobs, SETUP_CONCURRENCY, CONTROL_BUFFERS)
        .await
        .into_iter()
        .enumerate()
    {
        let dev = j % d;
        let session = result.map_err(|e| {
            anyhow!(
                "consumer {j} of developer {:?} could not connect: {e}",
                plan.developers[dev].id
            )
        })?;
        let tracked = uids
            .iter()
            .filter(|(u, _)| *u == dev)
            .map(|(_, uid)| uid.clone());
        let state = ConsumerState {
            checker: Checker::new(tracked),
            latency: latency_histogram(),
            unexpected: Tally::default(),
        };
        let got = Arc::new(AtomicU64::new(0));
        let counters = [tracked_delivered.clone(), got.clone()];
        let parser = plan.parser;
        let mut pace = plan
            .consumer_rate
            .map(|rate| Pace::new(rate, plan.duration.unwrap_or(Duration::MAX)));
        let conn = LiveConn::spawn(session, state, move |st: &mut ConsumerState, text| {
            on_consumer_frame(st, text, parser, &counters);
            pace.as_mut().map_or(Flow::Continue, Pace::next)
        });
        consumers.push((dev, conn, got));
    }

    // Producers: connect all, then release them together.
    progress.set_message(format!("connecting {} producer(s)", plan.producers));
    let jobs = uids
        .iter()
        .map(|(dev, uid)| Job {
            dev: plan.developers[*dev].clone(),
            kind: ClientKind::Producer,
            uid: Some(uid.clone()),
        })
        .collect();
    let buffers = Buffers {
        write: PRODUCER_WRITE_BUFFER,
        send: Some(plan.inflight),
    };
    let sessions = connect_all(ctx, jobs, SETUP_CONCURRENCY, buffers).await;
    let mut setup_failures = Tally::default();
    let mut ready = Vec::new();
    for ((dev, uid), result) in uids.iter().zip(sessions) {
        match result {
            Ok(session) => ready.push((*dev, uid.clone(), session)),
            Err(e) => setup_failures.add(format!("producer {}", e.kind()), 1),
        }
    }
    if ready.is_empty() {
        for (_, c, _) in consumers {
            c.finish(Instant::now() + Duration::from_secs(2)).await;
        }
        bail!("no producer could connect: {}", setup_failures.describe());
    }

    let live = ready.len() as u64;
    let rate_each = plan.rate.map(|r| r / live as f64);
    let shared = Arc::new(ProducerShared {
        sent: AtomicU64::new(0),
        active: AtomicUsize::new(ready.len()),
        delivered: tracked_delivered.clone(),
        delivered_at_end: AtomicU64::new(0),
    });
    let started = Instant::now();
    let end_at = plan
        .duration
        .map_or(ctx.deadline, |dur| ctx.bound(started + dur));
    let ticker = spawn_ticker(progress.clone(), shared.clone());
    let mut producers = JoinSet::new();
    let mut uid_dev = HashMap::new();
    for (i, (dev, uid, session)) in ready.into_iter().enumerate() {
        let quota = plan
            .count
            .map_or(u64::MAX, |n| n / live + u64::from((i as u64) < n % live));
        uid_dev.insert(uid.clone(), dev);
        // Producer i's schedule starts i/P of a period late, so readings arrive evenly
        // rather than as one burst per period.
        let phase = match rate_each {
            Some(r) if !plan.aligned => Duration::from_secs_f64(i as f64 / (live as f64 * r)),
            _ => Duration::ZERO,
        };
        let spec = ProducerSpec {
            uid,
            quota,
            rate: rate_each,
            size: plan.size,
            batch: plan.batch,
            started: started + phase,
            end_at,
            deadline: ctx.deadline,
        };
        producers.spawn(run_producer(
            session,
            spec,
            shared.clone(),
            ctx.stop.clone(),
        ));
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = producers.join_next().await {
        outcomes.push(outcome?);
    }
    let window = outcomes
        .iter()
        .map(|o| o.stopped_at)
        .max()
        .unwrap_or(started)
        .duration_since(started);
    let delivered_in_window = shared.delivered_at_end.load(Ordering::Relaxed);

    // Drain: wait (bounded) until consumers have everything they should.
    let sent_by_uid: HashMap<String, u64> =
        outcomes.iter().map(|o| (o.uid.clone(), o.sent)).collect();
    let mut sent_by_dev = vec![0u64; d];
    for o in &outcomes {
        sent_by_dev[uid_dev[&o.uid]] += o.sent;
    }
    let expected: u64 = consumers.iter().map(|(dev, ..)| sent_by_dev[*dev]).sum();
    let has_all = |dev: usize, got: &AtomicU64| got.load(Ordering::Relaxed) >= sent_by_dev[dev];
    let drain_start = Instant::now();
    let drain_until = ctx.bound(drain_start + plan.drain);
    let drained = loop {
        // Done when every consumer has its readings or can get no more.
        let waiting = consumers
            .iter()
            .any(|(dev, c, got)| !c.is_finished() && !has_all(*dev, got));
        if !waiting {
            break consumers.iter().all(|(dev, _, got)| has_all(*dev, got));
        }
        // Ctrl-C stops the producers but not this bounded wait.
        if Instant::now() >= drain_until {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish();

    // Tear down consumers and gather their findings.
    let mut close_codes = Tally::default();
    let mut errors = Tally::default();
    for o in &outcomes {
        if let Some(code) = &o.server_close {
            close_codes.add(code.clone(), 1);
        }
        if let Some(e) = &o.error {
            errors.add(format!("producer: {e}"), 1);
        }
    }
    for (_, c, _) in &consumers {
        c.begin_close();
    }
    let close_deadline = Instant::now() + Duration::from_secs(5);
    let mut latency = latency_histogram();
    let mut totals = crate::check::DeliveryStats::default();
    let mut lost = 0;
    let mut last_seq = Vec::new();
    for (dev, c, _) in consumers {
        let state = c.state.clone();
        let ended = c.finish(close_deadline).await;
        if let Some(code) = ended.server_close {
            close_codes.add(code, 1);
        }
        let st = lock(&state);
        let (stats, consumer_lost) = st.checker.finish(&sent_by_uid);
        lost += consumer_lost;
        totals.received += stats.received;
        totals.duplicated += stats.duplicated;
        totals.out_of_order += stats.out_of_order;
        totals.seq_regressions += stats.seq_regressions;
        totals.seq_gaps += stats.seq_gaps;
        totals.malformed += stats.malformed;
        totals.foreign += stats.foreign;
        latency
            .add(&st.latency)
            .map_err(|e| anyhow!("merging latency histograms: {e:?}"))?;
        for (what, n) in &st.unexpected.0 {
            errors.add(format!("consumer: {what}"), *n);
        }
        last_seq.push((plan.developers[dev].id.clone(), st.checker.last_seq()));
    }

    let sent: u64 = outcomes.iter().map(|o| o.sent).sum();
    let window_secs = window.as_secs_f64().max(1e-9);
    let mut report = RelayReport {
        scenario: "relay",
        developers: d,
        producers: plan.producers,
        producers_connected: outcomes.len(),
        consumers: plan.consumers,
        rate_target: plan.rate,
        aligned: plan.aligned,
        frame_bytes: plan
            .size
            .max(SubmitBuilder::unpadded_len(frames::unix_nanos(), 0)),
        inflight_bytes: plan.inflight,
        parser: plan.parser,
        window_secs: window.as_secs_f64(),
        sent,
        sent_per_sec: sent as f64 / window_secs,
        expected,
        delivered: totals.received,
        delivered_in_window,
        delivered_per_sec: delivered_in_window as f64 / window_secs,
        drained,
        drain_secs,
        lost,
        duplicated: totals.duplicated,
        out_of_order: totals.out_of_order,
        seq_regressions: totals.seq_regressions,
        seq_gaps: totals.seq_gaps,
        malformed: totals.malformed,
        foreign: totals.foreign,
        latency: Latency::of(&latency),
        close_codes,
        setup_failures,
        errors,
        last_seq,
        passed: false,
    };
    report.passed = report.check_passed();
    Ok(report)
}

/// A slow consumer's schedule: `rate` frames/s for `during` from its first frame, then
/// unpaced.
struct Pace {
    rate: f64,
    during: Duration,
    start: Option<Instant>,
    taken: u64,
}

impl Pace {
    fn new(rate: f64, during: Duration) -> Self {
        Self {
            rate,
            during,
            start: None,
            taken: 0,
        }
    }

    /// After one frame: pause until the next one is due.
    fn next(&mut self) -> Flow {
        let elapsed = self.start.get_or_insert_with(Instant::now).elapsed();
        if elapsed >= self.during {
            return Flow::Continue;
        }
        self.taken += 1;
        let due = Duration::from_secs_f64(self.taken as f64 / self.rate);
        match due.checked_sub(elapsed) {
            Some(wait) if !wait.is_zero() => Flow::Pause(wait),
            _ => Flow::Continue,
        }
    }
}

/// Handles one consumer frame; `delivered` counters (run total, this
/// consumer) count DISPATCHes of tracked uids.
fn on_consumer_frame(
    st: &mut ConsumerState,
    text: &[u8],
    parser: Parser,
    delivered: &[Arc<AtomicU64>; 2],
) {
    let Some(frame) = parser.parse(text) else {
        st.unexpected.add("unparsable frame", 1);
        return;
    };
    match frame.op {
        Some(5) => {
            let now = frames::unix_nanos();
            if st.checker.observe(frame.uid.as_deref(), frame.n, frame.seq) {
                for counter in delivered {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(ts) = frame.ts {
                    record_latency(&mut st.latency, ts, now);
                }
            }
        }
        Some(1) => {}
        op => st.unexpected.add(format!("unexpected op {op:?}"), 1),
    }
}

/// Updates the progress message with counts and rates every 250 ms.
fn spawn_ticker(progress: Arc<Progress>, shared: Arc<ProducerShared>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let (mut at, mut s0, mut d0) = (Instant::now(), 0, 0);
        loop {
            tick.tick().await;
            let (s, dl) = (
                shared.sent.load(Ordering::Relaxed),
                shared.delivered.load(Ordering::Relaxed),
            );
            let dt = at.elapsed().as_secs_f64().max(1e-3);
            progress.set_message(format!(
                "sent {} ({})  delivered {} ({})",
                report::count(s),
                report::rate((s - s0) as f64 / dt),
                report::count(dl),
                report::rate((dl - d0) as f64 / dt)
            ));
            (at, s0, d0) = (Instant::now(), s, dl);
        }
    })
}

struct ProducerSpec {
    uid: String,
    /// Readings this producer sends at most.
    quota: u64,
    /// This producer's readings/s, `None` for unlimited.
    rate: Option<f64>,
    size: usize,
    batch: usize,
    started: Instant,
    end_at: Instant,
    deadline: Instant,
}

/// Counters the producers share with the run.
struct ProducerShared {
    /// Readings flushed by all producers.
    sent: AtomicU64,
    /// Producers still producing.
    active: AtomicUsize,
    /// Tracked deliveries so far (the consumers' counter).
    delivered: Arc<AtomicU64>,
    /// `delivered` when the last producer stopped: the window's deliveries.
    delivered_at_end: AtomicU64,
}

struct ProducerOutcome {
    uid: String,
    /// Readings flushed to the socket.
    sent: u64,
    /// When it stopped producing (before closing).
    stopped_at: Instant,
    error: Option<String>,
    server_close: Option<String>,
}

/// Submits readings in batches (one flush each) until the quota, the end
/// time, a stop, or the server closing; heartbeats in between.
async fn run_producer(
    session: Session,
    spec: ProducerSpec,
    shared: Arc<ProducerShared>,
    mut stop: Stop,
) -> ProducerOutcome {
    let period = session.heartbeat_period();
    let Session {
        mut read,
        mut write,
        ..
    } = session;
    let closing = Arc::new(AtomicBool::new(false));
    let server_gone = Arc::new(AtomicBool::new(false));
    let mut reader = tokio::spawn({
        let (closing, server_gone) = (closing.clone(), server_gone.clone());
        async move {
            let end = ws::read_loop(&mut read, |_| Flow::Continue).await;
            server_gone.store(true, Ordering::SeqCst);
            (end, closing.load(Ordering::SeqCst))
        }
    });

    let builder = SubmitBuilder::new(spec.size);
    let mut buf = Vec::with_capacity(spec.size + 64);
    let (mut n, mut flushed) = (0u64, 0u64);
    let mut next_heartbeat = Instant::now() + period;
    let error = loop {
        let now = Instant::now();
        if stop.is_set()
            || server_gone.load(Ordering::Relaxed)
            || n >= spec.quota
            || now >= spec.end_at
        {
            break None;
        }
        let mut want = (spec.batch as u64).min(spec.quota - n);
        if let Some(rate) = spec.rate {
            let due = (now.duration_since(spec.started).as_secs_f64() * rate) as u64;
            if due <= n {
                let next_due = spec.started + Duration::from_secs_f64((n + 1) as f64 / rate);
                let wake = next_due.min(spec.end_at).min(next_heartbeat);
                tokio::select! {
                    _ = sleep_until(wake) => {}
                    _ = stop.wait() => {}
                }
                if Instant::now() < next_heartbeat {
                    continue;
                }
                want = 0;
            } else {
                want = want.min(due - n);
            }
        }
        let batch = async {
            for _ in 0..want {
                builder.build(&mut buf, frames::unix_nanos(), n);
                ws::send(&mut write, &mut buf).await?;
                n += 1;
            }
            if Instant::now() >= next_heartbeat {
                let mut hb = frames::HEARTBEAT.to_vec();
                ws::send(&mut write, &mut hb).await?;
                next_heartbeat = Instant::now() + period;
            }
            write.flush().await
        };
        match timeout_at(spec.deadline, batch).await {
            Ok(Ok(())) => {
                shared.sent.fetch_add(n - flushed, Ordering::Relaxed);
                flushed = n;
            }
            Ok(Err(e)) => break Some(e.to_string()),
            Err(_) => break Some("write blocked until the hard timeout".to_string()),
        }
    };

    let stopped_at = Instant::now();
    if shared.active.fetch_sub(1, Ordering::SeqCst) == 1 {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        shared.delivered_at_end.store(delivered, Ordering::Relaxed);
    }

    closing.store(true, Ordering::SeqCst);
    let _ = timeout(Duration::from_secs(2), close_quietly(&mut write)).await;
    let server_close = match timeout(Duration::from_secs(5), &mut reader).await {
        Ok(Ok((end, we_closed))) => end_key(&end, we_closed),
        Ok(Err(e)) => Some(format!("reader task failed: {e}")),
        Err(_) => {
            reader.abort();
            None
        }
    };
    ProducerOutcome {
        uid: spec.uid,
        sent: flushed,
        stopped_at,
        error,
        server_close,
    }
}

async fn close_quietly(write: &mut WsWrite) {
    let _ = ws::close(write).await;
}
