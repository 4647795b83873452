//! `sensorgate-load burn`: takes a known share of the CPU from everything else on the machine.
//!
//! Each worker thread spins for `--duty` % of every `--period-us` and sleeps the rest, so the
//! machine loses `workers × duty` % of a core in short bursts, the way a busy server's
//! wake-ups take it (one long spin would instead take a core away for a whole time slice).
//! Run beside a system under test, it shows what another process's CPU share costs that
//! system: `loadtest/cluster.sh` runs JetStream beside the cluster nodes' share this way.
//! Owns nothing but its threads; touches no network and no file.

use std::hint::spin_loop;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cli::BurnArgs;

/// Longest run accepted: a burner left behind by a broken script stops by itself.
const MAX_SECONDS: f64 = 3600.0;

pub fn run(args: &BurnArgs) -> Result<()> {
    if !(1..=100).contains(&args.duty) {
        bail!("--duty must be a percentage from 1 to 100");
    }
    if args.period_us == 0 || args.workers == 0 || args.workers > 64 {
        bail!("--period-us must be positive and --workers from 1 to 64");
    }
    if !(args.duration > 0.0 && args.duration <= MAX_SECONDS) {
        bail!("--duration must be a number of seconds up to {MAX_SECONDS}");
    }
    let period = Duration::from_micros(args.period_us);
    let spin = period * args.duty / 100;
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let workers: Vec<_> = (0..args.workers)
        .map(|_| thread::spawn(move || burn(spin, period, end)))
        .collect();
    for w in workers {
        let _ = w.join();
    }
    println!(
        "burn: {} workers x {} % of every {} us for {} s: {:.2} CPU-s",
        args.workers,
        args.duty,
        args.period_us,
        args.duration,
        cpu_seconds()
    );
    Ok(())
}

/// Spins for `spin` of every `period` until `end`, on a fixed schedule: a period that ran
/// late is not made up for.
fn burn(spin: Duration, period: Duration, end: Instant) {
    let mut next = Instant::now();
    while next < end {
        let busy_until = next + spin;
        while Instant::now() < busy_until {
            spin_loop();
        }
        next += period;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// CPU time this process used, user and system.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to our rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(duty: u32, duration: f64) -> BurnArgs {
        BurnArgs {
            workers: 1,
            duty,
            period_us: 200,
            duration,
        }
    }

    #[test]
    fn refuses_a_duty_outside_a_percentage_and_an_unbounded_run() {
        assert!(run(&args(0, 0.01)).is_err());
        assert!(run(&args(101, 0.01)).is_err());
        assert!(run(&args(10, 0.0)).is_err());
        assert!(run(&args(10, f64::INFINITY)).is_err());
    }

    #[test]
    fn a_short_burn_ends_on_its_own() {
        run(&args(50, 0.02)).unwrap();
    }
}
