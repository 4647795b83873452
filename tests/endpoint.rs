//! Seed 003's notification endpoint against the real server: the `/stream` handshake, the
//! JSON API over `POST /json` and over the socket with both interface name families, pushes
//! compared byte for byte with tests/golden/endpoint, the throttle, the socket's timers and
//! the metrics.

mod common;

use common::endpoint::{golden, json_body, json_call, json_call_text, outcome, publish, Endpoint};
use common::*;
use sensorgate::config::EndpointTokenConfig;
use serde_json::{json, Value};

const REGISTRY: &str = "org.bimserver.NotificationRegistryInterface";
const OLD_REGISTRY: &str = "Bimsie1NotificationRegistryInterface";
const STATIC_TOKEN: &str = "a-static-bimserver-token";

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.endpoint_context_path = "/bimserver".into();
        c.endpoint_tokens = vec![EndpointTokenConfig {
            id: "bimviews".into(),
            api_key: Some(STATIC_TOKEN.into()),
            api_key_sha256: None,
            developer: None,
            prefixes: None,
        }];
        // Long enough that no progress-only update gets through by timing in these tests.
        c.endpoint_progress_interval_ms = 3_600_000;
    })
    .await
}

/// Topic 12 as a checkin starts it, with a fixed start so pushes match the golden files.
async fn start_topic(srv: &TestServer) {
    let first = json!({"progress": 0, "state": "STARTED", "title": "Checking in model.ifc",
                       "stage": 1, "start": 1_700_000_000_000u64});
    publish(srv, "/bimserver/progress/12", first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_bad_then_good_token_hb_ignored_and_unregistered_on_close() {
    let srv = server().await;
    let token = srv.token("/auth/user?id=alice").await;

    let before = sensorgate::hub::now_ms();
    let mut e = Endpoint::open(&srv, "/stream").await;
    assert!(e.welcome >= before && e.welcome <= sensorgate::hub::now_ms() + 1);
    // A bad token is answered, and the socket stays open for another try.
    e.send(r#"{"token":"not-a-token"}"#).await;
    assert_eq!(e.recv().await, r#"{"error":"Invalid token"}"#);
    // A keep-alive gets no answer: the next message is the endpoint reply.
    e.send(r#"{"hb":true}"#).await;
    let id = e.identify(&token).await;
    // The same token serves the JSON API too (BIMserver's clients reuse their login token).
    let (status, reply) = json_call(
        &srv,
        &token,
        REGISTRY,
        "registerNewProjectHandler",
        json!({"endPointId": id}),
    )
    .await;
    assert_eq!((status, outcome(&reply)), (200, Ok(json!({}))));

    // Under the context path, with a configured static token: another, later id.
    let mut other = Endpoint::connected(&srv, "/bimserver/stream", STATIC_TOKEN).await;
    assert!(other.id > id, "ids are unique for the server's life");
    other.send(r#"{"token":"again"}"#).await;
    let again = other.recv_json().await;
    assert_eq!(
        again["error"],
        format!("This socket is endpoint {} already", other.id)
    );

    // Closed: the endpoint is gone, and registering it is the documented exception.
    drop(e);
    let gone = format!("Endpoint with id {id} not found");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, reply) = json_call(
            &srv,
            &token,
            "NotificationRegistryInterface",
            "registerNewRevisionHandler",
            json!({"endPointId": id}),
        )
        .await;
        match outcome(&reply) {
            Err(message) if message == gone => break,
            Ok(_) => assert!(std::time::Instant::now() < deadline, "still registered"),
            Err(other) => panic!("{other}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Nobody else's endpoint is theirs to register: it is "not found" too.
    let (_, reply) = json_call(
        &srv,
        &token,
        REGISTRY,
        "registerNewProjectHandler",
        json!({"endPointId": other.id}),
    )
    .await;
    assert_eq!(
        outcome(&reply),
        Err(format!("Endpoint with id {} not found", other.id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_by_json_and_socket_push_the_golden_bytes() {
    let srv = server().await;
    let alice = srv.token("/auth/user?id=alice").await;
    let bob = srv.token("/auth/user?id=bob").await;
    start_topic(&srv).await;

    // Alice registers over POST /json with the qualified current name.
    let mut a = Endpoint::connected(&srv, "/stream", &alice).await;
    let (_, reply) = json_call(
        &srv,
        &alice,
        REGISTRY,
        "registerProgressHandler",
        json!({"topicId": 12, "endPointId": a.id}),
    )
    .await;
    assert_eq!(outcome(&reply), Ok(json!({})));
    // ...then asks for the state, as the JavaScript client does right after.
    let (_, reply) = json_call_text(
        &srv,
        &alice,
        REGISTRY,
        "getProgress",
        json!({"topicId": 12}),
    )
    .await;
    assert_eq!(reply, golden("get-progress.json"));

    // Bob registers over his socket with the pre-2016 names, several calls in one envelope.
    let mut b = Endpoint::connected(&srv, "/bimserver/stream", &bob).await;
    let calls = json!({"id": 7, "requests": [
        {"interface": OLD_REGISTRY, "method": "registerProgressHandler",
         "parameters": {"endPointId": b.id, "topicId": 12}},
        {"interface": "org.buildingsmart.bimsie1.Bimsie1NotificationRegistryInterface",
         "method": "registerNewRevisionHandler", "parameters": {"endPointId": b.id}},
        {"interface": OLD_REGISTRY, "method": "registerProgressHandler",
         "parameters": {"endPointId": b.id, "topicId": 99}},
    ]});
    b.send(&calls.to_string()).await;
    assert_eq!(
        b.recv().await,
        r#"{"id":7,"responses":[{"result":{}},{"result":{}},{"exception":{"__type":"UserException","message":"Topic with id 99 not found"}}]}"#
    );

    // A stage change goes at once, to each in the family it registered with.
    let update =
        json!({"progress": 42, "stage": 2, "title": "Storing", "warnings": ["unit guessed"]});
    publish(&srv, "/bimserver/progress/12", update).await;
    assert_eq!(a.recv().await, golden("progress.json"));
    assert_eq!(b.recv().await, golden("progress-bimsie1.json"));

    publish(
        &srv,
        "/bimserver/newRevision",
        json!({"poid": 65539, "roid": 131075}),
    )
    .await;
    assert_eq!(b.recv().await, golden("new-revision-bimsie1.json"));
    // Alice registers for new projects over her socket, without a token in the envelope.
    let reply = a
        .call(
            3,
            "NotificationRegistryInterface",
            "registerNewProjectHandler",
            json!({"endPointId": a.id}),
        )
        .await;
    assert_eq!(outcome(&reply), Ok(json!({})));
    publish(&srv, "/bimserver/newProject", json!({"poid": 65539})).await;
    // She was not registered for the revision: the project is her next message.
    assert_eq!(a.recv().await, golden("new-project.json"));

    // Alice unregisters; the finish reaches Bob alone.
    let (_, reply) = json_call(
        &srv,
        &alice,
        "NotificationRegistryInterface",
        "unregisterProgressHandler",
        json!({"topicId": 12, "endPointId": a.id}),
    )
    .await;
    assert_eq!(outcome(&reply), Ok(json!({})));
    let done = json!({"progress": 100, "state": "FINISHED", "end": 1_700_000_005_000u64,
                      "infos": ["stored as roid 131075"]});
    publish(&srv, "/bimserver/progress/12", done).await;
    assert_eq!(b.recv().await, golden("progress-finished-bimsie1.json"));
    let reply = a
        .call(4, REGISTRY, "getProgress", json!({"topicId": 12}))
        .await;
    assert_eq!(outcome(&reply).unwrap()["state"], "FINISHED");

    // Refusals, each naming what is wrong; the server carries on.
    for (token, method, params, want) in [
        (
            alice.as_str(),
            "registerProgressHandler",
            json!({"endPointId": a.id}),
            "Missing parameter: topicId",
        ),
        (
            alice.as_str(),
            "registerNewRevisionHandler",
            json!({"endPointId": null}),
            "No EndpointId given",
        ),
        (
            alice.as_str(),
            "registerProgressHandler",
            json!({"topicId": 12, "endPointId": b.id}),
            &*format!("Endpoint with id {} not found", b.id),
        ),
        (
            alice.as_str(),
            "getProgress",
            json!({"topicId": 404}),
            "Topic with id 404 not found",
        ),
        (
            "forged",
            "getProgress",
            json!({"topicId": 12}),
            "Invalid token",
        ),
    ] {
        let (status, reply) = json_call(&srv, token, REGISTRY, method, params).await;
        assert_eq!(
            (status, outcome(&reply)),
            (200, Err(want.to_string())),
            "{method}"
        );
    }
    let (status, reply) = json_body(&srv, "/bimserver/json", "{\"token\":\"x\"}").await;
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(status, 400);
    assert!(
        outcome(&reply).unwrap_err().starts_with("Invalid request"),
        "{reply}"
    );
    let (status, _) = http(srv.addr, "OPTIONS", "/json", &[]).await;
    assert_eq!(status, 204);

    let scrape = srv.metrics().await;
    for (line, at_least) in [
        ("sensorgate_endpoints", 2.0),
        ("sensorgate_endpoint_pushes_total{method=\"progress\"}", 3.0),
        ("sensorgate_endpoint_pushes_total{method=\"newRevision\"}", 1.0),
        ("sensorgate_endpoint_pushes_total{method=\"newProject\"}", 1.0),
        ("sensorgate_endpoint_calls_total{method=\"registerProgressHandler\",outcome=\"result\"}", 2.0),
        ("sensorgate_endpoint_calls_total{method=\"registerProgressHandler\",outcome=\"exception\"}", 3.0),
        ("sensorgate_endpoint_calls_total{method=\"getProgress\",outcome=\"exception\"}", 2.0),
        ("sensorgate_endpoint_handshakes_total{outcome=\"accepted\"}", 2.0),
        ("sensorgate_progress_topics", 1.0),
    ] {
        assert!(metric(&scrape, line) >= at_least, "{line}: {scrape}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_alone_is_held_until_something_that_matters_changes() {
    let srv = server().await;
    let token = srv.token("/auth/developer").await;
    start_topic(&srv).await;
    let mut e = Endpoint::connected(&srv, "/stream", &token).await;
    let reply = e
        .call(
            1,
            REGISTRY,
            "registerProgressHandler",
            json!({"topicId": 12, "endPointId": e.id}),
        )
        .await;
    assert_eq!(outcome(&reply), Ok(json!({})));
    // The topic's first state went out when it started; progress alone now waits for the
    // window, which here is an hour.
    for p in [10, 20, 30] {
        publish(&srv, "/bimserver/progress/12", json!({"progress": p})).await;
    }
    // A title change goes at once and carries the latest progress: it is the next push.
    publish(
        &srv,
        "/bimserver/progress/12",
        json!({"progress": 35, "title": "Indexing"}),
    )
    .await;
    let next = e.recv_json().await;
    let state = &next["request"]["parameters"]["state"];
    assert_eq!(
        (state["progress"].clone(), state["title"].clone()),
        (json!(35), json!("Indexing")),
        "{next}"
    );
    // Reaching 100 goes at once too.
    publish(&srv, "/bimserver/progress/12", json!({"progress": 100})).await;
    assert_eq!(
        e.recv_json().await["request"]["parameters"]["state"]["progress"],
        100
    );
    let scrape = srv.metrics().await;
    assert!(
        metric(
            &scrape,
            "sensorgate_progress_updates_total{outcome=\"held\"}"
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sockets_timers_and_bad_input() {
    let srv = TestServer::start_with(|c| {
        c.identify_timeout_ms = 300;
        c.endpoint_idle_timeout_ms = 1200;
    })
    .await;
    // No token in time: 4000.
    let mut silent = Endpoint::open(&srv, "/stream").await;
    assert!(matches!(silent.closed().await, Closed::Code(4000, _)));

    // Unrecognised JSON is answered and the socket stays; text that is not JSON is 1007.
    let token = srv.token("/auth/developer").await;
    let mut e = Endpoint::connected(&srv, "/stream", &token).await;
    e.send(r#"{"what":1}"#).await;
    let err: Value = e.recv_json().await;
    assert!(
        err["error"].as_str().unwrap().starts_with("expected"),
        "{err}"
    );
    e.send("{not json").await;
    assert!(matches!(e.closed().await, Closed::Code(1007, _)));

    // An endpoint that reads (so its library answers pings) stays up without sending hb:
    // the server pings it after a third of the idle time. It is served after all of the
    // above.
    let token = srv.token("/auth/developer").await;
    let mut reader = Endpoint::connected(&srv, "/stream", &token).await;
    let reply = reader
        .call(
            1,
            REGISTRY,
            "registerNewProjectHandler",
            json!({"endPointId": reader.id}),
        )
        .await;
    assert_eq!(outcome(&reply), Ok(json!({})));
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(3000), reader.recv()).await;
    assert!(
        quiet.is_err(),
        "nothing but pings in the meantime: {quiet:?}"
    );
    publish(&srv, "/bimserver/newProject", json!({"poid": 2})).await;
    assert_eq!(reader.recv_json().await["request"]["parameters"]["poid"], 2);

    // One that does not read never answers: 4005 after the idle time.
    let token = srv.token("/auth/developer").await;
    let mut deaf = Endpoint::connected(&srv, "/stream", &token).await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(matches!(deaf.closed().await, Closed::Code(4005, _)));
}
