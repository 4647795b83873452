//! Metric names, label sets, buckets, and the Prometheus exporter.
//!
//! Owns the global recorder and a set of pre-registered handles, so that the hot path
//! increments an atomic instead of hashing a name and labels per reading. Every label value
//! comes from a closed set defined here (never a user, developer or topic id). Imports nothing
//! above it.

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const CONNECTIONS: &str = "sensorgate_connections";
pub const CONNECTIONS_OPENED: &str = "sensorgate_connections_opened_total";
/// TCP connections that have not authenticated (HTTP being read, WebSockets before their
/// token, anonymous STOMP): bounded by `max_unauthenticated_connections`.
pub const UNAUTHENTICATED: &str = "sensorgate_unauthenticated_connections";
/// Connections accepted past a budget and answered 503 (health checks excepted), by budget.
pub const CONNECTIONS_SHED: &str = "sensorgate_connections_shed_total";
/// Credentials or tokens refused, by where they were presented.
pub const AUTH_FAILURES: &str = "sensorgate_auth_failures_total";

/// Where credentials are presented, the `where` label of [`AUTH_FAILURES`].
#[derive(Clone, Copy)]
pub enum AuthPlace {
    /// `POST /auth/developer`, `/auth/user`: a developer's key.
    Mint,
    /// `POST /api/publish`: a publisher's or developer's key.
    Publish,
    /// IDENTIFY on `/connect`.
    Identify,
    /// STOMP CONNECT.
    Stomp,
    /// A `/stream` token, or one in a JSON API call.
    Endpoint,
}
pub const FRAMES_IN: &str = "sensorgate_frames_in_total";
pub const FRAMES_OUT: &str = "sensorgate_frames_out_total";
pub const CLOSES: &str = "sensorgate_close_codes_total";
pub const DISPATCH_LATENCY: &str = "sensorgate_submit_to_dispatch_seconds";
pub const COMMIT_READINGS: &str = "sensorgate_group_commit_readings";
pub const FSYNC_SECONDS: &str = "sensorgate_fsync_seconds";
pub const REPLAY_REQUESTS: &str = "sensorgate_replay_requests_total";
pub const REPLAY_FRAMES: &str = "sensorgate_replay_frames_total";
pub const SLOW_CONSUMER_CLOSES: &str = "sensorgate_slow_consumer_closes_total";
/// Times a stream consumer's outbox filled and it went from live delivery to reading the log.
pub const CONSUMER_LAGS: &str = "sensorgate_consumer_lags_total";
/// Client publishes to a live topic that had to wait for a full subscriber's room.
pub const TOPIC_PUBLISH_WAITS: &str = "sensorgate_topic_publish_waits_total";
/// Readings a lagging consumer was sent from the log (REPLAY frames are counted apart).
pub const CATCHUP_FRAMES: &str = "sensorgate_catchup_frames_total";
pub const STREAMS: &str = "sensorgate_streams";
pub const READINGS_STORED: &str = "sensorgate_readings_stored_total";
pub const STORE_ERRORS: &str = "sensorgate_store_errors_total";
pub const RETENTION_REMOVED: &str = "sensorgate_retention_removed_readings_total";
pub const TOKENS_MINTED: &str = "sensorgate_tokens_minted_total";
pub const HTTP_REQUESTS: &str = "sensorgate_http_requests_total";
pub const RSS_BYTES: &str = "sensorgate_process_resident_memory_bytes";
pub const BUILD_INFO: &str = "sensorgate_build_info";
pub const WORKER_THREADS: &str = "sensorgate_worker_threads";
pub const STOMP_CONNECTIONS: &str = "sensorgate_stomp_connections";
pub const STOMP_SUBSCRIPTIONS: &str = "sensorgate_stomp_subscriptions";
pub const STOMP_FRAMES_IN: &str = "sensorgate_stomp_frames_in_total";
pub const STOMP_FRAMES_OUT: &str = "sensorgate_stomp_frames_out_total";
pub const STOMP_ERRORS: &str = "sensorgate_stomp_errors_total";
pub const TOPIC_MESSAGES: &str = "sensorgate_topic_messages_total";
pub const ENDPOINTS: &str = "sensorgate_endpoints";
pub const ENDPOINT_HANDSHAKES: &str = "sensorgate_endpoint_handshakes_total";
pub const ENDPOINT_PUSHES: &str = "sensorgate_endpoint_pushes_total";
pub const ENDPOINT_CALLS: &str = "sensorgate_endpoint_calls_total";
pub const PROGRESS_TOPICS: &str = "sensorgate_progress_topics";
pub const PROGRESS_UPDATES: &str = "sensorgate_progress_updates_total";
/// Cluster mode: a SUBMIT's publish to JetStream until its ack.
pub const JS_PUBLISH_SECONDS: &str = "sensorgate_jetstream_publish_seconds";
/// Cluster mode: publishes sent and not yet acknowledged, all streams of the node.
pub const JS_ACKS_PENDING: &str = "sensorgate_jetstream_acks_pending";
/// Cluster mode: attempts to send again readings JetStream did not acknowledge (each reads
/// the stream back first after a failure).
pub const JS_RETRIES: &str = "sensorgate_jetstream_publish_retries_total";
/// Cluster mode: NATS connection events, by event (connected, disconnected, ...).
pub const JS_EVENTS: &str = "sensorgate_nats_events_total";
/// Cluster mode: 1 while the node has a NATS connection.
pub const JS_CONNECTED: &str = "sensorgate_nats_connected";
/// Cluster mode: key-value operations (tokens, connection owners, consumer counts), by
/// operation and result.
pub const KV_OPERATIONS: &str = "sensorgate_kv_operations_total";

/// Notification methods pushed to endpoints, the `method` label of [`ENDPOINT_PUSHES`].
pub const PUSH_METHODS: [&str; 3] = ["progress", "newRevision", "newProject"];
/// What the throttle did with a progress update, the `outcome` label of
/// [`PROGRESS_UPDATES`].
pub const PROGRESS_OUTCOMES: [&str; 3] = ["pushed", "held", "unchanged"];

/// The JSON API's methods (the `method` label of [`ENDPOINT_CALLS`]); anything else is
/// counted as "other".
pub const ENDPOINT_METHODS: [&str; 9] = [
    "registerProgressHandler",
    "unregisterProgressHandler",
    "getProgress",
    "registerNewRevisionHandler",
    "unregisterNewRevisionHandler",
    "registerNewProjectHandler",
    "unregisterNewProjectHandler",
    "getLoggedInUser",
    "other",
];

/// STOMP client commands, the `command` label of [`STOMP_FRAMES_IN`].
pub const STOMP_IN: [&str; 11] = [
    "connect",
    "stomp",
    "send",
    "subscribe",
    "unsubscribe",
    "ack",
    "nack",
    "begin",
    "commit",
    "abort",
    "disconnect",
];
/// STOMP server frames, the `command` label of [`STOMP_FRAMES_OUT`]; index with [`stomp_out`].
pub const STOMP_OUT: [&str; 5] = ["connected", "message", "receipt", "error", "heartbeat"];

pub mod stomp_out {
    pub const CONNECTED: usize = 0;
    pub const MESSAGE: usize = 1;
    pub const RECEIPT: usize = 2;
    pub const ERROR: usize = 3;
    pub const HEARTBEAT: usize = 4;
}

/// Why a STOMP connection got an ERROR, the `reason` label of [`STOMP_ERRORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StompError {
    /// Malformed bytes, or a frame missing what its command needs.
    Frame = 0,
    /// A refused destination.
    Destination = 1,
    /// A frame not allowed now: before CONNECT, a second CONNECT, an unknown subscription
    /// or transaction.
    State = 2,
    /// No STOMP version in common.
    Version = 3,
    /// No CONNECT in time, or heart-beats missed.
    Timeout = 4,
    /// Too many subscriptions or transactions.
    Limit = 5,
    /// Messages not read in time (the inbox filled).
    Slow = 6,
    /// A token that does not redeem, or none where one is required.
    Auth = 7,
    /// A destination the rules do not open to this principal.
    Forbidden = 8,
    /// A `client` or `client-individual` subscription past `stomp_max_unacked`.
    Unacked = 9,
    /// The server failed (a stream's store).
    Internal = 10,
}

pub const STOMP_ERROR_REASONS: [&str; 11] = [
    "frame",
    "destination",
    "state",
    "version",
    "timeout",
    "limit",
    "slow",
    "auth",
    "forbidden",
    "unacked",
    "internal",
];

/// Opcode-protocol frame names, the `op` label of the frame counters; index with [`op_in`]
/// and [`op_out`].
pub const OPS_IN: [&str; 6] = [
    "heartbeat",
    "identify",
    "submit",
    "replay",
    "invalid",
    "control",
];
pub const OPS_OUT: [&str; 5] = ["hello", "heartbeat_ack", "ready", "dispatch", "close"];

pub mod op_in {
    pub const HEARTBEAT: usize = 0;
    pub const IDENTIFY: usize = 1;
    pub const SUBMIT: usize = 2;
    pub const REPLAY: usize = 3;
    /// Undecodable or not allowed.
    pub const INVALID: usize = 4;
    /// WebSocket ping, pong and close.
    pub const CONTROL: usize = 5;
}

pub mod op_out {
    pub const HELLO: usize = 0;
    pub const HEARTBEAT_ACK: usize = 1;
    pub const READY: usize = 2;
    pub const DISPATCH: usize = 3;
    pub const CLOSE: usize = 4;
}

/// Close codes the server sends, the `code` label of [`CLOSES`].
pub const CLOSE_CODES: [u16; 15] = [
    1000, 1001, 1002, 1007, 1009, 1011, 4000, 4001, 4002, 4003, 4004, 4005, 4008, 4009, 4010,
];

/// Pre-registered handles for everything the per-frame path touches.
pub struct Handles {
    pub frames_in: [Counter; OPS_IN.len()],
    pub frames_out: [Counter; OPS_OUT.len()],
    pub closes: [Counter; CLOSE_CODES.len()],
    pub connections: [Gauge; 3],
    pub connections_opened: Counter,
    pub unauthenticated: Gauge,
    /// By budget: `unauthenticated`, `total`.
    pub connections_shed: [Counter; 2],
    /// By [`AuthPlace`].
    pub auth_failures: [Counter; 5],
    pub dispatch_latency: Histogram,
    pub commit_readings: Histogram,
    pub fsync_seconds: Histogram,
    pub replay_requests: Counter,
    pub replay_frames: Counter,
    pub slow_consumer_closes: Counter,
    pub consumer_lags: Counter,
    pub catchup_frames: Counter,
    pub topic_publish_waits: Counter,
    pub streams: Gauge,
    pub readings_stored: Counter,
    pub store_errors: Counter,
    pub retention_removed: Counter,
    pub rss: Gauge,
    pub stomp_connections: Gauge,
    pub stomp_subscriptions: Gauge,
    pub stomp_in: [Counter; STOMP_IN.len()],
    pub stomp_out: [Counter; STOMP_OUT.len()],
    pub stomp_errors: [Counter; STOMP_ERROR_REASONS.len()],
    /// Messages published to topics, by where they came from: STOMP SEND, the HTTP
    /// publish API, the built-in chat services.
    pub topic_messages: [Counter; 3],
    pub endpoints: Gauge,
    /// Tokens sent on `/stream`: accepted, refused.
    pub endpoint_handshakes: [Counter; 2],
    /// Pushes written to endpoint sockets, by method ([`PUSH_METHODS`]).
    pub endpoint_pushes: [Counter; 3],
    /// JSON API calls by method ([`ENDPOINT_METHODS`]) and outcome: result, exception.
    pub endpoint_calls: [[Counter; 2]; ENDPOINT_METHODS.len()],
    pub progress_topics: Gauge,
    /// Progress updates by what the throttle did ([`PROGRESS_OUTCOMES`]).
    pub progress_updates: [Counter; 3],
    pub js_publish_seconds: Histogram,
    pub js_acks_pending: Gauge,
    pub js_retries: Counter,
    pub js_connected: Gauge,
}

/// Which connection gauge: not yet identified, user (producer), developer (consumer).
#[derive(Debug, Clone, Copy)]
pub enum ConnRole {
    Pending = 0,
    User = 1,
    Developer = 2,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Installs the Prometheus recorder once per process (tests start many servers in one) and
/// returns its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let latency = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ];
        let sizes = [
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
        ];
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DISPATCH_LATENCY.into()), &latency)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FSYNC_SECONDS.into()), &latency))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(JS_PUBLISH_SECONDS.into()), &latency)
            })
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_READINGS.into()), &sizes))
            .and_then(|b| b.install_recorder())
            .expect("the Prometheus recorder is installed once, with valid buckets")
    })
}

/// The pre-registered handles; installs the recorder first if needed.
pub fn handles() -> &'static Handles {
    HANDLES.get_or_init(|| {
        install();
        describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Handles {
            frames_in: OPS_IN.map(|op| metrics::counter!(FRAMES_IN, "op" => op)),
            frames_out: OPS_OUT.map(|op| metrics::counter!(FRAMES_OUT, "op" => op)),
            closes: CLOSE_CODES.map(|c| metrics::counter!(CLOSES, "code" => c.to_string())),
            connections: ["pending", "user", "developer"]
                .map(|r| metrics::gauge!(CONNECTIONS, "role" => r)),
            connections_opened: metrics::counter!(CONNECTIONS_OPENED),
            unauthenticated: metrics::gauge!(UNAUTHENTICATED),
            connections_shed: ["unauthenticated", "total"]
                .map(|b| metrics::counter!(CONNECTIONS_SHED, "budget" => b)),
            auth_failures: ["mint", "publish", "identify", "stomp", "endpoint"]
                .map(|w| metrics::counter!(AUTH_FAILURES, "where" => w)),
            dispatch_latency: metrics::histogram!(DISPATCH_LATENCY),
            commit_readings: metrics::histogram!(COMMIT_READINGS),
            fsync_seconds: metrics::histogram!(FSYNC_SECONDS),
            replay_requests: metrics::counter!(REPLAY_REQUESTS),
            replay_frames: metrics::counter!(REPLAY_FRAMES),
            slow_consumer_closes: metrics::counter!(SLOW_CONSUMER_CLOSES),
            consumer_lags: metrics::counter!(CONSUMER_LAGS),
            catchup_frames: metrics::counter!(CATCHUP_FRAMES),
            topic_publish_waits: metrics::counter!(TOPIC_PUBLISH_WAITS),
            streams: metrics::gauge!(STREAMS),
            readings_stored: metrics::counter!(READINGS_STORED),
            store_errors: metrics::counter!(STORE_ERRORS),
            retention_removed: metrics::counter!(RETENTION_REMOVED),
            rss: metrics::gauge!(RSS_BYTES),
            stomp_connections: metrics::gauge!(STOMP_CONNECTIONS),
            stomp_subscriptions: metrics::gauge!(STOMP_SUBSCRIPTIONS),
            stomp_in: STOMP_IN.map(|c| metrics::counter!(STOMP_FRAMES_IN, "command" => c)),
            stomp_out: STOMP_OUT.map(|c| metrics::counter!(STOMP_FRAMES_OUT, "command" => c)),
            stomp_errors: STOMP_ERROR_REASONS
                .map(|r| metrics::counter!(STOMP_ERRORS, "reason" => r)),
            topic_messages: ["stomp", "http", "service"]
                .map(|s| metrics::counter!(TOPIC_MESSAGES, "source" => s)),
            endpoints: metrics::gauge!(ENDPOINTS),
            endpoint_handshakes: ["accepted", "invalid_token"]
                .map(|o| metrics::counter!(ENDPOINT_HANDSHAKES, "outcome" => o)),
            endpoint_pushes: PUSH_METHODS
                .map(|m| metrics::counter!(ENDPOINT_PUSHES, "method" => m)),
            endpoint_calls: ENDPOINT_METHODS.map(|m| {
                ["result", "exception"]
                    .map(|o| metrics::counter!(ENDPOINT_CALLS, "method" => m, "outcome" => o))
            }),
            progress_topics: metrics::gauge!(PROGRESS_TOPICS),
            progress_updates: PROGRESS_OUTCOMES
                .map(|o| metrics::counter!(PROGRESS_UPDATES, "outcome" => o)),
            js_publish_seconds: metrics::histogram!(JS_PUBLISH_SECONDS),
            js_acks_pending: metrics::gauge!(JS_ACKS_PENDING),
            js_retries: metrics::counter!(JS_RETRIES),
            js_connected: metrics::gauge!(JS_CONNECTED),
        }
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "Open WebSocket connections by role");
    describe_counter!(CONNECTIONS_OPENED, "WebSocket connections accepted");
    describe_gauge!(
        UNAUTHENTICATED,
        "TCP connections that have not authenticated (max_unauthenticated_connections)"
    );
    describe_counter!(
        AUTH_FAILURES,
        "Credentials or tokens refused, by where they were presented"
    );
    describe_counter!(
        CONNECTIONS_SHED,
        "Connections past a budget, answered 503 except health checks, by budget"
    );
    describe_counter!(FRAMES_IN, "Frames received by opcode");
    describe_counter!(FRAMES_OUT, "Frames sent by opcode");
    describe_counter!(CLOSES, "Connections closed by the server, by close code");
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "SUBMIT received to DISPATCH queued, oldest reading of each group commit"
    );
    describe_histogram!(COMMIT_READINGS, "Readings per group commit");
    describe_histogram!(
        FSYNC_SECONDS,
        Unit::Seconds,
        "Duration of a store flush + fsync"
    );
    describe_counter!(REPLAY_REQUESTS, "REPLAY requests served");
    describe_counter!(REPLAY_FRAMES, "DISPATCH frames sent by REPLAY");
    describe_counter!(
        SLOW_CONSUMER_CLOSES,
        "Consumers closed with 4009 because their queue filled"
    );
    describe_gauge!(STREAMS, "Developer streams open in the hub");
    describe_counter!(READINGS_STORED, "Readings appended to the log");
    describe_counter!(STORE_ERRORS, "Failed log appends or flushes");
    describe_counter!(RETENTION_REMOVED, "Readings removed by retention");
    describe_counter!(TOKENS_MINTED, "Tokens minted over HTTP, by role");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status class");
    describe_gauge!(RSS_BYTES, Unit::Bytes, "Resident set size of the process");
    describe_gauge!(
        WORKER_THREADS,
        "Threads of the async runtime running connections and the hub (worker_threads)"
    );
    describe_gauge!(STOMP_CONNECTIONS, "Open STOMP connections");
    describe_gauge!(STOMP_SUBSCRIPTIONS, "STOMP subscriptions held");
    describe_counter!(STOMP_FRAMES_IN, "STOMP frames received, by command");
    describe_counter!(STOMP_FRAMES_OUT, "STOMP frames sent, by command");
    describe_counter!(
        STOMP_ERRORS,
        "STOMP ERROR frames sent (each then closes), by reason"
    );
    describe_counter!(TOPIC_MESSAGES, "Messages published to topics, by source");
    describe_gauge!(
        ENDPOINTS,
        "Notification endpoints registered on /stream sockets"
    );
    describe_counter!(
        ENDPOINT_HANDSHAKES,
        "Tokens sent on /stream, by outcome (an invalid one leaves the socket open)"
    );
    describe_counter!(
        ENDPOINT_PUSHES,
        "Notifications pushed to endpoints, by method"
    );
    describe_counter!(
        ENDPOINT_CALLS,
        "JSON API calls (POST /json and over /stream), by method and outcome"
    );
    describe_gauge!(PROGRESS_TOPICS, "Progress topics held");
    describe_histogram!(
        JS_PUBLISH_SECONDS,
        Unit::Seconds,
        "Cluster mode: a reading's publish to JetStream until its ack"
    );
    describe_gauge!(
        JS_ACKS_PENDING,
        "Cluster mode: publishes waiting for their JetStream ack"
    );
    describe_counter!(
        JS_RETRIES,
        "Cluster mode: attempts to send again readings JetStream did not acknowledge"
    );
    describe_counter!(JS_EVENTS, "Cluster mode: NATS connection events, by event");
    describe_gauge!(JS_CONNECTED, "Cluster mode: 1 while connected to NATS");
    describe_counter!(
        KV_OPERATIONS,
        "Cluster mode: key-value operations, by operation and result"
    );
    describe_counter!(
        PROGRESS_UPDATES,
        "Progress updates from backends, by what the throttle did with them"
    );
}

impl Handles {
    pub fn frame_in(&self, op: usize) {
        self.frames_in[op].increment(1);
    }

    /// A refused key or token: counted, and logged at debug only (strangers can make many).
    pub fn auth_failed(&self, place: AuthPlace, why: &dyn std::fmt::Display) {
        self.auth_failures[place as usize].increment(1);
        tracing::debug!(error = %why, "credentials refused");
    }

    pub fn close(&self, code: u16) {
        if let Some(i) = CLOSE_CODES.iter().position(|&c| c == code) {
            self.closes[i].increment(1);
        }
    }
}

/// Counts a NATS connection event (the `event` label: a closed set).
pub fn nats_event(event: &'static str) {
    metrics::counter!(JS_EVENTS, "event" => event).increment(1);
}

/// Counts a key-value operation (`op` and `result` from closed sets in `log::cluster`).
pub fn kv_operation(op: &'static str, result: &'static str) {
    metrics::counter!(KV_OPERATIONS, "op" => op, "result" => result).increment(1);
}

/// Records how many workers the runtime serving this process has.
pub fn worker_threads(n: usize) {
    metrics::gauge!(WORKER_THREADS).set(n as f64);
}

/// Renders the scrape, refreshing the gauges that are sampled rather than maintained.
pub fn render() -> String {
    handles().rss.set(resident_bytes() as f64);
    install().render()
}

/// Runs histogram upkeep; without it the exporter keeps every sample until a scrape.
pub fn upkeep() {
    install().run_upkeep();
}

/// Resident set size from /proc (0 where there is none).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
