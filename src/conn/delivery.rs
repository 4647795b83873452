//! What a consumer connection owes its client from its developer's stream: a cursor over the
//! stream, framed as DISPATCH on `/connect` or MESSAGE on a STOMP stream topic (each
//! front-end frames a reading through [`Encode`]).
//!
//! Owns the cursor: `next`, the seq the client is owed next. While the cursor is at the head
//! it takes the stream owner's live batches (the fast path: shared frames, no store read).
//! When it cannot keep up — its outbox filled and the owner marked it lagging — or a REPLAY
//! asks for other readings first, it stops taking live batches, gives their room back, and
//! reads the log from `next` in bounded steps until it reaches the durable mark; then it
//! clears the lag flag, reads once more (the owner may have skipped a batch meanwhile) and
//! takes live batches again, skipping what it already sent. In seq order, with no gap and no
//! duplicate, and with no more memory than the outbox bound plus one step.
//!
//! Log reads run off the async workers, one step at a time (see `StreamHandle::read`).
//!
//! Writes frames into the connection's buffer and never touches the socket; must not decide
//! protocol questions (the session does) or read past the durable mark (the stream handle
//! enforces it).

use fastwebsockets::OpCode;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::wire::push_frame;
use crate::frontend::CloseCode;
use crate::hub::{Batch, HubError, Kick, Outbox, StreamHandle, Subscriber};
use crate::log::{Entry, ReadLimit};
use crate::metrics::op_out;

/// How a front-end frames one reading for its client.
pub trait Encode {
    /// Appends the frame of reading `seq` to `out`; `dispatch` is its DISPATCH JSON.
    fn frame(&mut self, out: &mut Vec<u8>, seq: u64, dispatch: &[u8]);
    /// Counts `n` frames sent, in the front-end's own metric.
    fn count(&self, n: u64);
}

/// The opcode protocol's framing: the DISPATCH itself, in a text frame.
pub struct Dispatch;

impl Encode for Dispatch {
    fn frame(&mut self, out: &mut Vec<u8>, _seq: u64, dispatch: &[u8]) {
        push_frame(out, OpCode::Text, dispatch);
    }

    fn count(&self, n: u64) {
        crate::metrics::handles().frames_out[op_out::DISPATCH].increment(n);
    }
}

/// REPLAY requests a consumer may have waiting before it is closed with 4008.
pub const MAX_QUEUED_REPLAYS: usize = 16;

/// Where the frames [`Delivery::poll_send`] wrote came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The owner's live batches: more may be runnable right behind them.
    Live,
    /// The log: a REPLAY or a consumer catching up.
    Log,
}

struct Cursor {
    rx: mpsc::UnboundedReceiver<Arc<Batch>>,
    outbox: Arc<Outbox>,
    stream: StreamHandle,
    /// The next seq owed to the client.
    next: u64,
    /// Reading the log instead of taking live batches.
    behind: bool,
    /// `next` follows what was delivered, so a reading removed below it was owed and lost.
    /// False right after an open REPLAY until its first reading goes out: `after: 0` asks
    /// for whatever is still kept.
    owed: bool,
    /// Catching up on an open REPLAY's behalf (its frames count as replayed).
    replaying: bool,
    /// A live batch written only up to the write bound (a group commit can hold thousands
    /// of readings); the rest goes out next round. Its outbox room is held until then.
    part: Option<Arc<Batch>>,
}

/// A REPLAY waiting its turn.
enum Request {
    /// `after < seq < before`; `after` advances as frames go out. Then the cursor goes on.
    Range { after: u64, before: u64 },
    /// Everything after `after`: moves the cursor there.
    From { after: u64 },
}

#[derive(Default)]
pub struct Delivery {
    cursor: Option<Cursor>,
    requests: VecDeque<Request>,
    entries: Vec<Entry>,
    reading: Option<Read>,
}

/// A log read off the async worker, for readings `after < seq < before`.
struct Read {
    after: u64,
    before: u64,
    task: JoinHandle<(Vec<Entry>, Result<(), HubError>)>,
}

/// Reads `after < seq < before` (within `limit`) into `entries`, off the async worker. A
/// read in flight for other bounds (a REPLAY moved the cursor meanwhile) is abandoned.
fn poll_read(
    reading: &mut Option<Read>,
    entries: &mut Vec<Entry>,
    cx: &mut Context<'_>,
    stream: &StreamHandle,
    (after, before): (u64, u64),
    limit: ReadLimit,
) -> Poll<Result<(), HubError>> {
    if reading
        .as_ref()
        .is_some_and(|r| (r.after, r.before) != (after, before))
    {
        *reading = None;
    }
    let read = reading.get_or_insert_with(|| Read {
        after,
        before,
        task: stream.read(after, before, limit, std::mem::take(entries)),
    });
    let done = ready!(Pin::new(&mut read.task).poll(cx));
    *reading = None;
    Poll::Ready(match done {
        Ok((buf, result)) => {
            *entries = buf;
            result
        }
        Err(e) => Err(HubError::Store(crate::log::LogError::Io(
            std::io::Error::other(e.to_string()),
        ))),
    })
}

impl Delivery {
    /// Joins `stream` as consumer `conn`: its live batches are bounded by `outbox`; the
    /// owner ends it through `kick` only for a newer connection (4002).
    pub async fn join(
        stream: &StreamHandle,
        conn: u64,
        outbox: Arc<Outbox>,
        kick: Arc<Kick>,
    ) -> Result<Self, HubError> {
        let (tx, rx) = mpsc::unbounded_channel();
        outbox.set_lagging(false);
        let sub = Subscriber {
            id: conn,
            tx,
            outbox: outbox.clone(),
            kick,
        };
        let head = stream.subscribe(sub).await?;
        Ok(Self {
            cursor: Some(Cursor {
                rx,
                outbox,
                stream: stream.clone(),
                next: head + 1,
                behind: false,
                owed: true,
                replaying: false,
                part: None,
            }),
            ..Self::default()
        })
    }

    /// Queues a REPLAY of readings with `after < seq < before` (`None`: every reading
    /// after `after`, then live).
    pub fn request_replay(&mut self, after: u64, before: Option<u64>) -> Result<(), CloseCode> {
        if self.cursor.is_none() {
            return Ok(());
        }
        if self.requests.len() >= MAX_QUEUED_REPLAYS {
            return Err(CloseCode::RateLimited);
        }
        crate::metrics::handles().replay_requests.increment(1);
        self.requests.push_back(match before {
            Some(before) => Request::Range { after, before },
            None => Request::From { after },
        });
        Ok(())
    }

    /// Writes what is owed into `out` until it holds about `high` bytes: queued REPLAYs,
    /// then the log up to the mark while behind, then live batches. Ready when it wrote
    /// something (or the connection must close); pending with the task registered for the
    /// next live batch or lag.
    pub fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
        high: usize,
        chunk: usize,
        enc: &mut impl Encode,
    ) -> Poll<Result<Sent, CloseCode>> {
        let Some(c) = &mut self.cursor else {
            return Poll::Pending;
        };
        let limit = ReadLimit {
            entries: chunk.max(1),
            bytes: high.saturating_sub(out.len()),
        };
        loop {
            if !self.requests.is_empty() && !c.behind {
                c.fall_behind();
            }
            if c.behind {
                let served = serve_requests(
                    c,
                    &mut self.requests,
                    &mut self.reading,
                    &mut self.entries,
                    cx,
                    limit,
                );
                if let Some(n) = ready!(served).map_err(read_failed)? {
                    write_entries(&self.entries, out, enc);
                    crate::metrics::handles().replay_frames.increment(n);
                    return Poll::Ready(Ok(Sent::Log));
                }
                if c.owed && c.next < c.stream.first_seq() {
                    return Poll::Ready(Err(CloseCode::BehindRetention));
                }
                let bounds = (c.next - 1, u64::MAX);
                let read = poll_read(
                    &mut self.reading,
                    &mut self.entries,
                    cx,
                    &c.stream,
                    bounds,
                    limit,
                );
                ready!(read).map_err(read_failed)?;
                if c.owed && c.next < c.stream.first_seq() {
                    // Retention took what was owed while it was being read (JetStream
                    // learns its first seq from the read itself).
                    return Poll::Ready(Err(CloseCode::BehindRetention));
                }
                if let Some(last) = self.entries.last() {
                    c.next = last.seq + 1;
                    c.owed = true;
                    let n = write_entries(&self.entries, out, enc);
                    let m = crate::metrics::handles();
                    if c.replaying {
                        m.replay_frames.increment(n);
                    } else {
                        m.catchup_frames.increment(n);
                    }
                    return Poll::Ready(Ok(Sent::Log));
                }
                // At the mark. Rejoin live, then read once more: a batch the owner skipped
                // between that read and clearing the flag is in the log by now.
                if c.outbox.is_lagging() {
                    c.outbox.set_lagging(false);
                    continue;
                }
                c.behind = false;
                c.replaying = false;
            }
            let mut sent = 0u64;
            while out.len() < high {
                let batch = match c.part.take() {
                    Some(batch) => batch,
                    None => match c.rx.poll_recv(cx) {
                        Poll::Ready(Some(batch)) => batch,
                        Poll::Ready(None) => return Poll::Ready(Err(CloseCode::GoingAway)),
                        Poll::Pending => break,
                    },
                };
                sent += write_batch(c, batch, out, high, enc);
            }
            if sent > 0 {
                enc.count(sent);
                return Poll::Ready(Ok(Sent::Live));
            }
            if out.len() >= high || !c.outbox.is_lagging() {
                return Poll::Pending;
            }
            // The owner skipped us and everything it did send is written: read the rest.
            c.fall_behind();
        }
    }

    /// Gives back the outbox room of everything still queued, so the hub's accounting of a
    /// closed connection ends at zero.
    pub fn finish(&mut self) {
        if let Some(c) = &mut self.cursor {
            c.rx.close();
            c.drain();
        }
    }
}

impl Cursor {
    /// Stops taking live batches: the owner skips this subscriber from now on, and what it
    /// already queued is given back (the log has it, below the mark).
    fn fall_behind(&mut self) {
        self.outbox.set_lagging(true);
        self.drain();
        self.behind = true;
    }

    fn drain(&mut self) {
        let part = self.part.take();
        for batch in part
            .into_iter()
            .chain(std::iter::from_fn(|| self.rx.try_recv().ok()))
        {
            self.outbox.release(batch.frames.len(), batch.bytes);
        }
    }
}

/// Serves the queued REPLAYs: `Some(n)` when `entries` holds `n` frames of a range to
/// write, `None` once no range has any left (an open REPLAY has moved the cursor).
fn serve_requests(
    c: &mut Cursor,
    requests: &mut VecDeque<Request>,
    reading: &mut Option<Read>,
    entries: &mut Vec<Entry>,
    cx: &mut Context<'_>,
    limit: ReadLimit,
) -> Poll<Result<Option<u64>, HubError>> {
    while let Some(request) = requests.front_mut() {
        match request {
            Request::From { after } => {
                c.next = *after + 1;
                c.owed = false;
                c.replaying = true;
                requests.pop_front();
            }
            Request::Range { after, before } => {
                let read = poll_read(reading, entries, cx, &c.stream, (*after, *before), limit);
                ready!(read)?;
                match entries.last() {
                    Some(last) => {
                        *after = last.seq;
                        return Poll::Ready(Ok(Some(entries.len() as u64)));
                    }
                    None => {
                        requests.pop_front();
                    }
                }
            }
        }
    }
    Poll::Ready(Ok(None))
}

fn read_failed(e: HubError) -> CloseCode {
    tracing::error!(error = %e, "reading the stream failed");
    CloseCode::Internal
}

fn write_entries(entries: &[Entry], out: &mut Vec<u8>, enc: &mut impl Encode) -> u64 {
    for entry in entries {
        enc.frame(out, entry.seq, &entry.frame);
    }
    let n = entries.len() as u64;
    enc.count(n);
    n
}

/// Writes a live batch's frames from the next seq owed (the rest went out from the log)
/// until `out` holds `high` bytes. A batch written to its end gives its outbox room back;
/// one cut short waits in `c.part`. Returns the frames written.
fn write_batch(
    c: &mut Cursor,
    batch: Arc<Batch>,
    out: &mut Vec<u8>,
    high: usize,
    enc: &mut impl Encode,
) -> u64 {
    let mut sent = 0;
    for (seq, frame) in batch.from_seq(c.next) {
        if out.len() >= high {
            break;
        }
        enc.frame(out, seq, frame);
        c.next = seq + 1;
        sent += 1;
    }
    if c.next <= batch.last_seq() {
        c.part = Some(batch);
    } else {
        c.outbox.release(batch.frames.len(), batch.bytes);
    }
    sent
}

#[cfg(test)]
mod tests {
    //! The cursor against a real stream on a real sled directory, polled by hand: the
    //! queues are the hub's, the "socket" is whatever the test drains.
    use super::*;
    use crate::config::{Config, Durability};
    use crate::hub::{Hub, HubConfig, Publish, SeqTemplate};
    use crate::log::SledStore;
    use std::time::{Duration, Instant};

    /// Frames as their seqs (and their bytes in `out`, so write bounds apply).
    #[derive(Default)]
    struct Seqs(Vec<u64>);

    impl Encode for Seqs {
        fn frame(&mut self, out: &mut Vec<u8>, seq: u64, dispatch: &[u8]) {
            out.extend_from_slice(dispatch);
            self.0.push(seq);
        }
        fn count(&self, _n: u64) {}
    }

    struct Fixture {
        hub: Hub,
        stream: StreamHandle,
        published: u64,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store =
                SledStore::open(dir.path(), Durability::Fast, Duration::from_millis(5)).unwrap();
            let mut config = HubConfig::from(&Config::default());
            config.durability = Durability::Fast;
            let hub = Hub::new(Arc::new(store), config);
            let stream = hub.stream("acme").unwrap();
            Self {
                hub,
                stream,
                published: 0,
                _dir: dir,
            }
        }

        /// Publishes `n` readings, one group commit each, and waits until all are dispatched.
        async fn publish(&mut self, n: u64) {
            for _ in 0..n {
                self.burst(1).await;
            }
        }

        /// Publishes `n` readings at once (few commits, large batches), then waits until
        /// all are dispatched.
        async fn burst(&mut self, n: u64) {
            for _ in 0..n {
                let mut buf = Vec::with_capacity(32);
                buf.extend_from_slice(b"{\"seq\":}");
                let publish = Publish {
                    frame: SeqTemplate::new(buf, 7),
                    received: Instant::now(),
                };
                self.stream.publish(publish).await.unwrap();
            }
            self.published += n;
            while self.stream.durable_mark() < self.published {
                tokio::task::yield_now().await;
            }
        }

        /// Stops the stream's owner (it ends once every handle is gone) and the store.
        async fn close(self, delivery: Delivery) {
            drop(delivery);
            drop(self.stream);
            self.hub.close().await.unwrap();
        }

        async fn consumer(&self, max_frames: usize) -> (Delivery, Arc<Outbox>) {
            let outbox = Outbox::new(max_frames, 1 << 20);
            let delivery = Delivery::join(&self.stream, 1, outbox.clone(), Kick::new())
                .await
                .unwrap();
            (delivery, outbox)
        }
    }

    /// Polls until the delivery has nothing more to send; returns where each write came
    /// from and the seqs written.
    fn drain(d: &mut Delivery) -> (Vec<Sent>, Vec<u64>) {
        drain_by(d, 1 << 20, |_| {})
    }

    /// [`drain`] as a socket does it: each round starts from an empty write buffer and may
    /// fill it to `high`; `round` sees what each round wrote.
    fn drain_by(
        d: &mut Delivery,
        high: usize,
        mut round: impl FnMut(&[u8]),
    ) -> (Vec<Sent>, Vec<u64>) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut enc = Seqs::default();
        let mut sources = Vec::new();
        let mut out = Vec::new();
        loop {
            match d.poll_send(&mut cx, &mut out, high, 3, &mut enc) {
                Poll::Ready(Ok(sent)) => sources.push(sent),
                Poll::Ready(Err(code)) => panic!("closed with {code:?}"),
                // A log read on the blocking pool: wait for it.
                Poll::Pending if d.reading.is_some() => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Poll::Pending => return (sources, enc.0),
            }
            round(&out);
            out.clear();
        }
    }

    #[tokio::test]
    async fn a_full_outbox_lags_then_catches_up_from_the_log_and_rejoins_live() {
        let mut f = Fixture::new();
        let (mut d, outbox) = f.consumer(4).await;
        // Ten commits while the consumer takes nothing: four fit, then it lags.
        f.publish(10).await;
        assert!(outbox.is_lagging());
        let (sources, seqs) = drain(&mut d);
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        assert_eq!(sources.first(), Some(&Sent::Live));
        assert!(sources.contains(&Sent::Log));
        // Caught up: the flag is cleared, the outbox empty, and live delivery is back.
        assert!(!outbox.is_lagging());
        assert_eq!(outbox.queued_frames(), 0);
        f.publish(2).await;
        let (sources, seqs) = drain(&mut d);
        assert_eq!(seqs, vec![11, 12]);
        assert!(sources.iter().all(|s| *s == Sent::Live));
        f.close(d).await;
    }

    #[tokio::test]
    async fn a_large_live_batch_goes_out_a_write_bound_at_a_time() {
        let mut f = Fixture::new();
        let (mut d, outbox) = f.consumer(10_000).await;
        f.burst(500).await;
        assert!(!outbox.is_lagging(), "the outbox had room for every batch");
        // A round may pass the bound by one frame, never by a batch.
        let frame = br#"{"seq":}"#.len() + 3;
        let high = 4 * frame;
        let (sources, seqs) = drain_by(&mut d, high, |out| assert!(out.len() < high + frame));
        assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
        assert!(sources.iter().all(|s| *s == Sent::Live));
        assert_eq!(
            outbox.queued_frames(),
            0,
            "room comes back once a batch is written"
        );
        f.close(d).await;
    }

    #[tokio::test]
    async fn a_bounded_replay_goes_first_then_the_cursor_carries_on_where_it_was() {
        let mut f = Fixture::new();
        let (mut d, outbox) = f.consumer(100).await;
        f.publish(5).await;
        assert_eq!(drain(&mut d).1, vec![1, 2, 3, 4, 5]);
        f.publish(2).await;
        // Queued live batches (6, 7) are set aside for the replay and read back after it.
        d.request_replay(1, Some(4)).unwrap();
        let (_, seqs) = drain(&mut d);
        assert_eq!(seqs, vec![2, 3, 6, 7]);
        assert!(!outbox.is_lagging());
        f.publish(1).await;
        assert_eq!(drain(&mut d).1, vec![8]);
        f.close(d).await;
    }

    #[tokio::test]
    async fn an_open_replay_moves_the_cursor_with_no_gap_and_no_duplicate() {
        let mut f = Fixture::new();
        let (mut d, _) = f.consumer(100).await;
        f.publish(6).await;
        d.request_replay(3, None).unwrap();
        // Whatever was queued live is dropped: the cursor now starts after 3.
        assert_eq!(drain(&mut d).1, vec![4, 5, 6]);
        // After the newest: nothing until a reading past it exists.
        d.request_replay(8, None).unwrap();
        assert_eq!(drain(&mut d).1, Vec::<u64>::new());
        f.publish(3).await;
        assert_eq!(drain(&mut d).1, vec![9]);
        f.close(d).await;
    }

    #[tokio::test]
    async fn replays_past_the_limit_are_refused() {
        let f = Fixture::new();
        let (mut d, _) = f.consumer(100).await;
        for _ in 0..MAX_QUEUED_REPLAYS {
            d.request_replay(0, Some(1)).unwrap();
        }
        assert_eq!(d.request_replay(0, Some(1)), Err(CloseCode::RateLimited));
        f.close(d).await;
    }
}
