//! The stderr progress display (indicatif), a no-op when disabled by
//! `--quiet` or when stderr is not a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner or bar on stderr; every method is a no-op when hidden.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A spinner with a free-form message.
    pub fn spinner(enabled: bool, prefix: &str) -> Self {
        let bar = Self::make(enabled, None);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>8} [{elapsed_precise}] {msg}")
                .expect("static progress template is valid"),
        );
        bar.set_prefix(prefix.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }

    /// A bar counting up to `len`, with a message.
    pub fn bar(enabled: bool, prefix: &str, len: u64) -> Self {
        let bar = Self::make(enabled, Some(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .expect("static progress template is valid"),
        );
        bar.set_prefix(prefix.to_string());
        Self { bar }
    }

    fn make(enabled: bool, len: Option<u64>) -> ProgressBar {
        if !enabled {
            return ProgressBar::hidden();
        }
        ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr_with_hz(8))
    }

    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Removes the display.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
