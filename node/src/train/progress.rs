//! Progress reporting: an indicatif bar on a terminal, periodic tracing lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Reports step, loss and throughput.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_log: Instant,
    interval: Duration,
    total: u64,
}

impl Progress {
    /// A reporter for `total` steps; draws a bar only when stderr is a terminal.
    pub fn new(total: u64, start: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} step {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start);
            bar
        });
        Self {
            bar,
            last_log: Instant::now(),
            interval: Duration::from_secs(10),
            total,
        }
    }

    /// A reporter that never draws or logs (tests, benchmarks).
    pub fn hidden() -> Self {
        Self {
            bar: None,
            last_log: Instant::now(),
            interval: Duration::MAX,
            total: 0,
        }
    }

    /// Records that `step` steps are done with the given loss and throughput.
    pub fn update(&mut self, step: u64, loss: f32, tokens_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tok/s"));
        } else if self.last_log.elapsed() >= self.interval {
            self.last_log = Instant::now();
            tracing::info!(
                step,
                total = self.total,
                loss,
                tokens_per_s = tokens_per_s.round(),
                "training"
            );
        }
    }

    /// Prints a line above the bar (or logs it).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
