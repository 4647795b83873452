//! Cluster mode: sensorgate nodes on a real three-server NATS JetStream cluster (R3) serve one
//! set of streams. A reading submitted on any node gets its seq from JetStream and reaches the
//! developer's consumers on every node, in seq order, once; every node replays the same
//! history.

mod common;

use common::cluster::*;
use common::*;

/// Three nodes, each on its own nats-server of a three-server cluster.
async fn three_nodes(nats: &NatsCluster) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for s in &nats.servers {
        let url = s.url();
        nodes.push(
            TestServer::start_with(|c| {
                node_config(c, vec![url], 3);
                c.max_consumers_per_developer = 4;
            })
            .await,
        );
    }
    nodes
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
