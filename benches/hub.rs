//! Hub fan-out benchmark: the cost per reading of publishing to a stream and delivering to
//! every subscriber.
//!
//! `hub_fan_out/<N>`: a real [`Hub`] over a [`SledStore`] in fast durability (in a temporary
//! directory under cargo's target tmp dir, so on the same disk as the build), one stream,
//! `N` = 1, 10 or 100 subscribers, each a tokio task that drains its channel and releases
//! its outbox as the connection writer does. One iteration publishes [`READINGS`] readings
//! (179-byte DISPATCH frames of the codec benchmark's 120-byte SUBMIT; each a clone of a
//! prebuilt template, standing in for the front-end's encode) and waits until every
//! subscriber has received all of them: seq assignment, the log append, group commit
//! batching, the shared batch and the fan-out are all inside.
//! Throughput is per reading published (divide the iteration time by [`READINGS`] for the
//! time per reading; each reading is delivered `N` times).
//!
//! Run: `cargo bench --bench hub -- --warm-up-time 1 --measurement-time 3`
//! (1 s warm-up, 3 s measurement, 30 flat samples by default; see `config`).

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use serde_json::value::RawValue;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use sensorgate::config::Durability;
use sensorgate::frontend::opcode::dispatch_template;
use sensorgate::hub::{Hub, HubConfig, Kick, Publish, SeqTemplate, Subscriber};
use sensorgate::log::SledStore;

/// Readings published per iteration.
const READINGS: usize = 1000;
const UID: &str = "8e864e3a-979a-4d04-b4e9-b6d020f20ba0";

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

/// The DISPATCH template (179 bytes once filled) of the 120-byte SUBMIT of the codec
/// benchmark.
fn template() -> SeqTemplate {
    let d = format!(
        r#"{{"ts":"2022-05-04T10:26:11.268507+01:00","val":95,"pad":"{}"}}"#,
        "x".repeat(31)
    );
    let d = RawValue::from_string(d).expect("d is JSON");
    let template = dispatch_template(UID, "HEART_RATE", &d);
    assert_eq!(template.fill(1_000_000).len(), 179);
    template
}

fn hub_config() -> HubConfig {
    // The defaults of `Config`, with room for many consumers and no services.
    HubConfig {
        durability: Durability::Fast,
        max_consumers_per_developer: 1000,
        retention_max_age_s: 0,
        chat: false,
        ..HubConfig::from(&sensorgate::config::Config::default())
    }
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let template = template();
    let mut group = c.benchmark_group("hub_fan_out");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(READINGS as u64));
    for subscribers in [1usize, 10, 100] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir");
        let store = SledStore::open(
            &dir.path().join("store"),
            Durability::Fast,
            Duration::from_millis(5),
        )
        .expect("the store opens");
        let hub = Hub::new(Arc::new(store), hub_config());
        // Each subscriber signals `done` once per READINGS frames it has received.
        let (done_tx, mut done) = mpsc::unbounded_channel::<()>();
        let stream = rt.block_on(async {
            let stream = hub.stream("bench").expect("the stream opens");
            for id in 0..subscribers as u64 {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let outbox = hub.outbox();
                let sub = Subscriber {
                    id,
                    tx,
                    outbox: outbox.clone(),
                    kick: Kick::new(),
                };
                stream.subscribe(sub).await.expect("subscribed");
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let mut received = 0usize;
                    while let Some(batch) = rx.recv().await {
                        let bytes: usize = batch.frames.iter().map(|f| f.len()).sum();
                        black_box(bytes);
                        outbox.release(batch.frames.len(), batch.bytes);
                        received += batch.frames.len();
                        while received >= READINGS {
                            received -= READINGS;
                            let _ = done_tx.send(());
                        }
                    }
                });
            }
            stream
        });
        drop(done_tx);
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..READINGS {
                            stream
                                .publish(Publish {
                                    frame: template.clone(),
                                    received: Instant::now(),
                                })
                                .await
                                .expect("published");
                        }
                        for _ in 0..subscribers {
                            done.recv().await.expect("a subscriber finished");
                        }
                    }
                    start.elapsed()
                })
            })
        });
        // The owner stops once no handle on its stream is left.
        drop(stream);
        rt.block_on(hub.close()).expect("the hub closes");
    }
    group.finish();
}

criterion_group! {
    name = hub;
    config = config();
    targets = fan_out
}
criterion_main!(hub);
