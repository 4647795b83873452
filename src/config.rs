//! Configuration: the schema, its defaults, validation, and the three layers that feed it
//! (TOML file < `SENSORGATE_*` environment < command-line flags). The file and environment
//! are layered by config-rs, which converts each value to the type the schema gives its key.
//!
//! Owns every tunable number of the server. Knows nothing of sockets or the store; other
//! modules receive a validated [`Config`] and never re-read the environment.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used. Each variant names the key at fault, because the
/// operator reads exactly one line before the process exits with code 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// When a reading may be dispatched relative to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Dispatch only after the group commit holding the reading is fsynced.
    Strict,
    /// Dispatch right after the append; fsync every `fast_flush_interval_ms`.
    Fast,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Self::Strict),
            "fast" => Ok(Self::Fast),
            other => Err(format!("expected \"strict\" or \"fast\", got {other:?}")),
        }
    }
}

/// A tenant allowed to mint tokens. The key is given in clear or as its SHA-256 (hex), so a
/// config file in a repository need not hold the secret itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeveloperConfig {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<String>,
    /// Publishers and endpoint tokens only: the developer (tenant) they act for. A
    /// publisher raises that developer's endpoint notifications; a static endpoint token
    /// sees that developer's progress topics and project events. Without it, neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub developer: Option<String>,
    /// Developers and publishers only: the STOMP destinations it may publish to (through
    /// `POST /api/publish`, and a developer's STOMP SEND): a prefix ending in `/`, or one
    /// destination. Unset: `developer_publish_prefixes` for a developer, nothing for a
    /// publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<Vec<String>>,
}

/// Whether `destination` is under one of `grants` (a prefix ending in `/`, or exactly it).
pub fn granted(grants: &[String], destination: &str) -> bool {
    grants.iter().any(|g| {
        destination.starts_with(g.as_str()) && (g.ends_with('/') || destination.len() == g.len())
    })
}

/// Who a STOMP rule admits: connections without a token, with a user (producer) token,
/// with a user token minted for an employee (seed 002's staff side), or with a developer
/// token.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StompPrincipal {
    Anonymous,
    User,
    Employee,
    Developer,
}

/// A backend allowed to use `POST /api/publish` without being a developer: it sends
/// `Authorization: Bearer <key>`.
pub type PublisherConfig = DeveloperConfig;

/// A static token for `/stream` and `/json` (BIMserver-style deployments whose clients
/// hold a fixed token): `api_key` (or its SHA-256) is the token, `id` names its owner.
pub type EndpointTokenConfig = DeveloperConfig;

/// Which principals may SUBSCRIBE to and SEND to destinations under `prefix` (a prefix
/// ending in `/`), or to exactly `prefix` (one that does not); the longest rule that covers
/// a destination decides, and a destination no rule covers is refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StompRule {
    pub prefix: String,
    #[serde(default)]
    pub subscribe: Vec<StompPrincipal>,
    #[serde(default)]
    pub send: Vec<StompPrincipal>,
}

impl StompRule {
    fn new(prefix: &str, subscribe: &[StompPrincipal], send: &[StompPrincipal]) -> Self {
        Self {
            prefix: prefix.into(),
            subscribe: subscribe.to_vec(),
            send: send.to_vec(),
        }
    }

    /// Whether the rule covers `destination`: everything under a prefix that ends in `/`,
    /// exactly the destination named otherwise.
    pub fn covers(&self, destination: &str) -> bool {
        destination.starts_with(&self.prefix)
            && (self.prefix.ends_with('/') || destination.len() == self.prefix.len())
    }

    /// The default rules. Anonymous clients read the seeds' public feeds (seed 000's
    /// `/topic/…`, seed 002's heart-beat and online count) and send nothing; seed 002's
    /// conversations are read by users and employees only, and their events come from the
    /// chat backend through `POST /api/publish`; typing events name their sender, so only
    /// principals with a user id send them; a developer (a tenant's backend) may SEND to
    /// `/topic/`.
    fn defaults() -> Vec<Self> {
        use StompPrincipal::*;
        const ALL: &[StompPrincipal] = &[Anonymous, User, Employee, Developer];
        vec![
            Self::new("/topic/", ALL, &[Developer]),
            Self::new("/v1/topic/", &[User, Employee, Developer], &[]),
            Self::new("/v1/topic/heartbeat", ALL, &[]),
            Self::new("/v1/topic/online-employees", ALL, &[]),
            Self::new("/v1/topic/conversation/", &[User, Employee], &[]),
            Self::new("/v1/app/", &[], &[User, Employee]),
        ]
    }
}

/// Most `worker_threads`: past this a typo (an extra zero) would spend memory on stacks
/// and time on wake-ups for nothing.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The effective configuration. Field names are the TOML keys and, upper-cased with the
/// `SENSORGATE_` prefix, the environment variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_grace_ms: u64,
    pub identify_timeout_ms: u64,
    /// Largest WebSocket message accepted, after joining fragments (close 1009 above it).
    pub max_frame_bytes: usize,
    pub durability: Durability,
    pub token_ttl_s: u64,
    pub max_consumers_per_developer: usize,
    /// Frames queued for one consumer before it falls behind and catches up from the log
    /// (for a live-topic subscriber: before it is closed with 4009).
    pub consumer_queue_max: usize,
    /// A connection whose socket takes nothing this long while data waits is closed with
    /// 4009: it reads nothing.
    pub consumer_stall_timeout_ms: u64,
    /// 0 keeps readings forever.
    pub retention_max_age_s: u64,
    /// 0 keeps any number of readings.
    pub retention_max_per_stream: u64,
    /// Accepted connections (HTTP and WebSocket) before new ones wait in the kernel backlog
    /// (64 more are accepted to answer health checks and 503 to everything else).
    pub max_connections: usize,
    /// Origins a browser may open WebSockets from, as the `Origin` header gives them
    /// (`https://app.example.com`). Empty: any. A client that sends no `Origin` (not a
    /// browser) always passes; a browser from another origin gets 403.
    pub allowed_origins: Vec<String>,
    /// A second listener for `/metrics`, `/healthz` and `/readyz` (e.g. `127.0.0.1:9090`).
    /// When set, `/metrics` is served there only; the health checks on both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// Of those, connections that have not authenticated: HTTP requests being read,
    /// WebSockets before IDENTIFY or their token, anonymous STOMP clients. Past it a new
    /// connection gets 503 (health checks excepted), so strangers can never take the slot of
    /// an identified client.
    pub max_unauthenticated_connections: usize,
    /// Time for a client to send its HTTP request headers (and so its upgrade).
    pub handshake_timeout_ms: u64,
    /// Time SIGTERM allows for closing clients and the final commit.
    pub shutdown_grace_ms: u64,
    /// After SIGTERM, time /readyz answers 503 while clients are still served, so a load
    /// balancer can take the node out first.
    pub drain_delay_ms: u64,
    /// Fast mode: how often the background flush makes appends durable.
    pub fast_flush_interval_ms: u64,
    /// Strict mode: the nice value (-20 … 19) the commit thread asks for, so that a finished
    /// sync's answer is not queued behind connection work. Raising a priority needs
    /// `CAP_SYS_NICE` (or a `RLIMIT_NICE` that allows it); without it the thread keeps the
    /// process's priority and the server says so once. 0 leaves the thread alone.
    pub commit_thread_nice: i32,
    /// Readings a stream owner takes from its queue per group commit.
    pub commit_batch_max: usize,
    /// SUBMITs waiting for their stream's owner before producers are pushed back.
    pub publish_queue_max: usize,
    /// Readings sent per REPLAY read from the log before other work gets a turn.
    pub replay_chunk: usize,
    /// SUBMITs per second per producer connection before close 4008 (0: no limit).
    pub submit_rate_per_s: u32,
    /// HMAC secret for tokens; generated and kept in `data_dir` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// Log lines as JSON instead of text.
    pub log_json: bool,
    /// Threads running connections and the hub (0: one per core the process may use, which
    /// counts a container's CPU quota). Fewer suit a node sharing its cores with other
    /// busy processes, where every idle worker woken for a message costs a context switch.
    pub worker_threads: usize,
    /// STOMP: the heart-beat the server offers both ways in CONNECTED (0: none). The
    /// negotiated rates follow the spec's max() rule; a client silent for twice its rate
    /// is closed.
    pub stomp_heart_beat_ms: u64,
    /// STOMP: headers per frame.
    pub stomp_max_headers: usize,
    /// STOMP: bytes per header line (and per command line).
    pub stomp_max_header_line: usize,
    /// STOMP: subscriptions one connection may hold.
    pub stomp_max_subscriptions: usize,
    /// STOMP: further paths serving raw STOMP over WebSocket, beside `/stomp/websocket`.
    pub stomp_paths: Vec<String>,
    /// STOMP: CONNECT without a token is allowed (seed 000: "no authentication is
    /// required"); what an anonymous client may do is up to `stomp_rules`.
    pub stomp_anonymous: bool,
    /// STOMP: who may SUBSCRIBE and SEND where. Default: anonymous clients subscribe to
    /// `/topic/…`, `/v1/topic/heartbeat` and `/v1/topic/online-employees` and send nothing;
    /// conversations are read by users and employees; developers SEND to `/topic/…`; users
    /// and employees SEND typing events under `/v1/app/`.
    pub stomp_rules: Vec<StompRule>,
    /// STOMP: destinations that are topics (SUBSCRIBE and SEND).
    pub stomp_broker_prefixes: Vec<String>,
    /// STOMP: destinations handled by the server's own services (SEND only).
    pub stomp_app_prefixes: Vec<String>,
    /// STOMP: bytes of MESSAGE bodies one connection may have queued (all its
    /// subscriptions together) before it is a slow subscriber: ERROR, then close 4009.
    pub stomp_max_pending_bytes: usize,
    /// STOMP: MESSAGEs one `client` or `client-individual` subscription may have
    /// unacknowledged; one more is a slow subscriber (ERROR, then close 4009).
    pub stomp_max_unacked: usize,
    /// How long a STOMP SEND or `POST /api/publish` waits for a full live-topic subscriber
    /// to make room before that subscriber is cut (ERROR, 4009); 0 cuts at once.
    pub stomp_publish_wait_ms: u64,
    /// STOMP: a connection silent this long (no frame, no heart-beat EOL, no pong) is
    /// closed (ERROR, 1002), whatever heart-beat it negotiated; the server pings it with a
    /// WebSocket ping after two thirds of this, so a client whose library answers pings
    /// stays connected. A negotiated client heart-beat shortens it to twice its rate.
    pub stomp_idle_timeout_ms: u64,
    /// STOMP: seed 002's built-in services on `/v1` (heart-beat ticks, online employees,
    /// conversation presence, typing).
    pub stomp_services: bool,
    /// STOMP: seconds between ticks on `/v1/topic/heartbeat` (0: none).
    pub stomp_heartbeat_topic_s: u64,
    /// Endpoints (seed 003): a context path under which `/stream` and `/json` are served
    /// too, e.g. "/bimserver" ("" for none).
    pub endpoint_context_path: String,
    /// Endpoints: least milliseconds between two pushes of one progress topic that only
    /// move its percentage (0: no throttle).
    pub endpoint_progress_interval_ms: u64,
    /// Endpoints: progress topics held at once; an update creating one more is refused.
    pub endpoint_max_topics: usize,
    /// Endpoints: a progress topic nobody is registered on is dropped this many seconds
    /// after its last update.
    pub endpoint_topic_ttl_s: u64,
    /// Endpoints: registrations one endpoint may hold.
    pub endpoint_max_registrations: usize,
    /// Endpoints: a `/stream` socket silent this long (no message, no pong) is closed with
    /// 4005; the server pings it after a third of this.
    pub endpoint_idle_timeout_ms: u64,
    /// Endpoints: static tokens accepted on `/stream` and `/json` beside sensorgate tokens.
    pub endpoint_tokens: Vec<EndpointTokenConfig>,
    /// Backends that may `POST /api/publish` with a key of their own.
    /// The STOMP destinations a developer may publish to when its entry sets no
    /// `prefixes` (prefixes ending in `/`, or single destinations).
    pub developer_publish_prefixes: Vec<String>,
    pub publishers: Vec<PublisherConfig>,
    pub developers: Vec<DeveloperConfig>,
    /// Cluster mode: several nodes share one set of streams on NATS JetStream. Absent: the
    /// embedded store (sled under `data_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: the NATS JetStream the nodes share (README, "Cluster").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The NATS servers to connect to (`nats://127.0.0.1:4222`); the client fails over
    /// between them and the servers they announce.
    pub nats_urls: Vec<String>,
    /// This node's name in the cluster (connection ownership, logs, metrics). Default:
    /// generated on first start and kept in `data_dir/node-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Replicas of each developer's JetStream stream (1, 3 or 5; 3 survives one lost server).
    pub stream_replicas: usize,
    /// NATS credentials: user and password, a token, or a `.creds` file (JWT + NKey).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// Time to reach a NATS server at start.
    pub connect_timeout_ms: u64,
    /// Time one JetStream request (a stream lookup, a read, a key-value operation) may take.
    pub request_timeout_ms: u64,
    /// Time a publish waits for its ack before it counts as lost (the stream is then asked
    /// whether it holds it, and it is sent again if not): short, so a lost server costs a
    /// stall of about this plus the stream's leader election. A dropped NATS connection
    /// does not wait for it: the acks on their way went with the connection.
    pub ack_timeout_ms: u64,
    /// How long a stream keeps retrying readings JetStream did not acknowledge (a server
    /// lost, a leader being elected) before it gives up: its producers then get 1011 and
    /// nothing of what was not acknowledged is ever dispatched. Long enough to ride out one
    /// lost server: replacing a lost stream leader and a lost meta leader takes JetStream
    /// 4–9 s each, and a busy host stretches that (CI once needed more than 10 s).
    pub publish_retry_ms: u64,
    /// Publishes one stream may have waiting for their ack; past it the stream's queue
    /// fills and producers are pushed back.
    pub max_acks_pending: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            node_id: None,
            stream_replicas: 3,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
            ack_timeout_ms: 2_000,
            publish_retry_ms: 20_000,
            max_acks_pending: 4096,
        }
    }
}

impl ClusterConfig {
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.nats_urls.is_empty() {
            return invalid("cluster.nats_urls", "name at least one NATS server".into());
        }
        if ![1, 3, 5].contains(&self.stream_replicas) {
            return invalid("cluster.stream_replicas", "must be 1, 3 or 5".into());
        }
        for (key, value) in [
            ("cluster.connect_timeout_ms", self.connect_timeout_ms),
            ("cluster.request_timeout_ms", self.request_timeout_ms),
            ("cluster.ack_timeout_ms", self.ack_timeout_ms),
            ("cluster.publish_retry_ms", self.publish_retry_ms),
            ("cluster.max_acks_pending", self.max_acks_pending as u64),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
        }
        if let Some(id) = self.node_id.as_deref().filter(|id| !nats_safe(id)) {
            return invalid(
                "cluster.node_id",
                format!("{id:?}: use letters, digits, '_' and '-'"),
            );
        }
        // Every node must accept the others' tokens and know the same developers: a
        // secret or a demo developer made up per node would split the cluster.
        if config.token_secret.is_none() {
            return invalid(
                "token_secret",
                "cluster mode needs the same token_secret on every node".into(),
            );
        }
        if config.developers.is_empty() {
            return invalid(
                "developers",
                "cluster mode needs the developers configured (the same on every node)".into(),
            );
        }
        if let Some(d) = config.developers.iter().find(|d| !nats_safe(&d.id)) {
            return invalid(
                "developers",
                format!(
                    "id {:?}: in cluster mode an id names a NATS subject; use letters, digits, '_' and '-'",
                    d.id
                ),
            );
        }
        Ok(())
    }
}

/// Whether `id` can name a NATS subject token and a JetStream stream as it is.
pub fn nats_safe(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            heartbeat_interval_ms: 40_000,
            heartbeat_grace_ms: 5_000,
            identify_timeout_ms: 15_000,
            max_frame_bytes: 65_536,
            durability: Durability::Strict,
            token_ttl_s: 300,
            max_consumers_per_developer: 1,
            consumer_queue_max: 65_536,
            consumer_stall_timeout_ms: 30_000,
            retention_max_age_s: 7 * 24 * 3600,
            retention_max_per_stream: 0,
            max_connections: 16_384,
            max_unauthenticated_connections: 4096,
            allowed_origins: Vec::new(),
            admin_listen: None,
            handshake_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            drain_delay_ms: 0,
            fast_flush_interval_ms: 5,
            commit_thread_nice: -10,
            commit_batch_max: 4096,
            publish_queue_max: 8192,
            replay_chunk: 1024,
            submit_rate_per_s: 0,
            token_secret: None,
            log_json: false,
            worker_threads: 0,
            stomp_heart_beat_ms: 10_000,
            stomp_max_headers: 64,
            stomp_max_header_line: 8192,
            stomp_max_subscriptions: 64,
            stomp_paths: vec!["/api/v1/chat".into()],
            stomp_anonymous: true,
            stomp_rules: StompRule::defaults(),
            stomp_broker_prefixes: vec!["/topic/".into(), "/v1/topic/".into()],
            stomp_app_prefixes: vec!["/v1/app/".into()],
            stomp_max_pending_bytes: 8 << 20,
            stomp_max_unacked: 1024,
            stomp_publish_wait_ms: 1000,
            stomp_idle_timeout_ms: 120_000,
            stomp_services: true,
            stomp_heartbeat_topic_s: 10,
            endpoint_context_path: String::new(),
            endpoint_progress_interval_ms: 200,
            endpoint_max_topics: 100_000,
            endpoint_topic_ttl_s: 3600,
            endpoint_max_registrations: 1024,
            endpoint_idle_timeout_ms: 120_000,
            endpoint_tokens: Vec::new(),
            developer_publish_prefixes: vec!["/topic/".into(), "/v1/topic/".into()],
            publishers: Vec::new(),
            developers: Vec::new(),
            cluster: None,
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers in charge.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub durability: Option<Durability>,
    pub log_json: Option<bool>,
}

/// Environment variables with the `SENSORGATE_` prefix that are not configuration keys.
const ENV_NOT_KEYS: [&str; 2] = ["SENSORGATE_CONFIG", "SENSORGATE_LOG"];

/// The environment variable that sets `key`.
fn env_var(key: &str) -> String {
    format!("SENSORGATE_{}", key.to_ascii_uppercase())
}

/// Every key of the schema, with whether it holds a list or a table (given as TOML in the
/// environment): the default configuration serialized (the optional keys set so that they
/// appear).
fn schema() -> Vec<(String, bool)> {
    let all = Config {
        token_secret: Some(String::new()),
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        cluster: Some(ClusterConfig::default()),
        ..Config::default()
    };
    let table: toml::Table = toml::from_str(&toml::to_string(&all).expect("the schema serializes"))
        .expect("the schema parses back");
    table
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                matches!(v, toml::Value::Array(_) | toml::Value::Table(_)),
            )
        })
        .collect()
}

impl Config {
    /// Builds the effective configuration: defaults, then `file`, then the process
    /// environment, then `flags`; validated. A `SENSORGATE_*` variable that names no key
    /// is an error, not silently ignored.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Self, ConfigError> {
        let keys: Vec<String> = schema().into_iter().map(|(k, _)| env_var(&k)).collect();
        if let Some((var, _)) = std::env::vars().find(|(var, _)| {
            var.starts_with("SENSORGATE_")
                && !keys.contains(var)
                && !ENV_NOT_KEYS.contains(&var.as_str())
        }) {
            return Err(ConfigError::Env {
                var,
                message: "no such setting (see deploy/sensorgate.toml for every key)".into(),
            });
        }
        Self::load_with_env(file, flags, |k| std::env::var(k).ok())
    }

    /// As [`Config::load`] with the environment supplied, so tests need not mutate the
    /// process's own.
    ///
    /// The layering is config-rs's: every value is converted to the type the schema gives
    /// its key, whichever layer it comes from. From the environment, a list is written
    /// comma-separated (`a,b`) or as a TOML array (`["a","b"]`, and so lists of tables such
    /// as `[{id="d", api_key="k"}]`), a table as an inline TOML table
    /// (`SENSORGATE_CLUSTER='{nats_urls=["nats://n1:4222"]}'`). Each variable is checked on
    /// its own first, so an error names the variable, never the file.
    pub fn load_with_env(
        file: Option<&Path>,
        flags: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        use config::{Environment, File, FileFormat};
        let mut scalars = config::Map::new();
        let mut arrays: Vec<(String, String)> = Vec::new();
        for (key, list) in schema() {
            let Some(raw) = env(&env_var(&key)) else {
                continue;
            };
            if !list {
                scalars.insert(key, raw);
            } else if raw.trim_start().starts_with(['[', '{']) {
                arrays.push((key, raw));
            } else {
                let items = raw
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect();
                arrays.push((key, toml::Value::Array(items).to_string()));
            }
        }
        // No `try_parsing`: it would turn a secret of digits into a float. Values stay
        // strings here and config-rs converts each to its field's type.
        let environment = |only: Option<&str>| {
            let source = scalars
                .iter()
                .filter(|(k, _)| only.is_none_or(|o| o == k.as_str()))
                .map(|(k, v)| (env_var(k), v.clone()))
                .collect();
            Environment::with_prefix("SENSORGATE")
                .prefix_separator("_")
                .source(Some(source))
        };
        let array =
            |key: &str, raw: &str| File::from_str(&format!("{key} = {raw}"), FileFormat::Toml);
        // Each variable alone over the defaults: a bad one is named.
        let alone = |key: &str, builder: config::ConfigBuilder<config::builder::DefaultState>| {
            builder
                .build()
                .and_then(|c| c.try_deserialize::<Config>())
                .map(drop)
                .map_err(|e| ConfigError::Env {
                    var: env_var(key),
                    message: one_line(&e.to_string()),
                })
        };
        for key in scalars.keys() {
            alone(
                key,
                config::Config::builder().add_source(environment(Some(key))),
            )?;
        }
        for (key, raw) in &arrays {
            alone(key, config::Config::builder().add_source(array(key, raw)))?;
        }
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if let Err(source) = std::fs::metadata(path) {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        builder = builder.add_source(environment(None));
        for (key, raw) in &arrays {
            builder = builder.add_source(array(key, raw));
        }
        let mut config: Config =
            builder
                .build()
                .and_then(|c| c.try_deserialize())
                .map_err(|e| ConfigError::Parse {
                    path: file.map_or_else(|| PathBuf::from("(none)"), Path::to_owned),
                    message: one_line(&e.to_string()),
                })?;
        if let Some(v) = flags.listen {
            config.listen = v;
        }
        if let Some(v) = &flags.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = flags.durability {
            config.durability = v;
        }
        if let Some(v) = flags.log_json {
            config.log_json = v;
        }
        config.validate()?;
        Ok(config)
    }

    /// Rejects values that would make the server misbehave rather than fail loudly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let positive: [(&'static str, u64); 24] = [
            (
                "max_unauthenticated_connections",
                self.max_unauthenticated_connections as u64,
            ),
            ("endpoint_max_topics", self.endpoint_max_topics as u64),
            ("stomp_idle_timeout_ms", self.stomp_idle_timeout_ms),
            ("endpoint_topic_ttl_s", self.endpoint_topic_ttl_s),
            (
                "endpoint_max_registrations",
                self.endpoint_max_registrations as u64,
            ),
            ("endpoint_idle_timeout_ms", self.endpoint_idle_timeout_ms),
            (
                "stomp_max_pending_bytes",
                self.stomp_max_pending_bytes as u64,
            ),
            ("stomp_max_unacked", self.stomp_max_unacked as u64),
            ("stomp_max_headers", self.stomp_max_headers as u64),
            ("stomp_max_header_line", self.stomp_max_header_line as u64),
            (
                "stomp_max_subscriptions",
                self.stomp_max_subscriptions as u64,
            ),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("identify_timeout_ms", self.identify_timeout_ms),
            ("token_ttl_s", self.token_ttl_s),
            (
                "max_consumers_per_developer",
                self.max_consumers_per_developer as u64,
            ),
            ("consumer_queue_max", self.consumer_queue_max as u64),
            ("consumer_stall_timeout_ms", self.consumer_stall_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("fast_flush_interval_ms", self.fast_flush_interval_ms),
            ("commit_batch_max", self.commit_batch_max as u64),
            ("publish_queue_max", self.publish_queue_max as u64),
            ("replay_chunk", self.replay_chunk as u64),
            ("shutdown_grace_ms", self.shutdown_grace_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0: one per core)"),
            ));
        }
        if !(-20..=19).contains(&self.commit_thread_nice) {
            return Err(invalid(
                "commit_thread_nice",
                "must be a nice value from -20 to 19",
            ));
        }
        let prefixes = [
            (
                "stomp_broker_prefixes",
                self.stomp_broker_prefixes.iter().collect(),
            ),
            (
                "stomp_app_prefixes",
                self.stomp_app_prefixes.iter().collect::<Vec<_>>(),
            ),
        ];
        if self.max_unauthenticated_connections > self.max_connections {
            return Err(invalid(
                "max_unauthenticated_connections",
                "must not be more than max_connections",
            ));
        }
        if let Some(bad) = self
            .stomp_rules
            .iter()
            .find(|r| r.prefix.len() < 2 || !r.prefix.starts_with('/'))
        {
            return Err(invalid(
                "stomp_rules.prefix",
                format!("{:?}: must start with '/' and name something", bad.prefix),
            ));
        }
        if let Some(bad) = self
            .allowed_origins
            .iter()
            .find(|o| !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/'))
        {
            return Err(invalid(
                "allowed_origins",
                format!("{bad:?}: an origin is scheme://host[:port], without a path"),
            ));
        }
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err(invalid("admin_listen", "must differ from listen"));
        }
        for (key, list) in prefixes {
            if let Some(bad) = list
                .iter()
                .find(|p| p.len() < 2 || !p.starts_with('/') || !p.ends_with('/'))
            {
                return Err(invalid(
                    key,
                    format!("{bad:?}: must start and end with '/' and name something"),
                ));
            }
        }
        if let Some(reserved) = self
            .stomp_broker_prefixes
            .iter()
            .chain(&self.stomp_app_prefixes)
            .find(|p| p.starts_with("/bimserver/") || "/bimserver/".starts_with(p.as_str()))
        {
            return Err(invalid(
                "stomp_broker_prefixes",
                format!("{reserved:?} overlaps /bimserver/, reserved for endpoint notifications"),
            ));
        }
        if let Some(both) = self.stomp_app_prefixes.iter().find(|a| {
            self.stomp_broker_prefixes
                .iter()
                .any(|b| a.starts_with(b.as_str()) || b.starts_with(a.as_str()))
        }) {
            return Err(invalid(
                "stomp_app_prefixes",
                format!("{both:?} overlaps a broker prefix"),
            ));
        }
        let builtin = [
            "/connect",
            "/metrics",
            "/healthz",
            "/readyz",
            "/stomp",
            "/stomp/info",
            "/stomp/websocket",
            "/api/publish",
            "/auth/user",
            "/auth/developer",
            "/stream",
            "/json",
        ];
        for path in &self.stomp_paths {
            if !path.starts_with('/')
                || builtin.contains(&path.as_str())
                || self.endpoint_paths().any(|p| p == *path)
            {
                return Err(invalid(
                    "stomp_paths",
                    format!("{path:?}: must start with '/' and not be a built-in route"),
                ));
            }
        }
        let context = &self.endpoint_context_path;
        if !context.is_empty()
            && (!context.starts_with('/')
                || context.ends_with('/')
                || context.contains(['?', '#', ' ']))
        {
            return Err(invalid(
                "endpoint_context_path",
                format!("{context:?}: must be empty or like \"/bimserver\" (a leading '/', no trailing one)"),
            ));
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate(self)?;
        }
        if self.max_frame_bytes < 256 {
            return Err(invalid("max_frame_bytes", "must be at least 256"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if let Some(secret) = &self.token_secret {
            if secret.len() < 32 {
                return Err(invalid("token_secret", "must be at least 32 characters"));
            }
        }
        let keyed = [
            ("developers", &self.developers),
            ("publishers", &self.publishers),
            ("endpoint_tokens", &self.endpoint_tokens),
        ];
        for (key, list) in keyed {
            let mut seen = std::collections::HashSet::new();
            for k in list {
                if k.prefixes.is_some() && key == "endpoint_tokens" {
                    return Err(invalid(
                        key,
                        format!("{:?}: `prefixes` is for developers and publishers", k.id),
                    ));
                }
                match (&k.developer, key) {
                    (Some(_), "developers") => {
                        return Err(invalid(
                            key,
                            format!(
                                "{:?}: `developer` is for publishers and endpoint tokens",
                                k.id
                            ),
                        ))
                    }
                    (Some(d), _)
                        if !self.developers.is_empty()
                            && !self.developers.iter().any(|dev| &dev.id == d) =>
                    {
                        return Err(invalid(
                            key,
                            format!("{:?}: developer {d:?} is not configured", k.id),
                        ))
                    }
                    _ => {}
                }
                if k.id.is_empty() || k.id.len() > 128 || k.id.contains(['/', ':', '\0']) {
                    return Err(invalid(
                        key,
                        format!(
                            "id {:?}: must be 1-128 characters without '/', ':' or NUL",
                            k.id
                        ),
                    ));
                }
                if !seen.insert(k.id.as_str()) {
                    return Err(invalid(key, format!("id {:?} appears twice", k.id)));
                }
                match (&k.api_key, &k.api_key_sha256) {
                    (Some(_), None) => {}
                    (None, Some(hex))
                        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {}
                    (None, Some(_)) => {
                        return Err(invalid(
                            key,
                            format!("{:?}: api_key_sha256 must be 64 hex digits", k.id),
                        ))
                    }
                    _ => {
                        return Err(invalid(
                            key,
                            format!("{:?}: give exactly one of api_key or api_key_sha256", k.id),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// The configuration as TOML with secrets masked, for `sensorgate config` and the start-up log.
    pub fn to_toml_masked(&self) -> String {
        let mut shown = self.clone();
        if shown.token_secret.is_some() {
            shown.token_secret = Some("<set>".into());
        }
        for key in shown
            .developers
            .iter_mut()
            .chain(&mut shown.publishers)
            .chain(&mut shown.endpoint_tokens)
        {
            if key.api_key.is_some() {
                key.api_key = Some("<set>".into());
            }
        }
        if let Some(c) = &mut shown.cluster {
            for secret in [&mut c.password, &mut c.token] {
                if secret.is_some() {
                    *secret = Some("<set>".into());
                }
            }
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The context path's own `/stream` and `/json`, when one is set.
    pub fn endpoint_paths(&self) -> impl Iterator<Item = String> + '_ {
        let context = &self.endpoint_context_path;
        ["/stream", "/json"]
            .into_iter()
            .filter(move |_| !context.is_empty())
            .map(move |p| format!("{context}{p}"))
    }

    /// How long a connection may stay silent before close 4005.
    pub fn heartbeat_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.heartbeat_interval_ms + self.heartbeat_interval_ms / 4 + self.heartbeat_grace_ms,
        )
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(
        toml_text: &str,
        env: &[(&str, &str)],
        flags: Overrides,
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml_text).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(Some(&path), &flags, |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.heartbeat_interval_ms, 40_000);
        assert_eq!(c.identify_timeout_ms, 15_000);
        assert_eq!(c.max_frame_bytes, 65_536);
        assert_eq!(c.durability, Durability::Strict);
        assert_eq!(c.token_ttl_s, 300);
        assert_eq!(c.max_consumers_per_developer, 1);
        assert_eq!(c.heartbeat_deadline().as_millis(), 55_000);
        c.validate().unwrap();
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let text = "listen = \"127.0.0.1:1000\"\ndata_dir = \"/file\"\ntoken_ttl_s = 7\n";
        let c = load(
            text,
            &[
                ("SENSORGATE_DATA_DIR", "/env"),
                ("SENSORGATE_LISTEN", "127.0.0.1:2000"),
            ],
            Overrides {
                listen: Some("127.0.0.1:3000".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 3000);
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        assert_eq!(c.token_ttl_s, 7);
    }

    #[test]
    fn env_numbers_are_typed() {
        let c = load(
            "",
            &[
                ("SENSORGATE_MAX_FRAME_BYTES", "1024"),
                ("SENSORGATE_DURABILITY", "fast"),
            ],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.max_frame_bytes, 1024);
        assert_eq!(c.durability, Durability::Fast);
        let err = load(
            "",
            &[("SENSORGATE_MAX_FRAME_BYTES", "lots")],
            Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_frame_bytes"), "{err}");
    }

    /// Every key is settable from the environment with its schema's type: counts, flags,
    /// strings that look like numbers, lists (comma-separated or a TOML array) and lists
    /// of tables. An error names the variable, not the file given with `--config`.
    #[test]
    fn every_key_takes_its_type_from_the_environment() {
        let c = load(
            "stomp_max_headers = 10",
            &[
                ("SENSORGATE_STOMP_MAX_HEADERS", "32"),
                ("SENSORGATE_STOMP_ANONYMOUS", "false"),
                ("SENSORGATE_STOMP_MAX_HEADER_LINE", "4096"),
                ("SENSORGATE_STOMP_MAX_SUBSCRIPTIONS", "8"),
                ("SENSORGATE_STOMP_MAX_UNACKED", "16"),
                ("SENSORGATE_ENDPOINT_MAX_TOPICS", "100"),
                ("SENSORGATE_ENDPOINT_MAX_REGISTRATIONS", "7"),
                ("SENSORGATE_STOMP_SERVICES", "false"),
                (
                    "SENSORGATE_TOKEN_SECRET",
                    "12345678901234567890123456789012",
                ),
                ("SENSORGATE_STOMP_PATHS", "/ws,/chat"),
                (
                    "SENSORGATE_STOMP_BROKER_PREFIXES",
                    r#"["/topic/", "/exchange/"]"#,
                ),
                ("SENSORGATE_STOMP_APP_PREFIXES", "/app/"),
                (
                    "SENSORGATE_PUBLISHERS",
                    r#"[{ id = "backend", api_key = "backend-key" }]"#,
                ),
            ],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.stomp_max_headers, 32, "the environment beats the file");
        assert!(!c.stomp_anonymous);
        assert_eq!(
            (
                c.stomp_max_header_line,
                c.stomp_max_subscriptions,
                c.stomp_max_unacked
            ),
            (4096, 8, 16)
        );
        assert_eq!(
            (c.endpoint_max_topics, c.endpoint_max_registrations),
            (100, 7)
        );
        assert!(!c.stomp_services);
        assert_eq!(
            c.token_secret.as_deref(),
            Some("12345678901234567890123456789012")
        );
        assert_eq!(c.stomp_paths, vec!["/ws", "/chat"]);
        assert_eq!(c.stomp_broker_prefixes, vec!["/topic/", "/exchange/"]);
        assert_eq!(c.stomp_app_prefixes, vec!["/app/"]);
        assert_eq!(c.publishers[0].id, "backend");

        for (var, raw) in [
            ("SENSORGATE_STOMP_ANONYMOUS", "perhaps"),
            ("SENSORGATE_STOMP_MAX_HEADERS", "-3"),
            ("SENSORGATE_LISTEN", "nowhere"),
            (
                "SENSORGATE_DEVELOPERS",
                r#"[{ id = "d", api_key = "k", extra = 1 }]"#,
            ),
        ] {
            let err =
                load("durability = \"fast\"", &[(var, raw)], Overrides::default()).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Env { var: v, .. } if v == var),
                "{var}: {err}"
            );
        }
    }

    #[test]
    fn a_nice_value_outside_minus_20_to_19_is_refused_by_name() {
        for bad in ["-21", "20"] {
            let err = load(
                &format!("commit_thread_nice = {bad}"),
                &[],
                Overrides::default(),
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("commit_thread_nice"),
                "{bad}: {err}"
            );
        }
        let c = load("commit_thread_nice = 5", &[], Overrides::default()).unwrap();
        assert_eq!(c.commit_thread_nice, 5);
        assert_eq!(Config::default().commit_thread_nice, -10);
    }

    #[test]
    fn errors_name_the_key() {
        let err = load("heartbeat_interval_ms = 0", &[], Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval_ms"), "{err}");
        let err = load("no_such_key = 1", &[], Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
        let err = load("durability = \"sometimes\"", &[], Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("durability") || err.to_string().contains("sometimes"),
            "{err}"
        );
        let err = load("[[developers]]\nid = \"a\"\n", &[], Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("developers"), "{err}");
        for (text, key) in [
            ("stomp_app_prefixes = [\"/topic/app/\"]", "stomp_app_prefixes"),
            ("stomp_broker_prefixes = [\"topic\"]", "stomp_broker_prefixes"),
            ("stomp_max_unacked = 0", "stomp_max_unacked"),
            (
                "[[publishers]]\nid = \"p\"\napi_key = \"k\"\n[[publishers]]\nid = \"p\"\napi_key = \"j\"",
                "publishers",
            ),
            ("endpoint_context_path = \"bimserver\"", "endpoint_context_path"),
            ("endpoint_context_path = \"/bimserver/\"", "endpoint_context_path"),
            ("endpoint_context_path = \"/a b\"", "endpoint_context_path"),
            ("stomp_paths = [\"/stream\"]", "stomp_paths"),
            (
                "endpoint_context_path = \"/b\"\nstomp_paths = [\"/b/json\"]",
                "stomp_paths",
            ),
            ("endpoint_max_topics = 0", "endpoint_max_topics"),
            ("stomp_broker_prefixes = [\"/bimserver/x/\"]", "stomp_broker_prefixes"),
            ("[[endpoint_tokens]]\nid = \"t\"\n", "endpoint_tokens"),
            (
                "[[developers]]\nid = \"a\"\napi_key = \"k\"\n[[publishers]]\nid = \"p\"\napi_key = \"j\"\ndeveloper = \"b\"",
                "publishers",
            ),
            (
                "[[developers]]\nid = \"a\"\napi_key = \"k\"\ndeveloper = \"a\"",
                "developers",
            ),
        ] {
            let err = load(text, &[], Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn developers_accept_a_hashed_key() {
        let text = format!(
            "[[developers]]\nid = \"acme\"\napi_key_sha256 = \"{}\"\n",
            "ab".repeat(32)
        );
        let c = load(&text, &[], Overrides::default()).unwrap();
        assert_eq!(c.developers[0].id, "acme");
        let shown = c.to_toml_masked();
        assert!(shown.contains("acme"));
    }

    #[test]
    fn the_example_config_lists_every_key_with_its_default() {
        let example = include_str!("../deploy/sensorgate.toml");
        let uncommented: String = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            })
            .filter(|l| {
                !l.starts_with("id ")
                    && !l.starts_with("api_key")
                    && !l.starts_with("token_secret")
                    && !l.starts_with("admin_listen")
                    && !l.starts_with("developer ")
                    && !l.starts_with("prefixes ")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed: Config = toml::from_str(&uncommented).expect("the example parses");
        assert_eq!(
            toml::to_string(&parsed).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
        let table: toml::Table =
            toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
        for key in table.keys().filter(|k| *k != "developers") {
            assert!(
                example.contains(&format!("# {key} = ")),
                "deploy/sensorgate.toml lacks {key}"
            );
        }
        // The [cluster] keys, indented under their table, with their defaults too.
        let cluster: String = example
            .split("# [cluster]\n")
            .nth(1)
            .expect("the example has a [cluster] section")
            .lines()
            .filter_map(|l| l.strip_prefix("#   "))
            .filter(|l| {
                !["node_id", "user", "password", "token ", "creds_file"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| format!("{}\n", l.split(" #").next().unwrap_or(l)))
            .collect();
        let parsed: ClusterConfig = toml::from_str(&cluster).expect("the [cluster] example parses");
        assert_eq!(parsed, ClusterConfig::default());
        for key in ["node_id", "user", "password", "token", "creds_file"] {
            assert!(example.contains(&format!("#   {key} = ")), "{key}");
        }
        for key in [
            "token_secret",
            "developers",
            "api_key_sha256",
            "admin_listen",
        ] {
            assert!(example.contains(key), "{key}");
        }
    }

    #[test]
    fn masked_output_hides_secrets_and_parses_back() {
        let mut c = Config {
            token_secret: Some("x".repeat(40)),
            ..Config::default()
        };
        c.developers.push(DeveloperConfig {
            id: "d".into(),
            api_key: Some("hunter2".into()),
            api_key_sha256: None,
            developer: None,
            prefixes: None,
        });
        let shown = c.to_toml_masked();
        assert!(
            !shown.contains("hunter2") && !shown.contains(&"x".repeat(40)),
            "{shown}"
        );
        let back: Config = toml::from_str(&shown).unwrap();
        assert_eq!(back.developers[0].id, "d");
    }
}
