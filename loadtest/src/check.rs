//! Delivery checking: per-uid exactly-once and in-order accounting of the
//! readings a consumer receives (from the producer's counter `n`), and
//! per-developer `seq` monotonicity, for both live relay and replay.

use std::collections::HashMap;

use serde::Serialize;

/// Counters with a hard ceiling on `n` so a bogus value cannot make the
/// per-uid bitmap allocate without bound.
const MAX_TRACKED_N: u64 = 1 << 32;

/// What one consumer saw, checked against what the producers sent.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryStats {
    /// DISPATCH frames carrying one of the tracked uids.
    pub received: u64,
    /// Distinct (uid, n) readings received.
    pub distinct: u64,
    /// Readings received more than once.
    pub duplicated: u64,
    /// Readings that arrived after a later reading of the same uid.
    pub out_of_order: u64,
    /// DISPATCH frames whose `seq` was not above the previous one.
    pub seq_regressions: u64,
    /// Missing seq numbers between consecutive DISPATCH frames (informational).
    pub seq_gaps: u64,
    /// DISPATCH frames for uids this run did not produce (ignored).
    pub foreign: u64,
    /// DISPATCH frames of tracked uids that lacked `n` or `seq`, or had an
    /// `n` the producer never sent.
    pub malformed: u64,
}

#[derive(Default)]
struct UidTrack {
    seen: Vec<u64>,
    /// One past the highest `n` seen so far.
    next: u64,
}

impl UidTrack {
    /// Marks `n` as seen; returns false if it already was.
    fn mark(&mut self, n: u64) -> bool {
        let (word, bit) = ((n / 64) as usize, n % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        let was = self.seen[word] & (1 << bit) != 0;
        self.seen[word] |= 1 << bit;
        !was
    }

    fn has(&self, n: u64) -> bool {
        let word = (n / 64) as usize;
        self.seen
            .get(word)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }
}

/// Checks the live DISPATCH stream of one consumer.
#[derive(Default)]
pub struct Checker {
    uids: HashMap<Box<str>, UidTrack>,
    last_seq: Option<u64>,
    stats: DeliveryStats,
}

impl Checker {
    /// A checker tracking readings from exactly these uids.
    pub fn new<I: IntoIterator<Item = String>>(uids: I) -> Self {
        Self {
            uids: uids
                .into_iter()
                .map(|u| (u.into_boxed_str(), UidTrack::default()))
                .collect(),
            ..Self::default()
        }
    }

    /// Records one DISPATCH frame; returns whether its uid is tracked.
    pub fn observe(&mut self, uid: Option<&str>, n: Option<u64>, seq: Option<u64>) -> bool {
        if let Some(seq) = seq {
            if let Some(last) = self.last_seq {
                if seq <= last {
                    self.stats.seq_regressions += 1;
                } else {
                    self.stats.seq_gaps += seq - last - 1;
                }
            }
            self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
        }
        let Some(track) = uid.and_then(|u| self.uids.get_mut(u)) else {
            self.stats.foreign += 1;
            return false;
        };
        self.stats.received += 1;
        let (Some(n), Some(_)) = (n, seq) else {
            self.stats.malformed += 1;
            return true;
        };
        if n >= MAX_TRACKED_N {
            self.stats.malformed += 1;
        } else if !track.mark(n) {
            self.stats.duplicated += 1;
        } else {
            self.stats.distinct += 1;
            if n < track.next {
                self.stats.out_of_order += 1;
            } else {
                track.next = n + 1;
            }
        }
        true
    }

    /// Highest `seq` seen so far.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Final accounting given how many readings each uid sent (counters
    /// `0..sent`). Returns the stats and the number of lost readings;
    /// readings with `n >= sent` count as malformed.
    pub fn finish(&self, sent: &HashMap<String, u64>) -> (DeliveryStats, u64) {
        let mut stats = self.stats.clone();
        let mut lost = 0;
        for (uid, track) in &self.uids {
            let sent = sent.get(&**uid).copied().unwrap_or(0);
            let got_in_range = (0..sent.min(track.next)).filter(|&n| track.has(n)).count() as u64;
            let beyond = track
                .seen
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
                - got_in_range;
            lost += sent - got_in_range;
            stats.malformed += beyond;
            stats.distinct -= beyond;
        }
        (stats, lost)
    }
}

/// Checks a replayed range: seqs must be strictly increasing and, for a
/// single-node log, contiguous.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SeqTracker {
    pub frames: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Frames whose seq was not above the previous one.
    pub regressions: u64,
    /// Missing seq numbers between consecutive frames.
    pub gaps: u64,
    /// DISPATCH frames without a seq.
    pub missing_seq: u64,
}

impl SeqTracker {
    pub fn observe(&mut self, seq: Option<u64>) {
        self.frames += 1;
        let Some(seq) = seq else {
            self.missing_seq += 1;
            return;
        };
        match self.last_seq {
            None => self.first_seq = Some(seq),
            Some(last) if seq <= last => self.regressions += 1,
            Some(last) => self.gaps += seq - last - 1,
        }
        self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
    }

    pub fn increasing(&self) -> bool {
        self.regressions == 0 && self.missing_seq == 0
    }

    pub fn contiguous(&self) -> bool {
        self.increasing() && self.gaps == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    #[test]
    fn clean_interleaved_stream() {
        let mut c = Checker::new(["a".to_string(), "b".to_string()]);
        let mut seq = 10;
        for n in 0..100 {
            for uid in ["a", "b"] {
                seq += 1;
                c.observe(Some(uid), Some(n), Some(seq));
            }
        }
        let (s, lost) = c.finish(&sent(&[("a", 100), ("b", 100)]));
        assert_eq!(lost, 0);
        assert_eq!(s.received, 200);
        assert_eq!(s.distinct, 200);
        assert_eq!(
            (s.duplicated, s.out_of_order, s.seq_regressions, s.seq_gaps),
            (0, 0, 0, 0)
        );
        assert_eq!(c.last_seq(), Some(210));
    }

    #[test]
    fn duplicates_losses_and_reordering() {
        let mut c = Checker::new(["a".to_string()]);
        // n: 0, 1, 1 (dup), 3, 2 (late), 5 ; 4 and 6..10 never arrive.
        for (i, n) in [0, 1, 1, 3, 2, 5].into_iter().enumerate() {
            c.observe(Some("a"), Some(n), Some(i as u64 + 1));
        }
        let (s, lost) = c.finish(&sent(&[("a", 10)]));
        assert_eq!(s.received, 6);
        assert_eq!(s.distinct, 5);
        assert_eq!(s.duplicated, 1);
        assert_eq!(s.out_of_order, 1);
        assert_eq!(lost, 5);
    }

    #[test]
    fn seq_checks() {
        let mut c = Checker::new(["a".to_string()]);
        c.observe(Some("a"), Some(0), Some(5));
        c.observe(Some("a"), Some(1), Some(8)); // gap of 2
        c.observe(Some("a"), Some(2), Some(8)); // repeat: regression
        c.observe(Some("a"), Some(3), Some(7)); // regression
        c.observe(Some("a"), Some(4), Some(9));
        let (s, lost) = c.finish(&sent(&[("a", 5)]));
        assert_eq!(lost, 0);
        assert_eq!(s.seq_gaps, 2);
        assert_eq!(s.seq_regressions, 2);
        assert_eq!(c.last_seq(), Some(9));
    }

    #[test]
    fn foreign_and_malformed() {
        let mut c = Checker::new(["a".to_string()]);
        c.observe(Some("zzz"), Some(0), Some(1));
        c.observe(None, Some(0), Some(2));
        c.observe(Some("a"), None, Some(3));
        c.observe(Some("a"), Some(MAX_TRACKED_N), Some(4));
        c.observe(Some("a"), Some(0), Some(5));
        c.observe(Some("a"), Some(7), Some(6)); // never sent: only 0..1
        let (s, lost) = c.finish(&sent(&[("a", 1)]));
        assert_eq!(s.foreign, 2);
        assert_eq!(s.malformed, 3);
        assert_eq!(s.distinct, 1);
        assert_eq!(lost, 0);
    }

    #[test]
    fn nothing_received_means_all_lost() {
        let c = Checker::new(["a".to_string(), "b".to_string()]);
        let (s, lost) = c.finish(&sent(&[("a", 3), ("b", 4)]));
        assert_eq!(lost, 7);
        assert_eq!(s.received, 0);
    }

    #[test]
    fn seq_tracker() {
        let mut t = SeqTracker::default();
        for s in [1, 2, 3, 4] {
            t.observe(Some(s));
        }
        assert!(t.contiguous());
        assert_eq!((t.first_seq, t.last_seq, t.frames), (Some(1), Some(4), 4));
        t.observe(Some(6));
        assert!(t.increasing() && !t.contiguous());
        assert_eq!(t.gaps, 1);
        t.observe(Some(6));
        assert!(!t.increasing());
        assert_eq!(t.regressions, 1);
        t.observe(None);
        assert_eq!(t.missing_seq, 1);
    }
}
