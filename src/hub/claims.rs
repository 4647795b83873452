//! Cluster-wide rules on JetStream key-value buckets (cluster mode): a token is redeemed once
//! in the whole cluster, the newer connection of a user wins across nodes, and
//! `max_consumers_per_developer` counts consumers on every node.
//!
//! Owns two buckets. `sg_tokens`: one key per redeemed token id, created only if absent,
//! kept as long as a token can live (the bucket's `max_age` is `token_ttl_s` and a minute).
//! `sg_claims`: one key per identified connection, `<group>.<node>.<conn>`, where the group
//! is `u.<developer>.<user>` (limit 1) or `c.<developer>` (limit `max_consumers`). Every node
//! watches the claims bucket and keeps each group's members in claim order (a key's first
//! revision: JetStream orders them the same for everyone); when a group holds more than its
//! limit, the node holding one of the oldest beyond it kicks that connection (4002), so
//! exactly the newest stay, whichever nodes they are on. A node refreshes its claims while
//! they live and deletes them when their connection ends; the bucket forgets a key an hour
//! after its last write, so a crashed node's claims go away by themselves (meanwhile they
//! are the oldest in their groups and never push a live connection out).
//!
//! Must not know about protocols: connections hand in their [`Kick`] and get it pulled.

use async_nats::jetstream::kv;
use base64::Engine;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::types::{Kick, KickReason};
use crate::log::jetstream::JetStream;
use crate::log::LogError;
use crate::metrics::kv_operation;

/// How long the claims bucket keeps a key after its last write.
const CLAIM_TTL: Duration = Duration::from_secs(3600);
/// How long a starting node tries to open its buckets before it gives up (exit 1).
const STARTUP_RETRY: Duration = Duration::from_secs(60);
/// How often a node writes its live claims again.
const REFRESH_EVERY: Duration = Duration::from_secs(600);

/// Why a cluster-wide rule refused.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("token already redeemed (on some node)")]
    Redeemed,
    #[error("cluster key-value store: {0}")]
    Store(#[from] LogError),
}

pub struct Claims {
    tokens: kv::Store,
    claims: kv::Store,
    node: String,
    /// This node's claims: key → the connection's off switch and the claim's order.
    local: DashMap<String, (Arc<Kick>, u64)>,
    max_consumers: usize,
}

fn kv_err(e: impl std::error::Error + Send + Sync + 'static) -> LogError {
    LogError::JetStream(Box::new(e))
}

impl Claims {
    /// Opens (or creates) the buckets and starts watching the claims.
    pub async fn open(
        js: &JetStream,
        node: &str,
        replicas: usize,
        token_ttl_s: u64,
        max_consumers: usize,
    ) -> Result<Arc<Self>, LogError> {
        let ctx = js.context();
        let bucket = |name: &str, max_age: Duration| kv::Config {
            bucket: name.into(),
            history: 1,
            max_age,
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let open = |config: kv::Config| {
            at_startup(format!("the {} bucket", config.bucket), move || {
                ctx.create_or_update_key_value(config.clone())
            })
        };
        let tokens = open(bucket("sg_tokens", Duration::from_secs(token_ttl_s + 60))).await?;
        let claims = open(bucket("sg_claims", CLAIM_TTL)).await?;
        let this = Arc::new(Self {
            tokens,
            claims,
            node: node.to_owned(),
            local: DashMap::new(),
            max_consumers: max_consumers.max(1),
        });
        let watch = at_startup("the claims watcher".into(), || {
            this.claims.watch_with_history(">")
        })
        .await?;
        tokio::spawn(watch_claims(Arc::downgrade(&this), watch));
        tokio::spawn(refresher(Arc::downgrade(&this)));
        Ok(this)
    }

    /// Burns a token id cluster-wide: refused if any node redeemed it before.
    pub async fn redeem(&self, jti: &str) -> Result<(), ClaimError> {
        let created = retrying(
            || self.tokens.create(jti, Bytes::new()),
            |e| e.kind() != kv::CreateErrorKind::AlreadyExists,
        )
        .await;
        match created {
            Ok(_) => {
                kv_operation("redeem", "ok");
                Ok(())
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                kv_operation("redeem", "refused");
                Err(ClaimError::Redeemed)
            }
            Err(e) => {
                kv_operation("redeem", "error");
                Err(ClaimError::Store(kv_err(e)))
            }
        }
    }

    /// Registers a producer connection of `user`; an older one on any node is kicked.
    pub async fn claim_user(
        &self,
        developer: &str,
        user: &str,
        conn: u64,
        kick: &Arc<Kick>,
    ) -> Result<(), ClaimError> {
        self.claim(user_group(developer, user), conn, kick).await
    }

    /// Registers a consumer connection; the oldest beyond the limit, on any node, is kicked.
    pub async fn claim_consumer(
        &self,
        developer: &str,
        conn: u64,
        kick: &Arc<Kick>,
    ) -> Result<(), ClaimError> {
        self.claim(format!("c.{developer}"), conn, kick).await
    }

    pub fn release_user(&self, developer: &str, user: &str, conn: u64) {
        self.release(user_group(developer, user), conn);
    }

    pub fn release_consumer(&self, developer: &str, conn: u64) {
        self.release(format!("c.{developer}"), conn);
    }

    async fn claim(&self, group: String, conn: u64, kick: &Arc<Kick>) -> Result<(), ClaimError> {
        let key = format!("{group}.{}.{conn}", self.node);
        // In the map before the write: the watch may report the write before `put` returns.
        self.local.insert(key.clone(), (kick.clone(), 0));
        match retrying(|| self.claims.put(&key, Bytes::new()), |_| true).await {
            Ok(revision) => {
                kv_operation("claim", "ok");
                if let Some(mut e) = self.local.get_mut(&key) {
                    e.1 = revision;
                }
                Ok(())
            }
            Err(e) => {
                kv_operation("claim", "error");
                self.local.remove(&key);
                Err(ClaimError::Store(kv_err(e)))
            }
        }
    }

    fn release(&self, group: String, conn: u64) {
        let key = format!("{group}.{}.{conn}", self.node);
        if self.local.remove(&key).is_none() {
            return;
        }
        let claims = self.claims.clone();
        tokio::spawn(async move {
            let result = claims.delete(&key).await;
            kv_operation("release", if result.is_ok() { "ok" } else { "error" });
        });
    }

    /// The group a key belongs to and the limit on it.
    fn group_of<'k>(&self, key: &'k str) -> Option<(&'k str, usize)> {
        // `<group>.<node>.<conn>`: the group is everything before the last two tokens.
        let mut dots = key.rmatch_indices('.').map(|(i, _)| i);
        let (_, cut) = (dots.next()?, dots.next()?);
        let group = &key[..cut];
        let limit = if group.starts_with("u.") {
            1
        } else {
            self.max_consumers
        };
        Some((group, limit))
    }
}

/// Runs `op` until it succeeds or [`STARTUP_RETRY`] passed: a cluster that has just started
/// (or is busy) may not place a bucket or a watcher's consumer yet, and a node that gave up
/// at once would not start at all.
async fn at_startup<T, E, F>(what: String, mut op: impl FnMut() -> F) -> Result<T, LogError>
where
    E: std::error::Error + Send + Sync + 'static,
    F: std::future::Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(done) => return Ok(done),
            Err(e) if started.elapsed() < STARTUP_RETRY => {
                tracing::warn!(error = %e, "cannot open {what} yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(kv_err(e)),
        }
    }
}

/// How long an operation is retried while JetStream cannot answer it (a server lost, the
/// bucket's leader being elected: a few seconds on three servers).
const RETRY_FOR: Duration = Duration::from_secs(8);

/// Runs `op` until it succeeds, fails for good (`transient` false), or [`RETRY_FOR`] passed.
async fn retrying<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    mut op: impl FnMut() -> F,
    transient: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Err(e) if transient(&e) && started.elapsed() < RETRY_FOR => {
                tracing::debug!(error = %e, "key-value operation failed; retrying");
                kv_operation("retry", "error");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(800));
            }
            done => return done,
        }
    }
}

/// `u.<developer>.<user>`, the user id in URL-safe base64 (a key allows few characters).
fn user_group(developer: &str, user: &str) -> String {
    let user = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user);
    format!("u.{developer}.{user}")
}

/// Follows the claims bucket for as long as the node runs: a watch that fails (a server
/// lost) is started again from the bucket's current state.
async fn watch_claims(claims: std::sync::Weak<Claims>, mut watch: kv::Watch) {
    loop {
        watcher(&claims, watch).await;
        loop {
            let Some(this) = claims.upgrade() else { return };
            tokio::time::sleep(Duration::from_millis(200)).await;
            match this.claims.watch_with_history(">").await {
                Ok(w) => {
                    watch = w;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch cluster claims; retrying");
                    kv_operation("watch", "error");
                }
            }
        }
    }
}

/// Keeps each group's members in claim order; kicks this node's members that fell beyond
/// their group's limit. Returns when the watch fails or ends.
async fn watcher(claims: &std::sync::Weak<Claims>, mut watch: kv::Watch) {
    let mut groups: HashMap<String, BTreeSet<(u64, String)>> = HashMap::new();
    let mut order: HashMap<String, u64> = HashMap::new();
    while let Some(entry) = watch.next().await {
        let Some(this) = claims.upgrade() else { return };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "watching cluster claims failed; watching again");
                kv_operation("watch", "error");
                return;
            }
        };
        let Some((group, limit)) = this.group_of(&entry.key) else {
            continue;
        };
        let group = group.to_owned();
        let members = groups.entry(group.clone()).or_default();
        match entry.operation {
            kv::Operation::Put => {
                // A refresh carries the claim's first revision; a new claim is its own.
                let first = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(entry.revision);
                if let Some(old) = order.insert(entry.key.clone(), first) {
                    members.remove(&(old, entry.key.clone()));
                }
                members.insert((first, entry.key.clone()));
                let beyond = members.len().saturating_sub(limit);
                for (_, key) in members.iter().take(beyond) {
                    if let Some((_, (kick, _))) = this.local.remove(key) {
                        tracing::debug!(key = %key, "a newer connection elsewhere takes over");
                        kick.kick(KickReason::Duplicate);
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(old) = order.remove(&entry.key) {
                    members.remove(&(old, entry.key.clone()));
                }
                if members.is_empty() {
                    groups.remove(&group);
                }
            }
        }
    }
}

/// Writes this node's live claims again before the bucket forgets them, keeping their order.
async fn refresher(claims: std::sync::Weak<Claims>) {
    let mut every = tokio::time::interval(REFRESH_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(this) = claims.upgrade() else { return };
        let live: Vec<(String, u64)> = this
            .local
            .iter()
            .map(|e| (e.key().clone(), e.value().1))
            .collect();
        for (key, first) in live {
            let result = this.claims.put(&key, first.to_string().into()).await;
            kv_operation("refresh", if result.is_ok() { "ok" } else { "error" });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_become_key_safe() {
        let g = user_group("acme", "a.b c/ü*>");
        assert!(g
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        assert_eq!(g.matches('.').count(), 2);
    }
}
