//! The HTTP side of the listener: token endpoints, health, 404/405, and the metrics scrape
//! after a scenario.

mod common;

use base64::Engine;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoints_answer_200_400_403() {
    let srv = TestServer::start().await;
    let a = srv.addr;
    let creds = [("dev-id", DEV), ("x-api-key", KEY)];
    let (s, body) = http(a, "POST", "/auth/developer", &creds).await;
    assert_eq!(s, 200);
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"].is_string());
    assert_eq!(http(a, "POST", "/auth/user?id=u-1", &creds).await.0, 200);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{DEV}:{KEY}"))
    );
    assert_eq!(
        http(a, "POST", "/auth/user?id=u-1", &[("authorization", &basic)])
            .await
            .0,
        200
    );
    // 400: missing credentials or user id, or a user id that cannot be a uid.
    assert_eq!(http(a, "POST", "/auth/developer", &[]).await.0, 400);
    assert_eq!(
        http(a, "POST", "/auth/developer", &[("dev-id", DEV)])
            .await
            .0,
        400
    );
    assert_eq!(http(a, "POST", "/auth/user", &creds).await.0, 400);
    assert_eq!(http(a, "POST", "/auth/user?id=", &creds).await.0, 400);
    assert_eq!(http(a, "POST", "/auth/user?id=a%22b", &creds).await.0, 400);
    // 403: wrong key, unknown developer.
    assert_eq!(
        http(
            a,
            "POST",
            "/auth/developer",
            &[("dev-id", DEV), ("x-api-key", "nope")]
        )
        .await
        .0,
        403
    );
    assert_eq!(
        http(
            a,
            "POST",
            "/auth/developer",
            &[("dev-id", "ghost"), ("x-api-key", KEY)]
        )
        .await
        .0,
        403
    );
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{DEV}:bad"))
    );
    assert_eq!(
        http(a, "POST", "/auth/user?id=u", &[("authorization", &wrong)])
            .await
            .0,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_unknown_routes() {
    let mut srv = TestServer::start().await;
    let a = srv.addr;
    assert_eq!(http(a, "GET", "/healthz", &[]).await, (200, "ok\n".into()));
    assert_eq!(
        http(a, "GET", "/readyz", &[]).await,
        (200, "ready\n".into())
    );
    assert_eq!(http(a, "GET", "/nope", &[]).await.0, 404);
    assert_eq!(http(a, "GET", "/connect/../metrics", &[]).await.0, 404);
    assert_eq!(http(a, "GET", "/auth/developer", &[]).await.0, 405);
    assert_eq!(http(a, "POST", "/metrics", &[]).await.0, 405);
    // /connect without an upgrade.
    assert_eq!(http(a, "GET", "/connect", &[]).await.0, 426);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrape_reflects_a_scenario() {
    let srv = TestServer::start().await;
    let mut consumer = srv.consumer().await;
    let mut producer = srv.producer("m").await;
    for i in 0..10 {
        producer.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
    }
    for _ in 0..10 {
        consumer.recv().await;
    }
    producer.ping().await;
    consumer
        .send(r#"{"op":7,"d":{"after":0,"before":4}}"#)
        .await;
    for _ in 0..3 {
        consumer.recv().await;
    }
    let mut bad = Client::connect(srv.addr).await;
    bad.send("nope").await;
    assert_eq!(bad.close_code().await, 1007);

    let s = srv.metrics().await;
    // Counters are process-wide (tests share the recorder), so check lower bounds.
    assert!(
        metric(&s, r#"sensorgate_frames_in_total{op="submit"}"#) >= 10.0,
        "{s}"
    );
    assert!(metric(&s, r#"sensorgate_frames_in_total{op="heartbeat"}"#) >= 1.0);
    assert!(metric(&s, r#"sensorgate_frames_out_total{op="dispatch"}"#) >= 13.0);
    assert!(metric(&s, r#"sensorgate_frames_out_total{op="hello"}"#) >= 3.0);
    assert!(metric(&s, r#"sensorgate_close_codes_total{code="1007"}"#) >= 1.0);
    assert!(metric(&s, r#"sensorgate_connections{role="developer"}"#) >= 1.0);
    assert!(metric(&s, r#"sensorgate_connections{role="user"}"#) >= 1.0);
    assert!(metric(&s, "sensorgate_replay_requests_total") >= 1.0);
    assert!(metric(&s, "sensorgate_readings_stored_total") >= 10.0);
    assert!(metric(&s, "sensorgate_streams") >= 1.0);
    assert!(metric(&s, "sensorgate_process_resident_memory_bytes") > 1e6);
    assert!(metric(&s, r#"sensorgate_tokens_minted_total{role="user"}"#) >= 1.0);
    for histogram in [
        "sensorgate_submit_to_dispatch_seconds",
        "sensorgate_group_commit_readings",
        "sensorgate_fsync_seconds",
    ] {
        assert!(
            metric(&s, &format!("{histogram}_count")) >= 1.0,
            "{histogram} in {s}"
        );
        assert!(
            s.contains(&format!("{histogram}_bucket{{le=")),
            "{histogram} has buckets"
        );
    }
    // Labels come from closed sets: no user or developer id appears in the scrape.
    assert!(
        !s.contains("\"m\"") && !s.contains(DEV),
        "ids leaked into labels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_draining_then_clients_get_1001() {
    let mut srv = TestServer::start_with(|c| c.drain_delay_ms = 1500).await;
    let mut c = srv.producer("d").await;
    let addr = srv.addr;
    let stopping = tokio::spawn(srv.server.take().unwrap().stop());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        http(addr, "GET", "/readyz", &[]).await,
        (503, "draining\n".into())
    );
    // Still serving during the delay.
    c.ping().await;
    assert_eq!(c.close_code().await, 1001);
    stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
