//! Measurement helpers shared by the scenarios: the latency histogram and its
//! percentile summary, tallies of close codes / failure kinds, and how a
//! connection's end is classified.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ws::ReadEnd;

/// Latency histogram in microseconds, 1 µs to 1 hour at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(Self {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
    }
}

/// Records one latency sample given the send and receive times (unix nanos).
/// Clock skew cannot occur on one host, but a bogus `ts` is clamped.
pub fn record_latency(h: &mut Histogram<u64>, sent_ns: u64, now_ns: u64) {
    let us = now_ns.saturating_sub(sent_ns) / 1_000;
    h.saturating_record(us.max(1));
}

/// Counts by key, e.g. close codes or failure kinds.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, key: impl Into<String>, n: u64) {
        *self.0.entry(key.into()).or_default() += n;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `3× 4009, 1× eof` (or `none`).
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How a connection ended, as a tally key, or `None` if it ended because
/// this tool closed it (normal teardown is not interesting).
pub fn end_key(end: &ReadEnd, we_closed: bool) -> Option<String> {
    if we_closed {
        return None;
    }
    Some(match end {
        ReadEnd::Closed(Some(code)) => code.to_string(),
        ReadEnd::Closed(None) => "close without code".into(),
        ReadEnd::Eof => "eof without close frame".into(),
        ReadEnd::Error(e) => format!("error: {e}"),
        ReadEnd::Stopped => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary() {
        let mut h = latency_histogram();
        assert!(Latency::of(&h).is_none());
        for us in 1..=1000u64 {
            record_latency(&mut h, 0, us * 1000);
        }
        record_latency(&mut h, 10, 5); // negative: clamped to 1 µs
        let l = Latency::of(&h).unwrap();
        assert_eq!(l.count, 1001);
        assert_eq!(l.min_us, 1);
        assert!((499..=501).contains(&l.p50_us));
        assert!((989..=991).contains(&l.p99_us));
        assert!((999..=1001).contains(&l.max_us));
    }

    #[test]
    fn tally_and_end_keys() {
        let mut t = Tally::default();
        assert_eq!(t.describe(), "none");
        t.add("4009", 2);
        t.add("4009", 1);
        t.add("1001", 1);
        assert_eq!(t.describe(), "1× 1001, 3× 4009");
        assert_eq!(t.total(), 4);
        assert_eq!(
            end_key(&ReadEnd::Closed(Some(4005)), false).as_deref(),
            Some("4005")
        );
        assert_eq!(end_key(&ReadEnd::Closed(Some(1000)), true), None);
        assert_eq!(
            end_key(&ReadEnd::Eof, false).as_deref(),
            Some("eof without close frame")
        );
    }
}
