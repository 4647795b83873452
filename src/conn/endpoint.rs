//! The `/stream` connection (seed 003): welcome on open, a token makes the socket a
//! notification endpoint, JSON API calls over the socket, and the pushes registered for it.
//! Also the JSON API's executor, which `POST /json` shares.
//!
//! Owns one socket's endpoint: its id once a token was accepted, its inbox of pushes, and
//! two timers (no token in time: 4000; silent past `endpoint_idle_timeout_ms`: 4005, with
//! a ping after a third of that so clients without `{"hb":true}` answer with pongs). The
//! registry and the progress topics are the hub's; frames are `frontend::endpoint`'s.
//! An invalid token or an unrecognised message gets `{"error":…}` and the socket stays
//! open, as BIMserver does; text that is not JSON closes it with 1007.

use fastwebsockets::OpCode;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as Deadline, Sleep};

use super::socket::{End, Handler, Out, WsSocket, WRITE_HIGH};
use super::wire::push_frame_parts;
use super::{kicked, ConnCtx, Unauthenticated, Upgraded};
use crate::frontend::endpoint::api::{self, Call, Envelope, Outcome};
use crate::frontend::endpoint::frame::{push_parts, FrameError, Inbound, Outbound};
use crate::frontend::CloseCode;
use crate::hub::endpoints::{Family, PushKey};
use crate::hub::{Inbox, Kick, TopicDelivery};
use crate::metrics::{self, AuthPlace};

/// Rounds of socket work per wake-up before the task lets others run.
const BUDGET: usize = 4;
/// Invalid tokens one socket may send before it is closed with 4001: guessing costs a new
/// connection (and a place among the unauthenticated) every few tries.
const MAX_REFUSED_TOKENS: u8 = 3;

struct State {
    ctx: Arc<ConnCtx>,
    id: u64,
    kick: Arc<Kick>,
    /// No token by then: 4000; once an endpoint, silence until then: 4005.
    deadline: Pin<Box<Sleep>>,
    /// When to ping a silent endpoint.
    ping: Pin<Box<Sleep>>,
    idle: Duration,
    /// The endpoint id and its owner, once a token was accepted.
    endpoint: Option<(u64, Arc<str>)>,
    inbox: Inbox,
    deliveries: mpsc::UnboundedReceiver<TopicDelivery>,
    /// Given back once a token is accepted.
    unauthenticated: Option<Unauthenticated>,
    /// Tokens refused on this socket; at [`MAX_REFUSED_TOKENS`] it is closed.
    refused: u8,
}

pub(super) async fn run(ctx: Arc<ConnCtx>, socket: Upgraded) {
    let m = metrics::handles();
    let (id, kick) = ctx.open();
    let (inbox, deliveries) = ctx.topic_inbox(id, &kick);
    let far = Deadline::now() + Duration::from_secs(86_400 * 365);
    let mut io = WsSocket::new(socket.stream, &socket.leftover, &ctx.limits, id);
    let mut st = State {
        unauthenticated: socket.unauthenticated,
        refused: 0,
        id,
        kick,
        deadline: Box::pin(sleep_until(Deadline::now() + ctx.limits.identify_timeout)),
        ping: Box::pin(sleep_until(far)),
        idle: ctx.limits.endpoint_idle_timeout,
        endpoint: None,
        inbox,
        deliveries,
        ctx,
    };
    let welcome = Outbound::Welcome {
        now_ms: crate::hub::now_ms(),
    };
    io.out.reply(OpCode::Text, &welcome.encode());
    tracing::debug!(conn = id, "endpoint socket open");

    let end = poll_fn(|cx| st.poll_io(cx, &mut io)).await;
    let mut sent_close = false;
    if let End::Close(code) = end {
        m.close(code.code());
        tracing::debug!(conn = id, code = code.code(), "endpoint socket closing");
        sent_close = io.close(code).await;
    }
    if let Some((endpoint, _)) = st.endpoint.take() {
        let hub = &st.ctx.hub;
        hub.endpoints().close(endpoint, hub.topics());
        tracing::debug!(conn = id, endpoint, "endpoint unregistered");
    }
    st.ctx.unregister(id);
    if sent_close {
        io.await_close().await;
    }
}

impl State {
    fn poll_io(&mut self, cx: &mut Context<'_>, io: &mut WsSocket) -> Poll<End> {
        if let Poll::Ready(reason) = self.kick.poll_kicked(cx) {
            return Poll::Ready(kicked(reason));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(match self.endpoint {
                None => CloseCode::IdentifyExpected.into(),
                Some(_) => CloseCode::HeartbeatMissed.into(),
            });
        }
        if self.ping.as_mut().poll(cx).is_ready() {
            io.out.reply(OpCode::Ping, b"");
            let at = self.deadline.deadline();
            self.ping.as_mut().reset(at);
        }
        for _ in 0..BUDGET {
            let mut progress = false;
            while io.out.unsent() < WRITE_HIGH {
                let Poll::Ready(Some((key, message))) = self.deliveries.poll_recv(cx) else {
                    break;
                };
                self.inbox.outbox.release(1, message.body.len());
                let key = PushKey(key);
                let parts = push_parts(&message.body, key.family());
                push_frame_parts(io.out.buf(), OpCode::Text, &parts);
                metrics::handles().endpoint_pushes[key.method()].increment(1);
                progress = true;
            }
            match io.poll_round(cx, self) {
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Any message or pong from the client puts both timers back, once it is an endpoint.
    fn alive(&mut self) {
        if self.endpoint.is_some() {
            let now = Deadline::now();
            self.deadline.as_mut().reset(now + self.idle);
            self.ping.as_mut().reset(now + self.idle / 3);
        }
    }

    fn identify(&mut self, token: &str, out: &mut Out) -> Result<(), End> {
        let m = metrics::handles();
        if let Some((id, _)) = &self.endpoint {
            let message = format!("This socket is endpoint {id} already");
            reply(
                out,
                Outbound::Error {
                    message: message.into(),
                },
            );
            return Ok(());
        }
        match self.ctx.auth.endpoint_owner(token) {
            Ok(owner) => {
                let id = self.ctx.hub.endpoints().open(
                    owner.clone(),
                    self.ctx.auth.tenant_of(&owner),
                    self.inbox.clone(),
                );
                tracing::debug!(conn = self.id, endpoint = id, %owner, "endpoint registered");
                m.endpoint_handshakes[0].increment(1);
                self.endpoint = Some((id, owner));
                self.unauthenticated = None;
                self.alive();
                reply(out, Outbound::Endpoint { id });
            }
            Err(e) => {
                m.auth_failed(AuthPlace::Endpoint, &e);
                m.endpoint_handshakes[1].increment(1);
                reply(
                    out,
                    Outbound::Error {
                        message: "Invalid token".into(),
                    },
                );
                self.refused += 1;
                if self.refused >= MAX_REFUSED_TOKENS {
                    return Err(CloseCode::BadToken.into());
                }
            }
        }
        Ok(())
    }
}

impl Handler for State {
    type Wait = Infallible;

    fn on_data(&mut self, data: &[u8], out: &mut Out) -> Result<Option<Infallible>, End> {
        self.alive();
        match Inbound::parse(data) {
            Ok(Inbound::Heartbeat) => {}
            Ok(Inbound::Token(token)) => self.identify(&token, out)?,
            Ok(Inbound::Call(envelope)) => {
                let owner = self.endpoint.as_ref().map(|(_, owner)| owner);
                out.reply(OpCode::Text, &execute(&self.ctx, &envelope, owner));
            }
            Err(FrameError::NotJson(e)) => {
                tracing::debug!(conn = self.id, error = %e, "endpoint message is not JSON");
                return Err(CloseCode::InvalidJson.into());
            }
            Err(e) => reply(
                out,
                Outbound::Error {
                    message: e.to_string().into(),
                },
            ),
        }
        Ok(None)
    }

    fn on_control(&mut self) {
        self.alive();
    }
}

fn reply(out: &mut Out, message: Outbound) {
    out.reply(OpCode::Text, &message.encode());
}

/// Runs a JSON API envelope and returns the reply. The envelope's token authenticates its
/// calls; over the socket, a call without one acts as the socket's endpoint owner.
pub fn execute(ctx: &ConnCtx, envelope: &Envelope, socket_owner: Option<&Arc<str>>) -> Vec<u8> {
    let owner = match (&envelope.token, socket_owner) {
        (Some(token), _) => ctx.auth.endpoint_owner(token).map_err(|e| {
            metrics::handles().auth_failed(AuthPlace::Endpoint, &e);
            "Invalid token".to_owned()
        }),
        (None, Some(owner)) => Ok(owner.clone()),
        (None, None) => Err("Authentication required: send a token".to_owned()),
    };
    let (calls, many) = envelope.calls();
    let m = metrics::handles();
    let outcomes: Vec<Outcome> = calls
        .iter()
        .map(|raw| {
            let (method, resolved) = api::resolve(raw);
            let outcome = match (&owner, resolved) {
                (Err(message), _) => Outcome::Exception(message.clone()),
                (_, Err(message)) => Outcome::Exception(message),
                (Ok(owner), Ok((family, call))) => call_one(ctx, owner, family, call),
            };
            let failed = matches!(outcome, Outcome::Exception(_));
            m.endpoint_calls[method][failed as usize].increment(1);
            outcome
        })
        .collect();
    api::encode_reply(envelope.id.as_ref(), many, &outcomes)
}

/// The name an owner goes by: the user, else the developer, else the static token's id.
fn user_name(owner: &str) -> &str {
    match owner.split_once('/') {
        Some((developer, "")) => developer,
        Some((_, user)) => user,
        None => owner.strip_prefix("token:").unwrap_or(owner),
    }
}

fn call_one(ctx: &ConnCtx, owner: &str, family: Family, call: Call) -> Outcome {
    let hub = &ctx.hub;
    let (endpoints, topics) = (hub.endpoints(), hub.topics());
    let done = match call {
        Call::Register { what, endpoint } => endpoints
            .register(endpoint, owner, what, family, topics)
            .map(|()| Outcome::Void),
        Call::Unregister { what, endpoint } => endpoints
            .unregister(endpoint, owner, what, topics)
            .map(|()| Outcome::Void),
        Call::GetProgress { topic } => endpoints
            .progress(&ctx.auth.tenant_of(owner), topic)
            .map(|state| Outcome::Progress(topic, state)),
        Call::LoggedInUser => Ok(Outcome::User(user_name(owner).to_owned())),
    };
    done.unwrap_or_else(|e| Outcome::Exception(e.to_string()))
}
