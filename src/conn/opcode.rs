//! The opcode protocol's connection: one task that asks [`Session`] what each message means,
//! carries the step out against auth and the hub, and queues replies and deliveries on the
//! shared [`WsSocket`]. Every way it can end maps to one [`CloseCode`], counted and logged
//! here.
//!
//! The task is driven by one poll function ([`Conn::poll_io`]) rather than a `select!` of
//! futures: each wake-up checks the kick flag and the deadline, pulls live batches, then lets
//! the socket write and read, with nothing registered or dropped per frame.

use fastwebsockets::OpCode;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::time::{sleep_until, Instant as Deadline, Sleep};

use super::delivery::{Delivery, Dispatch, Sent};
use super::socket::{End, Handler, Out, WsSocket, WRITE_HIGH};
use super::CLOSE_TIMEOUT;
use super::{kicked, ConnCtx, Unauthenticated, Upgraded};
use crate::auth::{AuthError, Principal, Role};
use crate::frontend::opcode::{dispatch_template, Inbound, Outbound, Session, Step};
use crate::frontend::CloseCode;
use crate::hub::claims::ClaimError;
use crate::hub::{HubError, Kick, Publish, StreamHandle, TryPublishError};
use crate::metrics::{self, op_in, op_out, AuthPlace, ConnRole};

/// Rounds of socket work per wake-up before the task lets others run: a flooding producer
/// must not starve the consumers on the same worker.
const BUDGET: usize = 4;

/// Work the poll function hands to the async loop because it must wait for something other
/// than this socket.
enum Wait {
    /// Claim the session and join the stream.
    Identify(Principal),
    /// The stream's queue is full: wait for room, reading nothing meanwhile.
    Publish(Publish),
}

struct Conn {
    io: WsSocket,
    st: State,
}

/// Everything but the socket: the session and what it owns.
struct State {
    ctx: Arc<ConnCtx>,
    id: u64,
    kick: Arc<Kick>,
    deadline: Pin<Box<Sleep>>,
    session: Session,
    principal: Option<Principal>,
    stream: Option<StreamHandle>,
    delivery: Delivery,
    role_gauge: ConnRole,
    /// SUBMITs in the current one-second window, for `submit_rate_per_s`.
    window: (Instant, u32),
    /// Given back at IDENTIFY.
    unauthenticated: Option<Unauthenticated>,
}

pub(super) async fn run(ctx: Arc<ConnCtx>, socket: Upgraded) {
    let m = metrics::handles();
    let peer = socket.stream.peer_addr().ok();
    let (id, kick) = ctx.open();
    let mut conn = Conn {
        io: WsSocket::new(socket.stream, &socket.leftover, &ctx.limits, id),
        st: State {
            unauthenticated: socket.unauthenticated,
            id,
            kick,
            deadline: Box::pin(sleep_until(Deadline::now() + ctx.limits.identify_timeout)),
            session: Session::new(),
            principal: None,
            stream: None,
            delivery: Delivery::default(),
            role_gauge: ConnRole::Pending,
            window: (Instant::now(), 0),
            ctx,
        },
    };
    m.connections[ConnRole::Pending as usize].increment(1.0);
    tracing::debug!(conn = id, ?peer, "connected");

    let hello = Outbound::Hello {
        heartbeat_interval: conn.st.ctx.limits.heartbeat_interval_ms,
    };
    conn.io.out.reply(OpCode::Text, &hello.encode());
    m.frames_out[op_out::HELLO].increment(1);

    let end = conn.serve().await;
    let mut sent_close = false;
    if let End::Close(code) = end {
        m.close(code.code());
        m.frames_out[op_out::CLOSE].increment(1);
        match code {
            CloseCode::Normal | CloseCode::GoingAway => {
                tracing::debug!(conn = id, code = code.code(), "closing")
            }
            _ => tracing::info!(
                conn = id,
                code = code.code(),
                reason = code.reason(),
                "closing"
            ),
        }
        sent_close = conn.io.close(code).await;
    }
    conn.st.leave().await;
    conn.st.delivery.finish();
    conn.st.ctx.unregister(id);
    if sent_close {
        conn.io.await_close().await;
    }
    m.connections[conn.st.role_gauge as usize].decrement(1.0);
    tracing::debug!(conn = id, sent_close, "disconnected");
}

impl Conn {
    async fn serve(&mut self) -> End {
        loop {
            let wait = match poll_fn(|cx| self.poll_io(cx)).await {
                Ok(wait) => wait,
                Err(end) => return end,
            };
            let out = &mut self.io.out;
            let done = match wait {
                Wait::Identify(principal) => self.st.identify(principal, out).await,
                Wait::Publish(publish) => self.st.publish_when_room(publish).await,
            };
            if let Err(end) = done {
                return end;
            }
            self.io.resume();
        }
    }

    /// Does all the work that needs no waiting; ready with the first thing that does, or
    /// with how the connection ends.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<Wait, End>> {
        let st = &mut self.st;
        if let Poll::Ready(reason) = st.kick.poll_kicked(cx) {
            return Poll::Ready(Err(kicked(reason)));
        }
        if st.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(match st.session.role() {
                None => CloseCode::IdentifyExpected.into(),
                Some(_) => CloseCode::HeartbeatMissed.into(),
            }));
        }
        for _ in 0..BUDGET {
            let mut progress = false;
            let out = &mut self.io.out;
            if out.unsent() < WRITE_HIGH {
                let chunk = st.ctx.limits.replay_chunk;
                match st
                    .delivery
                    .poll_send(cx, out.buf(), WRITE_HIGH, chunk, &mut Dispatch)
                {
                    Poll::Ready(Ok(Sent::Live)) if !out.coalesced => {
                        // Back of the run queue once before writing: commits from the
                        // other streams' owners that are already runnable land in the
                        // same write. (A self-wake is one round of the queue; `yield_now`
                        // would wait for the worker to go idle.)
                        out.coalesced = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(code)) => return Poll::Ready(Err(code.into())),
                    Poll::Pending => {}
                }
            }
            match self.io.poll_round(cx, st) {
                Poll::Ready(Ok(Some(wait))) => return Poll::Ready(Ok(wait)),
                Poll::Ready(Ok(None)) => progress = true,
                Poll::Ready(Err(end)) => return Poll::Ready(Err(end)),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Handler for State {
    type Wait = Wait;

    fn on_text(&mut self, text: &str, out: &mut Out) -> Result<Option<Wait>, End> {
        self.on_json(text, out)
    }

    /// A binary message holds the same JSON as a text one, once its UTF-8 is checked.
    fn on_data(&mut self, data: &[u8], out: &mut Out) -> Result<Option<Wait>, End> {
        let text = std::str::from_utf8(data).map_err(|_| {
            metrics::handles().frame_in(op_in::INVALID);
            tracing::debug!(conn = self.id, "binary frame that is not UTF-8");
            CloseCode::InvalidJson
        })?;
        self.on_json(text, out)
    }

    fn on_control(&mut self) {
        metrics::handles().frame_in(op_in::CONTROL);
    }
}

impl State {
    /// Handles one message.
    fn on_json(&mut self, text: &str, out: &mut Out) -> Result<Option<Wait>, End> {
        let m = metrics::handles();
        let inbound = Inbound::decode(text).map_err(|e| {
            m.frame_in(op_in::INVALID);
            tracing::debug!(conn = self.id, error = %e, "undecodable frame");
            CloseCode::InvalidJson
        })?;
        let step = self.session.step(inbound).map_err(|v| {
            m.frame_in(op_in::INVALID);
            tracing::debug!(conn = self.id, violation = %v, "frame not allowed");
            v.close_code()
        })?;
        match step {
            Step::Ack => {
                m.frame_in(op_in::HEARTBEAT);
                reply(out, Outbound::HeartbeatAck, op_out::HEARTBEAT_ACK);
                // Before IDENTIFY, heartbeats do not extend the IDENTIFY deadline.
                if self.session.role().is_some() {
                    let at = Deadline::now() + self.ctx.limits.heartbeat_deadline;
                    self.deadline.as_mut().reset(at);
                }
                Ok(None)
            }
            Step::Identify { token, role } => {
                m.frame_in(op_in::IDENTIFY);
                let token = token.ok_or(CloseCode::BadToken)?;
                let principal = self.ctx.auth.redeem(&token, role).map_err(|e| {
                    if let AuthError::Journal(_) = e {
                        tracing::error!(conn = self.id, error = %e, "IDENTIFY failed");
                        return CloseCode::Internal;
                    }
                    m.auth_failed(AuthPlace::Identify, &e);
                    CloseCode::BadToken
                })?;
                Ok(Some(Wait::Identify(principal)))
            }
            Step::Submit { t, d } => {
                m.frame_in(op_in::SUBMIT);
                // One clock read serves the rate window and the latency histogram.
                let received = Instant::now();
                self.check_rate(received)?;
                let (Some(p), Some(stream)) = (&self.principal, &self.stream) else {
                    return Err(CloseCode::Internal.into());
                };
                let publish = Publish {
                    frame: dispatch_template(&p.user, &t, d),
                    received,
                };
                match stream.try_publish(publish) {
                    Ok(()) => Ok(None),
                    Err(TryPublishError::Full(publish)) => Ok(Some(Wait::Publish(publish))),
                    Err(TryPublishError::Hub(e)) => Err(self.hub_error(e)),
                }
            }
            Step::Replay { after, before } => {
                m.frame_in(op_in::REPLAY);
                self.delivery.request_replay(after, before)?;
                Ok(None)
            }
        }
    }

    fn hub_error(&self, e: HubError) -> End {
        match e {
            HubError::Closed => CloseCode::GoingAway.into(),
            e => {
                tracing::warn!(conn = self.id, error = %e, "publish failed");
                CloseCode::Internal.into()
            }
        }
    }

    fn check_rate(&mut self, now: Instant) -> Result<(), End> {
        let limit = self.ctx.limits.submit_rate_per_s;
        if limit == 0 {
            return Ok(());
        }
        if now.duration_since(self.window.0).as_secs() >= 1 {
            self.window = (now, 0);
        }
        self.window.1 += 1;
        if self.window.1 > limit {
            return Err(CloseCode::RateLimited.into());
        }
        Ok(())
    }

    /// Waits for room in the stream's queue; a kick still ends the wait.
    async fn publish_when_room(&mut self, publish: Publish) -> Result<(), End> {
        let stream = self.stream.clone().ok_or(CloseCode::Internal)?;
        let kick = self.kick.clone();
        tokio::select! {
            r = stream.publish(publish) => r.map_err(|e| self.hub_error(e)),
            reason = poll_fn(|cx| kick.poll_kicked(cx)) => Err(kicked(reason)),
        }
    }

    /// Claims the session slot, joins the stream, and sends READY.
    async fn identify(&mut self, principal: Principal, out: &mut Out) -> Result<(), End> {
        let hub = &self.ctx.hub;
        let stream = hub.stream(&principal.developer).map_err(|e| {
            tracing::error!(conn = self.id, error = %e, "cannot open stream");
            CloseCode::Internal
        })?;
        hub.redeem_everywhere(&principal.token_id)
            .await
            .map_err(|e| claim_failed(self.id, e))?;
        let gauge = match principal.role {
            Role::User => {
                hub.claim_user(&principal.developer, &principal.user, self.id, &self.kick)
                    .await
                    .map_err(|e| claim_failed(self.id, e))?;
                reply(out, Outbound::Ready, op_out::READY);
                ConnRole::User
            }
            Role::Developer => {
                hub.claim_consumer(&principal.developer, self.id, &self.kick)
                    .await
                    .map_err(|e| claim_failed(self.id, e))?;
                self.delivery = Delivery::join(&stream, self.id, hub.outbox(), self.kick.clone())
                    .await
                    .map_err(|_| CloseCode::GoingAway)?;
                // READY goes out before any delivery: deliveries are written to `out` only
                // once this returns.
                reply(out, Outbound::Ready, op_out::READY);
                ConnRole::Developer
            }
        };
        let m = metrics::handles();
        m.connections[self.role_gauge as usize].decrement(1.0);
        m.connections[gauge as usize].increment(1.0);
        self.role_gauge = gauge;
        tracing::debug!(conn = self.id, developer = %principal.developer, user = %principal.user, role = principal.role.as_str(), "identified");
        self.session.identified(principal.role);
        self.principal = Some(principal);
        self.unauthenticated = None;
        self.stream = Some(stream);
        let at = Deadline::now() + self.ctx.limits.heartbeat_deadline;
        self.deadline.as_mut().reset(at);
        Ok(())
    }

    /// Gives back the session slot and the subscription.
    async fn leave(&mut self) {
        let Some(p) = &self.principal else { return };
        let hub = &self.ctx.hub;
        match p.role {
            Role::User => hub.release_user(&p.developer, &p.user, self.id),
            Role::Developer => {
                hub.release_consumer(&p.developer, self.id);
                if let Some(stream) = &self.stream {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.unsubscribe(self.id)).await;
                }
            }
        }
        self.stream = None;
    }
}

/// A cluster-wide rule refused (a token redeemed on another node: 4001) or could not be
/// checked (the key-value store failed: 1011).
fn claim_failed(conn: u64, e: ClaimError) -> CloseCode {
    match e {
        ClaimError::Redeemed => {
            metrics::handles().auth_failed(AuthPlace::Identify, &e);
            CloseCode::BadToken
        }
        ClaimError::Store(e) => {
            tracing::error!(conn, error = %e, "IDENTIFY failed: cluster key-value store");
            CloseCode::Internal
        }
    }
}

/// Queues a reply frame and counts it.
fn reply(out: &mut Out, frame: Outbound, op: usize) {
    out.reply(OpCode::Text, &frame.encode());
    metrics::handles().frames_out[op].increment(1);
}
