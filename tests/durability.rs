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

/// A small tmpfs as a server's data directory, to fill up and then grow.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Self { dir }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Every stored reading, by a fresh consumer's REPLAY `after: 0`.
async fn replay_all(addr: std::net::SocketAddr) -> Vec<String> {
    let t = token(addr, "/auth/developer", DEV, KEY).await;
    let mut c = Client::identified(addr, &t, 1).await;
    c.send(r#"{"op":7,"d":{"after":0}}"#).await;
    let mut replayed = Vec::new();
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(1000), c.ws.next()).await
    {
        replayed.push(t.to_string());
    }
    replayed
}

/// Two runs of DISPATCH frames are the same: the seqs first (a readable message), then
/// every byte.
fn assert_same(got: &[String], want: &[String], when: &str) {
    let seqs = |frames: &[String]| frames.iter().map(|f| dispatch(f).0).collect::<Vec<_>>();
    assert_eq!(
        seqs(got),
        seqs(want),
        "REPLAY returns exactly what was dispatched, {when}"
    );
    assert!(got == want, "the same readings, byte for byte, {when}");
}

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    http(addr, "GET", "/readyz", &[]).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_producers_turns_unready_and_recovers_losing_nothing() {
    let fs = Tmpfs::mount("3m");
    let port = free_port();
    let cfg = write_config(fs.dir.path(), port, "durability = \"strict\"");
    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut consumer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    // The consumer reads all along, so it stays on live delivery: everything it is sent was
    // dispatched, and it is sent everything that was.
    let witness = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(1500), consumer.ws.next()).await
        {
            seen.push(t.to_string());
        }
        seen
    });
    let t = token(addr, "/auth/user?id=p", DEV, KEY).await;
    let mut producer = Client::identified(addr, &t, 0).await;
    let pad = "x".repeat(4000);
    // Far more than fits: the producer is closed with 1011 once the disk is full.
    let mut code = None;
    for i in 0..5000 {
        let frame = format!(r#"{{"op":6,"t":"STEPS","d":{{"i":{i},"p":"{pad}"}}}}"#);
        if futures_util::SinkExt::send(&mut producer.ws, Message::text(frame))
            .await
            .is_err()
        {
            break;
        }
        if let Ok(Some(Ok(Message::Close(Some(f))))) =
            tokio::time::timeout(Duration::from_millis(1), producer.ws.next()).await
        {
            code = Some(u16::from(f.code));
            break;
        }
    }
    let code = match code {
        Some(code) => code,
        None => producer.close_code().await,
    };
    assert_eq!(code, 1011, "a producer on a full disk is closed with 1011");
    assert_eq!(
        readyz(addr).await,
        503,
        "unready while the store cannot write"
    );
    // Everything the consumer was sent, in order.
    let seen = witness.await.unwrap();
    assert!(
        !seen.is_empty(),
        "readings were stored before the disk filled"
    );
    // Room again: the same server probes the disk, turns ready and takes readings again.
    fs.resize("64m");
    let deadline = tokio::time::Instant::now() + WAIT;
    while readyz(addr).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ready again once the disk has room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut consumer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let t = token(addr, "/auth/user?id=r", DEV, KEY).await;
    let mut resumed = Client::identified(addr, &t, 0).await;
    // The owner refuses publishes for a second after a failed commit.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    resumed.submit("STEPS", r#"{"resumed":true}"#).await;
    let after_full = consumer.recv().await;
    let (seq, uid, _, _) = dispatch(&after_full);
    assert_eq!(uid, "r");
    assert!(seq > dispatch(seen.last().unwrap()).0, "no seq reused");
    let mut seen = seen;
    seen.push(after_full);
    drop((consumer, resumed));
    // And a crash then keeps exactly what was dispatched.
    server.kill9();
    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    assert_eq!(readyz(addr).await, 200);
    // No reading whose commit failed comes back as if it had been dispatched, and new
    // readings get seqs above everything seen.
    assert_same(&replay_all(addr).await, &seen, "after the restart");
    let mut consumer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let t = token(addr, "/auth/user?id=q", DEV, KEY).await;
    let mut again = Client::identified(addr, &t, 0).await;
    again.submit("STEPS", r#"{"after":true}"#).await;
    let (seq, uid, _, _) = dispatch(&consumer.recv().await);
    assert_eq!(uid, "q");
    assert!(seq > dispatch(seen.last().unwrap()).0);
    drop(server);
}
