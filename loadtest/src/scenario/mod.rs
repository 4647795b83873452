//! What the scenarios share: opening many identified connections with
//! bounded concurrency (minting one token per connection), and `LiveConn`,
//! a connection that mostly listens: a reader task feeding a callback plus a
//! writer task that heartbeats and forwards control frames.

pub mod connections;
pub mod relay;
pub mod replay;
pub mod stomp;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{timeout, timeout_at, Instant, MissedTickBehavior};

use crate::creds::Developer;
use crate::ctx::Ctx;
use crate::frames::ClientKind;
use crate::http::HttpClient;
use crate::stats::end_key;
use crate::target::Target;
use crate::ws::{self, Buffers, Flow, ReadEnd, Session, SetupError, Stage, WsWrite};

/// Buffers of connections that only send control frames.
pub const CONTROL_BUFFERS: Buffers = Buffers {
    write: 512,
    send: None,
};

/// One connection to set up.
#[derive(Clone)]
pub struct Job {
    pub dev: Developer,
    pub kind: ClientKind,
    /// The user id, for producers.
    pub uid: Option<String>,
}

/// The outcome of setting up one connection.
pub type SetupResult = Result<Session, SetupError>;

/// Locks a mutex, ignoring poisoning (a panicked task already fails the run).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sets up every job with at most `concurrency` in flight, each worker
/// reusing one keep-alive HTTP connection for tokens, and hands each result
/// to `on_result(index, result)` as soon as it is known.
pub async fn connect_many<F>(
    ctx: &Ctx,
    jobs: Vec<Job>,
    concurrency: usize,
    buffers: Buffers,
    on_result: F,
) where
    F: Fn(usize, Result<Session, SetupError>) + Send + Sync + 'static,
{
    let jobs = Arc::new(jobs);
    let next = Arc::new(AtomicUsize::new(0));
    let on_result = Arc::new(on_result);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.clamp(1, jobs.len().max(1)) {
        let (jobs, next, on_result) = (jobs.clone(), next.clone(), on_result.clone());
        let target = ctx.target.clone();
        let (deadline, stop) = (ctx.deadline, ctx.stop.clone());
        workers.spawn(async move {
            let mut http = HttpClient::new(target.clone());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let result = if stop.is_set() || Instant::now() >= deadline {
                    Err(SetupError::new(Stage::Connect, "run stopped before setup"))
                } else {
                    timeout_at(deadline, setup(&mut http, &target, job, buffers))
                        .await
                        .unwrap_or_else(|_| {
                            Err(SetupError::new(Stage::Connect, "hard timeout reached"))
                        })
                };
                on_result(i, result);
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// [`connect_many`], collecting the results in job order.
pub async fn connect_all(
    ctx: &Ctx,
    jobs: Vec<Job>,
    concurrency: usize,
    buffers: Buffers,
) -> Vec<SetupResult> {
    let slots: Arc<Mutex<Vec<Option<SetupResult>>>> =
        Arc::new(Mutex::new((0..jobs.len()).map(|_| None).collect()));
    let sink = slots.clone();
    connect_many(ctx, jobs, concurrency, buffers, move |i, r| {
        lock(&sink)[i] = Some(r);
    })
    .await;
    let results = std::mem::take(&mut *lock(&slots));
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(SetupError::new(Stage::Connect, "not attempted"))))
        .collect()
}

async fn setup(
    http: &mut HttpClient,
    target: &Target,
    job: &Job,
    buffers: Buffers,
) -> Result<Session, SetupError> {
    let token = match (job.kind, &job.uid) {
        (ClientKind::Producer, Some(uid)) => http.user_token(&job.dev, uid).await,
        _ => http.developer_token(&job.dev).await,
    }
    .map_err(|e| SetupError::new(Stage::Token, format!("{e:#}")))?;
    ws::open(target, &token, job.kind, buffers).await
}

/// Control messages for a [`LiveConn`]'s writer task.
enum Control {
    Send(Vec<u8>),
    Close,
}

/// How a [`LiveConn`] ended.
pub struct Ended {
    /// Close code (or other end) the server initiated, if it did.
    pub server_close: Option<String>,
    /// False if the reader had to be aborted (no close reply in time).
    pub reader_ended: bool,
}

/// A connection whose reader task feeds `on_text` with the shared state and
/// whose writer task heartbeats at [`Session::heartbeat_period`].
pub struct LiveConn<S> {
    pub state: Arc<Mutex<S>>,
    reader: JoinHandle<(ReadEnd, bool)>,
    writer: JoinHandle<()>,
    ctl: mpsc::UnboundedSender<Control>,
}

impl<S: Send + 'static> LiveConn<S> {
    pub fn spawn<F>(session: Session, state: S, mut on_text: F) -> Self
    where
        F: FnMut(&mut S, &[u8]) -> Flow + Send + 'static,
    {
        let period = session.heartbeat_period();
        let Session {
            mut read, write, ..
        } = session;
        let state = Arc::new(Mutex::new(state));
        let closing = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn({
            let (state, closing) = (state.clone(), closing.clone());
            async move {
                let end = ws::read_loop(&mut read, |text| on_text(&mut lock(&state), text)).await;
                (end, closing.load(Ordering::SeqCst))
            }
        });
        let (ctl, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_task(write, period, rx, closing));
        Self {
            state,
            reader,
            writer,
            ctl,
        }
    }

    /// Queues a text frame; false if the writer is gone.
    pub fn send(&self, text: Vec<u8>) -> bool {
        self.ctl.send(Control::Send(text)).is_ok()
    }

    /// Whether the reader has ended (server closed, error, or callback stop).
    pub fn is_finished(&self) -> bool {
        self.reader.is_finished()
    }

    /// Asks the writer to send a close frame.
    pub fn begin_close(&self) {
        let _ = self.ctl.send(Control::Close);
    }

    /// Closes (if not yet), waits for the reader until `deadline`, and
    /// aborts whatever is still running then.
    pub async fn finish(self, deadline: Instant) -> Ended {
        self.begin_close();
        let mut reader = self.reader;
        let ended = match timeout_at(deadline, &mut reader).await {
            Ok(Ok((end, we_closed))) => Ended {
                server_close: end_key(&end, we_closed),
                reader_ended: true,
            },
            Ok(Err(e)) => Ended {
                server_close: Some(format!("reader task failed: {e}")),
                reader_ended: true,
            },
            Err(_) => {
                reader.abort();
                Ended {
                    server_close: None,
                    reader_ended: false,
                }
            }
        };
        let mut writer = self.writer;
        if timeout_at(deadline, &mut writer).await.is_err() {
            writer.abort();
        }
        ended
    }
}

async fn writer_task(
    mut write: WsWrite,
    period: Duration,
    mut rx: mpsc::UnboundedReceiver<Control>,
    closing: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Both branches are cancel-safe; writes happen in the branch bodies.
        tokio::select! {
            _ = tick.tick() => {
                if ws::heartbeat(&mut write).await.is_err() {
                    return;
                }
            }
            msg = rx.recv() => match msg {
                Some(Control::Send(mut text)) => {
                    if ws::send_now(&mut write, &mut text).await.is_err() {
                        return;
                    }
                }
                Some(Control::Close) | None => {
                    closing.store(true, Ordering::SeqCst);
                    let _ = timeout(Duration::from_secs(5), ws::close(&mut write)).await;
                    return;
                }
            },
        }
    }
}
