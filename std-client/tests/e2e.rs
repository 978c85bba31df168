//! End-to-end: the real `deltasync-server` on an ephemeral loopback port and
//! the real `deltasync` command. Every server a test starts is stopped by the
//! test, by its own process id.

mod common;

use common::*;
use deltasync_core::sim::random_bytes as random;
use deltasync_server::process::test_key;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[test]
fn round_trips_of_edge_sizes_and_100_mib() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    for (i, len) in [0usize, 1, 4095, 4096, 4097, 100 << 20].into_iter().enumerate() {
        let data = random(i as u64 + 1, len);
        let src = dir.path().join(format!("in{len}"));
        std::fs::write(&src, &data).unwrap();
        let name = format!("sizes/f{len}");
        let up = srv.json(&["upload", s(&src), "--as", &name]);
        assert_eq!(up["mode"], "full", "{len}");
        assert_eq!(up["file_bytes"], len as u64);
        let dst = dir.path().join(format!("out{len}"));
        let down = srv.json(&["download", &name, "-o", s(&dst)]);
        // The uploader hashes chunk ids only; this SHA-256 is the server's.
        assert_eq!(up["sha256"], deltasync_core::Hash::of(&data).to_string(), "{len}");
        assert_eq!(down["sha256"], up["sha256"]);
        assert!(std::fs::read(&dst).unwrap() == data, "download of {len} bytes differs");
        assert!(srv.stored(&name).unwrap() == data, "stored copy of {len} bytes differs");
    }
    let ls = srv.cli(&["--json", "ls"]);
    let files: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(files.len(), 6);
    for f in &files {
        let stored = srv.stored(f["name"].as_str().unwrap()).unwrap();
        assert_eq!(f["sha256"], deltasync_core::Hash::of(&stored).to_string());
    }
}

#[test]
fn text_is_compressed_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let log = deltasync_core::sim::log_lines(5, 8 << 20);
    let path = dir.path().join("app.log");
    std::fs::write(&path, &log).unwrap();
    let len = log.len() as u64;
    let up = srv.json(&["upload", s(&path)]);
    assert_eq!(up["file_bytes"], len);
    assert_eq!(up["literal_bytes"], len, "literal bytes are file bytes, before compression");
    assert!(wire(&up) < len / 3, "{} wire bytes for {len} of text", wire(&up));
    let dst = dir.path().join("copy.log");
    let down = srv.json(&["download", "app.log", "-o", s(&dst)]);
    assert!(wire(&down) < len / 3, "{} wire bytes down", wire(&down));
    assert!(std::fs::read(&dst).unwrap() == log);
    assert_eq!(down["sha256"], deltasync_core::Hash::of(&log).to_string());
    // --no-compress: as it is, both ways (other lines: the server would
    // take app.log, holding the same data, as the upload's base).
    let other = deltasync_core::sim::log_lines(6, 8 << 20);
    let path = dir.path().join("plain.log");
    std::fs::write(&path, &other).unwrap();
    let len = other.len() as u64;
    let up = srv.json(&["--no-compress", "upload", s(&path), "--as", "plain/plain.log"]);
    assert!(wire(&up) > len, "{} wire bytes with --no-compress", wire(&up));
    let down =
        srv.json(&["--no-compress", "download", "plain/plain.log", "-o", s(&dir.path().join("plain"))]);
    assert!(wire(&down) > len, "{} wire bytes down with --no-compress", wire(&down));
    assert!(srv.stored("plain/plain.log").unwrap() == other);
}

#[test]
fn a_4k_edit_of_64_mib_moves_under_one_percent_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let old = random(42, 64 << 20);
    let path = dir.path().join("big");
    std::fs::write(&path, &old).unwrap();
    assert_eq!(srv.json(&["upload", s(&path)])["mode"], "full");

    let mut new = old.clone();
    new[30 << 20..(30 << 20) + 4096].iter_mut().for_each(|b| *b = !*b);
    std::fs::write(&path, &new).unwrap();
    let up = srv.json(&["upload", s(&path)]);
    assert_eq!(up["mode"], "delta");
    assert!(wire(&up) < (64 << 20) / 100, "delta upload moved {} bytes", wire(&up));
    assert!(srv.stored("big").unwrap() == new);
    assert_eq!(up["sha256"], deltasync_core::Hash::of(&new).to_string());

    // A client still holding the old version downloads the new one.
    let local = dir.path().join("local");
    std::fs::write(&local, &old).unwrap();
    let down = srv.json(&["download", "big", "-o", s(&local)]);
    assert_eq!(down["mode"], "delta");
    assert!(wire(&down) < (64 << 20) / 100, "delta download moved {} bytes", wire(&down));
    assert!(std::fs::read(&local).unwrap() == new);

    let again = srv.json(&["upload", s(&path)]);
    assert_eq!(again["mode"], "unchanged");
    assert!(wire(&again) < 300);
    assert_eq!(again["sha256"], deltasync_core::Hash::of(&new).to_string(), "from the stored index");
}

#[test]
fn an_unchanged_upload_costs_at_most_256_bytes_handshake_included() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    // Bytes counted both ways by a relay on the path, from the hello on.
    let relay = deltasync_server::relay::Relay::start(srv.port, None).unwrap();
    let upload = |path: &Path| {
        let mut c = srv.command(&key(), &["--json", "upload", s(path), "--as", "doc"]);
        let out = c.env("DELTASYNC_SERVER", format!("127.0.0.1:{}", relay.port)).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let path = dir.path().join("doc");
    for (seed, len) in [(60, 3_000), (61, 5 << 20)] {
        let data = random(seed, len);
        std::fs::write(&path, &data).unwrap();
        assert_ne!(upload(&path)["mode"], "unchanged");
        for _ in 0..2 {
            let before = relay.captured().len();
            let again = upload(&path);
            assert_eq!(again["mode"], "unchanged");
            assert_eq!(again["sha256"], deltasync_core::Hash::of(&data).to_string());
            let cost = relay.captured().len() - before;
            println!("unchanged upload of {len} bytes: {cost} bytes on the wire");
            assert!(cost <= 256, "an unchanged upload of {len} bytes cost {cost} bytes on the wire");
        }
    }
    assert!(srv.stored("doc").unwrap() == random(61, 5 << 20));
}

#[test]
fn a_downloaded_file_leaves_hints_so_sending_it_back_unchanged_sends_no_offer() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    let data = random(70, 3 << 20);
    std::fs::write(&src, &data).unwrap();
    // Uploaded without hints: the client keeps nothing of it.
    assert!(srv.cli(&["--no-hints", "upload", s(&src), "--as", "doc"]).status.success());
    let copy = dir.path().join("copy");
    assert_eq!(srv.json(&["download", "doc", "-o", s(&copy)])["mode"], "full");
    assert!(std::fs::read(&copy).unwrap() == data);
    // The download's hints name the version and its SHA-256: the upload
    // finds the server holds it from `Stat` alone.
    let back = srv.json(&["upload", s(&copy), "--as", "doc"]);
    assert_eq!(back["mode"], "unchanged");
    assert_eq!(back["sha256"], deltasync_core::Hash::of(&data).to_string());
    assert!(wire(&back) < 150, "an unchanged upload of a downloaded file cost {} bytes", wire(&back));
}

#[test]
fn chunk_hints_never_mislead_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let path = dir.path().join("doc");
    let check = |data: &[u8], mode: &str| {
        let up = srv.json(&["upload", s(&path), "--as", "doc"]);
        assert_eq!(up["mode"], mode);
        assert_eq!(up["sha256"], deltasync_core::Hash::of(data).to_string());
        assert!(srv.stored("doc").unwrap() == data, "stored copy differs");
    };
    let mut data = random(50, 8 << 20);
    std::fs::write(&path, &data).unwrap();
    check(&data, "full");
    let hints: Vec<_> = std::fs::read_dir(srv.hints()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(hints.len(), 1, "one hints file per uploaded name");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&srv.hints()), mode(&hints[0])), (0o700, 0o600), "hints are the owner's alone");
    }

    // Edited in place: the hints of the last upload describe all but the edit.
    data[5 << 20..(5 << 20) + 4096].iter_mut().for_each(|b| *b = !*b);
    data.insert(100, b'!');
    std::fs::write(&path, &data).unwrap();
    check(&data, "delta");

    // Damaged hints are ignored.
    let mut bytes = std::fs::read(&hints[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&hints[0], &bytes).unwrap();
    data[1 << 20] ^= 1;
    std::fs::write(&path, &data).unwrap();
    check(&data, "delta");

    // Hints of another file, under this file's key, cost time only.
    let other = dir.path().join("other");
    std::fs::write(&other, random(51, 3 << 20)).unwrap();
    assert_eq!(srv.json(&["upload", s(&other), "--as", "other"])["mode"], "full");
    let other_hints =
        std::fs::read_dir(srv.hints()).unwrap().map(|e| e.unwrap().path()).find(|p| *p != hints[0]);
    std::fs::copy(other_hints.unwrap(), &hints[0]).unwrap();
    data.truncate(6 << 20);
    std::fs::write(&path, &data).unwrap();
    check(&data, "delta");

    // Without hints the same file is unchanged.
    let plain = srv.cli(&["--no-hints", "--json", "upload", s(&path), "--as", "doc"]);
    assert!(plain.status.success());
    let v: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(v["mode"], "unchanged");
}

#[test]
fn hints_naming_the_wrong_hash_fail_one_upload_not_every_one() {
    use deltasync_host::hints::ChunkHints;
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let (path, other) = (dir.path().join("doc"), dir.path().join("other"));
    let (v1, v2) = (random(52, 1 << 20), random(53, 1 << 20));
    std::fs::write(&path, &v1).unwrap();
    assert_eq!(srv.json(&["upload", s(&path), "--as", "doc"])["mode"], "full");
    // Another version published since, from elsewhere.
    std::fs::write(&other, &v2).unwrap();
    assert!(srv.cli(&["--no-hints", "upload", s(&other), "--as", "doc"]).status.success());
    // The hints of this version name a hash that is not its own (well
    // formed, as a bug or an edit could leave them): the offer claims it,
    // and the server refuses to publish.
    let hints: Vec<_> = std::fs::read_dir(srv.hints()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(hints.len(), 1);
    let stored = ChunkHints::from_bytes(&std::fs::read(&hints[0]).unwrap()).unwrap();
    std::fs::write(&hints[0], stored.with_file_hash(deltasync_core::Hash([9; 32])).to_bytes()).unwrap();
    let out = srv.cli(&["upload", s(&path), "--as", "doc"]);
    assert!(!out.status.success());
    assert!(srv.stored("doc").unwrap() == v2);
    // Dropped with that failure: the next upload re-chunks the file.
    let up = srv.json(&["upload", s(&path), "--as", "doc"]);
    assert_eq!(up["sha256"], deltasync_core::Hash::of(&v1).to_string());
    assert!(srv.stored("doc").unwrap() == v1);
}

#[test]
fn fifty_concurrent_clients_get_byte_exact_results() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let shared: Vec<Vec<u8>> = (0..20).map(|i| random(1000 + i, 1 << 20)).collect();
    std::thread::scope(|sc| {
        let mut handles = Vec::new();
        for i in 0..50u64 {
            let (srv, dir, shared) = (&srv, dir.path(), &shared);
            handles.push(sc.spawn(move || {
                let (name, data) = if i < 30 {
                    (format!("own/{i}"), random(i, 300_000 + i as usize * 1000))
                } else {
                    ("shared".to_string(), shared[(i - 30) as usize].clone())
                };
                let src = dir.join(format!("src{i}"));
                std::fs::write(&src, &data).unwrap();
                let up = srv.cli(&["upload", s(&src), "--as", &name]);
                assert!(up.status.success(), "client {i}: {}", String::from_utf8_lossy(&up.stderr));
                let dst = dir.join(format!("dst{i}"));
                let down = srv.cli(&["download", &name, "-o", s(&dst)]);
                assert!(down.status.success(), "client {i}: {}", String::from_utf8_lossy(&down.stderr));
                let got = std::fs::read(&dst).unwrap();
                if i < 30 {
                    assert!(got == data, "client {i} got another file back");
                } else {
                    assert!(shared.contains(&got), "client {i} got a torn shared file");
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    let stored = srv.stored("shared").unwrap();
    assert!(shared.contains(&stored), "the stored shared file is not one of the uploads");
}

#[test]
fn escapes_and_wrong_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"do not read").unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let srv = Server::start(&root);
    let src = dir.path().join("payload");
    std::fs::write(&src, b"payload").unwrap();

    // The symlink under the root is the file store's concern (an object
    // store has none: there `link/...` is an ordinary name, not found).
    let planted: &[&str] = if srv.is_s3() { &[] } else { &["link/planted", "link/../../escape"] };
    for &bad in ["../escape", "/tmp/abs", "a/../../escape", ".deltasync/index/x"].iter().chain(planted) {
        let out = srv.cli(&["upload", s(&src), "--as", bad]);
        assert_eq!(out.status.code(), Some(7), "{bad}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let refused = if srv.is_s3() { 5 } else { 7 };
    let out = srv.cli(&["download", "link/secret", "-o", s(&dir.path().join("stolen"))]);
    assert_eq!(out.status.code(), Some(refused));
    assert!(!dir.path().join("stolen").exists());
    let out = srv.cli(&["rm", "link/secret"]);
    assert_eq!(out.status.code(), Some(refused));

    // A key the server does not know, and a password that is no key.
    let out = srv.cli_with_key(&test_key(2), &["upload", s(&src), "--as", "x"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication failed"));
    let out = srv.cli_with_key("hunter2", &["upload", s(&src), "--as", "x"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a deltasync key"));

    // Nothing was written outside the root, and nothing inside either.
    let names: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"do not read");
    assert!(!dir.path().join("escape").exists());
    let ls = srv.cli(&["--json", "ls"]);
    let files: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert!(files.is_empty(), "{files:?}");
}

#[test]
fn an_interrupted_first_upload_resumes_where_it_stopped() {
    // A first upload goes out before its tree is built (the root follows);
    // retried after a crash, the server's partial copy makes it a delta.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let size = 48 << 20;
    let data = random(9, size);
    let path = dir.path().join("first");
    std::fs::write(&path, &data).unwrap();
    let mut up = srv.spawn(&["--no-compress", "--limit-rate", "8M", "upload", s(&path)]);
    wait_for_part(&srv, "first", 24 << 20);
    srv.kill9();
    let status = up.wait().unwrap();
    assert_eq!(status.code(), Some(4), "a client whose server died reports a network error");

    let srv = Server::start(&root);
    assert!(srv.stored("first").is_none(), "a partial file became visible");
    let retry = srv.json(&["upload", s(&path)]);
    assert_eq!(retry["mode"], "delta");
    assert!(wire(&retry) < size as u64 * 6 / 10, "retry moved {} bytes of {size}", wire(&retry));
    assert!(srv.stored("first").unwrap() == data);
    assert_eq!(retry["sha256"], deltasync_core::Hash::of(&data).to_string());
    assert_eq!(srv.kept("first"), 0, "temporary files left");
}

#[test]
fn a_server_killed_mid_upload_keeps_the_old_version_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let size = 100 << 20;
    let old = random(7, size);
    let path = dir.path().join("data");
    std::fs::write(&path, &old).unwrap();
    assert!(srv.cli(&["upload", s(&path)]).status.success());

    // The new version rewrites the last 15 MiB.
    let mut new = old.clone();
    new[85 << 20..].copy_from_slice(&random(8, 15 << 20));
    std::fs::write(&path, &new).unwrap();
    let mut up = srv.spawn(&["--limit-rate", "4M", "upload", s(&path)]);
    // Wait until the server has assembled the reused 85 MiB and about half of
    // the 15 new MiB, then kill it.
    wait_for_part(&srv, "data", (85 << 20) + (7 << 20));
    srv.kill9();
    let status = up.wait().unwrap();
    assert_eq!(status.code(), Some(4), "a client whose server died reports a network error");

    let srv = Server::start(&root);
    assert!(srv.stored("data").unwrap() == old, "the old version was damaged");
    // Recovered as the name's interrupted upload, listed beside its file.
    let all = srv.json(&["ls", "--all"]);
    assert_eq!(all["files"][0]["name"], "data", "{all}");
    assert_eq!(all["partials"][0]["name"], "data", "{all}");
    assert!(all["partials"][0]["size"].as_u64().unwrap() >= (85 << 20) + (7 << 20), "{all}");
    let retry = srv.json(&["upload", s(&path)]);
    assert_eq!(retry["mode"], "delta");
    assert!(wire(&retry) < size as u64 / 10, "retry moved {} bytes", wire(&retry));
    assert!(srv.stored("data").unwrap() == new);
    assert_eq!(srv.kept("data"), 0, "temporary files left");
    let _ = std::io::stderr().flush();
}

/// Waits until an upload of `name` in progress holds `bytes` on `srv`.
fn wait_for_part(srv: &Server, name: &str, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while srv.kept(name) < bytes {
        assert!(Instant::now() < deadline, "the upload never got to {bytes} bytes");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_interrupted_upload_is_listed_described_and_dropped_by_rm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let path = dir.path().join("big");
    std::fs::write(&path, random(3, 8 << 20)).unwrap();
    let mut up = srv.spawn(&["--no-compress", "--limit-rate", "2M", "upload", s(&path)]);
    wait_for_part(&srv, "big", 1 << 20);
    // The client goes away mid-upload: the server keeps what it received.
    up.kill().unwrap();
    up.wait().unwrap();
    // Until it shows, and stays the same size (an object store records the
    // last of it once its server has seen the client go).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    let partials = loop {
        let all = srv.json(&["ls", "--all"]);
        let p = all["partials"].as_array().unwrap().clone();
        if !p.is_empty() {
            assert_eq!(all["files"].as_array().unwrap().len(), 0, "{all}");
            if seen == Some(p[0]["size"].clone()) {
                break p;
            }
            seen = Some(p[0]["size"].clone());
        }
        assert!(
            Instant::now() < deadline,
            "the interrupted upload never showed in ls --all, or kept growing"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(partials.len(), 1, "{partials:?}");
    assert_eq!(partials[0]["name"], "big");
    let size = partials[0]["size"].as_u64().unwrap();
    assert!((1 << 20..8 << 20).contains(&size), "{size}");
    // Plain `ls` lists files only; `ls --all` shows the partial's size and age.
    assert!(srv.cli(&["ls"]).stdout.is_empty());
    let text = String::from_utf8(srv.cli(&["ls", "--all"]).stdout).unwrap();
    assert!(
        text.contains(&format!("{size:>12}")) && text.contains("partial, ") && text.ends_with("big\n"),
        "{text:?}"
    );
    // `stat` describes it, and exits 5: there is no such file.
    let st = srv.cli(&["--json", "stat", "big"]);
    assert_eq!(st.status.code(), Some(5));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["partial"]["size"].as_u64(), Some(size), "{st}");
    assert!(st.get("sha256").is_none(), "no stored file: {st}");
    let text = String::from_utf8(srv.cli(&["stat", "big"]).stdout).unwrap();
    assert!(text.starts_with(&format!("big: interrupted upload, {size} bytes kept")), "{text:?}");
    // `rm` drops it; then there is nothing of that name.
    assert!(srv.cli(&["rm", "big"]).status.success());
    let gone = srv.cli(&["stat", "big"]);
    assert_eq!(gone.status.code(), Some(5));
    assert!(gone.stdout.is_empty());
    assert_eq!(srv.json(&["ls", "--all"])["partials"].as_array().unwrap().len(), 0);
    if !srv.is_s3() {
        assert_eq!(std::fs::read_dir(root.join(".deltasync/partial")).unwrap().count(), 0, "label left");
    }
}

#[test]
fn upload_if_match_wins_when_nothing_changed_and_loses_a_race() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let version = |i: u64| {
        let p = dir.path().join(format!("v{i}"));
        std::fs::write(&p, random(i, 8 << 20)).unwrap();
        p
    };
    let sha = |v: &serde_json::Value| v["sha256"].as_str().unwrap().to_string();
    let code = |o: &Output| o.status.code();
    let v1 = srv.json(&["upload", s(&version(1)), "--as", "doc"]);
    // Wins: the server still holds the version named.
    let v2 = srv.json(&["upload", s(&version(2)), "--as", "doc", "--if-match", &sha(&v1)]);
    assert_eq!(srv.json(&["stat", "doc"])["sha256"], v2["sha256"]);
    // Loses at once: a stale version named, or one expected absent.
    let stale = srv.cli(&["upload", s(&version(3)), "--as", "doc", "--if-match", &sha(&v1)]);
    assert_eq!(code(&stale), Some(10), "{}", String::from_utf8_lossy(&stale.stderr));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("not the one expected"));
    assert_eq!(code(&srv.cli(&["upload", s(&version(3)), "--as", "doc", "--if-absent"])), Some(10));
    assert_eq!(srv.json(&["stat", "doc"])["sha256"], v2["sha256"], "the stored version stays");
    assert!(srv.cli(&["upload", s(&version(3)), "--as", "new", "--if-absent"]).status.success());
    // Loses a race: a slow conditional upload is overtaken by a fast one.
    let slow = srv
        .command(&key(), &["--no-compress", "--limit-rate", "2M", "upload", s(&version(4)), "--as", "doc"])
        .args(["--if-match", &sha(&v2)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_part(&srv, "doc", 1 << 20);
    let fast = srv.json(&["upload", s(&version(5)), "--as", "doc"]);
    assert_eq!(fast["replaced"], false);
    let slow = slow.wait_with_output().unwrap();
    assert_eq!(code(&slow), Some(10), "{}", String::from_utf8_lossy(&slow.stderr));
    assert_eq!(srv.json(&["stat", "doc"])["sha256"], fast["sha256"], "the other writer's version stays");
    assert!(srv.stored("doc").unwrap() == std::fs::read(version(5)).unwrap());
    // Without --if-match the slow one wins the same race, and is told.
    let slow = srv
        .command(&key(), &["--no-compress", "--limit-rate", "2M", "upload", s(&version(6)), "--as", "doc"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_part(&srv, "doc", 1 << 20);
    srv.json(&["upload", s(&version(7)), "--as", "doc"]);
    let slow = slow.wait_with_output().unwrap();
    assert!(slow.status.success(), "{}", String::from_utf8_lossy(&slow.stderr));
    let warning = String::from_utf8_lossy(&slow.stderr);
    assert!(warning.contains("changed on the server by someone else while this upload ran"), "{warning}");
    assert!(srv.stored("doc").unwrap() == std::fs::read(version(6)).unwrap());
    assert_eq!(srv.kept("doc"), 0, "temporary files left");
}

#[test]
fn a_second_server_on_the_same_root_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let path = dir.path().join("f");
    std::fs::write(&path, b"first").unwrap();
    assert!(srv.cli(&["upload", s(&path)]).status.success());
    if let Some(prefix) = &srv.prefix {
        // Servers share an object store by design: a second one on the same
        // prefix starts, and serves the same files.
        let second = Server::start_s3(&dir.path().join("second/root"), prefix, &[]);
        assert_eq!(second.stored("f").unwrap(), b"first");
        assert_eq!(srv.stored("f").unwrap(), b"first");
        return;
    }
    // The same directory by another path.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(&root, &alias).unwrap();
    let keys = dir.path().join("root.keys.toml");
    let second = Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0", "--dashboard", "off", "--root", s(&alias), "--keys", s(&keys)])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It exits by itself; waited for with a bound, killed by its id if not.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut second = second;
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            second.kill().unwrap();
            panic!("the second server did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let said = String::from_utf8(second.wait_with_output().unwrap().stderr).unwrap();
    assert!(!status.success());
    assert!(said.contains("in use by another deltasync-server"), "{said}");
    // The first goes on, its files and uploads untouched.
    assert_eq!(srv.json(&["stat", "f"])["size"], 5);
    assert_eq!(srv.stored("f").unwrap(), b"first");
}

#[test]
fn stat_and_every_exit_code_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let data = random(9, 123_457);
    let path = dir.path().join("doc");
    std::fs::write(&path, &data).unwrap();
    let up = srv.json(&["upload", s(&path)]);
    // stat: the size and the SHA-256 of what was stored.
    let st = srv.json(&["stat", "doc"]);
    assert_eq!(st["name"], "doc");
    assert_eq!(st["size"].as_u64(), Some(123_457));
    assert_eq!(st["sha256"], up["sha256"]);
    let text = srv.cli(&["stat", "doc"]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).starts_with("doc: 123457 bytes, modified 2"), "{text:?}");
    // ls: a header, then the time for people (JSON keeps the number).
    let ls = String::from_utf8(srv.cli(&["ls"]).stdout).unwrap();
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 2, "{ls:?}");
    assert!(
        lines[0].contains("SIZE") && lines[0].contains("MODIFIED") && lines[0].ends_with("NAME"),
        "{ls:?}"
    );
    let date = lines[1].split_whitespace().nth(1).unwrap();
    assert!(date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-', "{ls:?}");
    assert!(st["modified"].as_u64().unwrap() > 1_700_000_000);
    // Completions and the manual page, without a server.
    for (args, want) in [(&["completions", "bash"][..], "_deltasync()"), (&["man"][..], ".TH deltasync 1")] {
        let out = Command::new(env!("CARGO_BIN_EXE_deltasync"))
            .args(args)
            .env("DELTASYNC_SERVER", "127.0.0.1:1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains(want), "{args:?}");
    }

    let code = |o: Output| (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned());
    // 2: usage.
    let (c, e) = code(srv.cli(&["frobnicate"]));
    assert_eq!(c, Some(2), "{e}");
    // 4: network (nothing listens on port 1: said so, with how to start one).
    let mut unreachable = srv.command(&key(), &["ls"]);
    let (c, e) = code(unreachable.env("DELTASYNC_SERVER", "127.0.0.1:1").output().unwrap());
    assert_eq!(c, Some(4), "{e}");
    assert!(
        e.contains("no deltasync server listens at 127.0.0.1:1") && e.contains("deltasync-server"),
        "{e}"
    );
    // 5: not found, for stat, download and rm.
    for args in
        [&["stat", "nope"][..], &["download", "nope", "-o", s(&dir.path().join("x"))], &["rm", "nope"]]
    {
        let (c, e) = code(srv.cli(args));
        assert_eq!(c, Some(5), "{args:?}: {e}");
    }
    // 8: local file errors (a missing file to upload, a download into a
    // missing directory).
    let (c, e) = code(srv.cli(&["upload", s(&dir.path().join("missing"))]));
    assert_eq!(c, Some(8), "{e}");
    let (c, e) = code(srv.cli(&["download", "doc", "-o", s(&dir.path().join("no/such/dir/doc"))]));
    assert_eq!(c, Some(8), "{e}");
    // Into a directory: under the name, as `cp` does.
    let into = dir.path().join("into");
    std::fs::create_dir(&into).unwrap();
    let got = srv.json(&["download", "doc", "-o", s(&into)]);
    assert_eq!(got["sha256"], up["sha256"]);
    assert!(std::fs::read(into.join("doc")).unwrap() == data);
    // (3 and 6 are checked in tests/attacks.rs: wrong keys, tampering.)
}

#[test]
fn names_with_escape_sequences_are_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let path = dir.path().join("f");
    std::fs::write(&path, b"x").unwrap();
    // A title-setting escape, then a line that would look like a listing.
    // (and a C1 CSI and a right-to-left override, which JSON must escape too).
    let name = "evil\u{1b}]0;pwned\u{7}\n           1  0  0000000000000000  forged\u{9b}2J\u{202e}";
    let up = srv.cli(&["upload", s(&path), "--as", name]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    for (args, lines) in [(&["ls"][..], 2), (&["stat", name][..], 1)] {
        let out = String::from_utf8(srv.cli(args).stdout).unwrap();
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{args:?} printed an escape: {out:?}");
        assert_eq!(out.lines().count(), lines, "{args:?} printed a forged line: {out:?}");
        assert!(out.contains("evil\\e]0;pwned\\x07\\n"), "{out:?}");
    }
    assert!(!String::from_utf8(up.stdout).unwrap().contains('\u{1b}'));
    // JSON carries the name exactly, as JSON escapes.
    let ls = srv.cli(&["--json", "ls"]);
    let text = String::from_utf8(ls.stdout).unwrap();
    assert!(!text.contains('\u{1b}') && text.contains("\\u001b"), "{text:?}");
    assert!(!text.contains(['\u{9b}', '\u{202e}']) && text.contains("\\u009b2J\\u202e"), "{text:?}");
    let files: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(files[0]["name"], name);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with a message) where this process may not mount.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): the disk-full test did not run");
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_reported_as_such_and_keeps_the_old_version() {
    if on_s3() {
        eprintln!("not for the object store: a full disk is the file store's (the S3 server's is its own)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "32m") else { return };
    let root = disk.0.join("root");
    let srv = Server::start(&root);
    let kept = random(3, 6 << 20);
    let path = dir.path().join("keep");
    std::fs::write(&path, &kept).unwrap();
    assert!(srv.cli(&["--no-compress", "upload", s(&path)]).status.success());
    let nothing_in_progress = || std::fs::read_dir(root.join(".deltasync/upload")).unwrap().count() == 0;

    // A first upload larger than the free space.
    let big = dir.path().join("big");
    std::fs::write(&big, random(4, 40 << 20)).unwrap();
    let out = srv.cli(&["--no-compress", "upload", s(&big)]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{said}");
    assert!(said.contains("storage is full"), "{said}");
    assert!(!root.join("big").exists() && nothing_in_progress());

    // A delta whose new version does not fit: the disk filled by others.
    let filler = disk.0.join("filler");
    let df = Command::new("df").args(["--output=avail", "-B1"]).arg(&disk.0).output().unwrap();
    let free: u64 = String::from_utf8_lossy(&df.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
    std::fs::write(&filler, vec![1u8; (free - (2 << 20)) as usize]).unwrap();
    let mut edited = kept.clone();
    edited[3 << 20..(3 << 20) + 4096].fill(9);
    std::fs::write(&path, &edited).unwrap();
    let out = srv.cli(&["--no-compress", "upload", s(&path)]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{said}");
    assert!(said.contains("storage is full"), "{said}");
    assert!(std::fs::read(root.join("keep")).unwrap() == kept, "the old version was damaged");
    assert!(nothing_in_progress());

    // Space again: the same delta goes through.
    std::fs::remove_file(&filler).unwrap();
    assert!(srv.cli(&["--no-compress", "upload", s(&path)]).status.success());
    assert!(std::fs::read(root.join("keep")).unwrap() == edited);

    // A download onto a full local disk, over an older local copy: typed,
    // exit 9, the copy as it was, no temporary left.
    let local = disk.0.join("local");
    std::fs::create_dir(&local).unwrap();
    let copy = local.join("keep");
    std::fs::write(&copy, &kept).unwrap();
    let df = Command::new("df").args(["--output=avail", "-B1"]).arg(&disk.0).output().unwrap();
    let free: u64 = String::from_utf8_lossy(&df.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
    std::fs::write(&filler, vec![1u8; (free - (1 << 20)) as usize]).unwrap();
    let out = srv.cli(&["--no-compress", "download", "keep", "-o", s(&copy)]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{said}");
    assert!(said.contains("no space left on this disk"), "{said}");
    assert!(std::fs::read(&copy).unwrap() == kept, "the local copy was damaged");
    assert_eq!(std::fs::read_dir(&local).unwrap().count(), 1, "a temporary was left");
    drop(srv);
}

/// Uploads `path` as `name` with a new write-only key of `srv` (whose
/// root is `root`); what the CLI printed.
fn upload_write_only(
    srv: &Server,
    root: &std::path::Path,
    path: &std::path::Path,
    name: &str,
) -> serde_json::Value {
    let keys = root.with_file_name("root.keys.toml");
    let out = Command::new(server_bin())
        .arg("--keys")
        .arg(&keys)
        .args(["key", "add", "device", "--write-only"])
        .output();
    let device = String::from_utf8(out.unwrap().stdout).unwrap().trim().to_string();
    let out = srv.cli_with_key(&device, &["--json", "upload", s(path), "--as", name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_new_name_beside_a_similar_file_sends_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let a = random(21, 8 << 20);
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let up = srv.json(&["upload", s(&file("a", &a)), "--as", "d/a"]);
    assert!(wire(&up) > 8 << 20, "{up}");
    // A copy under a new name: no file data crosses.
    let up = srv.json(&["upload", s(&file("copy", &a)), "--as", "d/copy"]);
    assert!(wire(&up) < 64 << 10, "a copy moved {} bytes", wire(&up));
    assert!(srv.stored("d/copy").unwrap() == a);
    // An edited copy: about the edit.
    let mut b = a.clone();
    b[3 << 20..(3 << 20) + 5000].copy_from_slice(&random(22, 5000));
    let up = srv.json(&["upload", s(&file("b", &b)), "--as", "d/b"]);
    assert!(wire(&up) < 200 << 10, "an edited copy moved {} bytes", wire(&up));
    assert!(srv.stored("d/b").unwrap() == b);
    // A key that may not read the files beside it gets nothing from them.
    let up = upload_write_only(&srv, &root, &file("w", &a), "d/w");
    assert!(wire(&up) > 8 << 20, "a write-only key's upload reused a file it may not read: {up}");
    assert!(srv.stored("d/w").unwrap() == a);
}

#[test]
fn a_new_file_anywhere_that_shares_data_with_a_stored_one_sends_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let a = random(31, 8 << 20);
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let up = srv.json(&["upload", s(&file("a", &a)), "--as", "x/a"]);
    assert!(wire(&up) > 8 << 20, "{up}");
    // Half of it and new data, in another directory, at another size (no
    // file beside it to start from): about the new data.
    let mut b = a[..4 << 20].to_vec();
    b.extend(random(32, 6 << 20));
    let up = srv.json(&["upload", s(&file("b", &b)), "--as", "y/b"]);
    assert!(wire(&up) < (6 << 20) + (256 << 10), "a file half stored moved {} bytes", wire(&up));
    assert!(srv.stored("y/b").unwrap() == b);
    // A copy anywhere: no file data.
    let up = srv.json(&["upload", s(&file("c", &a)), "--as", "z/deep/c"]);
    assert!(wire(&up) < 64 << 10, "a copy moved {} bytes", wire(&up));
    assert!(srv.stored("z/deep/c").unwrap() == a);
    // A key that may not read those files gets nothing from them.
    let up = upload_write_only(&srv, &root, &file("w", &b), "w/b");
    assert!(wire(&up) > 10 << 20, "a write-only key's upload reused a file it may not read: {up}");
    assert!(srv.stored("w/b").unwrap() == b);
    // A server started again reads the stored files' sketches (at once,
    // in the background: a moment is enough for these few).
    drop(srv);
    let srv = Server::start(&root);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut c = a[4 << 20..].to_vec();
    c.extend(random(33, 3 << 20));
    let up = srv.json(&["upload", s(&file("c2", &c)), "--as", "v/c"]);
    assert!(wire(&up) < (3 << 20) + (256 << 10), "after a restart, a file half stored moved {}", wire(&up));
    assert!(srv.stored("v/c").unwrap() == c);
}

#[test]
fn a_file_found_by_its_sketch_but_gone_since_fails_no_upload() {
    if on_s3() {
        eprintln!("the file store's: a file changed behind the server's back");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let srv = Server::start(&root);
    let a = random(51, 4 << 20);
    let src = dir.path().join("a");
    std::fs::write(&src, &a).unwrap();
    srv.json(&["upload", s(&src), "--as", "x/a"]);
    // Replaced behind the server's back by a directory, then by nothing
    // it may read: its sketch is still known.
    std::fs::remove_file(root.join("x/a")).unwrap();
    std::fs::create_dir(root.join("x/a")).unwrap();
    let up = srv.json(&["upload", s(&src), "--as", "y/a"]);
    assert!(wire(&up) > 4 << 20, "{up}");
    assert!(srv.stored("y/a").unwrap() == a);
}
