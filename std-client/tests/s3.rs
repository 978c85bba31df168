//! Several servers on one S3 bucket (SeaweedFS, a real S3 server, which
//! `scripts/test.sh` starts): the real `deltasync-server` instances on
//! ephemeral loopback ports and the real `deltasync` command. Each test
//! stores under a prefix of its own; every server it starts is stopped by
//! its own process id.

mod common;

use common::*;
use deltasync_core::sim::random_bytes as random;
use std::time::{Duration, Instant};

/// Two instances on one prefix.
fn pair(dir: &std::path::Path, test: &str) -> (Server, Server) {
    let prefix = s3_prefix(test);
    (Server::start_s3(&dir.join("a/root"), &prefix, &[]), Server::start_s3(&dir.join("b/root"), &prefix, &[]))
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
    let (a, b) = pair(dir.path(), "two");
    let mut data = random(1, 40 << 20);
    let src = dir.path().join("src");
    std::fs::write(&src, &data).unwrap();
    let up = a.json(&["upload", s(&src), "--as", "d/big"]);
    assert_eq!(up["mode"], "full");
    for srv in [&a, &b] {
        assert!(fetch(srv, dir.path(), "d/big") == data, "a full upload read back differs");
    }
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
