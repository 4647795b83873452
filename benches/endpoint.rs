//! Endpoint push benchmark: what a progress update costs from the backend's data to every
//! registered endpoint's inbox, against a plain topic publish of the same bytes to the same
//! number of subscribers (the baseline, measured in the same run).
//!
//! - `endpoint_push/progress/<N>`: one update that changes the stage (so the throttle lets
//!   it through) merged into the topic's state, the push encoded once, fanned out to `N`
//!   registered endpoints; each inbox is then drained and its outbox released, as the
//!   connection does.
//! - `endpoint_push/topic_baseline/<N>`: a prebuilt body of the same size published to `N`
//!   subscribers of a STOMP topic, drained the same way: the hub's fan-out alone.
//! - `endpoint_codec/*`: encoding one progress push; a JSON API envelope parsed, resolved
//!   and its reply encoded.
//!
//! Run: `cargo bench --bench endpoint -- --warm-up-time 1 --measurement-time 3`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use sensorgate::frontend::endpoint::api::{self, Envelope, Outcome};
use sensorgate::frontend::endpoint::frame::progress_push;
use sensorgate::hub::endpoints::{
    EndpointLimits, Endpoints, Family, Notification, ProgressState, ProgressUpdate,
};
use sensorgate::hub::{Inbox, Kick, Outbox, TopicDelivery, TopicMessage, Topics};

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

fn inbox(conn: u64) -> (Inbox, mpsc::UnboundedReceiver<TopicDelivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let inbox = Inbox {
        conn,
        tx,
        outbox: Outbox::new(65_536, 8 << 20),
        kick: Kick::new(),
    };
    (inbox, rx)
}

/// Takes everything queued, as a connection does before writing it.
fn drain(inboxes: &mut [(Inbox, mpsc::UnboundedReceiver<TopicDelivery>)]) {
    for (inbox, rx) in inboxes {
        while let Ok((key, message)) = rx.try_recv() {
            black_box(key);
            inbox.outbox.release(1, message.body.len());
        }
    }
}

fn push(c: &mut Criterion) {
    let mut group = c.benchmark_group("endpoint_push");
    group.throughput(Throughput::Elements(1));
    for n in [1u64, 100] {
        let topics = Topics::new();
        let endpoints = Endpoints::new(EndpointLimits {
            progress_interval_ms: 200,
            max_topics: 10,
            topic_ttl_ms: 3_600_000,
            max_registrations: 10,
        });
        let first = ProgressUpdate {
            title: Some("Checking in model.ifc".into()),
            ..Default::default()
        };
        endpoints
            .update("acme", 1, first, 0, &topics, progress_push)
            .expect("the topic starts");
        let mut inboxes: Vec<_> = (0..n).map(inbox).collect();
        for (i, (inbox, _)) in inboxes.iter().enumerate() {
            let id = endpoints.open(Arc::from("acme/alice"), Arc::from("acme"), inbox.clone());
            let family = if i % 2 == 0 {
                Family::Current
            } else {
                Family::Bimsie1
            };
            endpoints
                .register(id, "acme/alice", Notification::Progress(1), family, &topics)
                .expect("registered");
        }
        let mut stage = 0;
        let mut now = 0;
        group.bench_function(BenchmarkId::new("progress", n), |b| {
            b.iter(|| {
                stage = (stage + 1) % 8;
                now += 1;
                let update = ProgressUpdate {
                    stage: Some(stage),
                    progress: Some(stage * 10),
                    ..Default::default()
                };
                endpoints
                    .update("acme", 1, update, now, &topics, progress_push)
                    .expect("pushed");
                drain(&mut inboxes);
            })
        });

        let body = Bytes::from(progress_push(
            1,
            &endpoints.progress("acme", 1).expect("exists"),
        ));
        let mut subscribers: Vec<_> = (0..n).map(|i| inbox(1000 + i)).collect();
        for (inbox, _) in &subscribers {
            topics.subscribe("/topic/baseline", 0, inbox);
        }
        let destination: Arc<str> = Arc::from("/topic/baseline");
        group.bench_function(BenchmarkId::new("topic_baseline", n), |b| {
            b.iter(|| {
                topics.publish(TopicMessage {
                    destination: destination.clone(),
                    id: topics.next_id(),
                    content_type: None,
                    headers: Vec::new(),
                    body: body.clone(),
                    text: true,
                });
                drain(&mut subscribers);
            })
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("endpoint_codec");
    group.throughput(Throughput::Elements(1));
    let state = ProgressState {
        progress: 42,
        state: sensorgate::hub::endpoints::ActionState::Started,
        title: "Checking in model.ifc".into(),
        stage: 2,
        start: 1_700_000_000_000,
        end: None,
        errors: vec![],
        warnings: vec!["unit guessed".into()],
        infos: vec![],
    };
    group.bench_function("progress_push", |b| {
        b.iter(|| black_box(progress_push(black_box(12), &state)))
    });
    let call = br#"{"token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.e30.x","request":{"interface":"org.bimserver.NotificationRegistryInterface","method":"registerProgressHandler","parameters":{"topicId":12,"endPointId":2}}}"#;
    group.bench_function("json_api_call", |b| {
        b.iter(|| {
            let envelope = Envelope::parse(black_box(call)).expect("an envelope");
            let (calls, many) = envelope.calls();
            let outcomes: Vec<Outcome> = calls
                .iter()
                .map(|raw| match api::resolve(raw).1 {
                    Ok(_) => Outcome::Void,
                    Err(e) => Outcome::Exception(e),
                })
                .collect();
            black_box(api::encode_reply(envelope.id.as_ref(), many, &outcomes))
        })
    });
    group.finish();
}

criterion_group! {
    name = endpoint;
    config = config();
    targets = push, codec
}
criterion_main!(endpoint);
