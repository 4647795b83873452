//! The hub: developer streams and their subscribers; ordering, fan-out, the slow-consumer
//! policy and the duplicate-connection rule.
//!
//! Owns the map from stream id to its owner task ([`stream`]), the live topics with no log
//! behind them ([`topics`]), seed 002's services on them ([`chat`]), seed 003's endpoint
//! registry and progress topics ([`endpoints`]), the session registry ([`sessions`]) and
//! retention. Talks to the log through its traits only and never imports `conn` or a
//! front-end: what goes in and out are the value types in [`types`].
//!
//! Full-queue policies: a producer waits for room in its stream's queue
//! (`publish_queue_max`), which pushes back through TCP; a stream consumer whose outbox
//! would pass `consumer_queue_max` frames or `CONSUMER_QUEUE_MAX_BYTES` is marked lagging
//! and catches up from the log (its connection closes it only when it stops reading for
//! `consumer_stall_timeout_ms`, or falls behind retention); a live-topic subscriber whose
//! inbox is full is kicked with [`KickReason::TooSlow`] (close 4009) and the rest carry on.

pub mod chat;
pub mod claims;
pub mod cluster;
pub mod endpoints;
mod sessions;
mod stream;
mod topics;
mod types;

pub use sessions::Sessions;
pub use stream::{StreamHandle, Subscriber, TryPublishError};
pub use topics::{Delivery as TopicDelivery, Held, Inbox, TopicMessage, Topics, JSON_UTF8};
pub use types::{Batch, Kick, KickReason, Outbox, Publish, SeqTemplate};

use dashmap::DashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Durability};
use crate::log::{LogError, Store};

/// Bytes a stream consumer's outbox may hold, beside the frame bound; past either it
/// catches up from the log, so this is what a lagging consumer costs at most.
pub const CONSUMER_QUEUE_MAX_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the hub is shutting down")]
    Closed,
    #[error("the stream's store failed recently; try again")]
    StoreFailed,
    #[error(transparent)]
    Store(#[from] LogError),
}

/// The numbers the hub runs by, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub durability: Durability,
    pub publish_queue_max: usize,
    pub commit_batch_max: usize,
    pub consumer_queue_max: usize,
    pub max_consumers_per_developer: usize,
    pub retention_max_age_s: u64,
    pub retention_max_per_stream: u64,
    /// Seed 002's services on `/v1` ([`chat`]).
    pub chat: bool,
    pub chat_heartbeat: Duration,
    pub endpoints: endpoints::EndpointLimits,
}

impl From<&Config> for HubConfig {
    fn from(c: &Config) -> Self {
        Self {
            durability: c.durability,
            publish_queue_max: c.publish_queue_max,
            commit_batch_max: c.commit_batch_max,
            consumer_queue_max: c.consumer_queue_max,
            max_consumers_per_developer: c.max_consumers_per_developer,
            retention_max_age_s: c.retention_max_age_s,
            retention_max_per_stream: c.retention_max_per_stream,
            chat: c.stomp_services,
            chat_heartbeat: Duration::from_secs(c.stomp_heartbeat_topic_s),
            endpoints: endpoints::EndpointLimits {
                progress_interval_ms: c.endpoint_progress_interval_ms,
                max_topics: c.endpoint_max_topics,
                topic_ttl_ms: c.endpoint_topic_ttl_s.saturating_mul(1000),
                max_registrations: c.endpoint_max_registrations,
            },
        }
    }
}

/// Shared by every connection; clone freely.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// Where the streams live.
enum Backend {
    /// The embedded store: this node assigns seqs.
    Embedded(Arc<dyn Store>),
    /// JetStream, shared by every node of the cluster.
    Cluster(Arc<cluster::Cluster>),
}

struct Inner {
    backend: Backend,
    streams: DashMap<Arc<str>, StreamHandle>,
    sessions: Sessions,
    topics: Topics,
    chat: chat::ChatState,
    endpoints: endpoints::Endpoints,
    config: HubConfig,
    owners: TaskTracker,
}

impl Hub {
    /// A hub on the embedded store.
    pub fn new(store: Arc<dyn Store>, config: HubConfig) -> Self {
        Self::with(Backend::Embedded(store), config)
    }

    /// A hub whose streams live on JetStream (cluster mode).
    pub fn cluster(cluster: Arc<cluster::Cluster>, config: HubConfig) -> Self {
        Self::with(Backend::Cluster(cluster), config)
    }

    fn with(backend: Backend, config: HubConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                streams: DashMap::new(),
                sessions: Sessions::new(config.max_consumers_per_developer),
                topics: Topics::new(),
                chat: chat::ChatState::new(config.chat_heartbeat),
                endpoints: endpoints::Endpoints::new(config.endpoints.clone()),
                config,
                owners: TaskTracker::new(),
            }),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// Live topics (no log) for the STOMP and endpoint front-ends.
    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    /// Seed 002's services, when configured.
    pub fn chat(&self) -> Option<chat::Chat<'_>> {
        self.inner.config.chat.then_some(chat::Chat {
            state: &self.inner.chat,
            topics: &self.inner.topics,
        })
    }

    /// Seed 003's endpoint registry and progress topics.
    pub fn endpoints(&self) -> &endpoints::Endpoints {
        &self.inner.endpoints
    }

    /// False while the store cannot write (disk full, I/O error; in cluster mode, no NATS
    /// connection): `/readyz` answers 503.
    pub fn store_writable(&self) -> bool {
        match &self.inner.backend {
            Backend::Embedded(store) => store.writable(),
            Backend::Cluster(c) => c.js.connected(),
        }
    }

    /// Cluster mode: burns a token id cluster-wide (the node's own set already holds it).
    /// Embedded mode: nothing more to do.
    pub async fn redeem_everywhere(&self, token_id: &str) -> Result<(), claims::ClaimError> {
        match &self.inner.backend {
            Backend::Embedded(_) => Ok(()),
            Backend::Cluster(c) => c.claims.redeem(token_id).await,
        }
    }

    /// The duplicate-connection rule for a producer: an older connection of the same user
    /// is kicked (4002), on this node at once, on another node (cluster mode) within a
    /// second.
    pub async fn claim_user(
        &self,
        developer: &Arc<str>,
        user: &Arc<str>,
        conn: u64,
        kick: &Arc<Kick>,
    ) -> Result<(), claims::ClaimError> {
        self.inner.sessions.claim_user(developer, user, conn, kick);
        let Backend::Cluster(c) = &self.inner.backend else {
            return Ok(());
        };
        let claimed = c.claims.claim_user(developer, user, conn, kick).await;
        if claimed.is_err() {
            self.inner.sessions.release_user(developer, user, conn);
        }
        claimed
    }

    pub fn release_user(&self, developer: &Arc<str>, user: &Arc<str>, conn: u64) {
        self.inner.sessions.release_user(developer, user, conn);
        if let Backend::Cluster(c) = &self.inner.backend {
            c.claims.release_user(developer, user, conn);
        }
    }

    /// The consumer limit: the oldest consumer beyond `max_consumers_per_developer` is
    /// kicked (4002), counted across every node in cluster mode.
    pub async fn claim_consumer(
        &self,
        developer: &Arc<str>,
        conn: u64,
        kick: &Arc<Kick>,
    ) -> Result<(), claims::ClaimError> {
        self.inner.sessions.claim_developer(developer, conn, kick);
        let Backend::Cluster(c) = &self.inner.backend else {
            return Ok(());
        };
        let claimed = c.claims.claim_consumer(developer, conn, kick).await;
        if claimed.is_err() {
            self.inner.sessions.release_developer(developer, conn);
        }
        claimed
    }

    pub fn release_consumer(&self, developer: &Arc<str>, conn: u64) {
        self.inner.sessions.release_developer(developer, conn);
        if let Backend::Cluster(c) = &self.inner.backend {
            c.claims.release_consumer(developer, conn);
        }
    }

    /// The cluster, in cluster mode.
    pub fn cluster_link(&self) -> Option<&Arc<cluster::Cluster>> {
        match &self.inner.backend {
            Backend::Embedded(_) => None,
            Backend::Cluster(c) => Some(c),
        }
    }

    /// A new outbox bound for one consumer.
    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox_bytes(CONSUMER_QUEUE_MAX_BYTES)
    }

    /// [`Hub::outbox`] with its own byte bound.
    pub fn outbox_bytes(&self, max_bytes: usize) -> Arc<Outbox> {
        Outbox::new(self.inner.config.consumer_queue_max, max_bytes)
    }

    /// The stream of a developer, started (and recovered from the log) on first use.
    pub fn stream(&self, id: &str) -> Result<StreamHandle, HubError> {
        if let Some(handle) = self.inner.streams.get(id) {
            return Ok(handle.clone());
        }
        if self.inner.owners.is_closed() {
            return Err(HubError::Closed);
        }
        let key: Arc<str> = Arc::from(id);
        let handle = match self.inner.streams.entry(key.clone()) {
            dashmap::Entry::Occupied(e) => e.get().clone(),
            dashmap::Entry::Vacant(v) => {
                let (tx, rx) = mpsc::channel(self.inner.config.publish_queue_max);
                let batch_max = self.inner.config.commit_batch_max;
                let shared = match &self.inner.backend {
                    Backend::Embedded(store) => {
                        let log = store.open_stream(id)?;
                        let recovered = log.recover()?;
                        let shared = Arc::new(stream::Shared {
                            id: key,
                            source: stream::Source::Local(log.clone()),
                            durable: AtomicU64::new(recovered.next_seq - 1),
                            failed_until_ms: AtomicU64::new(0),
                        });
                        let owner = stream::Owner {
                            rx,
                            shared: shared.clone(),
                            log,
                            store: store.clone(),
                            durability: self.inner.config.durability,
                            batch_max,
                            next: recovered.next_seq,
                        };
                        tracing::debug!(
                            stream = id,
                            next_seq = recovered.next_seq,
                            "stream opened"
                        );
                        self.inner.owners.spawn(owner.run());
                        shared
                    }
                    Backend::Cluster(cluster) => {
                        let shared = Arc::new(stream::Shared {
                            id: key,
                            source: stream::Source::Cluster {
                                stream: std::sync::OnceLock::new(),
                                first: AtomicU64::new(0),
                            },
                            durable: AtomicU64::new(0),
                            failed_until_ms: AtomicU64::new(0),
                        });
                        let owner = cluster::ClusterOwner {
                            rx,
                            shared: shared.clone(),
                            cluster: cluster.clone(),
                            batch_max,
                            last_acked: 0,
                        };
                        self.inner.owners.spawn(owner.run());
                        shared
                    }
                };
                crate::metrics::handles().streams.increment(1.0);
                v.insert(StreamHandle { tx, shared }).clone()
            }
        };
        Ok(handle)
    }

    /// One retention pass over every stored stream; runs blocking store work, so call it
    /// from a blocking thread. Returns the readings removed.
    pub fn retain(&self, now_ms: u64) -> Result<u64, HubError> {
        let c = &self.inner.config;
        if c.retention_max_age_s == 0 && c.retention_max_per_stream == 0 {
            return Ok(0);
        }
        let older_than = if c.retention_max_age_s == 0 {
            0
        } else {
            now_ms.saturating_sub(c.retention_max_age_s * 1000)
        };
        // JetStream applies the same limits itself (max_age, max_msgs).
        let Backend::Embedded(store) = &self.inner.backend else {
            return Ok(0);
        };
        let mut removed = 0;
        for name in store.stream_names() {
            let log = store.open_stream(&name)?;
            removed += log.trim(c.retention_max_per_stream, older_than)?;
        }
        if removed > 0 {
            crate::metrics::handles()
                .retention_removed
                .increment(removed);
        }
        Ok(removed)
    }

    /// Stops every stream owner after it finishes its last commit, then closes the store.
    /// Call once connections are gone.
    pub async fn close(&self) -> Result<(), HubError> {
        self.inner.owners.close();
        self.inner.streams.clear();
        self.inner.owners.wait().await;
        match &self.inner.backend {
            Backend::Embedded(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.close())
                    .await
                    .map_err(|_| HubError::Closed)??;
            }
            Backend::Cluster(c) => c.js.close().await,
        }
        Ok(())
    }
}

pub use stream::now_ms;
