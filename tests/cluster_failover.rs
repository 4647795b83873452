//! Cluster mode under failure: three sensorgate processes behind a real haproxy
//! (deploy/haproxy.cfg as shipped) on a real three-server NATS JetStream cluster (R3). A
//! consumer whose node is killed reconnects through haproxy and REPLAYs with nothing lost or
//! duplicated; a killed nats-server stalls producers for a few seconds and loses nothing; a
//! node told to stop drains (readiness first, then 1001) and haproxy stops sending it
//! clients. The soak repeats node kills under load (`SOAK_ROUNDS`, default 2; the README
//! says how to run it longer) and reports what it saw.

mod common;

use common::cluster::*;
use common::*;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Every DISPATCH a consumer saw, by seq: a second frame for a seq is a duplicate if it is
/// the same reading, a reused seq if not; a reading seen under two seqs (stored twice) is a
/// duplicate too.
#[derive(Default)]
struct Tally {
    seen: BTreeMap<u64, String>,
    /// Distinct readings per uid.
    per_uid: std::collections::HashMap<String, u64>,
    /// Every reading, to catch one stored twice (under two seqs).
    readings: std::collections::HashSet<String>,
    duplicated: u64,
    reused: u64,
}

impl Tally {
    fn add(&mut self, frame: &str) {
        let (seq, uid, t, d) = dispatch(frame);
        let reading = format!("{uid}|{t}|{d}");
        match self.seen.get(&seq) {
            Some(old) if *old == reading => self.duplicated += 1,
            Some(_) => self.reused += 1,
            None => {
                if !self.readings.insert(reading.clone()) {
                    // The same reading under a second seq: stored twice.
                    self.duplicated += 1;
                }
                self.seen.insert(seq, reading);
                *self.per_uid.entry(uid).or_default() += 1;
            }
        }
    }

    /// The newest seq up to which nothing is missing.
    fn contiguous(&self) -> u64 {
        let mut last = 0;
        for &seq in self.seen.keys() {
            if seq != last + 1 {
                break;
            }
            last = seq;
        }
        last
    }

    /// Readings of `uid` received (each seq counted once).
    fn of(&self, uid: &str) -> u64 {
        self.per_uid.get(uid).copied().unwrap_or(0)
    }

    /// Readings of `uid` numbered 1..=n that never arrived.
    fn lost(&self, uid: &str, n: u64) -> u64 {
        let got: std::collections::HashSet<String> = self
            .seen
            .values()
            .filter(|r| r.starts_with(&format!("{uid}|")))
            .cloned()
            .collect();
        (1..=n)
            .filter(|i| !got.contains(&format!(r#"{uid}|STEPS|{{"n":{i}}}"#)))
            .count() as u64
    }
}

/// Submits readings `{"n":1..=n}` as `uid` at about `per_s` a second; returns when all are
/// sent and the node answered a heartbeat after them.
fn produce(addr: SocketAddr, uid: &'static str, n: u64, per_s: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let token = token(addr, &format!("/auth/user?id={uid}"), DEV, KEY).await;
        let mut p = Client::identified(addr, &token, 0).await;
        let started = Instant::now();
        for i in 1..=n {
            p.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
            if i % 20 == 0 {
                let due = started + Duration::from_micros(i * 1_000_000 / per_s);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        p.ping().await;
    })
}

/// A consumer through haproxy that survives its node: on a dropped connection it takes a
/// fresh token through haproxy, IDENTIFYs again and REPLAYs after the last seq it holds
/// without a gap.
///
/// Live frames the new connection got before the server read its REPLAY come again in
/// order after it (README, REPLAY): until the first frame with seq `after` + 1 arrives,
/// frames are not counted; and when live frames from `after` + 1 on came first, the
/// REPLAY's own `after` + 1 starts their repeat, which is skipped while it matches.
struct Survivor {
    lb: SocketAddr,
    client: Client,
    tally: Tally,
    /// After a reconnect: the seq the REPLAY starts at, and the newest seq counted since
    /// (below it: nothing counted yet).
    resumed: Option<(u64, u64)>,
    /// Inside the documented repeat: frames up to this seq come once more.
    repeat_to: Option<u64>,
}

impl Survivor {
    async fn connect(lb: SocketAddr) -> Self {
        let client = Self::identify(lb).await;
        Self {
            lb,
            client,
            tally: Tally::default(),
            resumed: None,
            repeat_to: None,
        }
    }

    async fn identify(lb: SocketAddr) -> Client {
        let started = Instant::now();
        loop {
            // The dead node may still be in rotation for a moment: try again.
            let attempt = async {
                let (status, body) = http(
                    lb,
                    "POST",
                    "/auth/developer",
                    &[("dev-id", DEV), ("x-api-key", KEY)],
                )
                .await;
                if status != 200 {
                    return None;
                }
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let token = v["token"].as_str()?.to_owned();
                let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{lb}/connect"))
                    .await
                    .ok()?;
                let mut c = Client { ws };
                c.recv().await;
                c.send(&format!(r#"{{"op":3,"d":{{"token":"{token}","type":1}}}}"#))
                    .await;
                match c.ws.next().await {
                    Some(Ok(Message::Text(t))) if t.as_str() == r#"{"op":4}"# => Some(c),
                    _ => None,
                }
            };
            if let Ok(Some(c)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
                return c;
            }
            assert!(started.elapsed() < WAIT, "no node took the consumer back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `frame` is one the REPLAY contract lets come again (not counted): a live
    /// frame ahead of the REPLAY's first, or the repeat of live frames counted before it.
    /// Anything else is counted, so a seq that comes again with another reading, or a
    /// repeat outside that window, still shows as reused or duplicated.
    fn repeated(&mut self, frame: &str) -> bool {
        let (seq, uid, t, d) = dispatch(frame);
        let same = || self.tally.seen.get(&seq) == Some(&format!("{uid}|{t}|{d}"));
        if let Some(to) = self.repeat_to {
            if seq <= to && same() {
                return true;
            }
            self.repeat_to = None;
        }
        let Some((first, counted)) = self.resumed else {
            return false;
        };
        if counted < first {
            // Nothing counted since the reconnect: wait for the REPLAY's first seq.
            if seq != first {
                return true;
            }
        } else if seq == first && same() {
            // The REPLAY's first frame after live ones: those come again, up to `counted`.
            self.repeat_to = Some(counted);
            self.resumed = None;
            return true;
        }
        self.resumed = Some((first, counted.max(seq)));
        false
    }

    /// Reads until `until` says stop; reconnects (and REPLAYs) whenever the connection
    /// drops. Returns how many reconnects it made and the first gap from a drop to a frame.
    async fn read_until(&mut self, until: impl Fn(&Tally) -> bool) -> (u32, Option<Duration>) {
        let mut reconnects = 0;
        let mut outage: Option<Duration> = None;
        let mut dropped_at: Option<Instant> = None;
        while !until(&self.tally) {
            match tokio::time::timeout(WAIT, self.client.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Some(at) = dropped_at.take() {
                        outage.get_or_insert(at.elapsed());
                    }
                    if self.repeated(t.as_str()) {
                        continue;
                    }
                    self.tally.add(t.as_str());
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(_) => {
                    dropped_at.get_or_insert_with(Instant::now);
                    reconnects += 1;
                    self.client = Self::identify(self.lb).await;
                    let after = self.tally.contiguous();
                    self.resumed = Some((after + 1, after));
                    self.repeat_to = None;
                    self.client
                        .send(&format!(r#"{{"op":7,"d":{{"after":{after}}}}}"#))
                        .await;
                }
                Err(_) => panic!(
                    "no frame for {WAIT:?}; holding up to seq {}",
                    self.tally.contiguous()
                ),
            }
        }
        (reconnects, outage)
    }
}

struct Cluster {
    _nats: NatsCluster,
    nodes: Vec<ProcNode>,
    lb: Haproxy,
}

impl Cluster {
    async fn start(extra: &str) -> Self {
        let nats = NatsCluster::start(3).await;
        let urls = nats.urls();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(ProcNode::start(&urls, extra).await);
        }
        let lb = Haproxy::start(&[nodes[0].addr(), nodes[1].addr(), nodes[2].addr()]).await;
        Self {
            _nats: nats,
            nodes,
            lb,
        }
    }

    /// The node holding the (one) consumer.
    async fn consumer_node(&self) -> usize {
        let started = Instant::now();
        loop {
            for (i, n) in self.nodes.iter().enumerate() {
                if n.process.is_some() && n.connections("developer").await == 1.0 {
                    return i;
                }
            }
            assert!(started.elapsed() < WAIT, "no node reports the consumer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One round: a producer on a node that survives, the consumer's node killed mid-stream.
/// Returns (dispatched, lost, duplicated, reused, failover).
async fn kill_the_consumers_node(
    c: &mut Cluster,
    uid: &'static str,
    n: u64,
) -> (u64, u64, u64, u64, Duration) {
    let mut consumer = Survivor::connect(c.lb.addr).await;
    let victim = c.consumer_node().await;
    let other = (0..3)
        .find(|&i| i != victim && c.nodes[i].process.is_some())
        .unwrap();
    let producer = produce(c.nodes[other].addr(), uid, n, 2000);
    let first_third = |t: &Tally| t.of(uid) >= n / 3;
    consumer.read_until(first_third).await;
    c.nodes[victim].kill9();
    let done = |t: &Tally| t.of(uid) >= n;
    let (reconnects, outage) = consumer.read_until(done).await;
    producer.await.unwrap();
    assert!(reconnects >= 1, "the consumer's node was killed");
    let t = &consumer.tally;
    let dispatched = t
        .seen
        .values()
        .filter(|r| r.starts_with(&format!("{uid}|")))
        .count() as u64;
    (
        dispatched,
        t.lost(uid, n),
        t.duplicated,
        t.reused,
        outage.unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_node_is_killed_replays_through_haproxy_without_loss() {
    let mut c = Cluster::start("").await;
    let (dispatched, lost, duplicated, reused, failover) =
        kill_the_consumers_node(&mut c, "walker", 3000).await;
    eprintln!("dispatched {dispatched} lost {lost} duplicated {duplicated} reused {reused} failover {failover:?}");
    assert_eq!((lost, duplicated, reused), (0, 0, 0));
    assert_eq!(dispatched, 3000);
    // haproxy took the dead node out of rotation.
    c.lb.wait_up(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nats_server_stalls_producers_briefly_and_loses_nothing() {
    let nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let mut nats = nats;
    // Each node knows every server, so it reconnects to a survivor.
    let a = ProcNode::start(&urls, "").await;
    let b = ProcNode::start(&urls, "").await;
    let t = token(b.addr(), "/auth/developer", DEV, KEY).await;
    let mut consumer = Client::identified(b.addr(), &t, 1).await;
    let producer = produce(a.addr(), "runner", 4000, 1000);
    let mut tally = Tally::default();
    let mut killed = false;
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    while tally.of("runner") < 4000 {
        let frame = consumer.recv().await;
        longest = longest.max(last.elapsed());
        last = Instant::now();
        tally.add(&frame);
        if !killed && tally.seen.len() >= 1000 {
            // The server the stream's leader is on or not: R3 survives either.
            nats.servers[0].kill9();
            killed = true;
        }
    }
    producer.await.unwrap();
    eprintln!("longest stall between DISPATCHes: {longest:?}");
    assert_eq!((tally.duplicated, tally.reused), (0, 0));
    assert_eq!(tally.contiguous(), 4000, "every reading once, in seq order");
    // A REPLAY from another node after the loss returns the same history.
    let t = token(a.addr(), "/auth/developer", DEV, KEY).await;
    let mut again = Client::identified(a.addr(), &t, 1).await;
    again.send(r#"{"op":7,"d":{"after":0}}"#).await;
    for seq in 1..=4000u64 {
        let frame = again.recv().await;
        let (s, uid, t, d) = dispatch(&frame);
        assert_eq!(s, seq);
        assert_eq!(tally.seen[&seq], format!("{uid}|{t}|{d}"));
    }
}

/// Acks on their way go with the NATS connection that carried them. A node whose server
/// dies reads the stream back and sends again as soon as it has reconnected, instead of
/// waiting out `ack_timeout_ms` (a minute here: far longer than the test waits for a
/// reading). The server is frozen first, so the readings the node sends it next are
/// certainly unacknowledged when it dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_nats_server_dies_does_not_wait_out_its_ack_timeout() {
    let mut nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    // The producer's node is given only the server that dies; it learns the others from it.
    // Freezing a server before killing it can hold JetStream's elections (stream and meta
    // leader, 4–9 s each) for longer than 10 s on a busy machine (CI hit that once, when
    // 10 s was the default retry window): the default 20 s covers it.
    let a = ProcNode::start_with(&urls[..1], "", "ack_timeout_ms = 60000").await;
    let b = ProcNode::start(&urls[1..], "").await;
    let t = token(b.addr(), "/auth/developer", DEV, KEY).await;
    let mut consumer = Client::identified(b.addr(), &t, 1).await;
    let t = token(a.addr(), "/auth/user?id=runner", DEV, KEY).await;
    let mut producer = Client::identified(a.addr(), &t, 0).await;
    let mut tally = Tally::default();
    for i in 1..=500 {
        producer.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
    }
    while tally.of("runner") < 500 {
        tally.add(&consumer.recv().await);
    }
    nats.servers[0].stop();
    for i in 501..=700 {
        producer.submit("STEPS", &format!(r#"{{"n":{i}}}"#)).await;
    }
    // The node has read them (and sent them to the frozen server) once it answers a ping.
    producer.ping().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.servers[0].kill9();
    while tally.of("runner") < 700 {
        tally.add(&consumer.recv().await);
    }
    assert_eq!((tally.duplicated, tally.reused), (0, 0));
    assert_eq!(tally.contiguous(), 700, "every reading once, in seq order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_leaves_rotation_before_it_closes_its_clients() {
    let c = Cluster::start("drain_delay_ms = 2000").await;
    let t = token(c.lb.addr, "/auth/developer", DEV, KEY).await;
    let mut consumer = Client::identified(c.lb.addr, &t, 1).await;
    let victim = c.consumer_node().await;
    let node = &c.nodes[victim];
    node.process.as_ref().unwrap().signal("TERM");
    // Readiness goes first, while the client is still served...
    let started = Instant::now();
    loop {
        let (status, _) = http(node.addr(), "GET", "/readyz", &[]).await;
        if status == 503 {
            break;
        }
        assert!(started.elapsed() < WAIT, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.ping().await;
    // ...haproxy takes the node out...
    c.lb.wait_up(2).await;
    // ...new clients land elsewhere while the old one is still open...
    for _ in 0..4 {
        let (status, _) = http(c.lb.addr, "GET", "/readyz", &[]).await;
        assert_eq!(status, 200, "haproxy sent a request to the draining node");
    }
    // ...and then the node closes its clients with 1001.
    assert_eq!(consumer.close_code().await, 1001);
    let mut back = Survivor::connect(c.lb.addr).await;
    let producer = produce(c.lb.addr, "stroller", 10, 1000);
    back.read_until(|t| t.of("stroller") >= 10).await;
    producer.await.unwrap();
}

/// The soak: repeated node kills under load, with a report line per round and in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_node_kills_under_load() {
    let rounds: usize = std::env::var("SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let n: u64 = std::env::var("SOAK_READINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let uids: [&'static str; 10] = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"];
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    let mut failovers = Vec::new();
    let mut report = Vec::new();
    for round in 0..rounds {
        let mut c = Cluster::start("").await;
        let uid = uids[round % uids.len()];
        let (dispatched, lost, duplicated, reused, failover) =
            kill_the_consumers_node(&mut c, uid, n).await;
        let line = format!(
            "soak round {round}: dispatched {dispatched} lost {lost} duplicated {duplicated} seq_reused {reused} failover_ms {}",
            failover.as_millis()
        );
        eprintln!("{line}");
        report.push(line);
        totals.0 += dispatched;
        totals.1 += lost;
        totals.2 += duplicated;
        totals.3 += reused;
        failovers.push(failover);
    }
    failovers.sort();
    let p50 = failovers[failovers.len() / 2];
    eprintln!(
        "soak: rounds {rounds} dispatched {} lost {} duplicated {} seq_reused {} failover_p50_ms {}",
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        p50.as_millis()
    );
    assert_eq!(
        (totals.1, totals.2, totals.3),
        (0, 0, 0),
        "lost, duplicated, seq reused:\n{}",
        report.join("\n")
    );
}
