//! The opcode protocol's connection: reads messages, asks [`Session`] what they mean, and
//! carries the step out against auth and the hub. Every way it can end maps to one
//! [`CloseCode`], counted and logged here.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as Deadline};
use tokio_util::sync::CancellationToken;

use super::wire::{Message, MessageReader, ReadError};
use super::writer::{Ctl, Exit, Writer};
use super::{ConnCtx, CLOSE_TIMEOUT, CONTROL_QUEUE};
use crate::auth::{Principal, Role};
use crate::frontend::opcode::{dispatch_template, Inbound, Outbound, Session, Step};
use crate::frontend::CloseCode;
use crate::hub::{HubError, Kick, KickReason, Publish, StreamHandle, Subscriber};
use crate::metrics::{self, op_in, op_out, ConnRole};

type ReadHalf = tokio::io::Chain<std::io::Cursor<Bytes>, tokio::net::tcp::OwnedReadHalf>;

/// How the reader's loop ended.
enum End {
    /// Close with this code.
    Close(CloseCode),
    /// The peer is gone, or the writer already closed: nothing more to send.
    Gone,
}

impl From<CloseCode> for End {
    fn from(code: CloseCode) -> Self {
        End::Close(code)
    }
}

struct Conn {
    ctx: Arc<ConnCtx>,
    id: u64,
    kick: Arc<Kick>,
    ctl: mpsc::Sender<Ctl>,
    session: Session,
    principal: Option<Principal>,
    stream: Option<StreamHandle>,
    role_gauge: ConnRole,
    /// SUBMITs in the current one-second window, for `submit_rate_per_s`.
    window: (Instant, u32),
}

pub(super) async fn run(ctx: Arc<ConnCtx>, stream: TcpStream, leftover: Bytes) {
    let m = metrics::handles();
    m.connections_opened.increment(1);
    let peer = stream.peer_addr().ok();
    let (read, write) = stream.into_split();
    let read: ReadHalf = std::io::Cursor::new(leftover).chain(read);
    // fastwebsockets pairs a read half with a write half; the write side here is our own
    // batching writer, so its half gets a sink.
    let (ws, _) = fastwebsockets::after_handshake_split(
        read,
        tokio::io::sink(),
        fastwebsockets::Role::Server,
    );
    let mut reader = MessageReader::new(ws, ctx.limits.max_frame_bytes);

    let (ctl, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let writer_done = CancellationToken::new();
    let mut writer =
        tokio::spawn(Writer::new(write, ctl_rx, ctx.limits.replay_chunk).run(writer_done.clone()));
    let hello = Outbound::Hello {
        heartbeat_interval: ctx.limits.heartbeat_interval_ms,
    };
    let _ = ctl.try_send(Ctl::Text(hello.encode().into()));
    m.frames_out[op_out::HELLO].increment(1);

    let mut conn = Conn {
        id: ctx.next_id(),
        kick: Kick::new(ctx.shutdown.token().child_token()),
        ctl,
        session: Session::new(),
        principal: None,
        stream: None,
        role_gauge: ConnRole::Pending,
        window: (Instant::now(), 0),
        ctx,
    };
    m.connections[ConnRole::Pending as usize].increment(1.0);
    tracing::debug!(conn = conn.id, ?peer, "connected");

    let end = conn.read_loop(&mut reader, &writer_done).await;
    if let End::Close(code) = end {
        m.close(code.code());
        m.frames_out[op_out::CLOSE].increment(1);
        match code {
            CloseCode::Normal | CloseCode::GoingAway => {
                tracing::debug!(conn = conn.id, code = code.code(), "closing")
            }
            _ => tracing::info!(
                conn = conn.id,
                code = code.code(),
                reason = code.reason(),
                "closing"
            ),
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.ctl.send(Ctl::Close(code))).await;
    }
    conn.leave().await;
    drop(conn.ctl);
    let exit = match tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await {
        Ok(Ok(exit)) => exit,
        _ => {
            writer.abort();
            Exit::Failed
        }
    };
    // Give the client a moment to answer our close, so it sees a clean close.
    if matches!(exit, Exit::Closed(_)) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while let Ok(msg) = reader.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    m.connections[conn.role_gauge as usize].decrement(1.0);
    tracing::debug!(conn = conn.id, ?exit, "disconnected");
}

impl Conn {
    async fn read_loop(
        &mut self,
        reader: &mut MessageReader<ReadHalf>,
        writer_done: &CancellationToken,
    ) -> End {
        let limits = self.ctx.limits.clone();
        let deadline = sleep_until(Deadline::now() + limits.identify_timeout);
        tokio::pin!(deadline);
        loop {
            // `reader.next()` is not cancel-safe; every other branch ends the connection.
            let msg = tokio::select! {
                msg = reader.next() => msg,
                _ = &mut deadline => {
                    return match self.session.role() {
                        None => CloseCode::IdentifyExpected.into(),
                        Some(_) => CloseCode::HeartbeatMissed.into(),
                    };
                }
                _ = self.kick.kicked() => return self.kicked(),
                _ = writer_done.cancelled() => return End::Gone,
            };
            let m = metrics::handles();
            let text = match msg {
                Ok(Message::Text(text) | Message::Binary(text)) => text,
                Ok(Message::Ping(payload)) => {
                    m.frame_in(op_in::CONTROL);
                    if self.ctl.try_send(Ctl::Pong(payload)).is_err() {
                        return CloseCode::RateLimited.into();
                    }
                    continue;
                }
                Ok(Message::Pong) => continue,
                Ok(Message::Close(_)) => {
                    m.frame_in(op_in::CONTROL);
                    return CloseCode::Normal.into();
                }
                Err(ReadError::Closed) => return End::Gone,
                Err(ReadError::TooLarge) => return CloseCode::TooLarge.into(),
                Err(ReadError::InvalidUtf8) => return CloseCode::InvalidJson.into(),
                Err(e @ ReadError::Protocol(_)) => {
                    tracing::debug!(conn = self.id, error = %e, "websocket protocol error");
                    return CloseCode::Protocol.into();
                }
            };
            match self.on_text(&text).await {
                Ok(Some(new_deadline)) => deadline.as_mut().reset(Deadline::now() + new_deadline),
                Ok(None) => {}
                Err(end) => return end,
            }
        }
    }

    /// Handles one text message; returns a new deadline when the message pushes it back.
    async fn on_text(&mut self, text: &[u8]) -> Result<Option<std::time::Duration>, End> {
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
                self.reply(Outbound::HeartbeatAck, op_out::HEARTBEAT_ACK)?;
                Ok(self
                    .session
                    .role()
                    .map(|_| self.ctx.limits.heartbeat_deadline))
            }
            Step::Identify { token, role } => {
                m.frame_in(op_in::IDENTIFY);
                let token = token.ok_or(CloseCode::BadToken)?;
                let principal = self.ctx.auth.redeem(&token, role).map_err(|e| {
                    tracing::info!(conn = self.id, error = %e, "IDENTIFY refused");
                    CloseCode::BadToken
                })?;
                self.identify(principal).await?;
                Ok(Some(self.ctx.limits.heartbeat_deadline))
            }
            Step::Submit { t, d } => {
                m.frame_in(op_in::SUBMIT);
                self.check_rate()?;
                let (Some(p), Some(stream)) = (&self.principal, &self.stream) else {
                    return Err(CloseCode::Internal.into());
                };
                let frame = dispatch_template(&p.user, &t, d);
                match stream
                    .publish(Publish {
                        frame,
                        received: Instant::now(),
                    })
                    .await
                {
                    Ok(()) => Ok(None),
                    Err(HubError::Closed) => Err(CloseCode::GoingAway.into()),
                    Err(e) => {
                        tracing::warn!(conn = self.id, error = %e, "publish failed");
                        Err(CloseCode::Internal.into())
                    }
                }
            }
            Step::Replay { after, before } => {
                m.frame_in(op_in::REPLAY);
                self.ctl
                    .try_send(Ctl::Replay { after, before })
                    .map_err(|_| CloseCode::RateLimited)?;
                Ok(None)
            }
        }
    }

    fn reply(&self, frame: Outbound, op: usize) -> Result<(), End> {
        self.ctl
            .try_send(Ctl::Text(frame.encode().into()))
            .map_err(|_| CloseCode::RateLimited)?;
        metrics::handles().frames_out[op].increment(1);
        Ok(())
    }

    fn check_rate(&mut self) -> Result<(), End> {
        let limit = self.ctx.limits.submit_rate_per_s;
        if limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(self.window.0).as_secs() >= 1 {
            self.window = (now, 0);
        }
        self.window.1 += 1;
        if self.window.1 > limit {
            return Err(CloseCode::RateLimited.into());
        }
        Ok(())
    }

    /// Claims the session slot, joins the stream, and sends READY.
    async fn identify(&mut self, principal: Principal) -> Result<(), End> {
        let hub = &self.ctx.hub;
        let stream = hub.stream(&principal.developer).map_err(|e| {
            tracing::error!(conn = self.id, error = %e, "cannot open stream");
            CloseCode::Internal
        })?;
        let gauge = match principal.role {
            Role::User => {
                hub.sessions().claim_user(
                    &principal.developer,
                    &principal.user,
                    self.id,
                    &self.kick,
                );
                self.reply(Outbound::Ready, op_out::READY)?;
                ConnRole::User
            }
            Role::Developer => {
                hub.sessions()
                    .claim_developer(&principal.developer, self.id, &self.kick);
                let (tx, live) = mpsc::unbounded_channel();
                let outbox = hub.outbox();
                let sub = Subscriber {
                    id: self.id,
                    tx,
                    outbox: outbox.clone(),
                    kick: self.kick.clone(),
                };
                let head = stream
                    .subscribe(sub)
                    .await
                    .map_err(|_| CloseCode::GoingAway)?;
                self.reply(Outbound::Ready, op_out::READY)?;
                self.ctl
                    .send(Ctl::Attach {
                        live,
                        outbox,
                        stream: stream.clone(),
                        head,
                    })
                    .await
                    .map_err(|_| End::Gone)?;
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
        self.stream = Some(stream);
        Ok(())
    }

    fn kicked(&self) -> End {
        match self.kick.reason() {
            Some(KickReason::Duplicate) => CloseCode::Duplicate.into(),
            Some(KickReason::TooSlow) => CloseCode::TooSlow.into(),
            Some(KickReason::StoreFailed) => CloseCode::Internal.into(),
            None => CloseCode::GoingAway.into(),
        }
    }

    /// Gives back the session slot and the subscription.
    async fn leave(&mut self) {
        let Some(p) = &self.principal else { return };
        let hub = &self.ctx.hub;
        match p.role {
            Role::User => hub.sessions().release_user(&p.developer, &p.user, self.id),
            Role::Developer => {
                hub.sessions().release_developer(&p.developer, self.id);
                if let Some(stream) = &self.stream {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.unsubscribe(self.id)).await;
                }
            }
        }
        self.stream = None;
    }
}
