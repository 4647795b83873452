//! The durable mark, tried the way a crash would: with every disk write and sync slowed by
//! 150 ms (strace), a consumer that REPLAYs in a loop while readings stream in must never be
//! handed a reading that a kill -9 then takes back or gives to another seq.

mod common;

use common::*;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// Every frame a client was sent, by seq; a seq sent twice must carry the same frame.
fn record(seen: &mut BTreeMap<u64, String>, text: &str) -> u64 {
    let seq = dispatch(text).0;
    let frame = seen.entry(seq).or_insert_with(|| text.to_owned());
    assert_eq!(
        frame, text,
        "seq {seq} was sent with two different readings"
    );
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_readers_never_pass_the_durable_mark_even_with_a_slow_disk() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(
        dir.path(),
        port,
        "durability = \"strict\"\nmax_consumers_per_developer = 2",
    );
    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut live =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let mut replayer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let producer_token = token(addr, "/auth/user?id=p", DEV, KEY).await;
    let slow = SlowDisk::attach(server.child.id()).await;

    let producer = tokio::spawn(async move {
        let mut p = Client::identified(addr, &producer_token, 0).await;
        for i in 0..1_000_000u64 {
            let d = format!(r#"{{"val":{i}}}"#);
            if tokio::time::timeout(Duration::from_secs(2), p.submit("HEART_RATE", &d))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // The newest seq live delivery has brought; a REPLAY that returns more than that is
    // the moment to crash: that reading's group commit may not have synced yet.
    let live_newest = Arc::new(AtomicU64::new(0));
    let ahead = Arc::new(Notify::new());
    let armed = Arc::new(AtomicBool::new(false));
    let newest = live_newest.clone();
    let live_reader = tokio::spawn(async move {
        let mut seen = BTreeMap::new();
        while let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(WAIT, live.ws.next()).await
        {
            newest.fetch_max(record(&mut seen, &t), Ordering::SeqCst);
        }
        seen
    });
    // The replaying consumer asks for everything past what it has, again and again: any
    // reading readable before its commit synced would show up here first.
    let (newest_live, ahead_of_live, trigger) = (live_newest.clone(), ahead.clone(), armed.clone());
    let replay_reader = tokio::spawn(async move {
        let mut seen = BTreeMap::new();
        let mut newest = 0;
        'outer: loop {
            let ask = format!(r#"{{"op":7,"d":{{"after":{newest},"before":1000000000}}}}"#);
            if futures_util::SinkExt::send(&mut replayer.ws, Message::text(ask))
                .await
                .is_err()
            {
                break;
            }
            let until = tokio::time::Instant::now() + Duration::from_millis(30);
            loop {
                match tokio::time::timeout_at(until, replayer.ws.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let seq = record(&mut seen, &t);
                        newest = newest.max(seq);
                        if trigger.load(Ordering::SeqCst)
                            && seq > newest_live.load(Ordering::SeqCst)
                        {
                            ahead_of_live.notify_one();
                        }
                    }
                    Ok(_) => break 'outer,
                }
            }
        }
        seen
    });
    // The crash lands inside a slowed group commit: as soon as a REPLAY runs ahead of live
    // delivery (with the mark in place only the race between two sockets can do that), or
    // after a few commits at the latest.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    armed.store(true, Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_millis(2500), ahead.notified()).await;
    server.kill9();
    drop(slow);
    let mut seen = live_reader.await.unwrap();
    let replayed = replay_reader.await.unwrap();
    for (seq, frame) in replayed {
        let kept = seen.entry(seq).or_insert_with(|| frame.clone());
        assert_eq!(*kept, frame, "seq {seq} differs between live and REPLAY");
    }
    let _ = producer.await;
    assert!(
        seen.len() > 10,
        "readings flowed before the kill ({})",
        seen.len()
    );

    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut c = Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let newest = *seen.keys().last().unwrap();
    c.send(&format!(
        r#"{{"op":7,"d":{{"after":0,"before":{}}}}}"#,
        newest + 1
    ))
    .await;
    let mut after_restart = BTreeMap::new();
    while after_restart.len() < seen.len() {
        match tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                after_restart.insert(dispatch(&t).0, t.to_string());
            }
            _ => break,
        }
    }
    for (seq, frame) in &seen {
        assert_eq!(
            after_restart.get(seq),
            Some(frame),
            "seq {seq}, which a client was sent, must replay unchanged after kill -9"
        );
    }
    server.signal("TERM");
}
