//! Flow control on live STOMP topics, which keep no log: a subscriber whose queue is full
//! holds its publishers back (a STOMP SEND is not read further, `POST /api/publish` does not
//! answer) instead of being cut; only one that stays full past `stomp_publish_wait_ms` is
//! cut with its ERROR and 4009.

mod common;

use common::stomp::{header, Stomp};
use common::*;
use std::time::Duration;

const TOPIC: &str = "/topic/burst";
const MESSAGES: usize = 2000;

/// A subscriber that can stop reading: its socket fills after a few hundred KB.
async fn deaf_subscriber(srv: &TestServer) -> Stomp {
    let ws = connect_small_window(&format!("ws://{}/stomp/websocket", srv.addr)).await;
    let mut s = Stomp {
        ws,
        chosen: None,
        pending: Vec::new(),
    };
    s.send("CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0")
        .await;
    assert!(s.frame().await.starts_with("CONNECTED\n"));
    s.subscribe("s", TOPIC).await;
    s
}

/// Sends [`MESSAGES`] SENDs of about 8 KB (16 MB in all, more than loopback's socket
/// buffers hold), the last with a receipt, from its own task.
fn publish_burst(mut p: Stomp) -> tokio::task::JoinHandle<Stomp> {
    tokio::spawn(async move {
        let pad = "x".repeat(8000);
        for i in 1..=MESSAGES {
            let receipt = if i == MESSAGES { "receipt:done\n" } else { "" };
            p.send(&format!(
                "SEND\ndestination:{TOPIC}\n{receipt}\n{{\"n\":{i},\"p\":\"{pad}\"}}\0"
            ))
            .await;
        }
        p
    })
}

/// A server whose live-topic inboxes hold 16 messages or 32 KiB, with a publish wait of
/// `wait_ms`.
async fn server(wait_ms: u64) -> TestServer {
    TestServer::start_with(|c| {
        c.consumer_queue_max = 16;
        c.stomp_max_pending_bytes = 32 << 10;
        c.stomp_publish_wait_ms = wait_ms;
    })
    .await
}

/// Connects a STOMP 1.2 client without heart-beats.
async fn client(srv: &TestServer) -> Stomp {
    Stomp::connected(srv, "accept-version:1.2\nheart-beat:0,0\n")
        .await
        .0
}

/// A STOMP 1.2 client without heart-beats that may SEND to `/topic/…` (a developer's).
async fn publisher(srv: &TestServer) -> Stomp {
    let token = srv.token("/auth/developer").await;
    let headers = format!("accept-version:1.2\nheart-beat:0,0\npasscode:{token}\n");
    Stomp::connected(srv, &headers).await.0
}

fn n_of(message: &str) -> usize {
    let body = message.split_once("\n\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["n"].as_u64().unwrap() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subscriber_holds_publishers_back_and_is_not_cut() {
    let srv = server(60_000).await;
    let mut sub = deaf_subscriber(&srv).await;
    let publisher = publish_burst(publisher(&srv).await);
    // The subscriber reads nothing for a while; then it reads every message, in order.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for want in 1..=MESSAGES {
        let m = sub.frame().await;
        assert!(m.starts_with("MESSAGE\n"), "{}", &m[..m.len().min(120)]);
        assert_eq!(n_of(&m), want, "in order, none lost");
    }
    // The publisher's last SEND is receipted once it is queued for everyone.
    let mut p = publisher.await.unwrap();
    assert_eq!(p.frame().await, "RECEIPT\nreceipt-id:done\n\n");
    let scrape = srv.metrics().await;
    assert!(
        metric(&scrape, "sensorgate_topic_publish_waits_total") >= 1.0,
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_full_past_the_wait_is_cut_and_the_publisher_goes_on() {
    let srv = server(200).await;
    let mut deaf = deaf_subscriber(&srv).await;
    let mut reader = client(&srv).await;
    reader.subscribe("r", TOPIC).await;
    let publisher = publish_burst(publisher(&srv).await);
    // The deaf one reads nothing until well past the wait, then finds what fit, in order,
    // then its ERROR and 4009.
    let deaf = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut last = 0;
        let error = loop {
            let f = deaf.frame().await;
            if !f.starts_with("MESSAGE\n") {
                break f;
            }
            assert_eq!(n_of(&f), last + 1);
            last += 1;
        };
        (last, error, deaf.close_code().await)
    });
    // A subscriber that reads gets everything, before and after the deaf one is cut.
    for want in 1..=MESSAGES {
        assert_eq!(n_of(&reader.frame().await), want);
    }
    let mut p = publisher.await.unwrap();
    assert_eq!(p.frame().await, "RECEIPT\nreceipt-id:done\n\n");
    let (last, error, code) = deaf.await.unwrap();
    assert!(error.starts_with("ERROR\n"), "{error}");
    assert!(
        header(&error, "message").unwrap().contains("too slow"),
        "{error}"
    );
    assert_eq!(code, 4009);
    assert!(last < MESSAGES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_answers_once_a_full_subscriber_made_room() {
    let srv = TestServer::start_with(|c| {
        c.consumer_queue_max = 4;
        c.stomp_max_pending_bytes = 8 << 10;
        c.stomp_publish_wait_ms = 60_000;
    })
    .await;
    let mut sub = deaf_subscriber(&srv).await;
    let pad = "x".repeat(1000);
    let batch: Vec<String> = (1..=64)
        .map(|n| format!(r#"{{"destination":"{TOPIC}","data":{{"n":{n},"p":"{pad}"}}}}"#))
        .collect();
    let body = format!(r#"{{"messages":[{}]}}"#, batch.join(","));
    let addr = srv.addr;
    let post = tokio::spawn(async move {
        http_with_body(
            addr,
            "POST",
            "/api/publish",
            &[("dev-id", DEV), ("x-api-key", KEY)],
            &body,
        )
        .await
    });
    for want in 1..=64 {
        assert_eq!(n_of(&sub.frame().await), want);
    }
    let (status, _) = post.await.unwrap();
    assert_eq!(status, 200);
}
