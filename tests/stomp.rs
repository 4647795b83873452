//! STOMP over WebSocket at `/stomp/websocket` against the real server: seed 000's flow as its
//! document shows it, version and subprotocol negotiation, receipts, transactions, and an
//! ERROR then close for each bad frame while everyone else is served.

mod common;

use common::stomp::{header, Stomp};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_flow_bare_connect_subscribe_and_message() {
    let srv = TestServer::start().await;
    // Seed 000: `CONNECT\n\n^@`, no version header: a 1.0 client, no heart-beats.
    let mut sub = Stomp::open(&srv, None).await;
    assert_eq!(sub.chosen, None);
    sub.send("CONNECT\n\n\0").await;
    let connected = sub.frame().await;
    assert_eq!(header(&connected, "version").as_deref(), Some("1.0"));
    assert_eq!(header(&connected, "heart-beat").as_deref(), Some("0,0"));
    sub.subscribe("any_client_id", "/topic/workout/record")
        .await;

    // Seed 000's events come from its backend: here a developer's STOMP client.
    let mut publisher = Stomp::publisher(&srv, "1.1").await;
    let body = "{\n  \"workout\": {\n    \"id\" : 4711,\n    \"person_id\": 1234\n  }\n}";
    publisher
        .send(&format!(
            "SEND\ndestination:/topic/workout/record\ncontent-type:application/json;charset=UTF-8\n\n{body}\0"
        ))
        .await;
    let message = sub.frame().await;
    let (head, got) = message.split_once("\n\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("MESSAGE"));
    assert_eq!(
        lines.collect::<Vec<_>>(),
        vec![
            "content-type:application/json;charset=UTF-8",
            "subscription:any_client_id",
            "destination:/topic/workout/record",
            &format!("message-id:{}", header(&message, "message-id").unwrap()),
            &format!("content-length:{}", body.len()),
        ]
    );
    assert_eq!(got, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_heart_beats_and_subprotocols_are_negotiated() {
    let srv = TestServer::start().await;
    let mut c = Stomp::open(&srv, Some("v10.stomp, v11.stomp, v12.stomp")).await;
    assert_eq!(c.chosen.as_deref(), Some("v12.stomp"));
    c.send("STOMP\naccept-version:1.1,1.2\nhost:h\nheart-beat:10000,20000\n\n\0")
        .await;
    let f = c.frame().await;
    assert_eq!(header(&f, "version").as_deref(), Some("1.2"));
    // Server sends every max(10000, 20000); expects every max(10000, 10000).
    assert_eq!(header(&f, "heart-beat").as_deref(), Some("20000,10000"));
    assert!(header(&f, "session").is_some());
    assert!(header(&f, "server").unwrap().starts_with("sensorgate/"));

    let mut old = Stomp::open(&srv, Some("v11.stomp")).await;
    assert_eq!(old.chosen.as_deref(), Some("v11.stomp"));
    old.send("CONNECT\naccept-version:2.0\n\n\0").await;
    let e = old.frame().await;
    assert!(e.starts_with("ERROR\n"), "{e}");
    assert_eq!(header(&e, "version").as_deref(), Some("1.0,1.1,1.2"));
    assert_eq!(old.close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_transactions_and_a_clean_disconnect() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    sub.subscribe("s", "/topic/conversation/42").await;
    let mut p = Stomp::publisher(&srv, "1.2").await;
    p.send("BEGIN\ntransaction:t1\n\n\0").await;
    p.send("SEND\ndestination:/topic/conversation/42\ntransaction:t1\n\n{\"n\":1}\0")
        .await;
    p.send("SEND\ndestination:/topic/conversation/42\n\n{\"n\":2}\0")
        .await;
    p.send("COMMIT\ntransaction:t1\nreceipt:c\n\n\0").await;
    assert_eq!(p.frame().await, "RECEIPT\nreceipt-id:c\n\n");
    // The plain SEND went out at once; the transaction's on COMMIT.
    assert!(sub.frame().await.ends_with("{\"n\":2}"));
    assert!(sub.frame().await.ends_with("{\"n\":1}"));
    p.send("BEGIN\ntransaction:t2\n\n\0").await;
    p.send("SEND\ndestination:/topic/conversation/42\ntransaction:t2\n\n{\"n\":3}\0")
        .await;
    p.send("ABORT\ntransaction:t2\n\n\0").await;
    p.send("SEND\ndestination:/topic/conversation/42\n\n{\"n\":4}\0")
        .await;
    assert!(
        sub.frame().await.ends_with("{\"n\":4}"),
        "aborted SEND not delivered"
    );
    sub.send("UNSUBSCRIBE\nid:s\nreceipt:u\n\n\0").await;
    assert_eq!(sub.frame().await, "RECEIPT\nreceipt-id:u\n\n");
    sub.send("DISCONNECT\nreceipt:bye\n\n\0").await;
    assert_eq!(sub.frame().await, "RECEIPT\nreceipt-id:bye\n\n");
    assert_eq!(sub.close_code().await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_frame_gets_an_error_then_a_close_and_others_carry_on() {
    let srv = TestServer::start().await;
    let (mut bystander, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    bystander.subscribe("b", "/topic/still-here").await;
    let cases: [(&str, &str, &str); 9] = [
        ("1.2", "PUBLISH\n\n\0", "unknown command"),
        (
            "1.2",
            "SEND\ndestination:/topic/a\\t\n\n\0",
            "undefined escape",
        ),
        (
            "1.1",
            "SEND\ndestination:/topic/a\\r\n\n\0",
            "undefined escape",
        ),
        ("1.2", "SEND\ndestination\n\n\0", "without a colon"),
        ("1.2", "SEND\n\nbody\0", "needs a 'destination'"),
        (
            "1.2",
            "SEND\ndestination:/topic/a\ncontent-length:2\n\nabc\0",
            "NUL",
        ),
        (
            "1.2",
            "SUBSCRIBE\nid:1\ndestination:/queue/secret\n\n\0",
            "/queue/secret",
        ),
        (
            "1.2",
            "SUBSCRIBE\nid:1\ndestination:/topic/../../etc/passwd\nreceipt:r9\n\n\0",
            "invalid destination",
        ),
        (
            "1.2",
            "SUBSCRIBE\nid:1\ndestination:/topic/a\n\nbody\0",
            "must not have a body",
        ),
    ];
    for (version, frame, want) in cases {
        let (mut c, _) = Stomp::connected(&srv, &format!("accept-version:{version}\n")).await;
        c.send(frame).await;
        let e = c.frame().await;
        assert!(e.starts_with("ERROR\n"), "{frame:?}: {e}");
        assert!(
            header(&e, "message").unwrap().contains(want),
            "{frame:?}: {e}"
        );
        assert_eq!(c.close_code().await, 1002, "{frame:?}");
    }
    // The one that carried a receipt gets it echoed on the ERROR.
    let (mut c, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    c.send("SUBSCRIBE\nid:1\ndestination:/topic/..\nreceipt:r9\n\n\0")
        .await;
    assert_eq!(
        header(&c.frame().await, "receipt-id").as_deref(),
        Some("r9")
    );
    // Frames before CONNECT are refused.
    let mut early = Stomp::open(&srv, None).await;
    early
        .send("SUBSCRIBE\nid:1\ndestination:/topic/a\n\n\0")
        .await;
    assert!(header(&early.frame().await, "message")
        .unwrap()
        .contains("expected CONNECT"));

    let mut p = Stomp::publisher(&srv, "1.2").await;
    p.send("SEND\ndestination:/topic/still-here\n\nok\0").await;
    assert!(bystander.frame().await.ends_with("\n\nok"));

    // Counted by reason and command (other tests share the recorder: at least these).
    let scrape = srv.metrics().await;
    let at_least = |name: &str, n: f64| {
        let got = metric(&scrape, name);
        assert!(got >= n, "{name} = {got}, want >= {n}");
    };
    at_least(r#"sensorgate_stomp_errors_total{reason="frame"}"#, 7.0);
    at_least(
        r#"sensorgate_stomp_errors_total{reason="destination"}"#,
        3.0,
    );
    at_least(r#"sensorgate_stomp_errors_total{reason="state"}"#, 1.0);
    at_least(
        r#"sensorgate_stomp_frames_in_total{command="connect"}"#,
        12.0,
    );
    at_least(
        r#"sensorgate_stomp_frames_out_total{command="error"}"#,
        11.0,
    );
    at_least(r#"sensorgate_topic_messages_total{source="stomp"}"#, 1.0);
    at_least("sensorgate_stomp_subscriptions", 1.0);
    at_least("sensorgate_stomp_connections", 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_split_across_messages_and_several_in_one() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    sub.subscribe("s", "/topic/x").await;
    let mut p = Stomp::publisher(&srv, "1.2").await;
    // One frame in three WebSocket messages (as stompjs splits large frames), then two
    // frames and a heart-beat in one binary message.
    p.send("SEND\ndestination:/to").await;
    p.send("pic/x\n\nfir").await;
    p.send("st\0").await;
    p.ws.send(Message::Binary(
        b"SEND\ndestination:/topic/x\n\nsecond\0\nSEND\ndestination:/topic/x\n\nthird\0"
            .to_vec()
            .into(),
    ))
    .await
    .unwrap();
    for want in ["first", "second", "third"] {
        assert!(sub.frame().await.ends_with(&format!("\n\n{want}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockjs_probes_are_answered_as_spring_does() {
    let srv = TestServer::start().await;
    let (status, body) = http(srv.addr, "GET", "/stomp", &[]).await;
    assert_eq!((status, body.as_str()), (200, "Welcome to SockJS!\n"));
    let (status, body) = http(srv.addr, "GET", "/stomp/info", &[]).await;
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["websocket"], true);
    assert!(info["entropy"].is_u64());
}

/// Seed 000's MESSAGE, raised by a backend through the HTTP publish API: the subscriber sees
/// exactly the document's headers and the JSON as posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_reaches_subscribers_as_seed_000_shows() {
    let srv = TestServer::start().await;
    let mut sub = Stomp::open(&srv, None).await;
    sub.send("CONNECT\n\n\0").await;
    sub.frame().await;
    sub.subscribe("any_client_id", "/topic/bookedfromwaitinglist")
        .await;
    let data = r#"{
  "groupactivitybooking": {
    "id" : 4711,
    "caption" : "Zumba"
  }
}"#;
    let body = format!(r#"{{"destination":"/topic/bookedfromwaitinglist","data":{data}}}"#);
    let creds = [("dev-id", DEV), ("x-api-key", KEY)];
    let (status, answer) = http_with_body(srv.addr, "POST", "/api/publish", &creds, &body).await;
    assert_eq!(status, 200, "{answer}");
    let ids: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let id = ids["message_ids"][0].as_str().unwrap().to_owned();
    assert_eq!(
        sub.frame().await,
        format!(
            "MESSAGE\ncontent-type:application/json;charset=UTF-8\nsubscription:any_client_id\n\
             destination:/topic/bookedfromwaitinglist\nmessage-id:{id}\ncontent-length:{}\n\n{data}",
            data.len()
        )
    );
    // Several at once, in order; refusals name the problem.
    let (status, _) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &creds,
        r#"{"messages":[{"destination":"/topic/bookedfromwaitinglist","data":1},{"destination":"/topic/bookedfromwaitinglist","data":2}]}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(sub.frame().await.ends_with("\n\n1"));
    assert!(sub.frame().await.ends_with("\n\n2"));
    let (status, answer) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &creds,
        r#"{"destination":"/queue/x","data":1}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(answer.contains("unknown destination: /queue/x"), "{answer}");
    let wrong = [("dev-id", DEV), ("x-api-key", "nope")];
    let (status, _) = http_with_body(srv.addr, "POST", "/api/publish", &wrong, &body).await;
    assert_eq!(status, 403);
    let scrape = srv.metrics().await;
    assert!(metric(&scrape, r#"sensorgate_topic_messages_total{source="http"}"#) >= 3.0);
}

/// Negotiated heart-beats: the server sends a bare EOL when it has nothing else to send,
/// closes a client silent for twice its rate, and leaves alone one that asked for none.
/// Also serves a configured extra path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heart_beats_are_sent_and_silence_is_closed_on_extra_paths_too() {
    let srv = TestServer::start_with(|c| {
        c.stomp_heart_beat_ms = 200;
        c.stomp_paths = vec!["/ws".into()];
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", srv.addr))
        .await
        .expect("upgrade on the extra path");
    ws.send(Message::text(
        "CONNECT\naccept-version:1.2\nheart-beat:100,100\n\n\0",
    ))
    .await
    .unwrap();
    let (mut eols, mut error, mut code) = (0, None, None);
    while code.is_none() {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) if t.as_str() == "\n" => eols += 1,
            Some(Ok(Message::Text(t))) if t.starts_with("ERROR") => error = Some(t.to_string()),
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains("heart-beat:200,200"), "{t}")
            }
            Some(Ok(Message::Close(f))) => code = f.map(|f| u16::from(f.code)),
            other => panic!("{other:?}"),
        }
    }
    assert!(eols >= 1, "the server beats while idle");
    assert!(error.unwrap().contains("heart-beat missed"));
    assert_eq!(code, Some(1002));

    // No heart-beats asked for: silence is fine.
    let (mut quiet, f) = Stomp::connected(&srv, "accept-version:1.2\nheart-beat:0,0\n").await;
    assert_eq!(header(&f, "heart-beat").as_deref(), Some("0,0"));
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    quiet.subscribe("still", "/topic/here").await;
}

/// Tokens (in CONNECT's passcode or the upgrade's `Authorization: Bearer`) and the rules
/// decide who may SUBSCRIBE and SEND where; refusals are an ERROR naming the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_rules_decide_who_may_subscribe_and_send() {
    use sensorgate::config::{StompPrincipal::*, StompRule};
    let srv = TestServer::start_with(|c| {
        c.stomp_rules = vec![
            StompRule {
                prefix: "/topic/".into(),
                subscribe: vec![Anonymous, User, Developer],
                send: vec![Developer],
            },
            StompRule {
                prefix: "/topic/open/".into(),
                subscribe: vec![Anonymous, User, Developer],
                send: vec![Anonymous, User, Developer],
            },
        ];
    })
    .await;
    let (mut anon, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    anon.subscribe("news", "/topic/news").await;
    anon.subscribe("open", "/topic/open/chat").await;

    // A developer token in the passcode may SEND to /topic/news.
    let dev = srv.token("/auth/developer").await;
    let (mut backend, _) =
        Stomp::connected(&srv, &format!("accept-version:1.2\npasscode:{dev}\n")).await;
    backend
        .send("SEND\ndestination:/topic/news\n\nhello\0")
        .await;
    assert!(anon.frame().await.ends_with("\n\nhello"));

    // Anonymous may SEND under /topic/open/ only (the longer prefix decides).
    let (mut other, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    other
        .send("SEND\ndestination:/topic/open/chat\n\nhi\0")
        .await;
    assert!(anon.frame().await.ends_with("\n\nhi"));
    other
        .send("SEND\ndestination:/topic/news\nreceipt:x\n\nspam\0")
        .await;
    let e = other.frame().await;
    assert_eq!(
        header(&e, "message").as_deref(),
        Some("forbidden: SEND to /topic/news")
    );
    assert_eq!(header(&e, "receipt-id").as_deref(), Some("x"));
    assert_eq!(other.close_code().await, 1002);

    // A user token from the upgrade request's Authorization header: not a developer.
    let user = srv.token("/auth/user?id=u-1").await;
    let mut req = format!("ws://{}/stomp/websocket", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {user}")).unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut u = Stomp {
        ws,
        chosen: None,
        pending: Vec::new(),
    };
    u.send("CONNECT\naccept-version:1.2\n\n\0").await;
    assert!(u.frame().await.starts_with("CONNECTED"));
    u.send("SEND\ndestination:/topic/news\n\nx\0").await;
    assert!(header(&u.frame().await, "message")
        .unwrap()
        .starts_with("forbidden"));

    // A token that does not redeem (here: already used) is refused at CONNECT.
    let mut reused = Stomp::open(&srv, None).await;
    reused
        .send(&format!(
            "CONNECT\naccept-version:1.2\npasscode:{dev}\n\n\0"
        ))
        .await;
    assert_eq!(
        header(&reused.frame().await, "message").as_deref(),
        Some("invalid token")
    );
    assert_eq!(reused.close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connect_can_be_turned_off() {
    let srv = TestServer::start_with(|c| c.stomp_anonymous = false).await;
    let mut c = Stomp::open(&srv, None).await;
    c.send("CONNECT\n\n\0").await;
    assert_eq!(
        header(&c.frame().await, "message").as_deref(),
        Some("authentication required")
    );
    assert_eq!(c.close_code().await, 1002);
    let dev = srv.token("/auth/developer").await;
    let (_ok, f) = Stomp::connected(&srv, &format!("passcode:{dev}\n")).await;
    assert_eq!(header(&f, "version").as_deref(), Some("1.0"));
}
