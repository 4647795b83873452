//! REPLAY over real sockets: exclusive bounds, replay-then-live with no gap and no duplicate
//! while producers keep going, the consumer cursor (a slow consumer falls behind and catches
//! up from the log; one that reads nothing gets 4009, one behind retention 4010), and
//! retention by count in both durability modes.

mod common;

use common::*;
use sensorgate::config::Durability;
use std::time::Duration;

async fn fill(srv: &TestServer, uid: &str, n: usize) {
    let mut p = srv.producer(uid).await;
    for i in 1..=n {
        p.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
    }
    p.ping().await;
}

async fn seqs(c: &mut Client, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(dispatch(&c.recv().await).0);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_are_exclusive_and_before_is_optional() {
    let srv = TestServer::start().await;
    let mut c = srv.consumer().await;
    fill(&srv, "u", 50).await;
    assert_eq!(seqs(&mut c, 50).await, (1..=50).collect::<Vec<_>>());
    c.send(r#"{"op":7,"d":{"after":28,"before":43}}"#).await;
    assert_eq!(seqs(&mut c, 14).await, (29..=42).collect::<Vec<_>>());
    c.send(r#"{"op":7,"d":{"after":45}}"#).await;
    assert_eq!(seqs(&mut c, 5).await, (46..=50).collect::<Vec<_>>());
    // An empty range sends nothing; the connection carries on.
    c.send(r#"{"op":7,"d":{"after":10,"before":11}}"#).await;
    c.send(r#"{"op":7,"d":{"after":999}}"#).await;
    c.ping().await;
    // Replayed frames are the stored DISPATCH frames, byte for byte.
    c.send(r#"{"op":7,"d":{"after":0,"before":2}}"#).await;
    assert_eq!(
        c.recv().await,
        r#"{"op":5,"d":{"n":1},"uid":"u","seq":1,"t":"STEPS"}"#
    );
    let scrape = srv.metrics().await;
    assert!(
        metric(&scrape, "sensorgate_replay_requests_total") >= 5.0,
        "{scrape}"
    );
    assert!(metric(&scrape, "sensorgate_replay_frames_total") >= 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_and_no_duplicate() {
    let srv = TestServer::start_with(|c| c.replay_chunk = 64).await;
    fill(&srv, "old", 3000).await;
    let mut c = srv.consumer().await;
    // Producers keep submitting while the replay runs.
    let addr = srv.addr;
    let producer = tokio::spawn(async move {
        let t = token(addr, "/auth/user?id=live", DEV, KEY).await;
        let mut p = Client::identified(addr, &t, 0).await;
        for i in 1..=2000 {
            p.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
            if i % 200 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        p.ping().await;
    });
    c.send(r#"{"op":7,"d":{"after":0}}"#).await;
    let mut got = Vec::new();
    while got.len() < 5000 {
        got.push(dispatch(&c.recv().await).0);
    }
    producer.await.unwrap();
    // Whatever came live before the REPLAY was read may repeat once at the front; after the
    // replay began, the sequence is exactly 1..=5000.
    let start = got
        .iter()
        .position(|&s| s == 1)
        .expect("the replay starts at 1");
    let tail: Vec<u64> = got[start..].to_vec();
    let mut all = tail.clone();
    while all.len() < 5000 {
        all.push(dispatch(&c.recv().await).0);
    }
    assert_eq!(all, (1..=5000).collect::<Vec<_>>());
}

/// Sends `n` readings of about 1 KB from one producer; returns once all were taken in.
async fn flood(srv: &TestServer, uid: &str, n: u64) {
    let pad = "x".repeat(1000);
    let mut p = srv.producer(uid).await;
    for i in 1..=n {
        p.submit("STEPS", &format!(r#"{{"n":{i},"p":"{pad}"}}"#))
            .await;
    }
    p.ping().await;
}

/// Reads DISPATCH frames, asserting seq order with no gap, until `until` or a close;
/// returns the last seq and the close code if the server closed.
async fn read_in_order(c: &mut Client, mut last: u64, until: u64) -> (u64, Option<u16>) {
    use tokio_tungstenite::tungstenite::Message;
    while last < until {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut c.ws))
            .await
            .expect("frames keep coming")
        {
            Some(Ok(Message::Text(t))) => {
                let seq = dispatch(&t).0;
                assert_eq!(seq, last + 1, "in order, no gap, no duplicate");
                last = seq;
            }
            Some(Ok(Message::Close(Some(f)))) => return (last, Some(u16::from(f.code))),
            other => panic!("unexpected {other:?}"),
        }
    }
    (last, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_cannot_keep_up_falls_behind_and_catches_up_losing_nothing() {
    let srv = TestServer::start_with(|c| {
        c.consumer_queue_max = 64;
        c.max_consumers_per_developer = 2;
    })
    .await;
    let t = srv.token("/auth/developer").await;
    let mut slow = Client::consumer_small_window(srv.addr, &t).await;
    let mut witness = srv.consumer().await;
    // The consumer reads nothing while ~16 MB go its way: its socket fills, then its
    // 64-frame outbox. The producer is never held back by it: all 16,000 are taken in,
    // and a second consumer that reads sees all of them dispatched.
    flood(&srv, "fast", 16_000).await;
    assert_eq!(read_in_order(&mut witness, 0, 16_000).await, (16_000, None));
    // Then it reads: every reading, in order, the older ones from the log, and then live.
    let (last, closed) = read_in_order(&mut slow, 0, 16_000).await;
    assert_eq!((last, closed), (16_000, None));
    srv.producer("later")
        .await
        .submit("STEPS", r#"{"n":0}"#)
        .await;
    assert_eq!(
        dispatch(&slow.recv().await).0,
        16_001,
        "back on live delivery"
    );
    // (It was never closed: `read_in_order` would have returned the close.)
    let scrape = srv.metrics().await;
    assert!(
        metric(&scrape, "sensorgate_consumer_lags_total") >= 1.0,
        "the consumer fell behind: {scrape}"
    );
    assert!(metric(&scrape, "sensorgate_catchup_frames_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_reads_nothing_gets_4009_after_the_stall_timeout_and_loses_nothing() {
    let srv = TestServer::start_with(|c| c.consumer_stall_timeout_ms = 500).await;
    let t = srv.token("/auth/developer").await;
    let mut deaf = Client::consumer_small_window(srv.addr, &t).await;
    let mut bystander = srv.producer("bystander").await;
    flood(&srv, "fast", 8000).await;
    // Well past the stall timeout without reading a byte.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    bystander.ping().await;
    let (last, closed) = read_in_order(&mut deaf, 0, 8000).await;
    assert_eq!(closed, Some(4009));
    assert!(last < 8000, "it was closed before getting everything");
    // It reconnects and REPLAYs from where it was: nothing is lost.
    let mut again = srv.consumer().await;
    again
        .send(&format!(r#"{{"op":7,"d":{{"after":{last}}}}}"#))
        .await;
    assert_eq!(read_in_order(&mut again, last, 8000).await, (8000, None));
    let scrape = srv.metrics().await;
    assert!(
        metric(&scrape, "sensorgate_slow_consumer_closes_total") >= 1.0,
        "{scrape}"
    );
    assert!(metric(&scrape, r#"sensorgate_close_codes_total{code="4009"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_falls_behind_retention_gets_4010() {
    let srv = TestServer::start_with(|c| {
        c.consumer_queue_max = 64;
        c.max_consumers_per_developer = 2;
        c.retention_max_per_stream = 100;
        c.commit_batch_max = 10;
    })
    .await;
    let t = srv.token("/auth/developer").await;
    let mut slow = Client::consumer_small_window(srv.addr, &t).await;
    flood(&srv, "fast", 8000).await;
    wait_for_retention(&srv, 8000).await;
    // What it is sent is in order, but readings it was owed are gone: 4010, not a gap.
    let (last, closed) = read_in_order(&mut slow, 0, 8000).await;
    assert_eq!(closed, Some(4010), "last seq {last}");
    let scrape = srv.metrics().await;
    assert!(metric(&scrape, r#"sensorgate_close_codes_total{code="4010"}"#) >= 1.0);
}

/// Waits (bounded) for a retention pass to remove seq 1 of a stream whose newest reading is
/// `newest`. Retention runs every 10 s. Asks with two REPLAYs, answered in order: seq 1 if
/// it is still there, then `newest`, which always is. (The metric is shared by every server
/// in this test process, so it cannot tell.)
async fn wait_for_retention(srv: &TestServer, newest: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let mut probe = srv.consumer().await;
    // Live readings still on their way first: nothing may come between the two answers.
    while let Ok(Some(_)) = tokio::time::timeout(
        Duration::from_millis(300),
        futures_util::StreamExt::next(&mut probe.ws),
    )
    .await
    {}
    loop {
        probe.send(r#"{"op":7,"d":{"after":0,"before":2}}"#).await;
        probe
            .send(&format!(
                r#"{{"op":7,"d":{{"after":{},"before":{}}}}}"#,
                newest - 1,
                newest + 1
            ))
            .await;
        if dispatch(&probe.recv().await).0 == newest {
            return;
        }
        assert_eq!(dispatch(&probe.recv().await).0, newest);
        assert!(std::time::Instant::now() < deadline, "no retention pass");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// 500 readings in commits of 10 with a limit of 100: after a pass, whole commits go, so
/// at least the newest 100 stay, the oldest are gone, and what stays is contiguous.
async fn retention_by_count_keeps_the_newest(durability: Durability) {
    let srv = TestServer::start_with(|c| {
        c.durability = durability;
        c.retention_max_per_stream = 100;
        c.commit_batch_max = 10;
    })
    .await;
    fill(&srv, "u", 500).await;
    wait_for_retention(&srv, 500).await;
    let mut c = srv.consumer().await;
    c.send(r#"{"op":7,"d":{"after":0}}"#).await;
    let first = dispatch(&c.recv().await).0;
    assert!(first > 1 && first <= 401, "first retained seq {first}");
    for want in first + 1..=500 {
        assert_eq!(dispatch(&c.recv().await).0, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_in_strict_mode_keeps_the_newest() {
    retention_by_count_keeps_the_newest(Durability::Strict).await;
}

/// Fast durability reserves seqs a block (65,536) ahead: retention by count must count from
/// the readings stored, or one pass removes the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_in_fast_mode_keeps_the_newest() {
    retention_by_count_keeps_the_newest(Durability::Fast).await;
}
