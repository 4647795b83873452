//! Result output: the trait scenario reports implement, the aligned
//! two-column table printed on stdout, and number formatting helpers.

use std::fmt::Write as _;

use serde::Serialize;

/// What every scenario returns.
pub trait Outcome: Serialize {
    /// Whether every check passed (decides the exit status).
    fn passed(&self) -> bool;
    /// The human summary.
    fn table(&self) -> Table;
}

/// A titled list of `label  value` rows.
pub struct Table {
    title: String,
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, label: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.rows.push((label.into(), value.into()));
        self
    }

    /// The latency percentiles, or that there were none.
    pub fn latency(&mut self, latency: Option<&crate::stats::Latency>) -> &mut Self {
        let Some(l) = latency else {
            return self.row("latency", "no samples");
        };
        self.row(
            "latency p50/p90/p99",
            format!(
                "{} / {} / {}",
                micros(l.p50_us),
                micros(l.p90_us),
                micros(l.p99_us)
            ),
        );
        self.row(
            "latency p99.9/max",
            format!("{} / {}", micros(l.p999_us), micros(l.max_us)),
        )
    }

    /// A blank separator line.
    pub fn gap(&mut self) -> &mut Self {
        self.rows.push((String::new(), String::new()));
        self
    }

    pub fn render(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.title);
        let _ = writeln!(out, "{}", "─".repeat(self.title.chars().count().max(20)));
        for (label, value) in &self.rows {
            if label.is_empty() && value.is_empty() {
                out.push('\n');
            } else {
                let _ = writeln!(out, "  {label:<width$}  {value}");
            }
        }
        out
    }
}

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with a unit, e.g. `123,456/s`.
pub fn rate(per_sec: f64) -> String {
    format!("{}/s", count(per_sec.round().max(0.0) as u64))
}

/// Bytes in binary units, e.g. `12.3 MiB`.
pub fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", units[unit])
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

/// Microseconds as a readable duration, e.g. `850 µs`, `12.4 ms`.
pub fn micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// `ok` / `FAIL` marker for check rows.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAIL"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(rate(1234.4), "1,234/s");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(-2.0 * 1024.0 * 1024.0), "-2.0 MiB");
        assert_eq!(micros(850), "850 µs");
        assert_eq!(micros(12_400), "12.40 ms");
        assert_eq!(micros(2_500_000), "2.50 s");
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new("relay");
        t.row("sent", "10").row("delivered/s", "5");
        let text = t.render();
        assert!(text.contains("  sent         10\n"));
        assert!(text.contains("  delivered/s  5\n"));
    }
}
