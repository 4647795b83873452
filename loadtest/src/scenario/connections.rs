//! The `connections` scenario: opens many idle, identified producer
//! connections at bounded concurrency, holds them (heartbeating), and
//! reports the setup rate and the server's resident-memory growth per
//! connection from its /metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use tokio::time::Instant;

use super::{connect_many, lock, Job, LiveConn, CONTROL_BUFFERS};
use crate::cli::ConnectionsArgs;
use crate::ctx::Ctx;
use crate::frames::ClientKind;
use crate::http::HttpClient;
use crate::progress::Progress;
use crate::report::{self, Outcome, Table};
use crate::stats::Tally;
use crate::sys;
use crate::ws::Flow;

/// File descriptors kept free beyond one per connection and per worker.
const FD_MARGIN: usize = 64;

/// Results of a connections run.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    pub scenario: &'static str,
    pub requested: usize,
    pub concurrency: usize,
    pub opened: u64,
    pub failed: u64,
    pub setup_secs: f64,
    /// Identified connections per second of setup.
    pub setup_per_sec: f64,
    pub hold_secs: f64,
    pub rss_before: Option<u64>,
    pub rss_after_open: Option<u64>,
    pub rss_after_hold: Option<u64>,
    /// RSS after the hold minus before, in bytes.
    pub rss_growth: Option<i64>,
    pub rss_growth_per_conn_kib: Option<f64>,
    /// Same, measured right after setup.
    pub rss_growth_per_conn_kib_after_open: Option<f64>,
    pub still_open: u64,
    /// Closes the server initiated during the run, by code.
    pub close_codes: Tally,
    pub setup_failures: Tally,
    /// Connections that did not answer our close within the grace period.
    pub close_unanswered: u64,
    pub metrics_error: Option<String>,
    pub passed: bool,
}

impl Outcome for ConnectionsReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn table(&self) -> Table {
        let mut t = Table::new("sensorgate-load connections");
        let rss = |v: Option<u64>| v.map_or("n/a".into(), |b| report::bytes(b as f64));
        t.row(
            "opened",
            format!(
                "{} of {} ({} failed) at concurrency {}",
                report::count(self.opened),
                report::count(self.requested as u64),
                report::count(self.failed),
                self.concurrency
            ),
        );
        t.row(
            "setup",
            format!(
                "{:.2} s ({} identified)",
                self.setup_secs,
                report::rate(self.setup_per_sec)
            ),
        );
        t.row("server RSS before", rss(self.rss_before));
        t.row("server RSS after open", rss(self.rss_after_open));
        t.row(
            format!("server RSS after {:.0} s hold", self.hold_secs),
            rss(self.rss_after_hold),
        );
        t.row(
            "RSS growth",
            self.rss_growth
                .map_or("n/a".into(), |g| report::bytes(g as f64)),
        );
        t.row(
            "per connection",
            match (
                self.rss_growth_per_conn_kib,
                self.rss_growth_per_conn_kib_after_open,
            ) {
                (Some(h), Some(o)) => format!("{h:.2} KiB (after open: {o:.2} KiB)"),
                (Some(h), None) => format!("{h:.2} KiB"),
                _ => "n/a".into(),
            },
        );
        if let Some(e) = &self.metrics_error {
            t.row("metrics", e.clone());
        }
        t.row(
            "still open at end",
            format!(
                "{} {}",
                report::count(self.still_open),
                report::verdict(self.still_open == self.opened)
            ),
        );
        t.row("server closes", self.close_codes.describe());
        if !self.setup_failures.is_empty() {
            t.row("setup failures", self.setup_failures.describe());
        }
        if self.close_unanswered > 0 {
            t.row("close unanswered", report::count(self.close_unanswered));
        }
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t
    }
}

pub async fn run(ctx: &Ctx, args: &ConnectionsArgs) -> Result<ConnectionsReport> {
    let hold = super::relay::secs("--hold", args.hold)?;
    let concurrency = args.concurrency.max(1);
    let limit = sys::raise_nofile_limit()?;
    let needed = args.count + 2 * concurrency + FD_MARGIN;
    if needed as u64 > limit {
        bail!(
            "--count {} needs about {needed} file descriptors, but the open-file limit is {limit}",
            args.count
        );
    }

    let mut http = HttpClient::new(ctx.target.clone());
    let mut metrics_error = None;
    let rss_before = scrape_rss(&mut http, &mut metrics_error).await;

    let d = ctx.developers.len();
    let jobs: Vec<Job> = (0..args.count)
        .map(|i| {
            let dev = ctx.developers[i % d].clone();
            let uid = format!("conn-{}-{i}", dev.id);
            Job {
                dev,
                kind: ClientKind::Producer,
                uid: Some(uid),
            }
        })
        .collect();
    let conns: Arc<Mutex<Vec<LiveConn<()>>>> = Arc::new(Mutex::new(Vec::with_capacity(args.count)));
    let failures = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicU64::new(0));

    let progress = Arc::new(Progress::bar(ctx.progress, "connect", args.count as u64));
    let ticker = tokio::spawn({
        let (progress, done, failures) = (progress.clone(), done.clone(), failures.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                progress.set_position(done.load(Ordering::Relaxed));
                let failed = lock(&failures).total();
                if failed > 0 {
                    progress.set_message(format!("{failed} failed"));
                }
            }
        }
    });
    let started = Instant::now();
    connect_many(ctx, jobs, concurrency, CONTROL_BUFFERS, {
        let (conns, failures, done) = (conns.clone(), failures.clone(), done.clone());
        move |_, result| {
            match result {
                Ok(session) => {
                    let conn = LiveConn::spawn(session, (), |_, _| Flow::Continue);
                    lock(&conns).push(conn);
                }
                Err(e) => lock(&failures).add(e.kind(), 1),
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    let setup_secs = started.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish();
    let conns = std::mem::take(&mut *lock(&conns));
    let setup_failures = std::mem::take(&mut *lock(&failures));
    let opened = conns.len() as u64;

    // Let the server settle before measuring, then hold.
    ctx.sleep(Duration::from_millis(500)).await;
    let rss_after_open = scrape_rss(&mut http, &mut metrics_error).await;
    let hold_progress = Progress::spinner(ctx.progress, "hold");
    let hold_started = Instant::now();
    let hold_until = hold_started + hold;
    while Instant::now() < hold_until && !ctx.should_stop() {
        let open = conns.iter().filter(|c| !c.is_finished()).count();
        hold_progress.set_message(format!("{} open", report::count(open as u64)));
        ctx.sleep(
            Duration::from_millis(250).min(hold_until.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    hold_progress.finish();
    let hold_secs = hold_started.elapsed().as_secs_f64();
    let rss_after_hold = scrape_rss(&mut http, &mut metrics_error).await;
    let still_open = conns.iter().filter(|c| !c.is_finished()).count() as u64;

    // Close everything; a grace period bounds the wait for close replies.
    for c in &conns {
        c.begin_close();
    }
    let close_deadline = Instant::now() + Duration::from_secs(10);
    let mut close_codes = Tally::default();
    let mut close_unanswered = 0;
    for c in conns {
        let ended = c.finish(close_deadline).await;
        if let Some(code) = ended.server_close {
            close_codes.add(code, 1);
        }
        if !ended.reader_ended {
            close_unanswered += 1;
        }
    }

    let growth = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) => Some(a as i64 - b as i64),
        _ => None,
    };
    let per_conn = |g: Option<i64>| {
        g.filter(|_| opened > 0)
            .map(|g| g as f64 / opened as f64 / 1024.0)
    };
    let rss_growth = growth(rss_after_hold);
    let failed = setup_failures.total();
    let mut report = ConnectionsReport {
        scenario: "connections",
        requested: args.count,
        concurrency,
        opened,
        failed,
        setup_secs,
        setup_per_sec: opened as f64 / setup_secs.max(1e-9),
        hold_secs,
        rss_before,
        rss_after_open,
        rss_after_hold,
        rss_growth,
        rss_growth_per_conn_kib: per_conn(rss_growth),
        rss_growth_per_conn_kib_after_open: per_conn(growth(rss_after_open)),
        still_open,
        close_codes,
        setup_failures,
        close_unanswered,
        metrics_error,
        passed: false,
    };
    report.passed = report.failed == 0
        && report.opened == args.count as u64
        && report.still_open == report.opened
        && report.close_codes.is_empty();
    Ok(report)
}

/// The server's RSS, remembering why it could not be read.
async fn scrape_rss(http: &mut HttpClient, error: &mut Option<String>) -> Option<u64> {
    match http.resident_memory().await {
        Ok(Some(v)) => Some(v),
        Ok(None) => {
            *error = Some("sensorgate_process_resident_memory_bytes not exported".into());
            None
        }
        Err(e) => {
            *error = Some(format!("{e:#}"));
            None
        }
    }
}
