//! `sensorgate-load`: a load generator for the sensorgate WebSocket gateway.
//! This file owns start-up (arguments, runtime, Ctrl-C, the hard timeout),
//! dispatching to a scenario, printing its report and the exit status.
//!
//! It speaks the real protocol over real sockets: it mints single-use tokens
//! from `/auth/developer` and `/auth/user`, connects to `/connect`, waits for
//! HELLO, IDENTIFYs, waits for READY and heartbeats; it never needs more than
//! a developer's id and API key.
//!
//! ```text
//! # against a local server started with `sensorgate serve --data-dir /tmp/lt-data`
//! sensorgate-load --data-dir /tmp/lt-data relay --producers 8 --duration 5
//! sensorgate-load --dev demo:KEY relay --rate 20000 --size 256 --json
//! sensorgate-load --config sensorgate.toml relay --developers 2 --count 100000
//! sensorgate-load --data-dir /tmp/lt-data replay --count 200000
//! sensorgate-load --data-dir /tmp/lt-data connections --count 5000 --hold 5
//! ```
//!
//! Scenarios:
//! - `relay`: consumers (one per developer) connect first, then producers
//!   submit padded, timestamped readings at `--rate` (or flat out) for
//!   `--duration` or `--count`; reports throughput, SUBMIT→DISPATCH latency
//!   percentiles, and lost / duplicated / out-of-order readings.
//! - `replay`: fills the log (`--count`, or `--no-fill`), then one consumer
//!   REPLAYs it; reports frames/s, bytes/s and seq contiguity.
//! - `connections`: opens `--count` idle identified producers at
//!   `--concurrency`; reports setup rate and server RSS growth per
//!   connection (from `/metrics`) after `--hold`.
//! - `disk-floor`: no server; readings arrive at `--rate`, one thread (or `--lanes`) commits
//!   them with a `pwrite` and an `fdatasync` each time: the disk's floor for strict mode's
//!   latency.
//! - `burn`: no server; `--workers` threads each spin `--duty` % of every `--period-us`, to
//!   take a known CPU share from whatever else runs (one line: the CPU seconds it used).
//!
//! Output is a table on stdout (or one JSON object with `--json`) and a
//! progress display on stderr when it is a terminal. Exit status: 0 when
//! every check passed, 1 when a check failed, 2 when the run could not be
//! carried out. Only loopback URLs are accepted unless `--allow-remote`.

mod burn;
mod check;
mod cli;
mod creds;
mod ctx;
mod disk_floor;
mod frames;
mod http;
mod null_relay;
mod progress;
mod report;
mod scan;
mod scenario;
mod stats;
mod sys;
mod target;
mod ws;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Parser as _;
use serde::Serialize;

use crate::cli::{Cli, Scenario, Via};
use crate::ctx::{Ctx, Stop};
use crate::report::Outcome;
use crate::target::Target;

/// Extra time past `--timeout` for a scenario to tear down and report.
const TEARDOWN_GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sensorgate-load: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the chosen scenario; `Ok(passed)`.
fn run(cli: Cli) -> Result<bool> {
    let common = &cli.common;
    let timeout = Duration::try_from_secs_f64(common.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("--timeout must be a positive number of seconds"))?;
    if let Scenario::NullRelay(args) = &cli.scenario {
        let runtime = runtime(common.threads)?;
        runtime.block_on(null_relay::serve(args.listen, common.allow_remote))?;
        runtime.shutdown_timeout(Duration::from_millis(200));
        return Ok(true);
    }
    if let Scenario::DiskFloor(args) = &cli.scenario {
        return emit(disk_floor::run(args)?, common.json);
    }
    if let Scenario::Burn(args) = &cli.scenario {
        burn::run(args)?;
        return Ok(true);
    }
    let target = Target::parse(&common.url, common.allow_remote)?;
    let sources = creds::Sources {
        devs: &common.devs,
        dev_id: common.dev_id.as_deref(),
        api_key: common.api_key.as_deref(),
        config: common.config.as_deref(),
        data_dir: common.data_dir.as_deref(),
    };
    // STOMP subscribers need no credentials; STOMP publishers send a developer's token
    // when one is given (sensorgate's default rules let only developers SEND to
    // `/topic/…`) and connect anonymously otherwise (RabbitMQ, permissive rules).
    let developers = match &cli.scenario {
        Scenario::Stomp(a) if a.via == Via::Stomp && !sources.any() => Vec::new(),
        _ => creds::collect(&sources)?,
    };

    let runtime = runtime(common.threads)?;
    let passed = runtime.block_on(async {
        let (stop_tx, stop) = Stop::new();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("sensorgate-load: interrupted, winding down (Ctrl-C again to abort)");
                let _ = stop_tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let ctx = Ctx {
            target,
            developers,
            deadline: tokio::time::Instant::now() + timeout,
            stop,
            progress: !common.quiet && std::io::stderr().is_terminal(),
        };
        let scenario = async {
            match &cli.scenario {
                Scenario::Relay(args) => emit(scenario::relay::run(&ctx, args).await?, common.json),
                Scenario::Replay(args) => {
                    emit(scenario::replay::run(&ctx, args).await?, common.json)
                }
                Scenario::Connections(args) => {
                    emit(scenario::connections::run(&ctx, args).await?, common.json)
                }
                Scenario::Stomp(args) => emit(scenario::stomp::run(&ctx, args).await?, common.json),
                Scenario::NullRelay(_) | Scenario::DiskFloor(_) | Scenario::Burn(_) => {
                    Err(anyhow!("served before the runtime starts"))
                }
            }
        };
        tokio::time::timeout(timeout + TEARDOWN_GRACE, scenario)
            .await
            .map_err(|_| anyhow!("run did not finish within --timeout plus {TEARDOWN_GRACE:?}"))?
    })?;
    // Connection tasks may still be parked on sockets; don't wait for them.
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(passed)
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Prints a report as a table or JSON; returns whether it passed.
fn emit<R: Outcome + Serialize>(report: R, json: bool) -> Result<bool> {
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table().render());
    }
    Ok(report.passed())
}
