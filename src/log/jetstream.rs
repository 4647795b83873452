//! The cluster's log: one JetStream stream per developer on a shared NATS cluster.
//!
//! Owns the NATS connection, the streams' names and configuration, the stored message format
//! and reads of a seq range. The JetStream stream sequence is the reading's seq, so every
//! node agrees on it; a message is in the stream only once JetStream acknowledged it (stored
//! on a quorum of `stream_replicas`), which is the cluster's durable mark.
//!
//! A stored message is a DISPATCH frame with a hole for its seq, which only JetStream knows
//! when the message is stored: four bytes (big-endian) giving where the digits go, eight
//! bytes of the publishing node's id for the reading, then the frame without the digits.
//! [`frame_at`] fills the hole from the stream sequence.
//!
//! **A retry stores nothing twice, without JetStream's de-duplication.** `Nats-Msg-Id` would
//! do it, but it more than doubled the servers' CPU per reading here (BENCHMARKS.md,
//! "Cluster"). Instead each node publishes on a subject of its own, `sg.s.<developer>.<node>`
//! (the stream takes `sg.s.<developer>.*`), with no header at all. A publish whose ack is lost
//! may or may not have been stored, so before sending anything again the node flushes its
//! connection and asks the stream's leader which of its readings it holds past the last one
//! acknowledged ([`JsStream::stored_since`]: one request per reading found, on its own
//! subject only), drops those, and sends the rest one at a time, each expecting the newest
//! seq on its subject to be the one it last saw (`Nats-Expected-Last-Subject-Sequence`): a
//! publish still on its way from before the failure that lands first makes the retry fail
//! instead of storing the reading twice, and the node reads back again. That costs requests
//! during a failure instead of a map update on every replica for every reading.
//!
//! Must not know about subscribers or connections: the hub's cluster owner
//! (`hub::cluster`) decides what to publish and whom to dispatch to.

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{header, HeaderMap, HeaderValue, StatusCode, Subject};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use std::time::Duration;
use tokio::sync::watch;

use super::{Entry, LogError, ReadLimit};
use crate::config::ClusterConfig;

/// The subjects of a developer's stream: one per publishing node.
pub fn subjects(developer: &str) -> String {
    format!("sg.s.{developer}.*")
}

/// The subject a node publishes a developer's readings on.
pub fn node_subject(developer: &str, node_id: &str) -> String {
    format!("sg.s.{developer}.{node_id}")
}

/// The JetStream stream holding a developer's readings.
pub fn stream_name(developer: &str) -> String {
    format!("SG_{developer}")
}

/// A per-subject limit no stream reaches (a node would have to publish 2^63 readings), set
/// for what it makes nats-server do: a stream with a per-subject limit and no `max_bytes` or
/// `max_msgs` is stored in 4 MiB blocks, as a key-value bucket is (`server/stream.go`,
/// `autoTuneFileStorageBlockSize`), instead of 8 MiB. A server grows the block it writes
/// through buffers of 1, 4 and 8 MiB, copying it at each step; the step to 8 MiB came on all
/// three replicas at once and was a run's largest stall (BENCHMARKS.md, "Developer streams in
/// 4 MiB blocks"). A 4 MiB block never takes it, and holds half the cache while written.
/// With `retention_max_per_stream` at 32 or more the server sizes blocks from that count
/// (8 MiB), and a stream made before keeps its blocks: the hint then changes nothing.
/// `tests/cluster.rs` checks the blocks on disk, so a server that sizes them otherwise fails
/// the tests instead of going unnoticed.
const BLOCK_SIZE_HINT: i64 = i64::MAX;

/// How long one request of a read-back may take before the read-back starts over.
const READ_BACK_STEP: Duration = Duration::from_millis(1000);

/// Most digits a u64 has in decimal.
const DIGITS: usize = 20;

/// Bytes before the frame in a stored message: where the seq goes, the reading's id.
const HEAD: usize = 12;

/// The stored form of reading `id` (unique per publishing node) whose seq goes at byte
/// `seq_at` of `frame`.
pub fn stored(id: u64, frame: &[u8], seq_at: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEAD + frame.len());
    buf.put_u32(seq_at as u32);
    buf.put_u64(id);
    buf.put_slice(frame);
    buf.freeze()
}

/// The id a stored message was published with.
pub fn stored_id(stored: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(stored.get(4..HEAD)?.try_into().ok()?))
}

/// The frame of a stored message, its seq written into the hole.
pub fn frame_at(stored: &[u8], seq: u64) -> Result<Bytes, LogError> {
    let corrupt = || LogError::Corrupt {
        stream: "jetstream".into(),
        seq,
    };
    let (head, rest) = stored.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let frame = rest.get(HEAD - 4..).ok_or_else(corrupt)?;
    let at = u32::from_be_bytes(*head) as usize;
    if at > frame.len() {
        return Err(corrupt());
    }
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(seq).as_bytes();
    let mut out = Vec::with_capacity(frame.len() + DIGITS);
    out.extend_from_slice(&frame[..at]);
    out.extend_from_slice(digits);
    out.extend_from_slice(&frame[at..]);
    Ok(Bytes::from(out))
}

/// The acks of one stream owner's publishes, on a subscription of its own. Each publish
/// names `<inbox>.<slot>` as its reply subject, so an ack says which publish it answers:
/// no request map, timer or boxed future per publish, as a JetStream context's publish
/// has (a node's CPU per reading fell by 20–42 %; BENCHMARKS.md, "Cluster").
pub struct Acks {
    sub: async_nats::Subscriber,
    prefix: String,
}

/// What JetStream answered to one publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Ack {
    /// Stored at this seq.
    Stored(u64),
    /// A resend's expected last seq was not the newest on the node's subject any more.
    WrongLastSequence,
    /// Not stored, with JetStream's reason.
    Refused(String),
}

/// JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;

#[derive(Deserialize)]
struct AckBody {
    seq: Option<u64>,
    error: Option<AckErrorBody>,
}

#[derive(Deserialize)]
struct AckErrorBody {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl Ack {
    /// Reads one ack message (a status such as 503 "no responders" is a refusal).
    pub fn parse(status: Option<StatusCode>, payload: &[u8]) -> Ack {
        if let Some(status) = status.filter(|s| *s != StatusCode::OK) {
            return Ack::Refused(format!("status {status}"));
        }
        match serde_json::from_slice::<AckBody>(payload) {
            Ok(AckBody { error: Some(e), .. }) if e.err_code == WRONG_LAST_SEQUENCE => {
                Ack::WrongLastSequence
            }
            Ok(AckBody { error: Some(e), .. }) => Ack::Refused(e.description),
            Ok(AckBody { seq: Some(seq), .. }) => Ack::Stored(seq),
            Ok(_) => Ack::Refused("an ack without a seq".into()),
            Err(e) => Ack::Refused(format!("an unreadable ack: {e}")),
        }
    }
}

impl Acks {
    /// The reply subject of the publish holding `slot`.
    pub fn reply(&self, slot: u64) -> Subject {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(slot);
        let mut reply = String::with_capacity(self.prefix.len() + 1 + digits.len());
        reply.push_str(&self.prefix);
        reply.push('.');
        reply.push_str(digits);
        Subject::from(reply)
    }

    /// The next ack: the slot of the publish it answers, and the answer. Never ends (a
    /// subscription that closed with its client waits forever: the owner's ack timeout
    /// takes over).
    pub async fn next(&mut self) -> (u64, Ack) {
        while let Some(m) = self.sub.next().await {
            let slot = m
                .subject
                .rsplit_once('.')
                .and_then(|(_, slot)| slot.parse::<u64>().ok());
            if let Some(slot) = slot {
                return (slot, Ack::parse(m.status, &m.payload));
            }
        }
        std::future::pending().await
    }
}

fn js_err(e: impl std::error::Error + Send + Sync + 'static) -> LogError {
    LogError::JetStream(Box::new(e))
}

/// How long JetStream keeps a stream's readings (from the retention keys).
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    /// 0: forever.
    pub max_age_s: u64,
    /// 0: any number.
    pub max_per_stream: u64,
}

/// The node's connection to the NATS cluster.
pub struct JetStream {
    client: async_nats::Client,
    js: jetstream::Context,
    replicas: usize,
    retention: Retention,
    request_timeout: Duration,
    /// How long a publish may wait for its ack before its owner counts it as lost.
    ack_timeout: Duration,
    /// Counts the times the NATS connection dropped.
    disconnects: watch::Receiver<u64>,
    /// Names the subject this node publishes on.
    node_id: String,
}

impl JetStream {
    /// Connects to the cluster (trying every URL until `connect_timeout_ms`); reconnects
    /// by itself afterwards, forever, counting what happens in the `sensorgate_nats_*`
    /// metrics.
    pub async fn connect(
        config: &ClusterConfig,
        node_id: &str,
        retention: Retention,
    ) -> Result<Self, LogError> {
        let (dropped, disconnects) = watch::channel(0u64);
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("sensorgate {node_id}"))
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
            .max_reconnects(None)
            .event_callback(move |event| {
                let dropped = dropped.clone();
                async move {
                    use async_nats::Event;
                    let (name, connected) = match &event {
                        Event::Connected => ("connected", Some(true)),
                        Event::Disconnected => ("disconnected", Some(false)),
                        Event::Closed => ("closed", Some(false)),
                        Event::LameDuckMode => ("lame_duck", None),
                        Event::Draining => ("draining", None),
                        Event::SlowConsumer(_) => ("slow_consumer", None),
                        Event::ServerError(_) => ("server_error", None),
                        Event::ClientError(_) => ("client_error", None),
                    };
                    crate::metrics::nats_event(name);
                    if let Some(up) = connected {
                        crate::metrics::handles()
                            .js_connected
                            .set(if up { 1.0 } else { 0.0 });
                    }
                    if let Event::Disconnected = event {
                        dropped.send_modify(|n| *n += 1);
                    }
                    if let Event::Connected = event {
                        tracing::info!("nats connected");
                    } else {
                        tracing::warn!(event = %event, "nats");
                    }
                }
            });
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &config.creds_file {
            options = options.credentials_file(path).await?;
        }
        let urls = config
            .nats_urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(js_err)?;
        let client = options.connect(urls).await.map_err(js_err)?;
        crate::metrics::handles().js_connected.set(1.0);
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let js = jetstream::ContextBuilder::new()
            .timeout(request_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            ack_timeout: Duration::from_millis(config.ack_timeout_ms),
            disconnects,
            replicas: config.stream_replicas,
            retention,
            request_timeout,
            node_id: node_id.to_owned(),
        })
    }

    /// Whether the node has a NATS connection right now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The NATS client, for the cluster-wide rules' key-value buckets.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// A developer's stream, created with the cluster's settings if it does not exist and
    /// brought to them if they changed.
    pub async fn open(&self, developer: &str) -> Result<JsStream, LogError> {
        let name = stream_name(developer);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects(developer)],
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            max_age: Duration::from_secs(self.retention.max_age_s),
            max_messages: self.retention.max_per_stream as i64,
            discard: stream::DiscardPolicy::Old,
            max_messages_per_subject: BLOCK_SIZE_HINT,
            ..Default::default()
        };
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(js_err)?;
        let stream = self.js.get_stream_no_info(&name).await.map_err(js_err)?;
        Ok(JsStream {
            client: self.client.clone(),
            stream,
            subject: Subject::from(node_subject(developer, &self.node_id)),
            request_timeout: self.request_timeout,
            ack_timeout: self.ack_timeout,
            disconnects: self.disconnects.clone(),
        })
    }

    /// Drains the connection: what was sent is flushed before it closes.
    pub async fn close(&self) {
        let _ = self.client.drain().await;
    }
}

/// One developer's JetStream stream.
pub struct JsStream {
    client: async_nats::Client,
    stream: jetstream::stream::Stream<()>,
    /// Cloned per publish: a reference count, not a copy of the string.
    subject: Subject,
    request_timeout: Duration,
    ack_timeout: Duration,
    disconnects: watch::Receiver<u64>,
}

/// The live readings of a stream as JetStream stores them, in seq order.
pub type Tail = consumer::push::Ordered;

impl JsStream {
    /// Where this stream's publish acks come back: a subscription of the owner's own.
    pub async fn acks(&self) -> Result<Acks, LogError> {
        let prefix = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(js_err)?;
        Ok(Acks { sub, prefix })
    }

    /// How long a publish may wait for its ack (`ack_timeout_ms`) before it counts as lost.
    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    /// Changes each time the NATS connection drops: acks on their way are lost with it, and
    /// a tail's consumer may have been on the server that went.
    pub fn disconnects(&self) -> watch::Receiver<u64> {
        let mut rx = self.disconnects.clone();
        rx.mark_unchanged();
        rx
    }

    /// Sends one reading (in its [`stored`] form), its ack to come back on `reply` (an
    /// [`Acks::reply`]). A resend after a failure names `after`, the newest seq it saw on
    /// this node's subject: it is stored only if that is still the newest (else its ack is
    /// [`Ack::WrongLastSequence`]).
    pub async fn publish(
        &self,
        stored: Bytes,
        reply: Subject,
        after: Option<u64>,
    ) -> Result<(), LogError> {
        let subject = self.subject.clone();
        match after {
            None => self.client.publish_with_reply(subject, reply, stored).await,
            Some(last) => {
                let mut headers = HeaderMap::new();
                headers.insert(
                    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    HeaderValue::from(last),
                );
                self.client
                    .publish_with_reply_and_headers(subject, reply, headers, stored)
                    .await
            }
        }
        .map_err(js_err)
    }

    /// What the stream holds of this node's readings past seq `after` (the newest it
    /// acknowledged): their ids, and the seq of the newest message on this node's subject (0
    /// if none). What a node checks before it sends readings again whose acks it did not
    /// get. First flushes the connection, so a publish still buffered from before a
    /// reconnect reaches the servers before the stream is asked. Asks the stream's leader
    /// (a replica could answer from behind), each request with a short timeout, and starts
    /// over until `deadline`: during a leader election requests go unanswered.
    pub async fn stored_since(
        &self,
        after: u64,
        deadline: std::time::Instant,
    ) -> Result<(std::collections::HashSet<u64>, u64), LogError> {
        let mut wait = Duration::from_millis(50);
        loop {
            match self.stored_since_once(after).await {
                Ok(found) => return Ok(found),
                Err(e) if std::time::Instant::now() + wait < deadline => {
                    tracing::debug!(error = %e, "reading the stream back failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(400));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn stored_since_once(
        &self,
        after: u64,
    ) -> Result<(std::collections::HashSet<u64>, u64), LogError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
        tokio::time::timeout(READ_BACK_STEP, self.client.flush())
            .await
            .map_err(js_err)?
            .map_err(js_err)?;
        let last = tokio::time::timeout(
            READ_BACK_STEP,
            self.stream.get_last_raw_message_by_subject(&self.subject),
        )
        .await
        .map_err(js_err)?;
        let last = match last {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == Kind::NoMessageFound => 0,
            Err(e) => return Err(js_err(e)),
        };
        let mut ids = std::collections::HashSet::new();
        let mut from = after + 1;
        while from <= last {
            let next = tokio::time::timeout(
                READ_BACK_STEP,
                self.stream
                    .get_first_raw_message_by_subject(&*self.subject, from),
            )
            .await
            .map_err(js_err)?;
            match next {
                Ok(m) => {
                    ids.extend(stored_id(&m.payload));
                    from = m.sequence + 1;
                }
                Err(e) if e.kind() == Kind::NoMessageFound => break,
                Err(e) => return Err(js_err(e)),
            }
        }
        Ok((ids, last))
    }

    /// The oldest and newest seq stored (`first` is `last + 1` when the stream is empty).
    pub async fn bounds(&self) -> Result<(u64, u64), LogError> {
        let info = self.stream.get_info().await.map_err(js_err)?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// The stream's messages from seq `from` on, live: an ordered consumer, which the client
    /// recreates from where it was after a gap or a lost server, so nothing is skipped.
    pub async fn tail(&self, from: u64) -> Result<Tail, LogError> {
        let config = consumer::push::OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        };
        let consumer = self.stream.create_consumer(config).await.map_err(js_err)?;
        consumer.messages().await.map_err(js_err)
    }

    /// Reads stored readings with `after < seq < before` into `out`, within `limit` (the
    /// first whatever its size), through a short-lived consumer. A read JetStream cannot
    /// answer yet (a consumer being placed, a leader being elected) is tried again, up to
    /// the request timeout.
    pub async fn read(
        &self,
        after: u64,
        before: u64,
        limit: ReadLimit,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError> {
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(20);
        loop {
            out.clear();
            match self.read_once(after, before, limit, out).await {
                Err(e) if started.elapsed() < self.request_timeout => {
                    tracing::debug!(error = %e, "stream read failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                done => return done,
            }
        }
    }

    async fn read_once(
        &self,
        after: u64,
        before: u64,
        limit: ReadLimit,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError> {
        let start = after.saturating_add(1);
        if start >= before || limit.entries == 0 {
            return Ok(());
        }
        let want = limit
            .entries
            .min((before - start).min(usize::MAX as u64) as usize);
        let reader = self
            .stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        let name = reader.cached_info().name.clone();
        let result = async {
            let mut batch = reader
                .fetch()
                .max_messages(want)
                .expires(self.request_timeout)
                .messages()
                .await
                .map_err(js_err)?;
            let mut bytes = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(LogError::JetStream)?;
                let seq = message.info().map_err(LogError::JetStream)?.stream_sequence;
                if seq >= before {
                    break;
                }
                let frame = frame_at(&message.payload, seq)?;
                bytes += frame.len();
                out.push(Entry { seq, frame });
                if out.len() >= want || bytes >= limit.bytes {
                    break;
                }
            }
            Ok(())
        }
        .await;
        // The consumer would expire on its own; deleting it keeps the servers tidy.
        let stream = self.stream.clone();
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_frame_gets_its_seq_back() {
        let frame = br#"{"op":5,"seq":,"t":"X"}"#;
        let at = frame.windows(2).position(|w| w == b":,").unwrap() + 1;
        let s = stored(42, frame, at);
        assert_eq!(stored_id(&s), Some(42));
        assert_eq!(
            &frame_at(&s, 73).unwrap()[..],
            br#"{"op":5,"seq":73,"t":"X"}"#
        );
        assert_eq!(
            &frame_at(&s, u64::MAX).unwrap()[..],
            format!(r#"{{"op":5,"seq":{},"t":"X"}}"#, u64::MAX).as_bytes()
        );
        assert!(frame_at(b"\0\0", 1).is_err());
        assert!(frame_at(&stored(1, b"ab", 2)[..13], 1).is_err());
        assert!(frame_at(&stored(1, b"ab", 3), 1).is_err());
    }

    #[test]
    fn acks_read_as_jetstream_sends_them() {
        let ack = |p: &str| Ack::parse(None, p.as_bytes());
        assert_eq!(ack(r#"{"stream":"SG_d0","seq":7}"#), Ack::Stored(7));
        assert_eq!(
            ack(r#"{"stream":"SG_d0","domain":"hub","seq":8,"duplicate":true}"#),
            Ack::Stored(8)
        );
        assert_eq!(
            ack(
                r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"},"stream":"SG_d0","seq":0}"#
            ),
            Ack::WrongLastSequence
        );
        assert_eq!(
            ack(
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"stream":"SG_d0","seq":0}"#
            ),
            Ack::Refused("maximum messages exceeded".into())
        );
        assert!(matches!(ack(r#"{"stream":"SG_d0"}"#), Ack::Refused(_)));
        assert!(matches!(ack("not json"), Ack::Refused(_)));
        assert_eq!(
            Ack::parse(Some(StatusCode::NO_RESPONDERS), b""),
            Ack::Refused("status 503".into())
        );
    }
}
