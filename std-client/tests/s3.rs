//! Several servers on one S3 bucket (SeaweedFS, a real S3 server, which
//! `scripts/test.sh` starts): the real `deltasync-server` instances on
//! ephemeral loopback ports and the real `deltasync` command. Each test
//! stores under a prefix of its own; every server it starts is stopped by
//! its own process id.

mod common;

use common::*;
use deltasync_core::sim::random_bytes as random;
use std::time::{Duration, Instant};

/// Two instances on one prefix, with `extra` options.
fn pair_with(dir: &std::path::Path, prefix: &str, extra: &[&str]) -> (Server, Server) {
    (
        Server::start_s3(&dir.join("a/root"), prefix, extra),
        Server::start_s3(&dir.join("b/root"), prefix, extra),
    )
}

/// Two instances on a new prefix.
fn pair(dir: &std::path::Path, test: &str) -> (Server, Server) {
    pair_with(dir, &s3_prefix(test), &[])
}

/// What `srv` serves as `name`, downloaded.
fn fetch(srv: &Server, dir: &std::path::Path, name: &str) -> Vec<u8> {
    let out = dir.join(format!("fetched-{}", srv.port));
    let _ = std::fs::remove_file(&out);
    let got = srv.json(&["download", name, "-o", s(&out)]);
    assert_eq!(got["name"], name);
    std::fs::read(&out).unwrap()
}

#[test]
fn a_full_upload_through_one_instance_and_a_delta_through_the_other_read_back_through_both() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = s3_prefix("two");
    let (a, b) = pair_with(dir.path(), &prefix, &[]);
    let mut data = random(1, 40 << 20);
    let src = dir.path().join("src");
    std::fs::write(&src, &data).unwrap();
    let up = a.json(&["upload", s(&src), "--as", "d/big"]);
    assert_eq!(up["mode"], "full");
    for srv in [&a, &b] {
        assert!(fetch(srv, dir.path(), "d/big") == data, "a full upload read back differs");
    }
    // A copy under a new name, through the other instance: no file data
    // crosses, and its chunks are not stored again.
    let up = b.json(&["upload", s(&src), "--as", "d/copy"]);
    assert!(wire(&up) < 64 << 10, "a copy moved {} bytes", wire(&up));
    assert!(fetch(&a, dir.path(), "d/copy") == data);
    let report = s3_gc(&prefix, &[]);
    let stored = report["pack_bytes"].as_u64().unwrap();
    assert!(
        stored < (data.len() as u64) * 11 / 10,
        "{stored} bytes of packs for two names of one file: {report}"
    );
    // A few edits, sent through the other instance: only they cross.
    for at in [5usize << 20, 20 << 20, 33 << 20] {
        data[at] ^= 0xff;
    }
    data.splice(10 << 20..10 << 20, random(2, 3000));
    std::fs::write(&src, &data).unwrap();
    let up = b.json(&["upload", s(&src), "--as", "d/big"]);
    assert_eq!(up["mode"], "delta");
    assert!(wire(&up) < 200 << 10, "a delta of four edits sent {} bytes", wire(&up));
    for srv in [&a, &b] {
        assert!(fetch(srv, dir.path(), "d/big") == data, "a delta upload read back differs");
        let ls = srv.json(&["stat", "d/big"]);
        assert_eq!(ls["sha256"], up["sha256"]);
    }
}

#[test]
fn racing_publishers_leave_one_input_and_every_loser_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path(), "race");
    const CLIENTS: usize = 20;
    let mut expect: Option<String> = None;
    for round in 0..3u64 {
        let inputs: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let p = dir.path().join(format!("in-{round}-{i}"));
                std::fs::write(&p, random(round * 100 + i as u64, 300_000 + i * 1000)).unwrap();
                p
            })
            .collect();
        // Every client publishes only over the version it saw: one wins.
        let children: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let srv = if i % 2 == 0 { &a } else { &b };
                let mut args = vec!["--json", "upload", s(p), "--as", "race"];
                match &expect {
                    None => args.push("--if-absent"),
                    Some(h) => args.extend(["--if-match", h.as_str()]),
                }
                srv.command(&key(), &args).stdout(std::process::Stdio::piped()).spawn().unwrap()
            })
            .collect();
        let codes: Vec<i32> =
            children.into_iter().map(|c| c.wait_with_output().unwrap().status.code().unwrap_or(-1)).collect();
        let winners: Vec<usize> = (0..CLIENTS).filter(|&i| codes[i] == 0).collect();
        assert_eq!(winners.len(), 1, "round {round}: exit codes {codes:?}");
        assert!(
            codes.iter().all(|&c| c == 0 || c == 10),
            "round {round}: every loser hears of the conflict: {codes:?}"
        );
        let stored = fetch(&a, dir.path(), "race");
        assert!(
            stored == std::fs::read(&inputs[winners[0]]).unwrap(),
            "round {round}: not the winner's bytes"
        );
        assert!(fetch(&b, dir.path(), "race") == stored);
        expect = Some(a.json(&["stat", "race"])["sha256"].as_str().unwrap().to_string());
    }
    // Without a condition the last to publish wins: still exactly one input.
    let inputs: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let p = dir.path().join(format!("free-{i}"));
            std::fs::write(&p, random(1000 + i as u64, 200_000)).unwrap();
            p
        })
        .collect();
    let children: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let srv = if i % 2 == 0 { &a } else { &b };
            srv.command(&key(), &["upload", s(p), "--as", "free"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        assert!(c.wait_with_output().unwrap().status.success());
    }
    let stored = fetch(&b, dir.path(), "free");
    assert!(
        inputs.iter().any(|p| std::fs::read(p).unwrap() == stored),
        "the stored version is none of the inputs"
    );
}

#[test]
fn an_upload_whose_instance_is_killed_resumes_through_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path(), "resume");
    let data = random(7, 80 << 20);
    let src = dir.path().join("src");
    std::fs::write(&src, &data).unwrap();
    let mut client = a.spawn(&["upload", s(&src), "--as", "big", "--limit-rate", "12M"]);
    // Until the other instance sees what the upload stored so far.
    let deadline = Instant::now() + Duration::from_secs(60);
    let kept = loop {
        let stat = b.cli(&["--json", "stat", "big"]);
        let text = String::from_utf8_lossy(&stat.stdout).to_string();
        let kept = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["partial"]["size"].as_u64());
        if let Some(k) = kept.filter(|&k| k >= 16 << 20) {
            break k;
        }
        assert!(Instant::now() < deadline, "no progress recorded: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    a.kill9();
    let _ = client.wait();
    let up = b.json(&["upload", s(&src), "--as", "big"]);
    let sent = up["wire_bytes_sent"].as_u64().unwrap();
    assert!(
        sent + kept <= data.len() as u64 + (1 << 20),
        "resumed, the upload still sent {sent} bytes ({kept} were stored)"
    );
    assert!(fetch(&b, dir.path(), "big") == data);
}

#[test]
fn garbage_is_collected_while_uploads_and_downloads_go_on_and_every_published_version_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = s3_prefix("gc");
    // Garbage kept 4 s (uploads must take under 2 s); both instances
    // collect every second, one at a time.
    let opts = ["--gc-grace", "4", "--gc-interval", "1"];
    let (a, b) = pair_with(dir.path(), &prefix, &opts);
    // Garbage to begin with: a replaced version, a deleted file, and an
    // upload cut off with its instance and then given up.
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name.replace('/', "_"));
        std::fs::write(&p, data).unwrap();
        p
    };
    a.json(&["upload", s(&file("old", &random(1, 3 << 20))), "--as", "replaced"]);
    a.json(&["upload", s(&file("new", &random(2, 3 << 20))), "--as", "replaced"]);
    a.json(&["upload", s(&file("gone", &random(3, 2 << 20))), "--as", "gone"]);
    assert!(a.cli(&["rm", "gone"]).status.success());
    let c = Server::start_s3(&dir.path().join("c/root"), &prefix, &opts);
    let big = file("cut", &random(4, 48 << 20));
    let mut client = c.spawn(&["upload", s(&big), "--as", "cut", "--limit-rate", "12M"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&b.cli(&["--json", "stat", "cut"]).stdout).contains("\"partial\"") {
        assert!(Instant::now() < deadline, "the cut upload recorded nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill9();
    let _ = client.wait();
    assert!(b.cli(&["rm", "cut"]).status.success());
    // Uploads and downloads through both instances while they collect;
    // every download is the version just published.
    let mut current: Vec<Vec<u8>> = (0..4).map(|i| random(10 + i, 1 << 20)).collect();
    let start = Instant::now();
    let mut round = 0u64;
    while start.elapsed() < Duration::from_secs(20) {
        let i = (round % 4) as usize;
        let (up, down) = if round.is_multiple_of(2) { (&a, &b) } else { (&b, &a) };
        let data = &mut current[i];
        let at = (round as usize * 7919) % data.len();
        data[at] ^= 0x5a;
        data.extend_from_slice(&random(100 + round, 5000));
        let name = format!("live/f{i}");
        up.json(&["upload", s(&file(&name, data)), "--as", &name]);
        assert!(fetch(down, dir.path(), &name) == *data, "round {round}: {name} read back differs");
        round += 1;
    }
    // Every version published last is whole; the garbage is gone once the
    // grace period has passed twice more (condemned, then deleted).
    std::thread::sleep(Duration::from_secs(12));
    for (i, data) in current.iter().enumerate() {
        assert!(fetch(&a, dir.path(), &format!("live/f{i}")) == *data);
    }
    assert!(fetch(&b, dir.path(), "replaced") == random(2, 3 << 20));
    // The instances stopped (one may hold the lease a moment longer: a run
    // by hand waits for it), runs by hand until the garbage of the last
    // compactions (packs the last versions left behind) is gone too.
    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let r = s3_gc(&prefix, &["--gc-grace", "4"]);
        let clean = r["skipped"] == false && r["garbage_packs"] == 0 && r["garbage_versions"] == 0;
        if clean || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(1000));
    };
    assert_eq!(report["skipped"], false, "{report}");
    assert_eq!(report["refs"], 5, "{report}");
    assert_eq!(report["partials"], 0, "{report}");
    assert_eq!(report["garbage_versions"], 0, "{report}");
    assert_eq!(report["garbage_packs"], 0, "{report}");
    assert_eq!(report["versions"], 5, "{report}");
    // What is stored is about what the files hold: the small packs of the
    // uploads (a hundred or more) were compacted into a few, and no pack
    // is kept mostly dead.
    let live: u64 = current.iter().map(|d| d.len() as u64).sum::<u64>() + (3 << 20);
    let stored = report["pack_bytes"].as_u64().unwrap();
    assert!(stored < live + live / 2, "{stored} bytes of packs for {live} bytes of files: {report}");
    assert!(report["packs"].as_u64().unwrap() <= 4, "{report}");
}

#[test]
fn a_plain_http_endpoint_off_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, bucket) = s3();
    let store = format!("s3://{bucket}/{}", s3_prefix("http"));
    // `gc` on the store through `endpoint`: whether it ended within 5 s
    // (then stopped), whether it succeeded, and what it said.
    let run = |endpoint: &str, extra: &[&str]| {
        let mut child = std::process::Command::new(server_bin())
            .args(["--store", &store, "--s3-endpoint", endpoint, "--gc-grace", "4"])
            .args(["--keys", dir.path().join("keys.toml").to_str().unwrap()])
            .args(extra)
            .arg("gc")
            .envs(S3_ENV)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        (status.map(|s| s.success()), err)
    };
    // Documentation addresses: refused at once, before any request.
    for off in ["http://192.0.2.1:8333", "http://[2001:db8::1]:8333", "http://s3.example.com"] {
        let (status, err) = run(off, &[]);
        assert_eq!(status, Some(false), "{off}: {err}");
        assert!(err.contains("plain HTTP off loopback"), "{off}: {err}");
    }
    // Allowed, it goes on (and fails, or waits, for want of a server).
    let (_, err) = run("http://192.0.2.1:8333", &["--s3-allow-http"]);
    assert!(!err.contains("plain HTTP off loopback"), "{err}");
    // Loopback is this machine: allowed as it is (the test's SeaweedFS).
    let (status, err) = run(&endpoint, &[]);
    assert_eq!(status, Some(true), "{err}");
}

#[test]
fn a_file_stored_through_one_instance_is_reused_by_a_new_file_through_the_other() {
    let dir = tempfile::tempdir().unwrap();
    // The other instance learns the files published elsewhere at its
    // upkeep (every second here).
    let (a, b) = pair_with(dir.path(), &s3_prefix("sketch"), &["--gc-interval", "1"]);
    let data = random(41, 8 << 20);
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    a.json(&["upload", s(&file("src-a", &data)), "--as", "x/a"]);
    std::thread::sleep(Duration::from_millis(2500));
    let mut half = data[2 << 20..6 << 20].to_vec();
    half.extend(random(42, 4 << 20));
    let up = b.json(&["upload", s(&file("src-b", &half)), "--as", "y/b"]);
    let sent = up["wire_bytes_sent"].as_u64().unwrap();
    assert!(sent < (4 << 20) + (256 << 10), "a file half stored through the other instance moved {sent}");
    assert!(fetch(&a, dir.path(), "y/b") == half);
}
