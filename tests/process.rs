//! The real binary as an operator runs it: kill -9 mid-stream and restart (nothing a
//! consumer received is lost, no seq reused), SIGTERM (1001 to every client, exit 0), bad
//! configuration (one line, exit 64), and the `token` and `config` subcommands.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Producers stream readings while a consumer records every DISPATCH; the server is killed
/// with SIGKILL mid-stream and restarted on the same data directory.
async fn kill9_round(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), port, &format!("durability = \"{durability}\""));
    let server = Process::start(&cfg, port).await;
    let addr = server.addr;

    let mut consumer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let mut producers = Vec::new();
    for p in 0..2 {
        let t = token(addr, &format!("/auth/user?id=p{p}"), DEV, KEY).await;
        producers.push(tokio::spawn(async move {
            let mut c = Client::identified(addr, &t, 0).await;
            for i in 0..1_000_000u64 {
                if tokio::time::timeout(Duration::from_secs(2), c.ws_send_submit(i))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    // Record what the consumer sees until the server dies under it.
    let mut seen: Vec<(u64, String)> = Vec::new();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        server.kill9();
    });
    while let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut consumer.ws))
            .await
            .unwrap()
    {
        seen.push((dispatch(&t).0, t.to_string()));
    }
    killer.await.unwrap();
    for p in producers {
        let _ = p.await;
    }
    assert!(
        seen.len() > 100,
        "the consumer saw readings before the kill ({})",
        seen.len()
    );
    for w in seen.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "live delivery is contiguous");
    }
    let max_seen = seen.last().unwrap().0;

    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut c = Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    c.send(&format!(
        r#"{{"op":7,"d":{{"after":0,"before":{}}}}}"#,
        max_seen + 1
    ))
    .await;
    for (seq, frame) in &seen {
        assert_eq!(
            &c.recv().await,
            frame,
            "seq {seq} replays byte for byte after kill -9"
        );
    }
    // New readings get seqs above everything any consumer saw.
    let t = token(addr, "/auth/user?id=after", DEV, KEY).await;
    let mut p = Client::identified(addr, &t, 0).await;
    p.submit("STEPS", r#"{"after":true}"#).await;
    let (seq, uid, _, _) = dispatch(&c.recv().await);
    assert_eq!(uid, "after");
    assert!(seq > max_seen, "new seq {seq} must exceed {max_seen}");
    server.signal("TERM");
}

impl Client {
    async fn ws_send_submit(&mut self, i: u64) {
        self.submit("HEART_RATE", &format!(r#"{{"val":{i}}}"#))
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_strict_loses_nothing_dispatched() {
    for _ in 0..3 {
        kill9_round("strict").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_fast_never_reuses_a_seq() {
    // Fast mode dispatches before the flush, so a kill may lose the last few ms of
    // readings; what it promises is that no seq is ever handed out twice.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), port, "durability = \"fast\"");
    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut consumer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let t = token(addr, "/auth/user?id=p", DEV, KEY).await;
    let mut p = Client::identified(addr, &t, 0).await;
    for i in 0..2000u64 {
        p.ws_send_submit(i).await;
    }
    let mut max_seen = 0;
    for _ in 0..2000 {
        max_seen = dispatch(&consumer.recv().await).0;
    }
    server.kill9();
    let server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut c = Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    let t = token(addr, "/auth/user?id=q", DEV, KEY).await;
    let mut p = Client::identified(addr, &t, 0).await;
    p.submit("STEPS", r#"{"n":1}"#).await;
    let seq = dispatch(&c.recv().await).0;
    assert!(
        seq > max_seen,
        "seq {seq} reused (max before the crash {max_seen})"
    );
    server.signal("TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_1001_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), port, "");
    let mut server = Process::start(&cfg, port).await;
    let addr = server.addr;
    let mut clients = Vec::new();
    for i in 0..20 {
        let t = token(addr, &format!("/auth/user?id=u{i}"), DEV, KEY).await;
        clients.push(Client::identified(addr, &t, 0).await);
    }
    let mut consumer =
        Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    clients[0].submit("STEPS", r#"{"n":1}"#).await;
    assert_eq!(dispatch(&consumer.recv().await).0, 1);
    server.signal("TERM");
    assert_eq!(
        consumer.closed().await,
        Closed::Code(1001, "Server is shutting down".into())
    );
    for c in &mut clients {
        assert_eq!(c.close_code().await, 1001);
    }
    let status = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // The reading made it to disk: a restart replays it and carries on at seq 2.
    let server = Process::start(&cfg, port).await;
    let mut c = Client::identified(addr, &token(addr, "/auth/developer", DEV, KEY).await, 1).await;
    c.send(r#"{"op":7,"d":{"after":0}}"#).await;
    assert_eq!(dispatch(&c.recv().await).0, 1);
    let t = token(addr, "/auth/user?id=x", DEV, KEY).await;
    Client::identified(addr, &t, 0)
        .await
        .submit("STEPS", "{}")
        .await;
    assert_eq!(dispatch(&c.recv().await).0, 2);
    server.signal("TERM");
}

fn sensorgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(args)
        .output()
        .unwrap()
}

/// The nice value of process `pid`'s thread named `name` (`/proc` cuts names at 15 bytes).
fn thread_nice(pid: u32, name: &str) -> i64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.join("stat")).unwrap();
            // After the parenthesised name: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            return rest.split(' ').nth(16).unwrap().parse().unwrap();
        }
    }
    panic!("process {pid} has no thread {name}");
}

/// Whether this process may give a thread the nice value `nice` < 0: with CAP_SYS_NICE
/// (root), or a RLIMIT_NICE of at least 20 - `nice`. Without either the server leaves the
/// commit thread alone, and so must the expectation.
fn may_take_nice(nice: i64) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_NICE: u32 = 23;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let rlimit_nice = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max nice priority"))
        .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        .unwrap_or(0);
    cap_eff & (1 << CAP_SYS_NICE) != 0 || rlimit_nice >= 20 - nice
}

/// Strict mode gives its commit thread the configured nice value (when the process may);
/// fast mode, where the thread is not between a SUBMIT and its DISPATCH, leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_raises_the_commit_threads_priority_and_fast_mode_does_not() {
    for durability in ["strict", "fast"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = write_config(
            dir.path(),
            port,
            &format!("durability = \"{durability}\"\ncommit_thread_nice = -7"),
        );
        let server = Process::start(&cfg, port).await;
        let pid = server.child.id();
        // Whatever nice value the tests run at, the process starts with it.
        let process = thread_nice(pid, "sensorgate");
        let want = if durability == "strict" && may_take_nice(-7) {
            -7
        } else {
            process
        };
        assert_eq!(
            thread_nice(pid, "sensorgate-comm"),
            want,
            "{durability}: the commit thread's nice value (the process's: {process})"
        );
        server.signal("TERM");
    }
}

/// `worker_threads` sets the runtime's workers, and the scrape says how many a node runs;
/// 0 (the default) is one per core the process may use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_runtimes_workers_and_metrics_show_them() {
    let cores = std::thread::available_parallelism().unwrap().get();
    // 3 differs from the core count of the machines this runs on (2 here), and 1 from any
    // machine with more than one core: a setting that is ignored shows.
    for (setting, want) in [
        ("worker_threads = 3", 3),
        ("worker_threads = 1", 1),
        ("", cores),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = write_config(dir.path(), port, setting);
        let server = Process::start(&cfg, port).await;
        let scrape = http(server.addr, "GET", "/metrics", &[]).await.1;
        assert_eq!(
            metric(&scrape, "sensorgate_worker_threads"),
            want as f64,
            "with `{setting}`"
        );
        server.signal("TERM");
    }
}

#[test]
fn invalid_config_is_one_line_naming_the_key_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("heartbeat_interval_ms = 0", "heartbeat_interval_ms"),
        ("durability = \"sometimes\"", "durability"),
        ("listen = \"nowhere\"", "listen"),
        ("max_frame_bytes = \"big\"", "max_frame_bytes"),
        ("no_such_key = 1", "no_such_key"),
        ("worker_threads = 100000", "worker_threads"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = sensorgate(&["--config", path.to_str().unwrap(), "config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(key), "{text}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["config"])
        .env("SENSORGATE_HEARTBEAT_GRACE_MS", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat_grace_ms"));
    // With a good file, a bad variable is named, not the file; a variable that names no
    // key is an error too.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "durability = \"fast\"").unwrap();
    for (var, value) in [
        ("SENSORGATE_STOMP_MAX_HEADERS", "lots"),
        ("SENSORGATE_STOMP_ANONYMUS", "false"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .args(["--config", good.to_str().unwrap(), "config"])
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{var}: {err}");
        assert!(err.contains(var), "{err}");
        assert!(!err.contains("good.toml"), "{err}");
    }
}

#[test]
fn config_prints_the_effective_values_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 9999, "durability = \"fast\"");
    let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7000",
            "config",
        ])
        .env("SENSORGATE_TOKEN_TTL_S", "42")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("listen = \"127.0.0.1:7000\""), "{text}");
    assert!(text.contains("durability = \"fast\""), "{text}");
    assert!(text.contains("token_ttl_s = 42"), "{text}");
    assert!(!text.contains(KEY), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_tokens_work_against_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), port, "");
    let server = Process::start(&cfg, port).await;
    let out = sensorgate(&[
        "--config",
        cfg.to_str().unwrap(),
        "token",
        "--role",
        "user",
        "--user",
        "script",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap();
    let mut c = Client::identified(server.addr, t.trim(), 0).await;
    c.ping().await;
    server.signal("TERM");
}

/// The demo developer's key is printed when it is created and never again: stdout ends up
/// in logs, and the key is kept in its file (mode 0600).
#[test]
fn the_demo_key_is_printed_once() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let first_lines = |dir: &std::path::Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .args([
                "--data-dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .env("SENSORGATE_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut text = String::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            text.push_str(&line);
            text.push('\n');
            if line.contains("Then open") {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        text
    };
    let created = first_lines(dir.path());
    let file = std::fs::read_to_string(dir.path().join("demo-developer.toml")).unwrap();
    let key = file
        .split("api_key = \"")
        .nth(1)
        .and_then(|k| k.split('"').next())
        .unwrap();
    assert!(created.contains(key), "{created}");
    let again = first_lines(dir.path());
    assert!(!again.contains(key), "{again}");
    assert!(again.contains("demo-developer.toml"), "{again}");
}
