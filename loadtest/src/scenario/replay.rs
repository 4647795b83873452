//! The `replay` scenario: optionally fills the first developer's log through
//! a relay run (whose consumer learns the highest seq), then one consumer
//! sends REPLAY and measures how fast the stored range streams back and
//! whether its seqs are increasing and contiguous.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use tokio::time::Instant;

use super::relay::{self, RelayPlan, RelayReport};
use super::{lock, LiveConn, CONTROL_BUFFERS};
use crate::check::SeqTracker;
use crate::cli::ReplayArgs;
use crate::ctx::Ctx;
use crate::frames::{self, ClientKind};
use crate::http::HttpClient;
use crate::progress::Progress;
use crate::report::{self, Outcome, Table};
use crate::scan::{self, Parser};
use crate::stats::Tally;
use crate::ws::{self, Flow};

/// The idle limit when the end seq is known (a gap is then a stall, not the
/// end of the range).
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Results of a replay run.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub scenario: &'static str,
    pub developer: String,
    /// The fill phase, unless `--no-fill`.
    pub fill: Option<RelayReport>,
    pub after: u64,
    pub before: Option<u64>,
    /// Highest seq the replay should reach, when known from the fill.
    pub expected_last_seq: Option<u64>,
    pub frames: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// From sending REPLAY to the last frame received.
    pub seconds: f64,
    pub frames_per_sec: f64,
    pub bytes: u64,
    pub bytes_per_sec: f64,
    pub increasing: bool,
    pub contiguous: bool,
    /// First seq is `after + 1`.
    pub starts_after: bool,
    /// Reached `expected_last_seq` (true when it is unknown).
    pub complete: bool,
    /// Ended by the idle gap rather than by reaching the known end.
    pub ended_idle: bool,
    pub seq_regressions: u64,
    pub seq_gaps: u64,
    pub close_codes: Tally,
    pub unexpected: Tally,
    pub passed: bool,
}

impl Outcome for ReplayReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn table(&self) -> Table {
        let mut t = Table::new("sensorgate-load replay");
        if let Some(fill) = &self.fill {
            t.row("fill", if fill.passed { "ok" } else { "FAIL" });
            fill.add_rows(&mut t);
            t.gap();
        }
        t.row("developer", self.developer.clone());
        t.row(
            "range",
            format!(
                "after {} before {}{}",
                self.after,
                self.before.map_or("newest".into(), |b| b.to_string()),
                self.expected_last_seq
                    .map_or(String::new(), |s| format!(" (expected last seq {s})"))
            ),
        );
        t.row(
            "seqs",
            format!(
                "{} .. {}",
                self.first_seq.map_or("-".into(), |s| s.to_string()),
                self.last_seq.map_or("-".into(), |s| s.to_string())
            ),
        );
        t.row("frames", report::count(self.frames));
        t.row("seconds", format!("{:.3}", self.seconds));
        t.row("frames/s", report::rate(self.frames_per_sec));
        t.row(
            "bytes",
            format!(
                "{} ({}/s)",
                report::bytes(self.bytes as f64),
                report::bytes(self.bytes_per_sec)
            ),
        );
        t.row("increasing", report::verdict(self.increasing));
        t.row(
            "contiguous",
            format!(
                "{} ({} missing)",
                report::verdict(self.contiguous),
                self.seq_gaps
            ),
        );
        t.row(
            "starts at after+1",
            if self.starts_after { "yes" } else { "no" },
        );
        t.row(
            "complete",
            format!(
                "{}{}",
                report::verdict(self.complete),
                if self.ended_idle {
                    " (ended on idle gap)"
                } else {
                    ""
                }
            ),
        );
        t.row("server closes", self.close_codes.describe());
        if !self.unexpected.is_empty() {
            t.row("unexpected frames", self.unexpected.describe());
        }
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t
    }
}

struct ReplayState {
    tracker: SeqTracker,
    bytes: u64,
    last_frame: Option<Instant>,
    unexpected: Tally,
}

pub async fn run(ctx: &Ctx, args: &ReplayArgs) -> Result<ReplayReport> {
    let dev = ctx.developers[0].clone();
    let idle = relay::secs("--idle", args.idle)?;
    if let Some(before) = args.before {
        if before <= args.after.saturating_add(1) {
            bail!(
                "--before {before} leaves nothing after --after {}",
                args.after
            );
        }
    }

    let fill = if args.no_fill {
        None
    } else {
        let plan = RelayPlan {
            developers: vec![dev.clone()],
            producers: args.producers.max(1),
            consumers: 1,
            rate: None,
            duration: None,
            count: Some(args.count),
            size: args.size,
            batch: 64,
            aligned: false,
            inflight: args.inflight,
            drain: Duration::from_secs(30),
            consumer_rate: None,
            parser: Parser::Scan,
            uid_prefix: "fill",
        };
        Some(relay::execute(ctx, &plan, "fill").await?)
    };
    let high = fill
        .as_ref()
        .and_then(|f| f.last_seq.first().and_then(|(_, s)| *s));
    let expected_last = high.map(|h| match args.before {
        Some(b) => h.min(b - 1),
        None => h,
    });

    let mut http = HttpClient::new(ctx.target.clone());
    let token = http.developer_token(&dev).await?;
    let session = ws::open(&ctx.target, &token, ClientKind::Consumer, CONTROL_BUFFERS)
        .await
        .map_err(|e| anyhow!("replay consumer could not connect: {e}"))?;
    // Stop reading as soon as the last wanted seq arrives.
    let stop_at = expected_last.or(args.before.map(|b| b - 1));
    let frames_seen = Arc::new(AtomicU64::new(0));
    let state = ReplayState {
        tracker: SeqTracker::default(),
        bytes: 0,
        last_frame: None,
        unexpected: Tally::default(),
    };
    let counter = frames_seen.clone();
    let conn = LiveConn::spawn(session, state, move |st: &mut ReplayState, text| {
        match scan::scan(text) {
            Some(f) if f.op == Some(5) => {
                st.tracker.observe(f.seq);
                st.bytes += text.len() as u64;
                st.last_frame = Some(Instant::now());
                counter.fetch_add(1, Ordering::Relaxed);
                if let (Some(seq), Some(end)) = (f.seq, stop_at) {
                    if seq >= end {
                        return Flow::Stop;
                    }
                }
            }
            Some(f) if f.op == Some(1) => {}
            Some(f) => st.unexpected.add(format!("op {:?}", f.op), 1),
            None => st.unexpected.add("unparsable", 1),
        }
        Flow::Continue
    });

    let progress = match expected_last {
        Some(end) => Progress::bar(ctx.progress, "replay", end.saturating_sub(args.after)),
        None => Progress::spinner(ctx.progress, "replay"),
    };
    let started = Instant::now();
    if !conn.send(frames::replay(args.after, args.before)) {
        bail!("replay consumer closed before REPLAY could be sent");
    }
    let mut ended_idle = false;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let seen = frames_seen.load(Ordering::Relaxed);
        progress.set_position(seen);
        progress.set_message(format!("{} frames", report::count(seen)));
        if conn.is_finished() || ctx.should_stop() {
            break;
        }
        let last = lock(&conn.state).last_frame;
        // With a known end, a gap is a stall to wait out (bounded); without,
        // the idle gap is how the end of the stored range is recognised.
        let limit = match expected_last {
            Some(_) => STALL_LIMIT.max(idle),
            None => idle,
        };
        if last.unwrap_or(started).elapsed() >= limit {
            ended_idle = true;
            break;
        }
    }
    progress.finish();
    let state = conn.state.clone();
    let ended = conn.finish(Instant::now() + Duration::from_secs(5)).await;
    let st = lock(&state);

    let t = &st.tracker;
    let seconds = st
        .last_frame
        .map_or(0.0, |l| l.duration_since(started).as_secs_f64());
    let per_sec = |v: u64| {
        if seconds > 0.0 {
            v as f64 / seconds
        } else {
            0.0
        }
    };
    let mut close_codes = Tally::default();
    if let Some(code) = ended.server_close {
        close_codes.add(code, 1);
    }
    let complete = match expected_last {
        Some(end) => t.last_seq.is_some_and(|l| l >= end),
        None => true,
    };
    let mut report = ReplayReport {
        scenario: "replay",
        developer: dev.id,
        fill,
        after: args.after,
        before: args.before,
        expected_last_seq: expected_last,
        frames: t.frames,
        first_seq: t.first_seq,
        last_seq: t.last_seq,
        seconds,
        frames_per_sec: per_sec(t.frames),
        bytes: st.bytes,
        bytes_per_sec: per_sec(st.bytes),
        increasing: t.increasing(),
        contiguous: t.contiguous(),
        starts_after: t.first_seq == Some(args.after + 1),
        complete,
        ended_idle,
        seq_regressions: t.regressions,
        seq_gaps: t.gaps,
        close_codes,
        unexpected: st.unexpected.clone(),
        passed: false,
    };
    report.passed = report.fill.as_ref().is_none_or(|f| f.passed)
        && report.frames > 0
        && report.increasing
        && report.contiguous
        && report.complete
        && report.close_codes.is_empty()
        && report.unexpected.is_empty();
    Ok(report)
}
