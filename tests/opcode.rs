//! The opcode protocol over real sockets: frames as the seed shows them, and every close code
//! a client can get, each closing only the offending connection.

mod common;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_identify_submit_dispatch_as_the_seed_shows() {
    let srv = TestServer::start().await;
    let mut consumer = srv.consumer().await;
    let mut producer = srv.producer("8e864e3a-979a-4d04-b4e9-b6d020f20ba0").await;
    producer
        .submit(
            "heart_rate",
            r#"{"ts":"2022-05-04T10:26:11.268507+01:00","val":95}"#,
        )
        .await;
    producer
        .submit(
            "ACCELERATION",
            r#"{ "ts":"2022-05-04T10:26:11Z", "d":[0.1, -9.81, 1e-3] }"#,
        )
        .await;
    assert_eq!(
        consumer.recv().await,
        r#"{"op":5,"d":{"ts":"2022-05-04T10:26:11.268507+01:00","val":95},"uid":"8e864e3a-979a-4d04-b4e9-b6d020f20ba0","seq":1,"t":"HEART_RATE"}"#
    );
    // `d` is relayed byte for byte, spaces and number spellings included.
    assert_eq!(
        consumer.recv().await,
        r#"{"op":5,"d":{ "ts":"2022-05-04T10:26:11Z", "d":[0.1, -9.81, 1e-3] },"uid":"8e864e3a-979a-4d04-b4e9-b6d020f20ba0","seq":2,"t":"ACCELERATION"}"#
    );
    producer.ping().await;
    consumer.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_get_only_their_developers_stream() {
    let srv = TestServer::start().await;
    let mut acme = srv.consumer().await;
    let other_token = token(srv.addr, "/auth/developer", DEV2, KEY2).await;
    let mut globex = Client::identified(srv.addr, &other_token, 1).await;
    let mut p = srv.producer("u1").await;
    let p2_token = token(srv.addr, "/auth/user?id=u1", DEV2, KEY2).await;
    let mut p2 = Client::identified(srv.addr, &p2_token, 0).await;
    p.submit("STEPS", r#"{"val":1}"#).await;
    p2.submit("STEPS", r#"{"val":2}"#).await;
    assert_eq!(dispatch(&acme.recv().await).3, r#"{"val":1}"#);
    assert_eq!(dispatch(&globex.recv().await).3, r#"{"val":2}"#);
    // Each stream counts its own seqs.
    p2.submit("STEPS", r#"{"val":3}"#).await;
    assert_eq!(dispatch(&globex.recv().await).0, 2);
}

/// Connects, sends `frames`, and returns the close code; checks that a bystander is still
/// served afterwards.
async fn close_code_for(srv: &TestServer, identify_as: Option<u8>, frames: &[&str]) -> u16 {
    let mut c = match identify_as {
        Some(0) => srv.producer("offender").await,
        Some(_) => srv.consumer().await,
        None => Client::connect(srv.addr).await,
    };
    for f in frames {
        c.send(f).await;
    }
    c.close_code().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_close_code_and_others_carry_on() {
    let srv = TestServer::start().await;
    let mut bystander = srv.producer("bystander").await;
    let cases: Vec<(Option<u8>, Vec<&str>, u16)> = vec![
        (None, vec!["{\"op\":"], 1007),
        (None, vec!["[]"], 1007),
        (None, vec![r#"{"op":"6"}"#], 1007),
        (Some(0), vec![r#"{"op":6,"t":"X","d":1e999}"#], 1007),
        (Some(0), vec![r#"{"op":6,"t":"X","d":5}"#], 1007),
        (None, vec![r#"{"op":6,"t":"STEPS","d":{}}"#], 4000),
        (None, vec![r#"{"op":7,"d":{"after":0}}"#], 4000),
        (
            None,
            vec![r#"{"op":3,"d":{"token":"garbage","type":0}}"#],
            4001,
        ),
        (None, vec![r#"{"op":3,"d":{"type":0}}"#], 4001),
        (
            Some(0),
            vec![r#"{"op":3,"d":{"token":"x","type":0}}"#],
            4003,
        ),
        (Some(0), vec![r#"{"op":42}"#], 4004),
        (Some(0), vec![r#"{"op":7,"d":{"after":0}}"#], 4004),
        (Some(1), vec![r#"{"op":6,"t":"STEPS","d":{}}"#], 4004),
        (Some(1), vec![r#"{"op":5,"d":{}}"#], 4004),
    ];
    for (who, frames, want) in cases {
        assert_eq!(close_code_for(&srv, who, &frames).await, want, "{frames:?}");
        bystander.ping().await;
    }
    let scrape = srv.metrics().await;
    assert!(
        metric(&scrape, r#"sensorgate_close_codes_total{code="1007"}"#) >= 5.0,
        "{scrape}"
    );
    assert!(metric(&scrape, r#"sensorgate_close_codes_total{code="4004"}"#) >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_typed() {
    let srv = TestServer::start().await;
    let t = srv.token("/auth/user?id=u1").await;
    let _first = Client::identified(srv.addr, &t, 0).await;
    let mut again = Client::connect(srv.addr).await;
    again
        .send(&format!(r#"{{"op":3,"d":{{"token":"{t}","type":0}}}}"#))
        .await;
    assert_eq!(again.close_code().await, 4001);
    let dev_token = srv.token("/auth/developer").await;
    let mut wrong_type = Client::connect(srv.addr).await;
    wrong_type
        .send(&format!(
            r#"{{"op":3,"d":{{"token":"{dev_token}","type":0}}}}"#
        ))
        .await;
    assert_eq!(wrong_type.close_code().await, 4001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_and_heartbeat_deadlines() {
    let srv = TestServer::start_with(|c| {
        c.identify_timeout_ms = 300;
        c.heartbeat_interval_ms = 200;
        c.heartbeat_grace_ms = 100;
    })
    .await;
    let mut silent = Client::connect(srv.addr).await;
    // Heartbeats do not stand in for IDENTIFY.
    silent.ping().await;
    assert_eq!(silent.close_code().await, 4000);
    let mut idle = srv.producer("idle").await;
    assert_eq!(idle.close_code().await, 4005);
    // One that keeps its heartbeat stays.
    let mut alive = srv.producer("alive").await;
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        alive.ping().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_wins() {
    let srv = TestServer::start().await;
    let mut old = srv.producer("same").await;
    let mut new = srv.producer("same").await;
    assert_eq!(
        old.closed().await,
        Closed::Code(4002, "Duplicate connection opened".into())
    );
    new.ping().await;
    // Consumers: one per developer by default; the older one goes.
    let mut c1 = srv.consumer().await;
    let mut c2 = srv.consumer().await;
    assert_eq!(c1.close_code().await, 4002);
    new.submit("STEPS", r#"{"val":1}"#).await;
    assert_eq!(dispatch(&c2.recv().await).0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identifies_leave_exactly_one_connection() {
    let srv = TestServer::start().await;
    let mut racers = Vec::new();
    for _ in 0..20 {
        racers.push((
            Client::connect(srv.addr).await,
            srv.token("/auth/user?id=racer").await,
        ));
    }
    let handles: Vec<_> = racers
        .into_iter()
        .map(|(mut c, t)| {
            tokio::spawn(async move {
                c.send(&format!(r#"{{"op":3,"d":{{"token":"{t}","type":0}}}}"#))
                    .await;
                assert_eq!(c.recv().await, r#"{"op":4}"#);
                c
            })
        })
        .collect();
    let mut clients = Vec::new();
    for h in handles {
        clients.push(h.await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut alive = 0;
    for mut c in clients {
        c.send(r#"{"op":0}"#).await;
        match c.ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == r#"{"op":1}"# => alive += 1,
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4002),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(alive, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_close_with_1009_whole_or_fragmented() {
    let srv = TestServer::start_with(|c| c.max_frame_bytes = 1024).await;
    let mut bystander = srv.producer("b").await;
    let mut whole = srv.producer("w").await;
    whole
        .submit("X", &format!(r#"{{"p":"{}"}}"#, "a".repeat(2000)))
        .await;
    assert_eq!(whole.close_code().await, 1009);
    let mut fragmented = srv.producer("f").await;
    // 8 fragments of 200 bytes: each frame is small, the message is not.
    let chunk = "a".repeat(200);
    fragmented
        .send_msg(fragment(chunk.as_bytes(), true, false))
        .await;
    for i in 0..7 {
        fragmented
            .send_msg(fragment(chunk.as_bytes(), false, i == 6))
            .await;
    }
    assert_eq!(fragmented.close_code().await, 1009);
    // Just under the limit, fragmented, is one ordinary SUBMIT.
    let mut consumer = srv.consumer().await;
    let body = format!(r#"{{"op":6,"t":"X","d":{{"p":"{}"}}}}"#, "b".repeat(900));
    let (a, b) = body.split_at(400);
    let mut ok = srv.producer("ok").await;
    ok.send_msg(fragment(a.as_bytes(), true, false)).await;
    ok.send_msg(fragment(b.as_bytes(), false, true)).await;
    let (_, uid, _, d) = dispatch(&consumer.recv().await);
    assert_eq!((uid.as_str(), d.len()), ("ok", 900 + 8));
    bystander.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007_and_client_close_is_answered() {
    let srv = TestServer::start().await;
    let mut c = srv.producer("u").await;
    c.send_msg(fragment(&[0xff, 0xfe], true, true)).await;
    assert_eq!(c.close_code().await, 1007);
    // A binary message carries the same JSON as a text one, and the same check.
    let mut consumer = srv.consumer().await;
    let mut binary = srv.producer("b").await;
    let submit = br#"{"op":6,"t":"STEPS","d":{"n":1}}"#;
    binary
        .send_msg(Message::Binary(submit.to_vec().into()))
        .await;
    assert_eq!(
        consumer.recv().await,
        r#"{"op":5,"d":{"n":1},"uid":"b","seq":1,"t":"STEPS"}"#
    );
    binary
        .send_msg(Message::Binary(vec![b'{', 0xff].into()))
        .await;
    assert_eq!(binary.close_code().await, 1007);
    let mut polite = srv.producer("p").await;
    polite.send_msg(ws_close(1000)).await;
    assert_eq!(polite.close_code().await, 1000);
}

/// A client that pings but never reads: once its socket is full and 64 pongs wait unsent, the
/// server closes it with 4008 instead of buffering without bound, and serves everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_closed_4008() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start().await;
    let mut bystander = srv.producer("bystander").await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(srv.addr).await.unwrap();
    let upgrade = format!(
        "GET /connect HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        srv.addr
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let (mut read, mut write) = tcp.into_split();

    // Masked (with a zero key) 125-byte pings, 100 per write; stops at the first error,
    // which comes once the server has closed.
    let mut pings = Vec::new();
    for _ in 0..100 {
        pings.extend_from_slice(&[0x89, 0x80 | 125, 0, 0, 0, 0]);
        pings.extend_from_slice(&[b'p'; 125]);
    }
    let writer = tokio::spawn(async move {
        for _ in 0..1000 {
            if write.write_all(&pings).await.is_err() {
                break;
            }
        }
    });
    // Not reading for a while is the point: the server's pongs pile up.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), writer).await;

    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(WAIT, read.read_to_end(&mut bytes)).await;
    let body = &bytes[bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    // Walk the server's (unmasked) frames to the close frame.
    let mut at = 0;
    let mut close = None;
    while at + 2 <= body.len() {
        let (op, len7) = (body[at] & 0x0f, (body[at + 1] & 0x7f) as usize);
        let (len, head) = match len7 {
            126 => (u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize, 4),
            n => (n, 2),
        };
        let payload = &body[at + head..(at + head + len).min(body.len())];
        if op == 8 {
            close = Some(u16::from_be_bytes([payload[0], payload[1]]));
            break;
        }
        at += head + len;
    }
    assert_eq!(close, Some(4008), "{} bytes, walked to {at}", body.len());
    bystander.ping().await;
    let scrape = srv.metrics().await;
    // Other tests in this binary share the recorder: at least this close is counted.
    assert!(metric(&scrape, r#"sensorgate_close_codes_total{code="4008"}"#) >= 1.0);
}

/// Many pings in one write are answered, however many: the reply bound is about unread
/// replies, not about bursts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pings_from_a_reading_client_is_answered() {
    use futures_util::SinkExt;
    let srv = TestServer::start().await;
    let mut c = srv.producer("pinger").await;
    for i in 0..500u32 {
        c.ws.feed(Message::Ping(i.to_be_bytes().to_vec().into()))
            .await
            .unwrap();
    }
    c.ws.flush().await.unwrap();
    for i in 0..500u32 {
        let msg = tokio::time::timeout(WAIT, c.ws.next()).await.unwrap();
        match msg {
            Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], &i.to_be_bytes()),
            other => panic!("pong {i}: got {other:?}"),
        }
    }
    c.ping().await;
}
