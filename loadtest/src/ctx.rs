//! The run context every scenario receives: the target, the developers, the
//! hard deadline, the Ctrl-C stop signal and whether to draw progress.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::creds::Developer;
use crate::target::Target;

/// Shared, read-only state of one run.
pub struct Ctx {
    pub target: Target,
    pub developers: Vec<Developer>,
    /// Nothing of the run may go on past this instant.
    pub deadline: Instant,
    pub stop: Stop,
    pub progress: bool,
}

impl Ctx {
    /// The earlier of `at` and the hard deadline.
    pub fn bound(&self, at: Instant) -> Instant {
        at.min(self.deadline)
    }

    /// True once the run must wind down (Ctrl-C or hard deadline).
    pub fn should_stop(&self) -> bool {
        self.stop.is_set() || Instant::now() >= self.deadline
    }

    /// Sleeps for `d`, waking early on stop or at the deadline.
    pub async fn sleep(&self, d: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(self.bound(Instant::now() + d)) => {}
            _ = stop.wait() => {}
        }
    }
}

/// Ctrl-C signal: set once, observed by every loop.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once stop is set (never, if the sender is gone unset).
    pub async fn wait(&mut self) {
        if self.0.wait_for(|set| *set).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
