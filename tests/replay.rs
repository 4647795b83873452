//! REPLAY over real sockets: exclusive bounds, replay-then-live with no gap and no duplicate
//! while producers keep going, and the slow-consumer policy (4009, then nothing lost).

mod common;

use common::*;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_cannot_keep_up_gets_4009_and_loses_nothing() {
    let srv = TestServer::start_with(|c| c.consumer_queue_max = 64).await;
    let mut slow = srv.consumer().await;
    let mut bystander = srv.producer("bystander").await;
    // The slow consumer does not read while ~8 MB go its way: socket buffers fill, then its
    // bounded queue.
    let pad = "x".repeat(1000);
    let mut p = srv.producer("fast").await;
    for i in 1..=8000 {
        p.submit("STEPS", &format!(r#"{{"n":{i},"p":"{pad}"}}"#))
            .await;
    }
    p.ping().await;
    let mut last = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut slow.ws))
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let seq = dispatch(&t).0;
                assert_eq!(seq, last + 1, "in order, no gap");
                last = seq;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                break u16::from(f.code)
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 4009);
    assert!(last < 8000, "it was closed before getting everything");
    bystander.ping().await;
    // It reconnects and REPLAYs from where it was: nothing is lost.
    let mut again = srv.consumer().await;
    again
        .send(&format!(r#"{{"op":7,"d":{{"after":{last}}}}}"#))
        .await;
    for want in last + 1..=8000 {
        assert_eq!(dispatch(&again.recv().await).0, want);
    }
    let scrape = srv.metrics().await;
    assert!(
        metric(&scrape, "sensorgate_slow_consumer_closes_total") >= 1.0,
        "{scrape}"
    );
    assert!(metric(&scrape, r#"sensorgate_close_codes_total{code="4009"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_keeps_the_newest() {
    let srv = TestServer::start_with(|c| {
        c.retention_max_per_stream = 100;
        c.commit_batch_max = 10;
    })
    .await;
    fill(&srv, "u", 500).await;
    // Retention runs every 10 s; wait for one pass (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    loop {
        let scrape = srv.metrics().await;
        if metric(&scrape, "sensorgate_retention_removed_readings_total") > 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no retention pass");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Whole batches go, so at least the newest 100 stay and the oldest are gone.
    let mut c = srv.consumer().await;
    c.send(r#"{"op":7,"d":{"after":0}}"#).await;
    let first = dispatch(&c.recv().await).0;
    assert!(first > 1 && first <= 401, "first retained seq {first}");
}
