//! `stomp`: topic fan-out over STOMP. P publishers SEND JSON bodies to T topics
//! (`/topic/load-<t>`, publisher i to topic i mod T); S subscribers per topic receive them
//! as MESSAGE frames. Measures delivered messages/s and SEND→MESSAGE latency (a timestamp
//! in the body), and checks that every subscriber got every message of its topic's
//! publishers once and in order. Needs no credentials: topics are open to anonymous
//! clients.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::ops::RangeInclusive;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

use crate::cli::{StompArgs, Via};
use crate::creds::Developer;
use crate::ctx::Ctx;
use crate::frames;
use crate::http::HttpClient;
use crate::report::{self, Outcome, Table};
use crate::stats::{latency_histogram, record_latency, Latency};
use crate::ws::{self, Buffers, Flow, WsRead, WsWrite};

/// SEND frames written per flush.
const BATCH: u64 = 64;
const BUFFERS: Buffers = Buffers {
    write: 64 * 1024,
    send: Some(256 * 1024),
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub topics: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub rate_target: Option<f64>,
    pub body_bytes: usize,
    pub window_secs: f64,
    pub sent: u64,
    pub sent_per_sec: f64,
    pub expected: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub lost: u64,
    pub out_of_order: u64,
    pub latency: Option<Latency>,
    pub errors: Vec<String>,
    pub passed: bool,
}

impl Outcome for Report {
    fn passed(&self) -> bool {
        self.passed
    }

    fn table(&self) -> Table {
        let mut t = Table::new("sensorgate-load stomp");
        t.row(
            "shape",
            format!(
                "{} publishers → {} topics → {} subscribers",
                self.publishers, self.topics, self.subscribers
            ),
        );
        t.row(
            "load",
            format!(
                "{} B bodies, rate {}",
                self.body_bytes,
                self.rate_target.map_or("unlimited".into(), report::rate)
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
                "{} of {} ({})",
                report::count(self.delivered),
                report::count(self.expected),
                report::rate(self.delivered_per_sec)
            ),
        );
        t.latency(self.latency.as_ref());
        t.row(
            "lost",
            format!("{} {}", self.lost, report::verdict(self.lost == 0)),
        );
        t.row(
            "out of order",
            format!(
                "{} {}",
                self.out_of_order,
                report::verdict(self.out_of_order == 0)
            ),
        );
        for e in &self.errors {
            t.row("error", e.clone());
        }
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t
    }
}

/// CONNECT (with `passcode` when given), then wait for CONNECTED.
async fn stomp_connect(
    read: &mut WsRead,
    write: &mut WsWrite,
    passcode: Option<&str>,
) -> Result<()> {
    // `host:/`: RabbitMQ reads the host header as its vhost; sensorgate ignores it.
    let mut connect = b"CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n".to_vec();
    if let Some(token) = passcode {
        connect.extend_from_slice(format!("passcode:{token}\n").as_bytes());
    }
    connect.extend_from_slice(b"\n\0");
    ws::send_now(write, &mut connect).await?;
    let got = first_message(read).await;
    if !got.starts_with(b"CONNECTED") {
        bail!("no CONNECTED: {}", String::from_utf8_lossy(&got));
    }
    Ok(())
}

/// The next WebSocket message (empty if none comes within 15 s).
async fn first_message(read: &mut WsRead) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = timeout(
        Duration::from_secs(15),
        ws::read_loop(read, |m| {
            got = m.to_vec();
            Flow::Stop
        }),
    )
    .await;
    got
}

/// One subscriber: its topic's messages, checked per publisher.
struct Seen {
    delivered: u64,
    out_of_order: u64,
    last: HashMap<u64, u64>,
    latency: Histogram<u64>,
}

pub async fn run(ctx: &Ctx, a: &StompArgs) -> Result<Report> {
    if a.topics == 0 || a.publishers == 0 {
        bail!("--topics and --publishers must be at least 1");
    }
    let subscribers = a.topics * a.per_topic;
    let mut errors = Vec::new();

    // Subscribers first, each waiting for its SUBSCRIBE's RECEIPT.
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subs = JoinSet::new();
    let mut ready = Vec::new();
    for i in 0..subscribers {
        let topic = i % a.topics;
        let (mut read, mut write) = ws::open_raw(&ctx.target, &a.path, BUFFERS).await?;
        stomp_connect(&mut read, &mut write, None).await?;
        let mut sub =
            format!("SUBSCRIBE\nid:s{i}\ndestination:/topic/load-{topic}\nreceipt:r{i}\n\n\0")
                .into_bytes();
        ws::send_now(&mut write, &mut sub).await?;
        if !first_message(&mut read).await.starts_with(b"RECEIPT") {
            bail!("subscriber {i}: no RECEIPT for SUBSCRIBE");
        }
        ready.push((read, write));
    }
    let mut writers = Vec::new();
    for (mut read, write) in ready {
        writers.push(write);
        let delivered = delivered.clone();
        subs.spawn(async move {
            let mut seen = Seen {
                delivered: 0,
                out_of_order: 0,
                last: HashMap::new(),
                latency: latency_histogram(),
            };
            ws::read_loop(&mut read, |m| {
                let now = frames::unix_nanos();
                // Several MESSAGE frames may share one WebSocket message.
                for frame in m.split(|b| *b == 0).filter(|f| f.starts_with(b"MESSAGE")) {
                    let Some((p, n, ts)) = body_fields(frame) else {
                        continue;
                    };
                    record_latency(&mut seen.latency, ts, now);
                    let last = seen.last.entry(p).or_insert(0);
                    if n != *last + 1 {
                        seen.out_of_order += 1;
                    }
                    *last = n;
                    seen.delivered += 1;
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                Flow::Continue
            })
            .await;
            seen
        });
    }

    // Publishers.
    let rate_each = a.rate.filter(|r| *r > 0.0).map(|r| r / a.publishers as f64);
    let started = Instant::now();
    let end_at = ctx.bound(started + Duration::from_secs_f64(a.duration));
    let mut pubs = JoinSet::new();
    for p in 0..a.publishers {
        let mut publisher = match a.via {
            Via::Stomp => {
                let token = match ctx.developers.first() {
                    Some(dev) => Some(
                        HttpClient::new(ctx.target.clone())
                            .developer_token(dev)
                            .await?,
                    ),
                    None => None,
                };
                let (mut read, mut write) = ws::open_raw(&ctx.target, &a.path, BUFFERS).await?;
                stomp_connect(&mut read, &mut write, token.as_deref()).await?;
                Publisher::Stomp { _read: read, write }
            }
            Via::Http => Publisher::Http {
                client: HttpClient::new(ctx.target.clone()),
                dev: ctx.developers.first().cloned().ok_or_else(|| {
                    anyhow!("--via http needs a developer's key (--data-dir, --config or --dev-id)")
                })?,
            },
        };
        let topic = p % a.topics;
        let size = a.size;
        let phase = rate_each.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(p as f64 / (a.publishers as f64 * r))
        });
        pubs.spawn(async move {
            let mut n = 0u64;
            let start = started + phase;
            let mut buf = Vec::with_capacity(size + 96);
            while Instant::now() < end_at {
                let mut want = BATCH;
                if let Some(r) = rate_each {
                    let due = (Instant::now()
                        .saturating_duration_since(start)
                        .as_secs_f64()
                        * r) as u64;
                    if due <= n {
                        let next = start + Duration::from_secs_f64((n + 1) as f64 / r);
                        sleep_until(next.min(end_at)).await;
                        continue;
                    }
                    want = want.min(due - n);
                }
                if let Err(e) = publisher
                    .send(&mut buf, topic, p as u64, n + 1..=n + want, size)
                    .await
                {
                    return (n, Some(e));
                }
                n += want;
            }
            (n, None)
        });
    }
    let mut sent = 0;
    while let Some(r) = pubs.join_next().await {
        let (n, err) = r?;
        sent += n;
        if let Some(e) = err {
            errors.push(e);
        }
    }
    let window = started.elapsed().as_secs_f64();
    // Every topic has `per_topic` subscribers, so each SEND is owed that many times.
    let expected = sent * a.per_topic as u64;
    let drain_until = Instant::now() + Duration::from_secs_f64(a.drain);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = delivered.load(Ordering::Relaxed);
    // Close every subscriber; each reader then ends and hands back what it saw.
    for mut w in writers {
        let _ = timeout(Duration::from_secs(2), ws::close(&mut w)).await;
    }
    let mut latency = latency_histogram();
    let mut out_of_order = 0;
    let collect = async {
        while let Some(r) = subs.join_next().await {
            if let Ok(seen) = r {
                latency.add(&seen.latency).ok();
                out_of_order += seen.out_of_order;
            }
        }
    };
    if timeout(Duration::from_secs(10), collect).await.is_err() {
        errors.push("subscribers did not close in time".into());
    }
    let lost = expected.saturating_sub(total);
    if total == 0 && expected > 0 && a.via == Via::Stomp && ctx.developers.is_empty() {
        errors.push(
            "nothing was delivered and the publishers were anonymous: sensorgate's default \
             rules let only developers SEND to /topic/ (pass --data-dir, --config or --dev)"
                .into(),
        );
    }
    let passed = lost == 0 && out_of_order == 0 && errors.is_empty();
    Ok(Report {
        scenario: "stomp",
        topics: a.topics,
        publishers: a.publishers,
        subscribers,
        rate_target: a.rate.filter(|r| *r > 0.0),
        body_bytes: a.size,
        window_secs: window,
        sent,
        sent_per_sec: sent as f64 / window,
        expected,
        delivered: total,
        delivered_per_sec: total as f64 / window,
        lost,
        out_of_order,
        latency: Latency::of(&latency),
        errors,
        passed,
    })
}

/// Where a publisher's messages go in.
enum Publisher {
    Stomp {
        /// Kept open; the server's replies are not read.
        _read: WsRead,
        write: WsWrite,
    },
    Http {
        client: HttpClient,
        dev: Developer,
    },
}

impl Publisher {
    /// Messages `ns` of publisher `p` to `topic`: SEND frames in one flush, or one
    /// `POST /api/publish` of them all. The error says what failed.
    async fn send(
        &mut self,
        buf: &mut Vec<u8>,
        topic: usize,
        p: u64,
        ns: RangeInclusive<u64>,
        size: usize,
    ) -> Result<(), String> {
        match self {
            Publisher::Stomp { write, .. } => {
                for n in ns {
                    send_frame(buf, topic, p, n, size);
                    ws::send(write, buf)
                        .await
                        .map_err(|_| "publisher write failed".to_string())?;
                }
                write
                    .flush()
                    .await
                    .map_err(|_| "publisher flush failed".to_string())
            }
            Publisher::Http { client, dev } => {
                buf.clear();
                buf.extend_from_slice(b"{\"messages\":[");
                let first = *ns.start();
                for n in ns {
                    if n != first {
                        buf.push(b',');
                    }
                    let head = format!("{{\"destination\":\"/topic/load-{topic}\",\"data\":");
                    buf.extend_from_slice(head.as_bytes());
                    body(buf, p, n, size);
                    buf.push(b'}');
                }
                buf.extend_from_slice(b"]}");
                client
                    .publish(dev, Bytes::copy_from_slice(buf))
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        }
    }
}

/// A SEND frame with a JSON body `{"p":P,"n":N,"ts":T,"x":"…"}` padded to `size` bytes.
fn send_frame(out: &mut Vec<u8>, topic: usize, p: u64, n: u64, size: usize) {
    out.clear();
    out.extend_from_slice(
        format!("SEND\ndestination:/topic/load-{topic}\ncontent-type:application/json\n\n")
            .as_bytes(),
    );
    body(out, p, n, size);
    out.push(0);
}

/// Appends the JSON body `{"p":P,"n":N,"ts":T,"x":"…"}`, padded to `size` bytes.
fn body(out: &mut Vec<u8>, p: u64, n: u64, size: usize) {
    let head = format!(
        "{{\"p\":{p},\"n\":{n},\"ts\":{},\"x\":\"",
        frames::unix_nanos()
    );
    out.extend_from_slice(head.as_bytes());
    let pad = size.saturating_sub(head.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// `(p, n, ts)` from a MESSAGE frame's body.
fn body_fields(frame: &[u8]) -> Option<(u64, u64, u64)> {
    let body_at = memchr::memmem::find(frame, b"\n\n")? + 2;
    let body = &frame[body_at..];
    let num = |key: &[u8]| -> Option<u64> {
        let at = memchr::memmem::find(body, key)? + key.len();
        let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&body[at..at + digits])
            .ok()?
            .parse()
            .ok()
    };
    Some((num(b"\"p\":")?, num(b"\"n\":")?, num(b"\"ts\":")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_frames_parse_back() {
        let mut out = Vec::new();
        send_frame(&mut out, 3, 7, 42, 120);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("SEND\ndestination:/topic/load-3\n"));
        let body = &text[text.find("\n\n").unwrap() + 2..text.len() - 1];
        assert_eq!(body.len(), 120);
        let message = format!("MESSAGE\nsubscription:s\n\n{body}");
        let (p, n, ts) = body_fields(message.as_bytes()).unwrap();
        assert_eq!((p, n), (7, 42));
        assert!(ts > 0);
    }
}
