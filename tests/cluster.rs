//! Cluster mode: sensorgate nodes on a real three-server NATS JetStream cluster (R3) serve one
//! set of streams. A reading submitted on any node gets its seq from JetStream and reaches the
//! developer's consumers on every node, in seq order, once; every node replays the same
//! history.

mod common;

use common::cluster::*;
use common::*;
use std::time::{Duration, Instant};

/// A node on each nats-server of the cluster.
async fn nodes(nats: &NatsCluster, tweak: impl Fn(&mut Config)) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for s in &nats.servers {
        let url = s.url();
        nodes.push(
            TestServer::start_with(|c| {
                node_config(c, vec![url], nats.servers.len());
                tweak(c);
            })
            .await,
        );
    }
    nodes
}

async fn three_nodes(nats: &NatsCluster) -> Vec<TestServer> {
    nodes(nats, |c| c.max_consumers_per_developer = 4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_one_node_reach_consumers_on_another_in_seq_order() {
    let nats = NatsCluster::start(3).await;
    let nodes = three_nodes(&nats).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let mut consumer = b.consumer().await;
    let mut producer = a.producer("walker").await;
    for i in 1..=300 {
        producer.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
    }
    // A second producer on the third node: one stream, one seq space.
    let mut other = c.producer("runner").await;
    for i in 1..=50 {
        other.submit("PACE", &format!(r#"{{"k":{i}}}"#)).await;
    }
    let mut live = Vec::new();
    for _ in 0..350 {
        live.push(consumer.recv().await);
    }
    let seqs: Vec<u64> = live.iter().map(|f| dispatch(f).0).collect();
    assert_eq!(
        seqs,
        (1..=350).collect::<Vec<_>>(),
        "every reading once, in seq order"
    );
    // Per producer, readings keep their order.
    let walker: Vec<String> = live
        .iter()
        .map(|f| dispatch(f))
        .filter(|d| d.1 == "walker")
        .map(|d| d.3)
        .collect();
    let expected: Vec<String> = (1..=300).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    assert_eq!(walker, expected);

    // A REPLAY on the third node returns the same history, byte for byte.
    let mut replayer = c.consumer().await;
    replayer.send(r#"{"op":7,"d":{"after":0}}"#).await;
    let mut replayed = Vec::new();
    for _ in 0..350 {
        replayed.push(replayer.recv().await);
    }
    assert_eq!(replayed, live);
    // Bounds are exclusive, as on one node.
    replayer
        .send(r#"{"op":7,"d":{"after":100,"before":104}}"#)
        .await;
    let range: Vec<u64> = [
        replayer.recv().await,
        replayer.recv().await,
        replayer.recv().await,
    ]
    .iter()
    .map(|f| dispatch(f).0)
    .collect();
    assert_eq!(range, [101, 102, 103]);

    // Live readings keep coming to both consumers after the replay.
    producer.submit("STEPS", r#"{"n":301}"#).await;
    assert_eq!(dispatch(&consumer.recv().await).0, 351);
    assert_eq!(dispatch(&replayer.recv().await).0, 351);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_used_on_one_node_is_refused_on_another() {
    let nats = NatsCluster::start(3).await;
    let nodes = three_nodes(&nats).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let token = a.token("/auth/user?id=u1").await;
    let _first = Client::identified(a.addr, &token, 0).await;
    let mut again = Client::connect(b.addr).await;
    again
        .send(&format!(r#"{{"op":3,"d":{{"token":"{token}","type":0}}}}"#))
        .await;
    assert_eq!(again.close_code().await, 4001);

    // STOMP CONNECT with a token redeemed over the opcode protocol elsewhere: refused too.
    let token = a.token("/auth/developer").await;
    let _consumer = Client::identified(a.addr, &token, 1).await;
    let mut stomp = common::stomp::Stomp::open(&nodes[2], None).await;
    stomp
        .send(&format!(
            "CONNECT\naccept-version:1.2\nhost:x\npasscode:{token}\n\n\0"
        ))
        .await;
    let frame = stomp.frame().await;
    assert!(frame.starts_with("ERROR"), "{frame}");
    // A fresh developer token connects over STOMP on any node.
    let fresh = b.token("/auth/developer").await;
    let (_ok, _) = common::stomp::Stomp::connected(
        &nodes[2],
        &format!("accept-version:1.2\nhost:x\npasscode:{fresh}\n"),
    )
    .await;
    let scrape = b.metrics().await;
    assert!(
        metric(
            &scrape,
            r#"sensorgate_kv_operations_total{op="redeem",result="refused"}"#
        ) >= 1.0,
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stops_tailing_a_stream_soon_after_its_last_consumer_leaves() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, |_| {}).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let stream = sensorgate::log::jetstream::stream_name(DEV);

    let mut consumer = a.consumer().await;
    let mut producer = b.producer("walker").await;
    producer.submit("STEPS", r#"{"n":1}"#).await;
    assert_eq!(dispatch(&consumer.recv().await).0, 1);
    assert_eq!(
        bound_consumers(&nats, &stream).await,
        1,
        "node a tails the stream"
    );

    // Behind a load balancer the consumer comes back on another node: the one it left must
    // not go on taking every reading from JetStream to drop it.
    drop(consumer);
    let left = Instant::now();
    while bound_consumers(&nats, &stream).await > 0 {
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "node a still tails the stream 10 s after its consumer left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut consumer = b.consumer().await;
    producer.submit("STEPS", r#"{"n":2}"#).await;
    assert_eq!(dispatch(&consumer.recv().await).0, 2);
    assert_eq!(
        bound_consumers(&nats, &stream).await,
        1,
        "node b tails it now"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_connection_wins_across_nodes() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, |_| {}).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // One consumer per developer (the default), counted cluster-wide.
    let mut first = a.consumer().await;
    let mut second = b.consumer().await;
    assert_eq!(first.close_code().await, 4002);
    // The same user producing from two nodes: the older connection goes.
    let mut old = b.producer("wearer").await;
    let mut new = c.producer("wearer").await;
    assert_eq!(old.close_code().await, 4002);
    // The winners work: a reading from the new producer reaches the new consumer.
    new.submit("HEART_RATE", r#"{"bpm":61}"#).await;
    let (_, uid, t, d) = dispatch(&second.recv().await);
    assert_eq!(
        (uid.as_str(), t.as_str(), d.as_str()),
        ("wearer", "HEART_RATE", r#"{"bpm":61}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jetstream_a_node_is_not_ready_and_producers_get_1011() {
    let mut nats = NatsCluster::start(3).await;
    let node = TestServer::start_with(|c| {
        node_config(c, nats.urls(), 3);
        if let Some(cluster) = &mut c.cluster {
            cluster.publish_retry_ms = 1500;
        }
    })
    .await;
    let mut producer = node.producer("wearer").await;
    let mut witness = node.consumer().await;
    producer.submit("STEPS", r#"{"n":1}"#).await;
    assert_eq!(
        dispatch(&witness.recv().await).0,
        1,
        "stored before the servers go"
    );
    drop(witness);
    assert_eq!(http(node.addr, "GET", "/readyz", &[]).await.0, 200);

    for s in &mut nats.servers {
        s.kill9();
    }
    let started = std::time::Instant::now();
    while http(node.addr, "GET", "/readyz", &[]).await.0 != 503 {
        assert!(started.elapsed() < WAIT, "/readyz stayed 200 without NATS");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Readings JetStream cannot take are retried for publish_retry_ms, then the producer is
    // closed with 1011.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            producer.submit("STEPS", r#"{"n":2}"#).await;
            match tokio::time::timeout(
                std::time::Duration::from_millis(100),
                futures_util::StreamExt::next(&mut producer.ws),
            )
            .await
            {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))))) => {
                    return u16::from(f.code)
                }
                Ok(None | Some(Err(_))) => return 0,
                _ => {}
            }
        }
    })
    .await
    .expect("the producer is closed while JetStream is gone");
    assert_eq!(closed, 1011);

    // The servers come back (same stores): the node is ready again and takes readings.
    for s in &mut nats.servers {
        s.restart();
    }
    nats.wait_formed()
        .await
        .expect("the restarted servers form the cluster again");
    let started = std::time::Instant::now();
    while http(node.addr, "GET", "/readyz", &[]).await.0 != 200 {
        assert!(started.elapsed() < WAIT * 2, "/readyz never came back");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let scrape = node.metrics().await;
    assert!(
        metric(
            &scrape,
            r#"sensorgate_nats_events_total{event="disconnected"}"#
        ) >= 1.0,
        "{scrape}"
    );
    assert!(metric(&scrape, "sensorgate_jetstream_publish_retries_total") >= 1.0);
    // Right after a restart the stream's leader may still be elected: a consumer that
    // cannot be given a tail in time is closed with 1011 and comes back, as a client would.
    let started = std::time::Instant::now();
    let mut consumer = loop {
        let token = node.token("/auth/developer").await;
        let mut c = Client::connect(node.addr).await;
        c.send(&format!(r#"{{"op":3,"d":{{"token":"{token}","type":1}}}}"#))
            .await;
        match futures_util::StreamExt::next(&mut c.ws).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
                if t.as_str() == r#"{"op":4}"# =>
            {
                break c
            }
            other => {
                assert!(
                    started.elapsed() < WAIT,
                    "no consumer after the restart: {other:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    consumer.send(r#"{"op":7,"d":{"after":0}}"#).await;
    let (seq, _, _, d) = dispatch(&consumer.recv().await);
    assert_eq!((seq, d.as_str()), (1, r#"{"n":1}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_stream_topics_and_lagging_consumers_behave_as_on_one_node() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, |c| {
        c.max_consumers_per_developer = 4;
        c.consumer_queue_max = 64;
    })
    .await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // A consumer that reads nothing while 4,000 readings of ~1 KB go its way falls behind
    // (its socket, then its 64-frame outbox fill); then it catches up from JetStream.
    let t = b.token("/auth/developer").await;
    let mut slow = Client::consumer_small_window(b.addr, &t).await;
    let pad = "x".repeat(1000);
    let mut producer = a.producer("u-1").await;
    for i in 1..=4000 {
        producer
            .submit("STEPS", &format!(r#"{{"n":{i},"p":"{pad}"}}"#))
            .await;
    }
    producer.ping().await;
    // The STOMP view of the same stream on a third node, from seq 3998 on.
    let dev = c.token("/auth/developer").await;
    let (mut stomp, _) = common::stomp::Stomp::connected(
        c,
        &format!("accept-version:1.2\nhost:x\npasscode:{dev}\n"),
    )
    .await;
    stomp
        .send_synced(
            "SUBSCRIBE\nid:mine\ndestination:/topic/streams/acme\nreplay-after:3997\n\n\0",
            "sub",
        )
        .await;
    for seq in 3998..=4000u64 {
        let m = stomp.frame().await;
        assert!(m.contains(&format!("\nseq:{seq}\n")), "{m}");
    }
    for seq in 1..=4000u64 {
        assert_eq!(dispatch(&slow.recv().await).0, seq);
    }
    producer.submit("STEPS", r#"{"n":0}"#).await;
    assert_eq!(
        dispatch(&slow.recv().await).0,
        4001,
        "back on live delivery"
    );
    let m = stomp.frame().await;
    assert!(m.contains("\nseq:4001\n"), "{m}");
    let scrape = b.metrics().await;
    assert!(
        metric(&scrape, "sensorgate_consumer_lags_total") >= 1.0,
        "{scrape}"
    );
    assert!(metric(&scrape, "sensorgate_catchup_frames_total") >= 1.0);
}

/// A publish whose ack is lost may have been stored all the same. With a 1 ms ack timeout
/// nearly every ack is "lost" while JetStream stores the readings: the node reads the stream
/// back before sending anything again, so each reading is stored exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_whose_acks_are_lost_are_stored_once() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, |c| {
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.ack_timeout_ms = 1;
        }
    })
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut consumer = b.consumer().await;
    let mut producer = a.producer("walker").await;
    for i in 1..=200 {
        producer.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
    }
    let mut live = Vec::new();
    for _ in 0..200 {
        live.push(dispatch(&consumer.recv().await));
    }
    assert_eq!(
        live.iter().map(|d| d.0).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>(),
        "seqs 1..=200, each once"
    );
    assert_eq!(
        live.iter().map(|d| d.3.clone()).collect::<Vec<_>>(),
        (1..=200)
            .map(|i| format!(r#"{{"n":{i}}}"#))
            .collect::<Vec<_>>(),
        "every reading once, in the order it was sent"
    );
    // Nothing stored twice arrives later.
    assert!(
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            futures_util::StreamExt::next(&mut consumer.ws)
        )
        .await
        .is_err(),
        "no reading after the 200th"
    );
    let metrics = a.metrics().await;
    let retries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sensorgate_jetstream_publish_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        retries > 0.0,
        "acks were lost and readings sent again:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("jetstream"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every server stores a developer's stream in blocks of at most 4 MiB, so none grows a
/// block's write buffer from 4 to 8 MiB, a step all replicas took at once and the largest
/// stall of a run (`BLOCK_SIZE_HINT` in src/log/jetstream.rs). 640 readings of 8,000 bytes
/// fill more than one such block on each of the three servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_stores_a_developer_stream_in_blocks_of_at_most_4_mib() {
    const READINGS: usize = 640;
    const MIB: u64 = 1024 * 1024;
    let nats = NatsCluster::start(3).await;
    let node = TestServer::start_with(|c| node_config(c, nats.urls(), 3)).await;
    let mut consumer = node.consumer().await;
    let mut producer = node.producer("walker").await;
    let blob = "x".repeat(8000);
    for i in 1..=READINGS {
        producer
            .submit("BLOB", &format!(r#"{{"n":{i},"b":"{blob}"}}"#))
            .await;
    }
    for seq in 1..=READINGS as u64 {
        assert_eq!(dispatch(&consumer.recv().await).0, seq);
    }
    let stored = (READINGS * 8000) as u64;
    for i in 1..=3 {
        let store = nats.dir.path().join(format!("n{i}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let blocks = loop {
            let blocks = stream_blocks(&store, &format!("SG_{DEV}"));
            let held: u64 = blocks.iter().sum();
            if held >= stored {
                break blocks;
            }
            assert!(
                Instant::now() < deadline,
                "n{i} holds {held} of the stream's bytes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(blocks.len() >= 2, "n{i}: {blocks:?}");
        assert!(
            blocks.iter().all(|&b| b <= 4 * MIB),
            "n{i}: a block over 4 MiB: {blocks:?}"
        );
    }
}

/// The sizes of the message blocks of the stream `name` in a nats-server's store directory
/// (`jetstream/<account>/streams/<name>/msgs/*.blk`; the servers here have no accounts, so
/// everything is in the global one, `$G`).
fn stream_blocks(store: &std::path::Path, name: &str) -> Vec<u64> {
    let msgs = store.join("jetstream/$G/streams").join(name).join("msgs");
    std::fs::read_dir(msgs)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "blk"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .collect()
}
