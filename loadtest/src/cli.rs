//! Command-line interface: global connection/credential/output options,
//! one subcommand per scenario (relay, replay, connections), and `null-relay`,
//! the baseline server the relay scenario is compared with.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::scan;

#[derive(Parser, Debug)]
#[command(
    name = "sensorgate-load",
    version,
    about = "Load generator for the sensorgate WebSocket gateway",
    long_about = "Load generator for the sensorgate WebSocket gateway.\n\n\
        Drives a running server over real WebSockets: it mints its own single-use tokens \
        through the server's /auth endpoints, checks every delivered reading for loss, \
        duplication and ordering, and reports throughput and latency.\n\n\
        Every run is bounded by its own duration/count and by --timeout, and only talks to \
        loopback addresses unless --allow-remote is given.\n\n\
        Exit status: 0 all checks passed; 1 a reading was lost, duplicated or out of order, \
        or connections failed; 2 the run could not be carried out.",
    after_help = "Examples:\n  \
        sensorgate-load --data-dir /tmp/lt-data relay --producers 8 --duration 5\n  \
        sensorgate-load --dev demo:KEY relay --rate 20000 --size 256 --json\n  \
        sensorgate-load --config sensorgate.toml relay --developers 2 --count 100000\n  \
        sensorgate-load --data-dir /tmp/lt-data replay --count 200000\n  \
        sensorgate-load --data-dir /tmp/lt-data connections --count 5000 --hold 5\n  \
        sensorgate-load null-relay --listen 127.0.0.1:18299   # baseline for relay"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options shared by every scenario.
#[derive(Args, Debug)]
pub struct Common {
    /// Server base URL; WebSockets go to <url>/connect, token calls to
    /// <url>/auth/…, metrics to <url>/metrics on the same host:port.
    #[arg(
        long,
        global = true,
        default_value = "ws://127.0.0.1:8080",
        env = "SENSORGATE_LOAD_URL",
        help_heading = "Server"
    )]
    pub url: String,

    /// Allow a URL that is not a loopback address.
    #[arg(long, global = true, help_heading = "Server")]
    pub allow_remote: bool,

    /// A developer's credentials as ID:KEY (repeatable).
    #[arg(
        long = "dev",
        value_name = "ID:KEY",
        global = true,
        help_heading = "Credentials"
    )]
    pub devs: Vec<String>,

    /// A developer id (with --api-key).
    #[arg(long, value_name = "ID", global = true, help_heading = "Credentials")]
    pub dev_id: Option<String>,

    /// The API key of --dev-id.
    #[arg(long, value_name = "KEY", global = true, help_heading = "Credentials")]
    pub api_key: Option<String>,

    /// A sensorgate TOML config: every [[developers]] entry with id and api_key is used.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Credentials")]
    pub config: Option<PathBuf>,

    /// A server data directory: its demo-developer.toml is used.
    #[arg(long, value_name = "DIR", global = true, help_heading = "Credentials")]
    pub data_dir: Option<PathBuf>,

    /// Print one JSON object with the results instead of the table.
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,

    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long, short, global = true, help_heading = "Output")]
    pub quiet: bool,

    /// Hard limit on the whole run, in seconds.
    #[arg(
        long,
        value_name = "SECS",
        global = true,
        default_value_t = 900.0,
        help_heading = "Limits"
    )]
    pub timeout: f64,

    /// Runtime worker threads (default: number of CPUs).
    #[arg(long, value_name = "N", global = true, help_heading = "Limits")]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Producers submit readings, consumers receive them: throughput,
    /// SUBMIT→DISPATCH latency, loss/duplication/ordering checks.
    Relay(RelayArgs),
    /// Fill the log, then one consumer REPLAYs it: frames/s and seq checks.
    Replay(ReplayArgs),
    /// Open many idle identified producer connections: setup rate and server
    /// memory per connection.
    Connections(ConnectionsArgs),
    /// STOMP topic fan-out: publishers SEND to topics, subscribers get MESSAGEs; throughput,
    /// SEND→MESSAGE latency, loss and order checks. Publishers send a developer's token
    /// when credentials are given (sensorgate lets only developers SEND to `/topic/…` by
    /// default) and connect anonymously otherwise (RabbitMQ).
    Stomp(StompArgs),
    /// Serve a null relay (no store, no checks) to measure the relay scenario's baseline
    /// with the same client: run it, then point `relay --url` at it.
    NullRelay(NullRelayArgs),
    /// The disk's floor for `durability = "strict"`: readings arrive at `--rate`, one thread
    /// appends whatever has arrived with one pwrite and one fdatasync, and reports each
    /// reading's arrival→synced latency. No server, no network.
    DiskFloor(DiskFloorArgs),
    /// Take CPU from everything else on the machine, in short bursts as a busy server does:
    /// each thread spins for `--duty` % of every `--period-us` and sleeps the rest. Shows
    /// what another process's CPU share costs a system under test (BENCHMARKS.md, "Where the
    /// cluster's p99 goes"). No network.
    Burn(BurnArgs),
}

/// Options of `burn`.
#[derive(Args, Debug, Clone)]
pub struct BurnArgs {
    /// Threads, each taking `--duty` % of a core.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,

    /// Percent of each period spent spinning (1–100).
    #[arg(long, default_value_t = 10)]
    pub duty: u32,

    /// Length of one spin-and-sleep period, in microseconds.
    #[arg(long, default_value_t = 200)]
    pub period_us: u64,

    /// Seconds to run.
    #[arg(long, short, default_value_t = 10.0)]
    pub duration: f64,
}

/// Options of `disk-floor`.
#[derive(Args, Debug, Clone)]
pub struct DiskFloorArgs {
    /// Directory on the disk to measure (the server's data_dir); a file is created and removed.
    #[arg(long, value_name = "DIR")]
    pub dir: std::path::PathBuf,

    /// Readings per second.
    #[arg(long, short, default_value_t = 10_000.0)]
    pub rate: f64,

    /// Seconds to run.
    #[arg(long, short, default_value_t = 10.0)]
    pub duration: f64,

    /// Bytes written per reading (a SUBMIT of the relay scenario's default size stores ~150).
    #[arg(long, short, default_value_t = 150)]
    pub size: usize,

    /// Append to a growing file instead of writing into one preallocated up front (as the
    /// server does with each 64 MiB segment): each `fdatasync` then allocates blocks and
    /// grows the file too.
    #[arg(long)]
    pub append: bool,

    /// Commit threads: each writes what has arrived after the previous batch, then syncs, so
    /// up to this many `fdatasync`s are in flight (a reading is durable once a sync that
    /// started after its write returns).
    #[arg(long, default_value_t = 1)]
    pub lanes: usize,

    /// The commit thread polls for arrivals instead of sleeping until one wakes it: the
    /// difference is what waking a sleeping thread costs on this machine (a CPU burnt).
    #[arg(long)]
    pub spin: bool,
}

/// Options of `stomp`.
#[derive(Args, Debug, Clone)]
pub struct StompArgs {
    /// Topics (`/topic/load-<t>`).
    #[arg(long, short, default_value_t = 4)]
    pub topics: usize,

    /// Subscribers per topic.
    #[arg(long, default_value_t = 10)]
    pub per_topic: usize,

    /// Publishers (publisher i sends to topic i mod T).
    #[arg(long, short, default_value_t = 4)]
    pub publishers: usize,

    /// Total SENDs per second over all publishers (0 or absent: as fast as possible).
    #[arg(long, short, value_name = "R")]
    pub rate: Option<f64>,

    /// How long publishers run, in seconds.
    #[arg(long, short, default_value_t = 10.0)]
    pub duration: f64,

    /// Message body size in bytes (JSON, padded).
    #[arg(long, short, default_value_t = 120)]
    pub size: usize,

    /// After publishers stop, wait up to this long for subscribers to catch up.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,

    /// WebSocket path of the STOMP endpoint (RabbitMQ Web-STOMP: /ws).
    #[arg(long, default_value = "/stomp/websocket")]
    pub path: String,

    /// How publishers send: STOMP SEND frames, or `POST /api/publish` batches (up to 64
    /// messages a request, with a developer's key from --data-dir/--config/--dev-id).
    #[arg(long, value_enum, default_value_t = Via::Stomp)]
    pub via: Via,
}

/// How the `stomp` scenario publishes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Stomp,
    Http,
}

/// Options of `null-relay`.
#[derive(Args, Debug, Clone)]
pub struct NullRelayArgs {
    /// Address to listen on (loopback unless --allow-remote).
    #[arg(long, default_value = "127.0.0.1:18299")]
    pub listen: std::net::SocketAddr,
}

/// Options of `relay`.
#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Producer connections (distinct uids load-<dev>-<i>, round-robin over developers).
    #[arg(long, short, default_value_t = 4)]
    pub producers: usize,

    /// Consumer connections, round-robin over developers [default: number of developers].
    /// The server keeps one consumer per developer by default, so more
    /// consumers than developers evict each other (close 4002).
    #[arg(long, short)]
    pub consumers: Option<usize>,

    /// Use only the first D developers.
    #[arg(long, value_name = "D")]
    pub developers: Option<usize>,

    /// Total readings per second over all producers (0 or absent: as fast as
    /// TCP backpressure allows).
    #[arg(long, short, value_name = "R")]
    pub rate: Option<f64>,

    /// How long producers run, in seconds [default: 10 unless --count is given].
    #[arg(long, short, value_name = "SECS")]
    pub duration: Option<f64>,

    /// Total readings to send (split evenly over producers); stops early at --duration if given.
    #[arg(long, short = 'n', value_name = "N")]
    pub count: Option<u64>,

    /// Target SUBMIT frame size in bytes (the JSON text is padded to exactly this).
    #[arg(long, short, value_name = "BYTES", default_value_t = 120)]
    pub size: usize,

    /// SUBMIT frames written per flush (one syscall per batch).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,

    /// With --rate: start every producer's schedule at the same instant, so all
    /// of them submit together (a burst of P readings every P/R seconds). By
    /// default producers are phased evenly over one period, as independent
    /// devices are.
    #[arg(long)]
    pub aligned: bool,

    /// Producer socket send buffer (SO_SNDBUF, which Linux doubles): bounds
    /// the bytes a producer has written that the server has not read yet.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    pub inflight: u32,

    /// After producers stop, wait up to this long for consumers to catch up.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub drain: f64,

    /// Slow consumers: each reads at most this many readings per second while the
    /// producers run (for --duration), then as fast as it can during the drain. Shows a
    /// consumer that falls behind and catches up from the log.
    #[arg(long, value_name = "R")]
    pub consumer_rate: Option<f64>,

    /// How consumers parse DISPATCH frames.
    #[arg(long, value_enum, default_value_t = scan::Parser::Scan)]
    pub parser: scan::Parser,
}

/// Options of `replay`.
#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Readings to write before replaying (as fast as possible).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 1_000_000)]
    pub count: u64,

    /// Producers used for the fill.
    #[arg(long, short, default_value_t = 4)]
    pub producers: usize,

    /// Skip the fill and replay what the log already holds.
    #[arg(long)]
    pub no_fill: bool,

    /// REPLAY lower bound (exclusive).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub after: u64,

    /// REPLAY upper bound (exclusive) [default: up to the newest].
    #[arg(long, value_name = "SEQ")]
    pub before: Option<u64>,

    /// Target SUBMIT frame size of the fill, in bytes.
    #[arg(long, short, value_name = "BYTES", default_value_t = 120)]
    pub size: usize,

    /// Producer socket send buffer of the fill (see `relay --inflight`).
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    pub inflight: u32,

    /// Without a known end seq (--no-fill), stop after this many seconds without a frame.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub idle: f64,
}

/// Options of `connections`.
#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Identified producer connections to open (distinct uids conn-<dev>-<i>).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 10_000)]
    pub count: usize,

    /// Connection setups in flight at once.
    #[arg(long, short = 'k', value_name = "K", default_value_t = 64)]
    pub concurrency: usize,

    /// Keep the connections open this long before measuring again; every
    /// connection heartbeats at ¾ of the server's HELLO interval throughout.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub hold: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_before_or_after_the_scenario() {
        let before =
            Cli::try_parse_from(["sensorgate-load", "--dev", "a:b", "--json", "relay"]).unwrap();
        let after = Cli::try_parse_from([
            "sensorgate-load",
            "relay",
            "--dev",
            "a:b",
            "--json",
            "-p",
            "2",
        ])
        .unwrap();
        for cli in [&before, &after] {
            assert_eq!(cli.common.devs, ["a:b"]);
            assert!(cli.common.json);
            assert_eq!(cli.common.url, "ws://127.0.0.1:8080");
        }
        let Scenario::Relay(r) = &after.scenario else {
            panic!("expected relay")
        };
        assert_eq!(r.producers, 2);
        assert_eq!(r.size, 120);
        assert_eq!(r.parser, scan::Parser::Scan);
    }
}
