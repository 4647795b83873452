//! STOMP beyond plain topics, against the real server: seed 002's chat services (online
//! employees, presence, typing, heartbeat ticks) at its own path `/api/v1/chat`, a publisher
//! key on the HTTP API, ACK bookkeeping with its window, and a developer's stream read as
//! `/topic/streams/{id}` with `replay-after`.

mod common;

use common::stomp::{header, Stomp};
use common::*;
use sensorgate::config::PublisherConfig;

const CHAT: &str = "/api/v1/chat";
const CONVERSATION: &str = "/v1/topic/conversation/6b92c178-c22b-4bbb-8dec-8d497660b5bf";
const TYPING: &str = "/v1/app/conversation/6b92c178-c22b-4bbb-8dec-8d497660b5bf/typing";

/// Connects to seed 002's path as 1.2 with the token in the upgrade's Authorization header.
async fn chat_client(srv: &TestServer, token: Option<&str>) -> Stomp {
    let mut c = Stomp::open_at(srv, CHAT, Some("v12.stomp"), token).await;
    assert_eq!(c.chosen.as_deref(), Some("v12.stomp"));
    c.send("CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0")
        .await;
    let f = c.frame().await;
    assert!(f.starts_with("CONNECTED\n"), "{f}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_presence_typing_and_online_employees() {
    let srv = TestServer::start().await;
    let employee = |id: &str| format!("/auth/user?id={id}&employee=true");

    // An anonymous dashboard sees the count, starting with the current value.
    let mut board = chat_client(&srv, None).await;
    board
        .subscribe("online", "/v1/topic/online-employees")
        .await;
    assert_eq!(board.message_body().await, r#"{"online":0}"#);

    let e1 = srv.token(&employee("e-1")).await;
    let mut staff = chat_client(&srv, Some(&e1)).await;
    assert_eq!(board.message_body().await, r#"{"online":1}"#);
    staff
        .subscribe("online", "/v1/topic/online-employees")
        .await;
    assert_eq!(staff.message_body().await, r#"{"online":1}"#);
    staff.subscribe("conv", CONVERSATION).await;
    // Staff are users too: the conversation hears them arrive.
    assert_eq!(
        staff.message_body().await,
        r#"{"userConnected":{"userId":"e-1"}}"#
    );

    // The same employee on a second connection is still one employee; another is two.
    let e1_again = srv.token(&employee("e-1")).await;
    let second = chat_client(&srv, Some(&e1_again)).await;
    let e2 = srv.token(&employee("e-2")).await;
    let other = chat_client(&srv, Some(&e2)).await;
    assert_eq!(board.message_body().await, r#"{"online":2}"#);
    drop(other);
    assert_eq!(board.message_body().await, r#"{"online":1}"#);
    drop(second);
    for n in [2, 1] {
        assert_eq!(staff.message_body().await, format!("{{\"online\":{n}}}"));
    }

    // A customer joins the conversation: the staff side hears it, then typing, then leaving.
    let u = srv
        .token("/auth/user?id=0be8c544-9518-4bce-8519-0eee0356989f")
        .await;
    let mut customer = chat_client(&srv, Some(&u)).await;
    customer.subscribe("conv", CONVERSATION).await;
    let joined = staff.frame().await;
    assert_eq!(
        header(&joined, "destination").as_deref(),
        Some(CONVERSATION)
    );
    assert_eq!(
        header(&joined, "content-type").as_deref(),
        Some("application/json;charset=UTF-8")
    );
    assert_eq!(
        joined.split_once("\n\n").unwrap().1,
        r#"{"userConnected":{"userId":"0be8c544-9518-4bce-8519-0eee0356989f"}}"#
    );
    // The customer also hears its own arrival, as any subscriber of the conversation.
    assert!(customer.message_body().await.contains("userConnected"));
    customer
        .send(&format!("SEND\ndestination:{TYPING}/start\n\n\0"))
        .await;
    assert_eq!(
        staff.message_body().await,
        r#"{"startTyping":{"userId":"0be8c544-9518-4bce-8519-0eee0356989f"}}"#
    );
    customer
        .send(&format!("SEND\ndestination:{TYPING}/stop\n\n\0"))
        .await;
    assert_eq!(
        staff.message_body().await,
        r#"{"stopTyping":{"userId":"0be8c544-9518-4bce-8519-0eee0356989f"}}"#
    );
    drop(customer);
    assert_eq!(
        staff.message_body().await,
        r#"{"userDisconnected":{"userId":"0be8c544-9518-4bce-8519-0eee0356989f"}}"#
    );

    // An application destination no service handles, and typing without a user id.
    let u2 = srv.token("/auth/user?id=u-2").await;
    let mut lost = chat_client(&srv, Some(&u2)).await;
    lost.send("SEND\ndestination:/v1/app/conversation/x/typing/maybe\nreceipt:r\n\n\0")
        .await;
    let e = lost.frame().await;
    assert_eq!(
        header(&e, "message").as_deref(),
        Some("unknown destination: /v1/app/conversation/x/typing/maybe")
    );
    assert_eq!(header(&e, "receipt-id").as_deref(), Some("r"));
    assert_eq!(lost.close_code().await, 1002);
    let mut anonymous = chat_client(&srv, None).await;
    anonymous
        .send(&format!("SEND\ndestination:{TYPING}/start\n\n\0"))
        .await;
    assert_eq!(
        header(&anonymous.frame().await, "message").as_deref(),
        Some(format!("forbidden: SEND to {TYPING}/start").as_str())
    );
    assert_eq!(anonymous.close_code().await, 1002);

    // The employee flag is only for users.
    let (status, _) = http(
        srv.addr,
        "POST",
        "/auth/developer?employee=true",
        &[("dev-id", DEV), ("x-api-key", KEY)],
    )
    .await;
    assert_eq!(status, 400);

    let scrape = srv.metrics().await;
    assert!(
        metric(
            &scrape,
            "sensorgate_topic_messages_total{source=\"service\"}"
        ) >= 8.0
    );
    assert!(
        metric(
            &scrape,
            "sensorgate_stomp_errors_total{reason=\"forbidden\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_ticks_and_a_publisher_key_raises_chat_events() {
    let srv = TestServer::start_with(|c| {
        c.stomp_heartbeat_topic_s = 1;
        c.publishers = vec![PublisherConfig {
            id: "chat-backend".into(),
            api_key: Some("chat-backend-key".into()),
            api_key_sha256: None,
            developer: None,
            // The conversations are the chat backend's: all it may publish to.
            prefixes: Some(vec!["/v1/topic/conversation/".into()]),
        }];
    })
    .await;
    // Anonymous clients read the heart-beat, but not conversations.
    let mut anonymous = chat_client(&srv, None).await;
    anonymous.subscribe("beat", "/v1/topic/heartbeat").await;
    anonymous
        .send(&format!(
            "SUBSCRIBE\nid:c\ndestination:{CONVERSATION}\n\n\0"
        ))
        .await;
    let refused = anonymous.frame().await;
    assert_eq!(
        header(&refused, "message").as_deref(),
        Some(format!("forbidden: SUBSCRIBE to {CONVERSATION}").as_str())
    );

    let customer = srv.token("/auth/user?id=c-1").await;
    let mut c = chat_client(&srv, Some(&customer)).await;
    c.subscribe("beat", "/v1/topic/heartbeat").await;
    let tick = c.message_body().await;
    let ms: u64 = tick
        .strip_prefix("{\"heartbeat\":")
        .and_then(|t| t.strip_suffix('}'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("a heartbeat tick: {tick}"));
    assert!(ms > 1_700_000_000_000, "{ms}");
    c.send_synced("UNSUBSCRIBE\nid:beat\n\n\0", "off").await;

    c.subscribe("conv", CONVERSATION).await;
    assert_eq!(
        c.message_body().await,
        r#"{"userConnected":{"userId":"c-1"}}"#
    );
    let event = r#"{"message":{"userId":"0be8c544-9518-4bce-8519-0eee0356989f","userName":"c1","userRole":"customer","id":"385444d4-e1aa-4edc-a082-17507c781238","created":"2021-07-26T12:05:22Z","message":"Hello"}}"#;
    let body = format!(r#"{{"destination":"{CONVERSATION}","data":{event}}}"#);
    let (status, answer) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer chat-backend-key")],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(c.message_body().await, event);
    let (status, _) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer not-the-key")],
        &body,
    )
    .await;
    assert_eq!(status, 403);
}

/// SEND to `/topic/a`, waiting for the RECEIPT: the message is then in every inbox.
async fn send(publisher: &mut Stomp, body: &str) {
    publisher
        .send_synced(&format!("SEND\ndestination:/topic/a\n\n{body}\0"), body)
        .await;
}

/// SUBSCRIBE with an ack mode, waiting for the RECEIPT.
async fn subscribe_acked(c: &mut Stomp, id: &str, destination: &str, ack: &str) {
    c.send_synced(
        &format!("SUBSCRIBE\nid:{id}\ndestination:{destination}\nack:{ack}\n\n\0"),
        &format!("sub-{id}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_settle_messages_and_a_subscriber_past_its_window_is_closed() {
    let srv = TestServer::start_with(|c| c.stomp_max_unacked = 2).await;
    let mut publisher = Stomp::publisher(&srv, "1.2").await;

    // 1.2, client-individual: the `ack` header names each message.
    let (mut one, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    subscribe_acked(&mut one, "s", "/topic/a", "client-individual").await;
    send(&mut publisher, "m1").await;
    send(&mut publisher, "m2").await;
    let m1 = one.frame().await;
    let ack1 = header(&m1, "ack").expect("an ack header in 1.2");
    assert!(one.frame().await.ends_with("m2"));
    // An ACK inside an aborted transaction settles nothing...
    one.send("BEGIN\ntransaction:t1\n\n\0").await;
    one.send(&format!("ACK\nid:{ack1}\ntransaction:t1\n\n\0"))
        .await;
    one.send_synced("ABORT\ntransaction:t1\n\n\0", "aborted")
        .await;
    // ...one in a committed one does.
    one.send("BEGIN\ntransaction:t2\n\n\0").await;
    one.send(&format!("ACK\nid:{ack1}\ntransaction:t2\n\n\0"))
        .await;
    one.send_synced("COMMIT\ntransaction:t2\n\n\0", "committed")
        .await;
    send(&mut publisher, "m3").await;
    assert!(one.frame().await.ends_with("m3"));
    // m2 and m3 are outstanding: a third is past the window.
    send(&mut publisher, "m4").await;
    let e = one.frame().await;
    assert_eq!(
        header(&e, "message").as_deref(),
        Some("too many unacknowledged messages on subscription s")
    );
    assert_eq!(one.close_code().await, 4009);

    // 1.1, client: an ACK covers its message and every earlier one.
    let (mut cumulative, _) = Stomp::connected(&srv, "accept-version:1.1\n").await;
    subscribe_acked(&mut cumulative, "c", "/topic/a", "client").await;
    send(&mut publisher, "n1").await;
    send(&mut publisher, "n2").await;
    assert!(cumulative.frame().await.ends_with("n1"));
    let n2 = cumulative.frame().await;
    assert_eq!(header(&n2, "ack"), None, "1.1 has no ack header");
    let id = header(&n2, "message-id").unwrap();
    cumulative
        .send_synced(
            &format!("ACK\nmessage-id:{id}\nsubscription:c\n\n\0"),
            "acked",
        )
        .await;
    send(&mut publisher, "n3").await;
    send(&mut publisher, "n4").await;
    assert!(cumulative.frame().await.ends_with("n3"));
    let n4 = cumulative.frame().await;
    // An unknown id changes nothing; NACK settles like ACK (live topics do not redeliver).
    cumulative
        .send_synced("NACK\nmessage-id:999999\nsubscription:c\n\n\0", "unknown")
        .await;
    let id = header(&n4, "message-id").unwrap();
    cumulative
        .send_synced(
            &format!("NACK\nmessage-id:{id}\nsubscription:c\n\n\0"),
            "nacked",
        )
        .await;
    send(&mut publisher, "n5").await;
    send(&mut publisher, "n6").await;
    assert!(cumulative.frame().await.ends_with("n5"));
    assert!(cumulative.frame().await.ends_with("n6"));
    let scrape = srv.metrics().await;
    assert_eq!(
        metric(&scrape, "sensorgate_stomp_errors_total{reason=\"unacked\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_reads_its_stream_as_a_topic_with_replay_after() {
    let srv = TestServer::start().await;
    let mut producer = srv.producer("u-1").await;
    for i in 1..=5 {
        producer
            .submit("HEART_RATE", &format!("{{\"bpm\":{}}}", 60 + i))
            .await;
    }
    // Its pong comes after all five were taken in.
    producer.ping().await;

    let dev = srv.token("/auth/developer").await;
    let (mut c, _) = Stomp::connected(&srv, &format!("accept-version:1.2\npasscode:{dev}\n")).await;
    c.send_synced(
        "SUBSCRIBE\nid:mine\ndestination:/topic/streams/acme\nreplay-after:2\n\n\0",
        "sub",
    )
    .await;
    for seq in 3..=5u64 {
        let m = c.frame().await;
        assert_eq!(header(&m, "seq"), Some(seq.to_string()));
        assert_eq!(header(&m, "message-id"), Some(seq.to_string()));
        assert_eq!(header(&m, "subscription").as_deref(), Some("mine"));
        assert_eq!(
            header(&m, "destination").as_deref(),
            Some("/topic/streams/acme")
        );
        let (s, uid, t, _) = dispatch(m.split_once("\n\n").unwrap().1);
        assert_eq!((s, uid.as_str(), t.as_str()), (seq, "u-1", "HEART_RATE"));
    }
    // Then live, with no gap.
    producer.submit("HEART_RATE", "{\"bpm\":99}").await;
    let live = c.frame().await;
    assert_eq!(header(&live, "seq").as_deref(), Some("6"));

    // Somebody else's stream, a second subscription, writing to a stream, a replay on a
    // plain topic, and ack:client on a stream: each an ERROR, then close.
    let other = token(srv.addr, "/auth/developer", DEV2, KEY2).await;
    let cases = [
        (
            format!("passcode:{other}\n"),
            "SUBSCRIBE\nid:x\ndestination:/topic/streams/acme\n\n\0",
            "forbidden: SUBSCRIBE to /topic/streams/acme needs that developer's token",
        ),
        (
            String::new(),
            "SUBSCRIBE\nid:x\ndestination:/topic/streams/acme\n\n\0",
            "forbidden: SUBSCRIBE to /topic/streams/acme needs that developer's token",
        ),
        (
            String::new(),
            "SEND\ndestination:/topic/streams/acme\n\nforged\0",
            "streams are written by their producers on /connect: /topic/streams/acme",
        ),
        (
            String::new(),
            "SUBSCRIBE\nid:x\ndestination:/topic/a\nreplay-after:1\n\n\0",
            "replay-after is for stream topics: /topic/a",
        ),
    ];
    for (auth, frame, want) in cases {
        let (mut bad, _) = Stomp::connected(&srv, &format!("accept-version:1.2\n{auth}")).await;
        bad.send(frame).await;
        assert_eq!(header(&bad.frame().await, "message").as_deref(), Some(want));
        assert_eq!(bad.close_code().await, 1002);
    }
    c.send("SUBSCRIBE\nid:again\ndestination:/topic/streams/acme\n\n\0")
        .await;
    assert_eq!(
        header(&c.frame().await, "message").as_deref(),
        Some("already subscribed to /topic/streams/acme")
    );
    assert_eq!(c.close_code().await, 1002);
    let dev = srv.token("/auth/developer").await;
    let (mut d, _) = Stomp::connected(&srv, &format!("accept-version:1.2\npasscode:{dev}\n")).await;
    d.send("SUBSCRIBE\nid:x\ndestination:/topic/streams/acme\nack:client\n\n\0")
        .await;
    assert_eq!(
        header(&d.frame().await, "message").as_deref(),
        Some("stream topics take ack:auto; resume with replay-after")
    );
    assert_eq!(d.close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_topic_subscriber_is_one_of_the_developers_consumers() {
    // max_consumers_per_developer is 1: the newest consumer, of either protocol, wins.
    let srv = TestServer::start().await;
    let mut opcode = srv.consumer().await;
    let dev = srv.token("/auth/developer").await;
    let (mut c, _) = Stomp::connected(&srv, &format!("accept-version:1.2\npasscode:{dev}\n")).await;
    c.send_synced(
        "SUBSCRIBE\nid:s\ndestination:/topic/streams/acme\n\n\0",
        "sub",
    )
    .await;
    assert_eq!(opcode.close_code().await, 4002);
    let _newer = srv.consumer().await;
    assert_eq!(
        header(&c.frame().await, "message").as_deref(),
        Some("a newer consumer of this stream took this one's place")
    );
    assert_eq!(c.close_code().await, 4002);
}

/// A stream topic is a cursor over the stream, as on `/connect`: a subscriber that cannot
/// keep up is not cut; it falls behind, catches up from the log and rejoins live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_subscriber_that_cannot_keep_up_catches_up_from_the_log() {
    let srv = TestServer::start_with(|c| {
        c.consumer_queue_max = 64;
        c.stomp_max_pending_bytes = 64 << 10;
    })
    .await;
    let dev = srv.token("/auth/developer").await;
    let ws = connect_small_window(&format!("ws://{}/stomp/websocket", srv.addr)).await;
    let mut c = Stomp {
        ws,
        chosen: None,
        pending: Vec::new(),
    };
    c.send(&format!(
        "CONNECT\naccept-version:1.2\nheart-beat:0,0\npasscode:{dev}\n\n\0"
    ))
    .await;
    assert!(c.frame().await.starts_with("CONNECTED\n"));
    c.send_synced(
        "SUBSCRIBE\nid:mine\ndestination:/topic/streams/acme\n\n\0",
        "sub",
    )
    .await;
    // ~8 MB while the subscriber reads nothing: far past its 64 KiB of pending bytes.
    let pad = "x".repeat(1000);
    let mut p = srv.producer("u-1").await;
    for i in 1..=8000 {
        p.submit("STEPS", &format!(r#"{{"n":{i},"p":"{pad}"}}"#))
            .await;
    }
    p.ping().await;
    // Dispatch follows each group commit, so the last readings may still be on their way:
    // wait until the owner has found this subscriber full, still without reading.
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&srv.metrics().await, "sensorgate_consumer_lags_total") < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a subscriber that reads nothing must be lagged, not cut"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for seq in 1..=8000u64 {
        let m = c.frame().await;
        assert!(m.starts_with("MESSAGE\n"), "{}", &m[..m.len().min(200)]);
        assert_eq!(header(&m, "seq"), Some(seq.to_string()), "in order, no gap");
    }
    p.submit("STEPS", r#"{"n":0}"#).await;
    assert_eq!(header(&c.frame().await, "seq").as_deref(), Some("8001"));
}
