//! Cluster mode: sensorgate nodes on a real three-server NATS JetStream cluster (R3) serve one
//! set of streams. A reading submitted on any node gets its seq from JetStream and reaches the
//! developer's consumers on every node, in seq order, once; every node replays the same
//! history.

mod common;

use common::cluster::*;
use common::*;

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
