//! What a stranger on the open internet can try, and the defined answer to each: bad close
//! codes, connections that never authenticate, bodies that never end, frames meant to
//! forge other clients' frames. Every test also checks that everyone else is still served.

mod common;

use common::stomp::Stomp;
use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;

/// A close frame with any code, valid or not (tungstenite would refuse to build some).
fn raw_close(code: u16) -> Message {
    let header = FrameHeader {
        opcode: OpCode::Control(Control::Close),
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(
        header,
        code.to_be_bytes().to_vec().into(),
    ))
}

/// RFC 6455 §7.4: a close code a peer may not send is answered with 1002 (Autobahn 7.9.x),
/// a valid one with 1000 (7.7.x), on every WebSocket endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_close_codes_are_answered_1002_on_every_endpoint() {
    let srv = TestServer::start().await;
    let cases = [
        (1000u16, 1000u16),
        (4999, 1000),
        (0, 1002),
        (999, 1002),
        (1005, 1002),
    ];
    let cases = cases.into_iter().chain(
        [1004u16, 1006, 1016, 1100, 2000, 2999]
            .into_iter()
            .map(|c| (c, 1002)),
    );
    for (sent, want) in cases {
        let mut c = Client::connect(srv.addr).await;
        c.send_msg(raw_close(sent)).await;
        assert_eq!(c.close_code().await, want, "/connect, close {sent}");

        let mut s = Stomp::open(&srv, None).await;
        s.ws.send(raw_close(sent)).await.unwrap();
        assert_eq!(s.close_code().await, want, "/stomp/websocket, close {sent}");

        let mut e = common::endpoint::Endpoint::open(&srv, "/stream").await;
        e.ws.send(raw_close(sent)).await.unwrap();
        match e.closed().await {
            Closed::Code(code, _) => assert_eq!(code, want, "/stream, close {sent}"),
            Closed::Abrupt => panic!("/stream, close {sent}: no close frame"),
        }
    }
    srv.producer("still-served").await.ping().await;
}

/// A header value a 1.2 client escaped (`\n`) reaches a 1.0 subscriber, which has no
/// escapes: written raw it would end the headers and let the sender frame a MESSAGE of its
/// own. The 1.0 copy leaves that header out; the 1.2 copy keeps it. A NUL in a header is
/// refused outright (ERROR, 1002).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_cannot_forge_frames_for_an_older_subscriber() {
    let srv = TestServer::start().await;
    let (mut old, connected) = Stomp::connected(&srv, "").await;
    assert!(connected.contains("version:1.0"), "{connected}");
    old.subscribe("0", "/topic/forge").await;
    let (mut new, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    new.subscribe("0", "/topic/forge").await;

    let mut sender = Stomp::publisher(&srv, "1.2").await;
    sender
        .send_synced(
            "SEND\ndestination:/topic/forge\nx:a\\n\\nMESSAGE\\nforged\\cyes\ny:kept\n\nfirst\0",
            "r1",
        )
        .await;
    sender
        .send_synced("SEND\ndestination:/topic/forge\n\nsecond\0", "r2")
        .await;

    let first = old.frame().await;
    assert!(first.starts_with("MESSAGE\n"), "{first:?}");
    assert_eq!(common::stomp::header(&first, "x"), None, "{first:?}");
    assert_eq!(common::stomp::header(&first, "forged"), None, "{first:?}");
    assert_eq!(common::stomp::header(&first, "y").as_deref(), Some("kept"));
    assert!(first.ends_with("\n\nfirst"), "{first:?}");
    assert_eq!(old.message_body().await, "second");

    let first = new.frame().await;
    assert_eq!(
        common::stomp::header(&first, "x").as_deref(),
        Some("a\n\nMESSAGE\nforged:yes")
    );
    assert_eq!(new.message_body().await, "second");

    sender
        .send("SEND\ndestination:/topic/forge\nx:a\0b\n\nthird\0")
        .await;
    let error = sender.frame().await;
    assert!(error.starts_with("ERROR\n"), "{error:?}");
    assert!(error.contains("NUL inside a header"), "{error:?}");
    assert_eq!(sender.close_code().await, 1002);
    old.send_synced("SUBSCRIBE\nid:1\ndestination:/topic/other\n\n\0", "still")
        .await;
}

/// Open transactions hold their SENDs until COMMIT: bounded in bytes per connection
/// (1 MiB), not only in count, or one client could hold a gigabyte. Past it: ERROR
/// `transaction too large`, close 1002. Under it, a COMMIT delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transactions_are_bounded_in_bytes() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    sub.subscribe("0", "/topic/tx").await;
    let mut client = Stomp::publisher(&srv, "1.2").await;

    let body = "b".repeat(60 << 10);
    client
        .send_synced("BEGIN\ntransaction:small\n\n\0", "b1")
        .await;
    for _ in 0..4 {
        client
            .send(&format!(
                "SEND\ndestination:/topic/tx\ntransaction:small\n\n{body}\0"
            ))
            .await;
    }
    client
        .send_synced("COMMIT\ntransaction:small\n\n\0", "c1")
        .await;
    for _ in 0..4 {
        assert_eq!(sub.message_body().await.len(), body.len());
    }

    // Two transactions, 60 KiB SENDs: the one that takes them past 1 MiB is refused.
    for tx in ["a", "b"] {
        client
            .send_synced(&format!("BEGIN\ntransaction:{tx}\n\n\0"), tx)
            .await;
    }
    let mut error = None;
    for i in 0..20 {
        let tx = ["a", "b"][i % 2];
        client
            .send(&format!(
                "SEND\ndestination:/topic/tx\ntransaction:{tx}\nreceipt:s{i}\n\n{body}\0"
            ))
            .await;
        let reply = client.frame().await;
        if reply.starts_with("ERROR\n") {
            error = Some((i, reply));
            break;
        }
        assert_eq!(reply, format!("RECEIPT\nreceipt-id:s{i}\n\n"));
    }
    let (i, error) = error.expect("an ERROR before 20 × 60 KiB were held");
    assert_eq!(i, 17, "the 18th SEND (past 1 MiB) is refused");
    assert!(error.contains("message:transaction too large"), "{error:?}");
    assert_eq!(client.close_code().await, 1002);
    sub.send_synced("SUBSCRIBE\nid:1\ndestination:/topic/other\n\n\0", "still")
        .await;
}

/// Asking for no heart-beats (or a heart-beat of a year) no longer keeps a socket open
/// for ever: a STOMP connection silent for `stomp_idle_timeout_ms` is pinged after two
/// thirds of it and closed (ERROR, 1002) if not even a pong came back. A client whose
/// library answers pings stays, however long it says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stomp_client_is_closed_whatever_it_negotiated() {
    let srv = TestServer::start_with(|c| c.stomp_idle_timeout_ms = 600).await;
    for beats in ["0,0", "0,31536000000"] {
        let headers = format!("accept-version:1.2\nheart-beat:{beats}\n");
        let (mut mute, _) = Stomp::connected(&srv, &headers).await;
        // Not reading: the ping goes unanswered.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let error = mute.frame().await;
        assert!(error.starts_with("ERROR\n"), "{beats}: {error:?}");
        assert!(error.contains("idle timeout"), "{error:?}");
        assert_eq!(mute.close_code().await, 1002);
    }

    let (mut listener, _) = Stomp::connected(&srv, "accept-version:1.2\nheart-beat:0,0\n").await;
    listener.subscribe("0", "/topic/idle").await;
    // Reading (tungstenite answers the pings) but sending nothing, 3× the timeout.
    let read = tokio::time::timeout(std::time::Duration::from_millis(1800), listener.frame());
    assert!(
        read.await.is_err(),
        "nothing arrives, and the connection stays open"
    );
    common::endpoint::publish(&srv, "/topic/idle", serde_json::json!({"still": "here"})).await;
    assert_eq!(listener.message_body().await, r#"{"still":"here"}"#);
}

/// Strangers have a budget of their own (`max_unauthenticated_connections`): sockets that
/// never send a request, and anonymous STOMP clients, fill it; past it a new connection
/// gets 503 with Retry-After, but health checks still answer and identified clients keep
/// their slots. When strangers leave, new clients get in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_take_identified_clients_slots() {
    let srv = TestServer::start_with(|c| {
        c.max_connections = 40;
        c.max_unauthenticated_connections = 8;
    })
    .await;
    let mut identified = srv.producer("identified").await;
    let shed_before = metric(
        &srv.metrics().await,
        "sensorgate_connections_shed_total{budget=\"unauthenticated\"}",
    );

    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(srv.addr).await.unwrap());
    }
    let mut anonymous = Vec::new();
    for _ in 0..4 {
        anonymous.push(Stomp::connected(&srv, "accept-version:1.2\n").await.0);
    }
    // The budget is full (a token request in between may have held a slot for a moment).
    let shed = wait_for_shed(&srv).await;
    assert_eq!(shed.0, 503, "{}", shed.1);
    assert!(shed.1.contains("too many connections"), "{}", shed.1);

    assert_eq!(http(srv.addr, "GET", "/healthz", &[]).await.0, 200);
    assert_eq!(http(srv.addr, "GET", "/readyz", &[]).await.0, 200);
    let scrape = srv.metrics().await;
    assert!(
        metric(
            &scrape,
            "sensorgate_connections_shed_total{budget=\"unauthenticated\"}"
        ) > shed_before
    );
    identified.ping().await;

    // Strangers leave: new clients are admitted again.
    drop(silent);
    drop(anonymous);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/connect", srv.addr))
            .await
            .map_or((None, ()), |(ws, _)| (Some(ws), ()));
        if ws.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never admitted again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    srv.producer("newcomer").await.ping().await;
}

/// A WebSocket upgrade attempt until one is shed: (status, body).
async fn wait_for_shed(srv: &TestServer) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = http(
            srv.addr,
            "GET",
            "/connect",
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
        )
        .await;
        if reply.0 == 503 || tokio::time::Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A request body that never ends is answered 408 after `handshake_timeout_ms` (`/json`
/// reads it before any authentication), and the server serves everyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_ends_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start_with(|c| c.handshake_timeout_ms = 500).await;
    for path in ["/json", "/api/publish"] {
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\ndev-id: {DEV}\r\nx-api-key: {KEY}\r\n\
             Content-Length: 1000\r\n\r\n{{\"tok"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("answered in time")
            .unwrap();
        let reply = String::from_utf8_lossy(&buf);
        assert!(reply.starts_with("HTTP/1.1 408"), "{path}: {reply}");
    }
    assert_eq!(http(srv.addr, "GET", "/healthz", &[]).await.0, 200);
}

/// Guessing tokens costs: a `/stream` socket is closed with 4001 after three invalid
/// tokens, and every refused key or token is counted in `sensorgate_auth_failures_total`
/// (and logged at debug only, so a stranger cannot flood the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_counted_and_token_guessing_is_cut_short() {
    let srv = TestServer::start().await;
    let count = |scrape: &str, place: &str| {
        metric(
            scrape,
            &format!("sensorgate_auth_failures_total{{where=\"{place}\"}}"),
        )
    };
    let before = srv.metrics().await;

    let mut e = common::endpoint::Endpoint::open(&srv, "/stream").await;
    for guess in ["a", "b", "c"] {
        e.send(&serde_json::json!({ "token": guess }).to_string())
            .await;
        let reply = e.recv().await;
        assert!(reply.contains("Invalid token"), "{reply}");
    }
    match e.closed().await {
        Closed::Code(code, _) => assert_eq!(code, 4001),
        Closed::Abrupt => panic!("no close frame"),
    }
    let (status, _) = http(
        srv.addr,
        "POST",
        "/auth/developer",
        &[("dev-id", DEV), ("x-api-key", "wrong")],
    )
    .await;
    assert_eq!(status, 403);
    let mut c = Client::connect(srv.addr).await;
    c.send(r#"{"op":3,"d":{"token":"forged","type":0}}"#).await;
    assert_eq!(c.close_code().await, 4001);

    let after = srv.metrics().await;
    assert!(count(&after, "endpoint") >= count(&before, "endpoint") + 3.0);
    assert!(count(&after, "mint") > count(&before, "mint"));
    assert!(count(&after, "identify") > count(&before, "identify"));
    srv.producer("still-served").await.ping().await;
}

/// A browser page from another origin cannot open a WebSocket (cross-site WebSocket
/// hijacking) once `allowed_origins` is set; an allowed origin and a client that sends no
/// `Origin` (not a browser) are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_from_other_origins_are_refused() {
    let srv = TestServer::start_with(|c| {
        c.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    for path in ["/connect", "/stomp/websocket", "/stream"] {
        let upgrade = |origin: Option<&'static str>| {
            let mut headers = vec![
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ];
            if let Some(o) = origin {
                headers.push(("Origin", o));
            }
            headers
        };
        let refused = http(
            srv.addr,
            "GET",
            path,
            &upgrade(Some("https://evil.example")),
        )
        .await;
        assert_eq!(refused.0, 403, "{path}: {}", refused.1);
        for origin in [Some("https://app.example.com"), None] {
            let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
            let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
            for (k, v) in upgrade(origin) {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HTTP/1.1 101", "{path} from {origin:?}");
        }
    }
}

/// With `admin_listen`, `/metrics` moves to the admin listener (404 on the public one);
/// the health checks answer on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_move_to_an_admin_listener() {
    let srv = TestServer::start_with(|c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = srv.server.as_ref().unwrap().admin_addr().expect("bound");
    let (status, body) = http(admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("sensorgate_build_info"), "{body}");
    assert_eq!(http(srv.addr, "GET", "/metrics", &[]).await.0, 404);
    for at in [admin, srv.addr] {
        assert_eq!(http(at, "GET", "/healthz", &[]).await.0, 200);
        assert_eq!(http(at, "GET", "/readyz", &[]).await.0, 200);
    }
    assert_eq!(http(admin, "GET", "/connect", &[]).await.0, 404);
    assert_eq!(http(admin, "POST", "/auth/developer", &[]).await.0, 404);
}

/// Progress topics and project events belong to the developer that raised them. Another
/// developer's token cannot read or register for them, and its endpoints never receive
/// them; a static endpoint token sees the developer it is configured for; a publisher key
/// raises endpoint notifications only for the developer it is configured for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_do_not_see_each_others_progress_or_projects() {
    use common::endpoint::{json_call, outcome, publish, Endpoint};
    use serde_json::json;
    const REGISTRY: &str = "org.bimserver.NotificationRegistryInterface";
    let srv = TestServer::start_with(|c| {
        c.endpoint_tokens = vec![DeveloperConfig {
            id: "acme-bimserver".into(),
            api_key: Some("acme-static-token".into()),
            developer: Some(DEV.into()),
            ..Default::default()
        }];
        c.publishers = vec![
            DeveloperConfig {
                id: "acme-backend".into(),
                api_key: Some("acme-backend-key".into()),
                developer: Some(DEV.into()),
                ..Default::default()
            },
            DeveloperConfig {
                id: "chat-only".into(),
                api_key: Some("chat-only-key".into()),
                ..Default::default()
            },
        ];
    })
    .await;
    publish(
        &srv,
        "/bimserver/progress/12",
        json!({"state": "STARTED", "progress": 5}),
    )
    .await;

    let acme = srv.token("/auth/user?id=alice").await;
    let globex = token(srv.addr, "/auth/user?id=bob", DEV2, KEY2).await;
    let (_, reply) = json_call(
        &srv,
        &globex,
        REGISTRY,
        "getProgress",
        json!({"topicId": 12}),
    )
    .await;
    assert_eq!(outcome(&reply), Err("Topic with id 12 not found".into()));
    let (_, reply) = json_call(&srv, &acme, REGISTRY, "getProgress", json!({"topicId": 12})).await;
    assert!(outcome(&reply).is_ok(), "{reply}");

    let mut theirs = Endpoint::connected(&srv, "/stream", &globex).await;
    let (_, reply) = json_call(
        &srv,
        &globex,
        REGISTRY,
        "registerProgressHandler",
        json!({"topicId": 12, "endPointId": theirs.id}),
    )
    .await;
    assert_eq!(outcome(&reply), Err("Topic with id 12 not found".into()));
    let mut ours = Endpoint::connected(&srv, "/stream", "acme-static-token").await;
    for (e, token) in [
        (&theirs, &globex),
        (&ours, &"acme-static-token".to_string()),
    ] {
        let (_, reply) = json_call(
            &srv,
            token,
            REGISTRY,
            "registerNewProjectHandler",
            json!({"endPointId": e.id}),
        )
        .await;
        assert_eq!(outcome(&reply), Ok(json!({})));
    }
    // acme's backend, by its publisher key, raises a project: acme's endpoint only.
    let body = json!({"destination": "/bimserver/newProject", "data": {"poid": 7}});
    let (status, text) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer acme-backend-key")],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let got = ours.recv_json().await;
    assert_eq!(got["request"]["method"], "newProject", "{got}");
    assert_eq!(got["request"]["parameters"]["poid"], 7, "{got}");
    // A key configured for no developer raises no endpoint notification.
    let (status, text) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer chat-only-key")],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    // globex's endpoint got nothing of all this.
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), theirs.recv());
    assert!(
        quiet.await.is_err(),
        "another developer's project reached globex"
    );
}

/// A developer or publisher key publishes only under the prefixes its configuration grants:
/// a developer's default is `developer_publish_prefixes`, a publisher's is nothing. Past
/// them, `POST /api/publish` answers 403 with nothing published, and a developer's STOMP
/// SEND gets ERROR `forbidden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_publish_only_where_they_are_granted() {
    let srv = TestServer::start_with(|c| {
        c.developers[1].prefixes = Some(vec!["/topic/globex/".into()]);
        c.publishers = vec![
            DeveloperConfig {
                id: "gym".into(),
                api_key: Some("gym-key".into()),
                prefixes: Some(vec!["/topic/workout/record".into()]),
                ..Default::default()
            },
            DeveloperConfig {
                id: "nothing".into(),
                api_key: Some("nothing-key".into()),
                ..Default::default()
            },
        ];
    })
    .await;
    let (mut sub, _) = Stomp::connected(&srv, "accept-version:1.2\n").await;
    sub.subscribe("0", "/topic/workout/record").await;
    let post = |auth: Vec<(&'static str, &'static str)>, destination: &'static str| {
        let srv_addr = srv.addr;
        async move {
            let body = serde_json::json!({"messages": [
                {"destination": "/topic/globex/ok", "data": 1},
                {"destination": destination, "data": 2},
            ]});
            http_with_body(srv_addr, "POST", "/api/publish", &auth, &body.to_string()).await
        }
    };
    // globex (prefixes /topic/globex/) may not write the gym's feed: 403, nothing sent.
    let (status, text) = post(
        vec![("dev-id", DEV2), ("x-api-key", KEY2)],
        "/topic/workout/record",
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("not granted: /topic/workout/record"),
        "{text}"
    );
    // The gym's key may publish exactly its feed; a key with no prefixes, nothing.
    let gym = vec![("Authorization", "Bearer gym-key")];
    let body = serde_json::json!({"destination": "/topic/workout/record", "data": {"id": 1}});
    let (status, text) =
        http_with_body(srv.addr, "POST", "/api/publish", &gym, &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let nothing = vec![("Authorization", "Bearer nothing-key")];
    let (status, _) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &nothing,
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 403);
    // acme keeps the default (/topic/, /v1/topic/).
    let acme = vec![("dev-id", DEV), ("x-api-key", KEY)];
    let (status, text) =
        http_with_body(srv.addr, "POST", "/api/publish", &acme, &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(sub.message_body().await, r#"{"id":1}"#);
    assert_eq!(
        sub.message_body().await,
        r#"{"id":1}"#,
        "the gym's, then acme's"
    );
    // Over STOMP, globex's developer token may SEND under its prefix only.
    let token = token(srv.addr, "/auth/developer", DEV2, KEY2).await;
    let headers = format!("accept-version:1.2\npasscode:{token}\n");
    let (mut globex, _) = Stomp::connected(&srv, &headers).await;
    globex
        .send_synced("SEND\ndestination:/topic/globex/news\n\nok\0", "ok")
        .await;
    globex
        .send("SEND\ndestination:/topic/workout/record\n\nforged\0")
        .await;
    let error = globex.frame().await;
    assert!(
        error.contains("forbidden: SEND to /topic/workout/record"),
        "{error:?}"
    );
}
