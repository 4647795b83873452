//! The STOMP connection (seeds 000 and 002): CONNECT and version/heart-beat negotiation,
//! SUBSCRIBE/UNSUBSCRIBE on live topics, SEND (with transactions), RECEIPTs, ERROR then
//! close on any protocol error, and MESSAGE frames from the hub's topics.
//!
//! Owns one connection's STOMP state: the byte buffer frames are decoded from (a frame may
//! span WebSocket messages), its subscriptions and open transactions, and both heart-beat
//! timers. The socket is the shared [`WsSocket`]; topics are the hub's. Destinations are
//! checked here against the broker prefixes; permissions per principal come in a later step.

use bytes::{Bytes, BytesMut};
use fastwebsockets::OpCode;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as Deadline, Sleep};

use super::socket::{End, Handler, Out, WsSocket, WRITE_HIGH};
use super::ConnCtx;
use crate::auth::Role;
use crate::config::StompPrincipal;
use crate::frontend::stomp::codec::{decode, Command, Decoded, Limits, Version};
use crate::frontend::stomp::destination;
use crate::frontend::stomp::frame::{
    negotiate_heart_beat, negotiate_version, pass_through, supported_versions, AckMode, Connect,
    Inbound, MessageView, Outbound,
};
use crate::frontend::CloseCode;
use crate::hub::{Inbox, Kick, KickReason, TopicDelivery, TopicMessage};
use crate::metrics::{self, stomp_out, StompError};

const MAX_TRANSACTIONS: usize = 16;
/// SENDs one transaction may hold until COMMIT.
const MAX_TRANSACTION_SENDS: usize = 1024;
/// Rounds of socket work per wake-up before the task lets others run.
const BUDGET: usize = 4;

/// What a client asks to do with a destination.
#[derive(Clone, Copy)]
enum Op {
    Subscribe,
    Send,
}

struct Sub {
    id: String,
    destination: Arc<str>,
    ack: AckMode,
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
    /// Twice the negotiated client heart-beat; zero: no deadline after CONNECT.
    silence: Duration,
    /// When to send a heart-beat EOL if nothing else went out.
    beat: Pin<Box<Sleep>>,
    beat_every: Duration,
    subs: HashMap<u64, Sub>,
    by_id: HashMap<String, u64>,
    next_key: u64,
    transactions: HashMap<String, Vec<TopicMessage>>,
    inbox: Inbox,
    deliveries: mpsc::UnboundedReceiver<TopicDelivery>,
    /// A token from the upgrade request, used when CONNECT carries none.
    bearer: Option<String>,
    /// Who the client is, set by CONNECT.
    principal: StompPrincipal,
    /// MESSAGE frames are encoded here before their WebSocket header goes in front; kept
    /// between deliveries so that none allocates.
    scratch: Vec<u8>,
}

pub(super) async fn run(
    ctx: Arc<ConnCtx>,
    sock: TcpStream,
    leftover: Bytes,
    bearer: Option<String>,
) {
    let m = metrics::handles();
    m.connections_opened.increment(1);
    m.stomp_connections.increment(1.0);
    let id = ctx.next_id();
    let kick = Kick::new();
    ctx.register(id, &kick);
    let (tx, deliveries) = mpsc::unbounded_channel();
    let inbox = Inbox {
        conn: id,
        tx,
        outbox: ctx.hub.outbox(),
        kick: kick.clone(),
    };
    let mut io = WsSocket::new(sock, &leftover, ctx.limits.max_frame_bytes, id);
    let mut st = State {
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
        beat: Box::pin(sleep_until(Deadline::now() + Duration::from_secs(86_400))),
        beat_every: Duration::ZERO,
        subs: HashMap::new(),
        by_id: HashMap::new(),
        next_key: 0,
        transactions: HashMap::new(),
        inbox,
        deliveries,
        bearer,
        principal: StompPrincipal::Anonymous,
        scratch: Vec::new(),
        ctx,
    };
    tracing::debug!(conn = id, "stomp connected");
    let end = poll_fn(|cx| st.poll_io(cx, &mut io)).await;
    let mut sent_close = false;
    if let End::Close(code) = end {
        m.close(code.code());
        tracing::debug!(conn = id, code = code.code(), "stomp closing");
        sent_close = io.close(code).await;
    }
    st.leave();
    st.ctx.unregister(id);
    if sent_close {
        io.await_close().await;
    }
    m.stomp_connections.decrement(1.0);
}

impl State {
    fn poll_io(&mut self, cx: &mut Context<'_>, io: &mut WsSocket) -> Poll<End> {
        if let Poll::Ready(reason) = self.kick.poll_kicked(cx) {
            return Poll::Ready(match reason {
                KickReason::TooSlow => {
                    self.error(
                        &mut io.out,
                        StompError::Slow,
                        "too slow: messages were not read in time",
                        None,
                    );
                    CloseCode::TooSlow.into()
                }
                _ => CloseCode::GoingAway.into(),
            });
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let what = match self.version {
                None => "no CONNECT in time",
                Some(_) => "heart-beat missed",
            };
            self.error(&mut io.out, StompError::Timeout, what, None);
            return Poll::Ready(CloseCode::Protocol.into());
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
                        self.deliver(key, &message, &mut io.out);
                        progress = true;
                    }
                    _ => break,
                }
            }
            match io.poll_round(cx, self) {
                Poll::Ready(Ok(Some(never))) => match never {},
                Poll::Ready(Err(end)) => return Poll::Ready(end),
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

    /// One MESSAGE for subscription `key`.
    fn deliver(&mut self, key: u64, message: &TopicMessage, out: &mut Out) {
        self.inbox.outbox.release(1, message.body.len());
        let (Some(sub), Some(version)) = (self.subs.get(&key), self.version) else {
            // Unsubscribed meanwhile.
            return;
        };
        let mut id = itoa::Buffer::new();
        let message_id = id.format(message.id);
        self.scratch.clear();
        MessageView {
            destination: &message.destination,
            subscription: &sub.id,
            message_id,
            // 1.2 names the message to ACK by this header when the mode is not auto.
            ack: (version == Version::V1_2 && sub.ack != AckMode::Auto).then_some(message_id),
            content_type: message.content_type.as_deref(),
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

    /// Any byte from the client is a sign of life.
    fn alive(&mut self) {
        if !self.silence.is_zero() {
            let at = Deadline::now() + self.silence;
            self.deadline.as_mut().reset(at);
        }
    }

    fn on_frame(
        &mut self,
        inbound: Inbound,
        receipt: Option<String>,
        out: &mut Out,
    ) -> Result<(), End> {
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
                replay_after: _,
            } => {
                self.check(&destination, Op::Subscribe, &receipt, out)?;
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
                self.ctx
                    .hub
                    .topics()
                    .subscribe(&destination, key, &self.inbox);
                metrics::handles().stomp_subscriptions.increment(1.0);
                self.by_id.insert(id.clone(), key);
                self.subs.insert(
                    key,
                    Sub {
                        id,
                        destination: Arc::from(destination),
                        ack,
                    },
                );
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
                    self.ctx
                        .hub
                        .topics()
                        .unsubscribe(&sub.destination, self.id, key);
                    metrics::handles().stomp_subscriptions.decrement(1.0);
                }
            }
            Inbound::Send {
                destination,
                transaction,
                headers,
                body,
            } => {
                self.check(&destination, Op::Send, &receipt, out)?;
                let topics = self.ctx.hub.topics();
                let message = TopicMessage {
                    destination: Arc::from(destination),
                    id: topics.next_id(),
                    content_type: headers
                        .iter()
                        .find(|(n, _)| n == "content-type")
                        .map(|(_, v)| v.clone()),
                    headers: pass_through(headers),
                    text: std::str::from_utf8(&body).is_ok(),
                    body,
                };
                match transaction {
                    None => {
                        topics.publish(message);
                        metrics::handles().topic_messages[0].increment(1);
                    }
                    Some(tx) => {
                        let Some(held) = self.transactions.get_mut(&tx) else {
                            self.error(
                                out,
                                StompError::State,
                                &format!("no transaction {tx}"),
                                receipt,
                            );
                            return Err(CloseCode::Protocol.into());
                        };
                        if held.len() >= MAX_TRANSACTION_SENDS {
                            self.error(out, StompError::Limit, "transaction too large", receipt);
                            return Err(CloseCode::Protocol.into());
                        }
                        held.push(message);
                    }
                }
            }
            // Live topics keep no unacknowledged messages: an ACK or NACK has nothing to
            // settle, and is accepted as the protocol allows.
            Inbound::Ack { .. } => {}
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
                let topics = self.ctx.hub.topics();
                for message in self.transactions.remove(&transaction).unwrap_or_default() {
                    topics.publish(message);
                    metrics::handles().topic_messages[0].increment(1);
                }
            }
            Inbound::Abort { transaction } => {
                self.transactions.remove(&transaction);
            }
            Inbound::Disconnect => {
                if let Some(receipt_id) = receipt {
                    self.receipt(out, receipt_id);
                }
                return Err(CloseCode::Normal.into());
            }
        }
        if let Some(receipt_id) = receipt {
            self.receipt(out, receipt_id);
        }
        Ok(())
    }

    /// A destination that exists and that the rules open to this principal for `op`.
    fn check(
        &self,
        destination: &str,
        op: Op,
        receipt: &Option<String>,
        out: &mut Out,
    ) -> Result<(), End> {
        if let Err(why) = destination::check(destination) {
            let message = format!("{why}: {destination}");
            self.error(out, StompError::Destination, &message, receipt.clone());
            return Err(CloseCode::Protocol.into());
        }
        let rule = self
            .ctx
            .limits
            .stomp_rules
            .iter()
            .filter(|r| destination.starts_with(&r.prefix))
            .max_by_key(|r| r.prefix.len());
        let allowed = rule.is_some_and(|r| match op {
            Op::Subscribe => r.subscribe.contains(&self.principal),
            Op::Send => r.send.contains(&self.principal),
        });
        if !allowed {
            let verb = match op {
                Op::Subscribe => "SUBSCRIBE",
                Op::Send => "SEND",
            };
            let message = format!("forbidden: {verb} to {destination}");
            self.error(out, StompError::Forbidden, &message, receipt.clone());
            return Err(CloseCode::Protocol.into());
        }
        Ok(())
    }

    fn receipt(&self, out: &mut Out, receipt_id: String) {
        self.reply(out, Outbound::Receipt { receipt_id });
        metrics::handles().stomp_out[stomp_out::RECEIPT].increment(1);
    }

    fn connect(&mut self, connect: Connect, out: &mut Out) -> Result<(), End> {
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
                Ok(p) => match p.role {
                    Role::User => StompPrincipal::User,
                    Role::Developer => StompPrincipal::Developer,
                },
                Err(e) => {
                    tracing::info!(conn = self.id, error = %e, "STOMP CONNECT refused");
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
        // The server offers the same rate both ways (`stomp_heart_beat_ms`).
        let offer = self.ctx.limits.stomp_heart_beat_ms;
        let (send, expect) = negotiate_heart_beat(connect.heart_beat, (offer, offer));
        self.beat_every = Duration::from_millis(send);
        if send > 0 {
            let at = Deadline::now() + self.beat_every;
            self.beat.as_mut().reset(at);
        }
        // stompjs and the spec's advice: allow twice the window before declaring the peer
        // dead. Without client heart-beats, the connection may stay silent.
        self.silence = Duration::from_millis(expect.saturating_mul(2));
        let far = Deadline::now() + Duration::from_secs(86_400 * 365);
        let at = if expect == 0 {
            far
        } else {
            Deadline::now() + self.silence
        };
        self.deadline.as_mut().reset(at);
        let frame = Outbound::Connected {
            version,
            heart_beat: (send, expect),
            session: format!("sg-{}", self.id),
            server: concat!("sensorgate/", env!("CARGO_PKG_VERSION")).into(),
        };
        self.reply(out, frame);
        metrics::handles().stomp_out[stomp_out::CONNECTED].increment(1);
        Ok(())
    }

    /// Drops every subscription; open transactions are aborted with the connection.
    fn leave(&mut self) {
        let topics = self.ctx.hub.topics();
        let held = self.subs.len();
        for (key, sub) in self.subs.drain() {
            topics.unsubscribe(&sub.destination, self.id, key);
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
    /// A STOMP frame never has to wait: SEND publishes without blocking.
    type Wait = Infallible;

    fn on_data(&mut self, data: &[u8], out: &mut Out) -> Result<Option<Infallible>, End> {
        self.alive();
        self.pending.extend_from_slice(data);
        // Before CONNECT the client's version is unknown: the 1.2 grammar accepts the most.
        loop {
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
            self.on_frame(inbound, receipt, out)?;
        }
        if self.pending.is_empty() && self.pending.capacity() > 4096 {
            self.pending = BytesMut::new();
        }
        Ok(None)
    }
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
