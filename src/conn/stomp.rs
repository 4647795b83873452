//! The STOMP connection (seeds 000 and 002): CONNECT and version/heart-beat negotiation,
//! SUBSCRIBE/UNSUBSCRIBE on live topics, SEND to topics and to the chat services (with
//! transactions), ACK/NACK bookkeeping, RECEIPTs, ERROR then close on any protocol error,
//! and MESSAGE frames from the hub's topics.
//!
//! Owns one connection's STOMP state: the byte buffer frames are decoded from (a frame may
//! span WebSocket messages), its subscriptions with their unacknowledged messages, open
//! transactions, and both heart-beat timers. The socket is the shared [`WsSocket`]; topics
//! and services are the hub's. Destinations are checked here against the configured
//! prefixes and the rules for this principal.

use bytes::{Bytes, BytesMut};
use fastwebsockets::OpCode;
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as Deadline, Sleep};

use super::delivery::{Delivery, Encode};
use super::socket::{End, Handler, Out, WsSocket, WRITE_HIGH};
use super::{ConnCtx, Unauthenticated, Upgraded, CLOSE_TIMEOUT};
use crate::auth::{AuthError, Principal, Role};
use crate::config::StompPrincipal;
use crate::frontend::stomp::codec::{decode, Command, Decoded, Limits, Version};
use crate::frontend::stomp::destination::{self, DestinationError};
use crate::frontend::stomp::frame::{
    negotiate_heart_beat, negotiate_version, pass_through, supported_versions, AckMode, Connect,
    Inbound, MessageView, Outbound,
};
use crate::frontend::CloseCode;
use crate::hub::chat::AppEvent;
use crate::hub::claims::ClaimError;
use crate::hub::{
    Held, Inbox, Kick, KickReason, StreamHandle, TopicDelivery, TopicMessage, JSON_UTF8,
};
use crate::metrics::{self, stomp_out, AuthPlace, StompError};

const MAX_TRANSACTIONS: usize = 16;
/// SENDs and ACKs one transaction may hold until COMMIT.
const MAX_TRANSACTION_OPS: usize = 1024;
/// Bytes all of a connection's open transactions may hold together (bodies, headers, ids):
/// without it, 16 transactions × 1,024 SENDs × a 64 KiB frame is a gigabyte per client.
const MAX_TRANSACTION_BYTES: usize = 1 << 20;
/// Rounds of socket work per wake-up before the task lets others run.
const BUDGET: usize = 4;

/// What a client asks to do with a destination.
#[derive(Clone, Copy)]
enum Op {
    Subscribe,
    Send,
}

/// A developer's own stream as a topic (`/topic/streams/{developer-id}`).
struct StreamSub {
    key: u64,
    id: String,
    destination: Arc<str>,
    handle: StreamHandle,
    delivery: Delivery,
}

/// A stream subscription to set up: it waits for the stream's owner to answer.
struct StreamJoin {
    key: u64,
    replay_after: Option<u64>,
    receipt: Option<String>,
}

/// What stops decoding until an await is done.
enum Wait {
    /// A stream subscription waits for its owner.
    Join(StreamJoin),
    /// Cluster mode: CONNECT's token is burnt cluster-wide before CONNECTED.
    Redeem {
        principal: Principal,
        heart_beat: (u64, u64),
    },
}

/// Frames readings of a stream topic as MESSAGEs: body the DISPATCH JSON, header `seq`,
/// the seq also as `message-id`.
struct StreamMessages<'a> {
    version: Version,
    subscription: &'a str,
    destination: &'a str,
    scratch: &'a mut Vec<u8>,
}

impl Encode for StreamMessages<'_> {
    fn frame(&mut self, out: &mut Vec<u8>, seq: u64, dispatch: &[u8]) {
        let mut digits = itoa::Buffer::new();
        let seq = digits.format(seq);
        self.scratch.clear();
        MessageView {
            destination: self.destination,
            subscription: self.subscription,
            message_id: seq,
            ack: None,
            content_type: Some(JSON_UTF8),
            seq: Some(seq),
            extra: &[],
            body: dispatch,
        }
        .encode(self.version, self.scratch);
        super::wire::push_frame(out, OpCode::Text, self.scratch);
    }

    fn count(&self, n: u64) {
        metrics::handles().stomp_out[stomp_out::MESSAGE].increment(n);
    }
}

/// SENDs held back by live topics' flow control, in order, and the RECEIPT owed once the
/// last is queued. The connection reads nothing meanwhile (its client feels TCP
/// backpressure) but keeps writing its own deliveries, so a client publishing to a topic it
/// also reads cannot block itself.
struct Blocked {
    held: Held,
    /// SENDs of the same COMMIT behind it.
    queue: VecDeque<Arc<TopicMessage>>,
    receipt: Option<String>,
}

/// Where a checked destination leads.
enum Target {
    Topic,
    /// A service under an application prefix.
    App,
}

struct Sub {
    id: String,
    destination: Arc<str>,
    ack: AckMode,
    /// Message ids delivered and not yet ACKed or NACKed, in delivery order (`client` and
    /// `client-individual` only).
    unacked: VecDeque<u64>,
}

/// What a transaction holds until COMMIT.
enum TxOp {
    Send(TopicMessage),
    App(AppEvent),
    Ack {
        id: String,
        subscription: Option<String>,
    },
}

impl TxOp {
    /// What holding it costs, near enough: its variable parts plus a fixed overhead.
    fn bytes(&self) -> usize {
        const OVERHEAD: usize = 64;
        OVERHEAD
            + match self {
                TxOp::Send(m) => {
                    m.destination.len()
                        + m.body.len()
                        + m.headers
                            .iter()
                            .map(|(n, v)| n.len() + v.len())
                            .sum::<usize>()
                }
                TxOp::App(_) => 0,
                TxOp::Ack { id, subscription } => {
                    id.len() + subscription.as_ref().map_or(0, String::len)
                }
            }
    }
}

struct State {
    ctx: Arc<ConnCtx>,
    id: u64,
    kick: Arc<Kick>,
    /// Set by CONNECT.
    version: Option<Version>,
    limits: Limits,
    /// Bytes of an unfinished STOMP frame.
    pending: BytesMut,
    /// Silence from the client past this ends the connection (CONNECT timeout before).
    deadline: Pin<Box<Sleep>>,
    /// Silence allowed after CONNECT: `stomp_idle_timeout_ms`, or twice the negotiated
    /// client heart-beat if shorter. Never zero, whatever was negotiated.
    silence: Duration,
    /// The silence allowed is the idle timeout (not a negotiated heart-beat): the client
    /// is pinged before it is closed.
    pings: bool,
    /// The deadline fired once and the client was pinged; the next firing closes.
    pinged: bool,
    /// When to send a heart-beat EOL if nothing else went out.
    beat: Pin<Box<Sleep>>,
    beat_every: Duration,
    subs: HashMap<u64, Sub>,
    by_id: HashMap<String, u64>,
    next_key: u64,
    transactions: HashMap<String, Vec<TxOp>>,
    /// Bytes held by all of `transactions`, bounded by [`MAX_TRANSACTION_BYTES`].
    held_bytes: usize,
    inbox: Inbox,
    deliveries: mpsc::UnboundedReceiver<TopicDelivery>,
    /// A token from the upgrade request, used when CONNECT carries none.
    bearer: Option<String>,
    /// Who the client is, set by CONNECT.
    principal: StompPrincipal,
    /// The user id of a user or employee token: named in presence and typing events.
    user: Option<Arc<str>>,
    /// "developer/user" of an employee, counted online until the connection ends.
    employee: Option<String>,
    /// The developer id of a developer token: its stream is `/topic/streams/{id}`.
    developer: Option<Arc<str>>,
    stream: Option<StreamSub>,
    blocked: Option<Blocked>,
    /// MESSAGE frames are encoded here before their WebSocket header goes in front; kept
    /// between deliveries so that none allocates.
    scratch: Vec<u8>,
    /// Given back when CONNECT carries a token; an anonymous client keeps it.
    unauthenticated: Option<Unauthenticated>,
}

pub(super) async fn run(ctx: Arc<ConnCtx>, socket: Upgraded, bearer: Option<String>) {
    let m = metrics::handles();
    m.stomp_connections.increment(1.0);
    let (id, kick) = ctx.open();
    let (inbox, deliveries) = ctx.topic_inbox(id, &kick);
    let mut io = WsSocket::new(socket.stream, &socket.leftover, &ctx.limits, id);
    let mut st = State {
        unauthenticated: socket.unauthenticated,
        id,
        kick,
        version: None,
        limits: Limits {
            max_frame_bytes: ctx.limits.max_frame_bytes,
            max_headers: ctx.limits.stomp_max_headers,
            max_header_line: ctx.limits.stomp_max_header_line,
        },
        pending: BytesMut::new(),
        deadline: Box::pin(sleep_until(Deadline::now() + ctx.limits.identify_timeout)),
        silence: Duration::ZERO,
        pings: false,
        pinged: false,
        beat: Box::pin(sleep_until(Deadline::now() + Duration::from_secs(86_400))),
        beat_every: Duration::ZERO,
        subs: HashMap::new(),
        by_id: HashMap::new(),
        next_key: 0,
        transactions: HashMap::new(),
        held_bytes: 0,
        inbox,
        deliveries,
        bearer,
        principal: StompPrincipal::Anonymous,
        user: None,
        employee: None,
        developer: None,
        stream: None,
        blocked: None,
        scratch: Vec::new(),
        ctx,
    };
    tracing::debug!(conn = id, "stomp connected");
    let end = st.serve(&mut io).await;
    let mut sent_close = false;
    if let End::Close(code) = end {
        m.close(code.code());
        tracing::debug!(conn = id, code = code.code(), "stomp closing");
        sent_close = io.close(code).await;
    }
    st.leave();
    st.leave_stream().await;
    st.ctx.unregister(id);
    if sent_close {
        io.await_close().await;
    }
    m.stomp_connections.decrement(1.0);
}

impl State {
    /// Serves until the connection ends; stream subscriptions are the only work that
    /// waits (for the stream's owner), after which the frames behind them are decoded.
    async fn serve(&mut self, io: &mut WsSocket) -> End {
        loop {
            let mut wait = match poll_fn(|cx| self.poll_io(cx, io)).await {
                Ok(join) => Some(join),
                Err(end) => return end,
            };
            while let Some(next) = wait.take() {
                let done = match next {
                    Wait::Join(join) => self.join_stream(join, &mut io.out).await,
                    Wait::Redeem {
                        principal,
                        heart_beat,
                    } => self.redeem(principal, heart_beat, &mut io.out).await,
                };
                if let Err(end) = done {
                    return end;
                }
                wait = match self.decode_pending(&mut io.out) {
                    Ok(next) => next,
                    Err(end) => return end,
                };
            }
            io.resume();
        }
    }

    fn poll_io(&mut self, cx: &mut Context<'_>, io: &mut WsSocket) -> Poll<Result<Wait, End>> {
        if let Poll::Ready(reason) = self.kick.poll_kicked(cx) {
            let (error, code) = match reason {
                KickReason::TooSlow => (
                    Some((StompError::Slow, "too slow: messages were not read in time")),
                    CloseCode::TooSlow,
                ),
                KickReason::Duplicate => (
                    Some((
                        StompError::Limit,
                        "a newer consumer of this stream took this one's place",
                    )),
                    CloseCode::Duplicate,
                ),
                KickReason::StoreFailed => (
                    Some((StompError::Internal, "the stream's store failed")),
                    CloseCode::Internal,
                ),
                KickReason::Shutdown => (None, CloseCode::GoingAway),
            };
            if let Some((reason, message)) = error {
                self.error(&mut io.out, reason, message, None);
            }
            return Poll::Ready(Err(code.into()));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            if self.version.is_some() && self.pings && !self.pinged {
                // A last chance: WebSocket libraries answer pings by themselves.
                self.pinged = true;
                io.out.reply(OpCode::Ping, b"");
                let at = Deadline::now() + self.silence / 3;
                self.deadline.as_mut().reset(at);
            } else {
                let what = match (self.version, self.pings) {
                    (None, _) => "no CONNECT in time",
                    (Some(_), false) => "heart-beat missed",
                    (Some(_), true) => "idle timeout: nothing received, not even a pong",
                };
                self.error(&mut io.out, StompError::Timeout, what, None);
                return Poll::Ready(Err(CloseCode::Protocol.into()));
            }
        }
        for _ in 0..BUDGET {
            let mut progress = false;
            // Polled every round, so a rate negotiated by CONNECT in the last round starts
            // its timer at once.
            if !self.beat_every.is_zero() && self.beat.as_mut().poll(cx).is_ready() {
                // A heart-beat is one EOL in its own message, sent when nothing else waits.
                if io.out.unsent() == 0 {
                    super::wire::push_frame(io.out.buf(), OpCode::Text, b"\n");
                    metrics::handles().stomp_out[stomp_out::HEARTBEAT].increment(1);
                }
                let next = Deadline::now() + self.beat_every;
                self.beat.as_mut().reset(next);
                progress = true;
            }
            while io.out.unsent() < WRITE_HIGH {
                match self.deliveries.poll_recv(cx) {
                    Poll::Ready(Some((key, message))) => {
                        if let Err(end) = self.deliver(key, &message, &mut io.out) {
                            return Poll::Ready(Err(end));
                        }
                        progress = true;
                    }
                    _ => break,
                }
            }
            match self.poll_stream(cx, &mut io.out) {
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(end)) => return Poll::Ready(Err(end)),
                Poll::Pending => {}
            }
            match self.poll_blocked(cx, &mut io.out) {
                Poll::Ready(Ok(Some(join))) => return Poll::Ready(Ok(join)),
                Poll::Ready(Ok(None)) => {
                    // Frames the socket holds behind the held SEND are parsed now.
                    io.resume();
                    progress = true;
                }
                Poll::Ready(Err(end)) => return Poll::Ready(Err(end)),
                Poll::Pending => {}
            }
            match io.poll_round(cx, self) {
                Poll::Ready(Ok(Some(join))) => return Poll::Ready(Ok(join)),
                Poll::Ready(Err(end)) => return Poll::Ready(Err(end)),
                Poll::Ready(Ok(None)) => progress = true,
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Stream readings owed, replayed or live, as MESSAGEs; ready when it wrote some.
    fn poll_stream(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Poll<Result<(), End>> {
        let (Some(stream), Some(version)) = (&mut self.stream, self.version) else {
            return Poll::Pending;
        };
        if out.unsent() >= WRITE_HIGH {
            return Poll::Pending;
        }
        let mut enc = StreamMessages {
            version,
            subscription: &stream.id,
            destination: &stream.destination,
            scratch: &mut self.scratch,
        };
        let chunk = self.ctx.limits.replay_chunk;
        let code = match stream
            .delivery
            .poll_send(cx, out.buf(), WRITE_HIGH, chunk, &mut enc)
        {
            Poll::Ready(Ok(_)) => return Poll::Ready(Ok(())),
            Poll::Ready(Err(code)) => code,
            Poll::Pending => return Poll::Pending,
        };
        let error = match code {
            CloseCode::BehindRetention => Some((
                StompError::Slow,
                "fell behind retention: readings not yet sent were removed",
            )),
            CloseCode::Internal => Some((StompError::Internal, "reading the stream failed")),
            _ => None,
        };
        if let Some((reason, message)) = error {
            self.error(out, reason, message, None);
        }
        Poll::Ready(Err(code.into()))
    }

    /// Subscribes to the developer's stream; a replay from `replay-after` goes first, then
    /// live readings, with no gap and no duplicate (as on `/connect`).
    async fn join_stream(&mut self, join: StreamJoin, out: &mut Out) -> Result<(), End> {
        let Some(developer) = self.developer.clone() else {
            return Err(CloseCode::Internal.into());
        };
        let hub = self.ctx.hub.clone();
        let handle = match hub.stream(&developer) {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(conn = self.id, error = %e, "cannot open stream");
                self.error(
                    out,
                    StompError::Internal,
                    "cannot open the stream",
                    join.receipt,
                );
                return Err(CloseCode::Internal.into());
            }
        };
        if let Err(e) = hub.claim_consumer(&developer, self.id, &self.kick).await {
            tracing::error!(conn = self.id, error = %e, "cannot claim the stream subscription");
            self.error(
                out,
                StompError::Internal,
                "cannot register the subscription",
                join.receipt,
            );
            return Err(CloseCode::Internal.into());
        }
        // One outbox for topics and the stream: `stomp_max_pending_bytes` bounds both.
        let outbox = self.inbox.outbox.clone();
        let mut delivery = Delivery::join(&handle, self.id, outbox, self.kick.clone())
            .await
            .map_err(|_| End::from(CloseCode::GoingAway))?;
        if let Some(after) = join.replay_after {
            delivery.request_replay(after, None)?;
        }
        let Some(sub) = self.subs.get(&join.key) else {
            return Err(CloseCode::Internal.into());
        };
        self.stream = Some(StreamSub {
            key: join.key,
            id: sub.id.clone(),
            destination: sub.destination.clone(),
            handle,
            delivery,
        });
        if let Some(receipt_id) = join.receipt {
            self.receipt(out, receipt_id);
        }
        Ok(())
    }

    /// Ends the stream subscription: gives back the session slot and the queued room.
    fn drop_stream(&mut self) -> Option<StreamHandle> {
        let mut stream = self.stream.take()?;
        stream.delivery.finish();
        if let Some(developer) = &self.developer {
            self.ctx.hub.release_consumer(developer, self.id);
        }
        Some(stream.handle)
    }

    /// [`State::drop_stream`] at the end of the connection, telling the owner at once.
    async fn leave_stream(&mut self) {
        if let Some(handle) = self.drop_stream() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, handle.unsubscribe(self.id)).await;
        }
    }

    /// One MESSAGE for subscription `key`.
    fn deliver(&mut self, key: u64, message: &TopicMessage, out: &mut Out) -> Result<(), End> {
        self.inbox.outbox.release(1, message.body.len());
        let (Some(sub), Some(version)) = (self.subs.get_mut(&key), self.version) else {
            // Unsubscribed meanwhile.
            return Ok(());
        };
        if sub.ack != AckMode::Auto {
            if sub.unacked.len() >= self.ctx.limits.stomp_max_unacked {
                let what = format!(
                    "too many unacknowledged messages on subscription {}",
                    sub.id
                );
                self.error(out, StompError::Unacked, &what, None);
                return Err(CloseCode::TooSlow.into());
            }
            sub.unacked.push_back(message.id);
        }
        let mut id = itoa::Buffer::new();
        let message_id = id.format(message.id);
        // 1.2 names the message to ACK by the `ack` header when the mode is not auto:
        // "<subscription key>.<message id>", so an ACK finds its subscription at once.
        let mut key_digits = itoa::Buffer::new();
        let mut ack = [0u8; 41];
        let ack = (version == Version::V1_2 && sub.ack != AckMode::Auto)
            .then(|| join_ids(&mut ack, key_digits.format(key), message_id));
        self.scratch.clear();
        MessageView {
            destination: &message.destination,
            subscription: &sub.id,
            message_id,
            ack,
            content_type: message.content_type.as_deref(),
            seq: None,
            extra: &message.headers,
            body: &message.body,
        }
        .encode(version, &mut self.scratch);
        // Headers are UTF-8 strings, so the frame is text exactly when the body is.
        let opcode = if message.text {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        super::wire::push_frame(out.buf(), opcode, &self.scratch);
        metrics::handles().stomp_out[stomp_out::MESSAGE].increment(1);
        Ok(())
    }

    /// Queues an ERROR, counted by reason; the caller then closes.
    fn error(&self, out: &mut Out, reason: StompError, message: &str, receipt: Option<String>) {
        tracing::debug!(conn = self.id, message, "stomp error");
        let m = metrics::handles();
        m.stomp_errors[reason as usize].increment(1);
        m.stomp_out[stomp_out::ERROR].increment(1);
        let frame = Outbound::Error {
            message: message.to_owned(),
            receipt_id: receipt,
            version: None,
            body: Bytes::copy_from_slice(message.as_bytes()),
        };
        let mut bytes = Vec::new();
        frame.encode(self.version.unwrap_or(Version::V1_2), &mut bytes);
        out.reply(OpCode::Text, &bytes);
    }

    fn reply(&self, out: &mut Out, frame: Outbound) {
        let mut bytes = Vec::new();
        frame.encode(self.version.unwrap_or(Version::V1_2), &mut bytes);
        out.reply(OpCode::Text, &bytes);
    }

    /// Any byte or pong from the client is a sign of life. Under the idle timeout the ping
    /// comes after two thirds of it and the close after all of it; a negotiated heart-beat
    /// is held to as agreed.
    fn alive(&mut self) {
        if self.version.is_some() {
            self.pinged = false;
            let wait = if self.pings {
                self.silence * 2 / 3
            } else {
                self.silence
            };
            self.deadline.as_mut().reset(Deadline::now() + wait);
        }
    }

    /// Acts on one client frame; a SUBSCRIBE to the stream comes back as work to wait for.
    fn on_frame(
        &mut self,
        inbound: Inbound,
        receipt: Option<String>,
        out: &mut Out,
    ) -> Result<Option<Wait>, End> {
        if self.version.is_none() {
            let Inbound::Connect(connect) = inbound else {
                self.error(out, StompError::State, "expected CONNECT", receipt);
                return Err(CloseCode::Protocol.into());
            };
            return self.connect(connect, out);
        }
        match inbound {
            Inbound::Connect(_) => {
                self.error(out, StompError::State, "already connected", receipt);
                return Err(CloseCode::Protocol.into());
            }
            Inbound::Subscribe {
                destination,
                id,
                ack,
                replay_after,
            } => {
                let stream = destination.starts_with(destination::STREAMS);
                if stream {
                    self.check_stream(&destination, ack, &receipt, out)?;
                } else {
                    self.check(&destination, Op::Subscribe, &receipt, out)?;
                    if replay_after.is_some() {
                        let message = format!("replay-after is for stream topics: {destination}");
                        self.error(out, StompError::Frame, &message, receipt);
                        return Err(CloseCode::Protocol.into());
                    }
                }
                if self.by_id.contains_key(&id) {
                    self.error(
                        out,
                        StompError::State,
                        &format!("subscription id already in use: {id}"),
                        receipt,
                    );
                    return Err(CloseCode::Protocol.into());
                }
                if self.subs.len() >= self.ctx.limits.stomp_max_subscriptions {
                    self.error(out, StompError::Limit, "too many subscriptions", receipt);
                    return Err(CloseCode::Protocol.into());
                }
                let key = self.next_key;
                self.next_key += 1;
                if !stream {
                    self.join(&destination, key);
                }
                metrics::handles().stomp_subscriptions.increment(1.0);
                self.by_id.insert(id.clone(), key);
                self.subs.insert(
                    key,
                    Sub {
                        id,
                        destination: Arc::from(destination),
                        ack,
                        unacked: VecDeque::new(),
                    },
                );
                if stream {
                    // The RECEIPT goes out once the subscription is in place.
                    return Ok(Some(Wait::Join(StreamJoin {
                        key,
                        replay_after,
                        receipt,
                    })));
                }
            }
            Inbound::Unsubscribe { id } => {
                let Some(key) = self.by_id.remove(&id) else {
                    self.error(
                        out,
                        StompError::State,
                        &format!("no subscription {id}"),
                        receipt,
                    );
                    return Err(CloseCode::Protocol.into());
                };
                if let Some(sub) = self.subs.remove(&key) {
                    if self.stream.as_ref().is_some_and(|s| s.key == key) {
                        // The owner drops the closed channel on its next dispatch.
                        self.drop_stream();
                    } else {
                        self.part(&sub.destination, key);
                    }
                    metrics::handles().stomp_subscriptions.decrement(1.0);
                }
            }
            Inbound::Send {
                destination,
                transaction,
                headers,
                body,
            } => {
                let op = match self.check(&destination, Op::Send, &receipt, out)? {
                    Target::Topic => {
                        let topics = self.ctx.hub.topics();
                        TxOp::Send(TopicMessage {
                            destination: Arc::from(destination),
                            id: topics.next_id(),
                            content_type: headers
                                .iter()
                                .find(|(n, _)| n == "content-type")
                                .map(|(_, v)| v.clone().into()),
                            headers: pass_through(headers),
                            text: std::str::from_utf8(&body).is_ok(),
                            body,
                        })
                    }
                    Target::App => TxOp::App(self.route(&destination, &receipt, out)?),
                };
                self.apply_or_hold(op, transaction, &receipt, out)?;
            }
            Inbound::Ack {
                nack: _,
                id,
                subscription,
                transaction,
            } => {
                // NACK settles like ACK: live topics have no redelivery, and the message is
                // dropped (see the README's STOMP section).
                let op = TxOp::Ack { id, subscription };
                self.apply_or_hold(op, transaction, &receipt, out)?;
            }
            Inbound::Begin { transaction } => {
                if self.transactions.contains_key(&transaction)
                    || self.transactions.len() >= MAX_TRANSACTIONS
                {
                    self.error(
                        out,
                        StompError::State,
                        &format!("cannot begin transaction {transaction}"),
                        receipt,
                    );
                    return Err(CloseCode::Protocol.into());
                }
                self.transactions.insert(transaction, Vec::new());
            }
            Inbound::Commit { transaction } | Inbound::Abort { transaction }
                if !self.transactions.contains_key(&transaction) =>
            {
                self.error(
                    out,
                    StompError::State,
                    &format!("no transaction {transaction}"),
                    receipt,
                );
                return Err(CloseCode::Protocol.into());
            }
            Inbound::Commit { transaction } => {
                for op in self.end_transaction(&transaction) {
                    self.apply(op);
                }
            }
            Inbound::Abort { transaction } => {
                self.end_transaction(&transaction);
            }
            Inbound::Disconnect => {
                if let Some(receipt_id) = receipt {
                    self.receipt(out, receipt_id);
                }
                return Err(CloseCode::Normal.into());
            }
        }
        if let Some(receipt_id) = receipt {
            match &mut self.blocked {
                // A SEND held back by flow control is receipted once it is queued.
                Some(blocked) => blocked.receipt = Some(receipt_id),
                None => self.receipt(out, receipt_id),
            }
        }
        Ok(None)
    }

    /// Sends what flow control holds back as subscribers make room; past
    /// `stomp_publish_wait_ms` whoever is still full is cut (ERROR, then 4009). Ready once
    /// everything went out, with what the frames buffered behind it asked for.
    fn poll_blocked(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Out,
    ) -> Poll<Result<Option<Wait>, End>> {
        let Some(blocked) = &mut self.blocked else {
            return Poll::Pending;
        };
        let topics = self.ctx.hub.topics();
        let wait = self.ctx.limits.stomp_publish_wait;
        'held: loop {
            ready!(topics.poll_held(&mut blocked.held, cx));
            while let Some(next) = blocked.queue.pop_front() {
                if let Err(held) = topics.publish_or_hold(next, wait) {
                    blocked.held = held;
                    continue 'held;
                }
            }
            break;
        }
        let receipt = blocked.receipt.take();
        self.blocked = None;
        if let Some(receipt_id) = receipt {
            self.receipt(out, receipt_id);
        }
        Poll::Ready(self.decode_pending(out))
    }

    /// `/topic/streams/{id}`: open to the developer `id` alone, once per connection, with
    /// `ack:auto` (a consumer resumes with `replay-after`, not by redelivery).
    fn check_stream(
        &self,
        destination: &str,
        ack: AckMode,
        receipt: &Option<String>,
        out: &mut Out,
    ) -> Result<(), End> {
        let id = &destination[destination::STREAMS.len()..];
        let (reason, message) = if self.developer.as_deref() != Some(id) {
            (
                StompError::Forbidden,
                format!("forbidden: SUBSCRIBE to {destination} needs that developer's token"),
            )
        } else if self.stream.is_some() {
            (
                StompError::State,
                format!("already subscribed to {destination}"),
            )
        } else if ack != AckMode::Auto {
            (
                StompError::Frame,
                "stream topics take ack:auto; resume with replay-after".to_owned(),
            )
        } else {
            return Ok(());
        };
        self.error(out, reason, &message, receipt.clone());
        Err(CloseCode::Protocol.into())
    }

    /// A destination that exists and that the rules open to this principal for `op`, and
    /// which kind it is: a topic, or (SEND only) a service under an application prefix.
    fn check(
        &self,
        destination: &str,
        op: Op,
        receipt: &Option<String>,
        out: &mut Out,
    ) -> Result<Target, End> {
        let limits = &self.ctx.limits;
        let checked = match destination::check(destination, &limits.stomp_broker_prefixes) {
            Err(DestinationError::Unknown) if matches!(op, Op::Send) => {
                destination::check(destination, &limits.stomp_app_prefixes).map(|()| Target::App)
            }
            other => other.map(|()| Target::Topic),
        };
        let checked = match checked {
            Ok(_) if destination.starts_with(destination::STREAMS) => {
                // Only a stream's producers write it, on `/connect`.
                Err(DestinationError::ReadOnly)
            }
            other => other,
        };
        let target = match checked {
            Ok(target) => target,
            Err(why) => {
                let message = format!("{why}: {destination}");
                self.error(out, StompError::Destination, &message, receipt.clone());
                return Err(CloseCode::Protocol.into());
            }
        };
        let verb = match op {
            Op::Subscribe => "SUBSCRIBE",
            Op::Send => "SEND",
        };
        let rule = limits
            .stomp_rules
            .iter()
            .filter(|r| r.covers(destination))
            .max_by_key(|r| r.prefix.len());
        let allowed = rule.is_some_and(|r| match op {
            Op::Subscribe => r.subscribe.contains(&self.principal),
            Op::Send => r.send.contains(&self.principal),
        });
        // A developer publishes only under the prefixes its configuration grants it.
        let granted = match (op, &target, &self.developer) {
            (Op::Send, Target::Topic, Some(developer)) => {
                self.ctx.auth.may_publish(developer, destination)
            }
            _ => true,
        };
        if !allowed || !granted {
            let message = format!("forbidden: {verb} to {destination}");
            self.error(out, StompError::Forbidden, &message, receipt.clone());
            return Err(CloseCode::Protocol.into());
        }
        Ok(target)
    }

    /// The service a SEND to an application destination asks for.
    fn route(
        &self,
        destination: &str,
        receipt: &Option<String>,
        out: &mut Out,
    ) -> Result<AppEvent, End> {
        let routed = self.ctx.hub.chat().map(|chat| chat.route(destination));
        let (reason, message) = match (routed, &self.user) {
            (Some(Ok(event)), Some(_)) => return Ok(event),
            (Some(Ok(_)), None) => (
                StompError::Forbidden,
                format!("forbidden: SEND to {destination} needs a user token"),
            ),
            _ => (
                StompError::Destination,
                format!("unknown destination: {destination}"),
            ),
        };
        self.error(out, reason, &message, receipt.clone());
        Err(CloseCode::Protocol.into())
    }

    /// Applies `op` now, or holds it in its transaction until COMMIT.
    fn apply_or_hold(
        &mut self,
        op: TxOp,
        transaction: Option<String>,
        receipt: &Option<String>,
        out: &mut Out,
    ) -> Result<(), End> {
        let Some(tx) = transaction else {
            self.apply(op);
            return Ok(());
        };
        let Some(held) = self.transactions.get_mut(&tx) else {
            let message = format!("no transaction {tx}");
            self.error(out, StompError::State, &message, receipt.clone());
            return Err(CloseCode::Protocol.into());
        };
        let bytes = op.bytes();
        if held.len() >= MAX_TRANSACTION_OPS || self.held_bytes + bytes > MAX_TRANSACTION_BYTES {
            self.error(
                out,
                StompError::Limit,
                "transaction too large",
                receipt.clone(),
            );
            return Err(CloseCode::Protocol.into());
        }
        held.push(op);
        self.held_bytes += bytes;
        Ok(())
    }

    /// Takes a transaction's operations out (to apply at COMMIT, or drop at ABORT).
    fn end_transaction(&mut self, transaction: &str) -> Vec<TxOp> {
        let ops = self.transactions.remove(transaction).unwrap_or_default();
        self.held_bytes -= ops.iter().map(TxOp::bytes).sum::<usize>();
        ops
    }

    fn apply(&mut self, op: TxOp) {
        match op {
            TxOp::Send(message) => {
                metrics::handles().topic_messages[0].increment(1);
                let message = Arc::new(message);
                let wait = self.ctx.limits.stomp_publish_wait;
                if let Some(blocked) = &mut self.blocked {
                    blocked.queue.push_back(message);
                } else if let Err(held) = self.ctx.hub.topics().publish_or_hold(message, wait) {
                    self.blocked = Some(Blocked {
                        held,
                        queue: VecDeque::new(),
                        receipt: None,
                    });
                }
            }
            TxOp::App(event) => {
                if let (Some(chat), Some(user)) = (self.ctx.hub.chat(), &self.user) {
                    chat.raise(&event, user);
                }
            }
            TxOp::Ack { id, subscription } => self.settle(&id, subscription.as_deref()),
        }
    }

    /// Settles an ACK or NACK: the message named, and in `client` mode every one before it,
    /// is no longer outstanding. One that names no outstanding message (already covered by
    /// a cumulative ACK, or on an `auto` subscription) changes nothing.
    fn settle(&mut self, id: &str, subscription: Option<&str>) {
        // 1.2 sends back our `ack` header, "<key>.<message id>"; 1.1 names the
        // subscription; 1.0 only the message.
        let (key, message) = match id.split_once('.') {
            Some((key, message)) => (key.parse::<u64>().ok(), message),
            None => (subscription.and_then(|s| self.by_id.get(s)).copied(), id),
        };
        let Ok(message) = message.parse::<u64>() else {
            return;
        };
        for (k, sub) in self.subs.iter_mut() {
            if key.is_some_and(|key| key != *k) {
                continue;
            }
            if let Some(at) = sub.unacked.iter().position(|&m| m == message) {
                match sub.ack {
                    AckMode::Client => drop(sub.unacked.drain(..=at)),
                    AckMode::ClientIndividual | AckMode::Auto => drop(sub.unacked.remove(at)),
                }
                return;
            }
        }
        tracing::debug!(conn = self.id, id, "ACK for no outstanding message");
    }

    /// Joins a topic, through the chat services when they run.
    fn join(&self, destination: &str, key: u64) {
        match self.ctx.hub.chat() {
            Some(chat) => chat.join(destination, key, &self.inbox, self.user.as_deref()),
            None => self
                .ctx
                .hub
                .topics()
                .subscribe(destination, key, &self.inbox),
        }
    }

    fn part(&self, destination: &str, key: u64) {
        match self.ctx.hub.chat() {
            Some(chat) => chat.part(destination, self.id, key, self.user.as_deref()),
            None => self.ctx.hub.topics().unsubscribe(destination, self.id, key),
        }
    }

    fn receipt(&self, out: &mut Out, receipt_id: String) {
        self.reply(out, Outbound::Receipt { receipt_id });
        metrics::handles().stomp_out[stomp_out::RECEIPT].increment(1);
    }

    fn connect(&mut self, connect: Connect, out: &mut Out) -> Result<Option<Wait>, End> {
        let Some(version) = negotiate_version(&connect.accept) else {
            let m = metrics::handles();
            m.stomp_errors[StompError::Version as usize].increment(1);
            m.stomp_out[stomp_out::ERROR].increment(1);
            let frame = Outbound::Error {
                message: "unsupported STOMP version".into(),
                receipt_id: None,
                version: Some(supported_versions()),
                body: Bytes::from(format!("Supported versions are {}", supported_versions())),
            };
            self.reply(out, frame);
            return Err(CloseCode::Protocol.into());
        };
        self.version = Some(version);
        // A token in CONNECT's passcode or Authorization header, else from the upgrade.
        let token = connect
            .passcode
            .filter(|p| !p.is_empty())
            .or_else(|| {
                connect
                    .authorization
                    .map(|a| a.strip_prefix("Bearer ").unwrap_or(&a).trim().to_owned())
            })
            .or_else(|| self.bearer.take());
        self.principal = match token {
            Some(token) => match self.ctx.auth.redeem_any(&token) {
                Ok(p) if self.ctx.hub.cluster_link().is_some() => {
                    return Ok(Some(Wait::Redeem {
                        principal: p,
                        heart_beat: connect.heart_beat,
                    }));
                }
                Ok(p) => {
                    self.unauthenticated = None;
                    self.identified(p)
                }
                Err(e @ AuthError::Journal(_)) => {
                    tracing::error!(conn = self.id, error = %e, "STOMP CONNECT failed");
                    let message = "the server could not record the token; try again";
                    self.error(out, StompError::Auth, message, None);
                    return Err(CloseCode::Internal.into());
                }
                Err(e) => {
                    metrics::handles().auth_failed(AuthPlace::Stomp, &e);
                    self.error(out, StompError::Auth, "invalid token", None);
                    return Err(CloseCode::Protocol.into());
                }
            },
            None if self.ctx.limits.stomp_anonymous => StompPrincipal::Anonymous,
            None => {
                self.error(out, StompError::Auth, "authentication required", None);
                return Err(CloseCode::Protocol.into());
            }
        };
        self.connected(connect.heart_beat, out);
        Ok(None)
    }

    /// Cluster mode: CONNECT's token, redeemed on this node, is burnt cluster-wide before
    /// the client is CONNECTED; one redeemed on another node gets the same ERROR as any
    /// invalid token.
    async fn redeem(
        &mut self,
        principal: Principal,
        heart_beat: (u64, u64),
        out: &mut Out,
    ) -> Result<(), End> {
        match self.ctx.hub.redeem_everywhere(&principal.token_id).await {
            Ok(()) => {
                self.unauthenticated = None;
                self.principal = self.identified(principal);
                self.connected(heart_beat, out);
                Ok(())
            }
            Err(e @ ClaimError::Redeemed) => {
                metrics::handles().auth_failed(AuthPlace::Stomp, &e);
                self.error(out, StompError::Auth, "invalid token", None);
                Err(CloseCode::Protocol.into())
            }
            Err(e) => {
                tracing::error!(conn = self.id, error = %e, "STOMP CONNECT failed");
                let message = "the server could not record the token; try again";
                self.error(out, StompError::Auth, message, None);
                Err(CloseCode::Internal.into())
            }
        }
    }

    /// Negotiates heart-beats and answers CONNECTED.
    fn connected(&mut self, heart_beat: (u64, u64), out: &mut Out) {
        let Some(version) = self.version else { return };
        // The server offers the same rate both ways (`stomp_heart_beat_ms`).
        let offer = self.ctx.limits.stomp_heart_beat_ms;
        let (send, expect) = negotiate_heart_beat(heart_beat, (offer, offer));
        self.beat_every = Duration::from_millis(send);
        if send > 0 {
            let at = Deadline::now() + self.beat_every;
            self.beat.as_mut().reset(at);
        }
        // stompjs and the spec's advice: allow twice the window before declaring the peer
        // dead. Without client heart-beats (or with huge ones) the idle timeout still
        // holds: a stranger cannot keep a socket open by asking for silence.
        let idle = self.ctx.limits.stomp_idle_timeout;
        let beats = Duration::from_millis(expect.saturating_mul(2));
        self.pings = expect == 0 || beats >= idle;
        self.silence = if self.pings { idle } else { beats };
        self.alive();
        let frame = Outbound::Connected {
            version,
            heart_beat: (send, expect),
            session: format!("sg-{}", self.id),
            server: concat!("sensorgate/", env!("CARGO_PKG_VERSION")).into(),
        };
        self.reply(out, frame);
        metrics::handles().stomp_out[stomp_out::CONNECTED].increment(1);
    }

    /// Takes in a redeemed token: the user it names, and an employee counted online.
    fn identified(&mut self, p: Principal) -> StompPrincipal {
        match p.role {
            Role::Developer => {
                self.developer = Some(p.developer.clone());
                return StompPrincipal::Developer;
            }
            Role::User => self.user = Some(p.user.clone()),
        }
        if !p.employee {
            return StompPrincipal::User;
        }
        let who = format!("{}/{}", p.developer, p.user);
        if let Some(chat) = self.ctx.hub.chat() {
            chat.employee_joined(&who);
        }
        self.employee = Some(who);
        StompPrincipal::Employee
    }

    /// Drops every subscription; open transactions are aborted with the connection.
    fn leave(&mut self) {
        let held = self.subs.len();
        let subs: Vec<_> = self.subs.drain().collect();
        for (key, sub) in subs {
            self.part(&sub.destination, key);
        }
        if let (Some(chat), Some(who)) = (self.ctx.hub.chat(), &self.employee) {
            chat.employee_left(who);
        }
        metrics::handles()
            .stomp_subscriptions
            .decrement(held as f64);
        self.deliveries.close();
        while let Ok((_, message)) = self.deliveries.try_recv() {
            self.inbox.outbox.release(1, message.body.len());
        }
    }
}

impl Handler for State {
    /// Only a stream subscription waits in the async loop (for its owner); a SEND held back
    /// by flow control waits inside the poll loop ([`State::poll_blocked`]).
    type Wait = Wait;

    fn on_data(&mut self, data: &[u8], out: &mut Out) -> Result<Option<Wait>, End> {
        self.alive();
        self.pending.extend_from_slice(data);
        self.decode_pending(out)
    }

    fn paused(&self) -> bool {
        self.blocked.is_some()
    }

    fn on_control(&mut self) {
        self.alive();
    }
}

impl State {
    /// Acts on the whole frames buffered, up to one that has to wait.
    fn decode_pending(&mut self, out: &mut Out) -> Result<Option<Wait>, End> {
        // Before CONNECT the client's version is unknown: the 1.2 grammar accepts the most.
        while self.blocked.is_none() {
            let version = self.version.unwrap_or(Version::V1_2);
            let raw = match decode(&mut self.pending, version, &self.limits) {
                Ok(None) => break,
                Ok(Some(Decoded::HeartBeat)) => continue,
                Ok(Some(Decoded::Frame(raw))) => raw,
                Err(e) => {
                    self.error(out, StompError::Frame, &e.to_string(), None);
                    return Err(CloseCode::Protocol.into());
                }
            };
            if let Some(i) = command_index(raw.command) {
                metrics::handles().stomp_in[i].increment(1);
            }
            let receipt = raw.header("receipt").map(str::to_owned);
            let inbound = match Inbound::from_raw(raw, version) {
                Ok(inbound) => inbound,
                Err(e) => {
                    self.error(out, StompError::Frame, &e.to_string(), receipt);
                    return Err(CloseCode::Protocol.into());
                }
            };
            if let Some(join) = self.on_frame(inbound, receipt, out)? {
                return Ok(Some(join));
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > 4096 {
            self.pending = BytesMut::new();
        }
        Ok(None)
    }
}

/// `<key>.<id>` in `buf`, without allocating.
fn join_ids<'a>(buf: &'a mut [u8; 41], key: &str, id: &str) -> &'a str {
    let n = key.len();
    buf[..n].copy_from_slice(key.as_bytes());
    buf[n] = b'.';
    buf[n + 1..n + 1 + id.len()].copy_from_slice(id.as_bytes());
    std::str::from_utf8(&buf[..n + 1 + id.len()]).expect("ASCII digits")
}

/// The `command` label index of a client frame in [`metrics::STOMP_IN`].
fn command_index(c: Command) -> Option<usize> {
    Some(match c {
        Command::Connect => 0,
        Command::Stomp => 1,
        Command::Send => 2,
        Command::Subscribe => 3,
        Command::Unsubscribe => 4,
        Command::Ack => 5,
        Command::Nack => 6,
        Command::Begin => 7,
        Command::Commit => 8,
        Command::Abort => 9,
        Command::Disconnect => 10,
        Command::Connected | Command::Message | Command::Receipt | Command::Error => return None,
    })
}
