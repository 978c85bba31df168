//! End-to-end tree syncs: `deltasync push` and `pull` with the real binaries
//! on a generated tree. Every server a test starts is stopped by the test,
//! by its own process id.

mod common;

use common::*;
use deltasync_core::sim::random_bytes as random;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// What a tree holds at a name: a directory and its mode, or a file's
/// content hash, time and mode.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir(u32),
    File { sha: String, mtime: (i64, i64), mode: u32 },
}

/// Every name under `root` (but the server's `.deltasync`), `/`-separated;
/// what goes while it is read is left out (the tree may be changing).
fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
        let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries {
            let Ok(e) = e else { continue };
            let name = e.file_name().into_string().unwrap();
            if name.starts_with(".deltasync") && name != ".deltasyncignore" {
                continue;
            }
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let Ok(m) = fs::symlink_metadata(e.path()) else { continue };
            if m.is_dir() {
                out.insert(rel.clone(), Node::Dir(m.mode() & 0o777));
                walk(root, &rel, out);
            } else if m.is_file() {
                let Ok(data) = fs::read(e.path()) else { continue };
                let sha = deltasync_core::Hash::of(&data).to_string();
                out.insert(
                    rel,
                    Node::File { sha, mtime: (m.mtime(), m.mtime_nsec()), mode: m.mode() & 0o777 },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// The server's copy as a client would see it: its files keep the owner's
/// read and write bits (a client's mode without them is in an extended
/// attribute), and its directories' modes are not compared.
fn as_stored(tree: &BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    tree.iter()
        .map(|(k, v)| {
            let v = match v {
                Node::Dir(_) => Node::Dir(0),
                Node::File { sha, mtime, mode } => {
                    Node::File { sha: sha.clone(), mtime: *mtime, mode: mode | 0o600 }
                }
            };
            (k.clone(), v)
        })
        .collect()
}

fn write_file(path: &Path, data: &[u8], mode: u32, mtime: (u64, u32)) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::new(mtime.0, mtime.1)).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Thousands of small files in nested directories, a few large ones,
/// empty files and directories, names with spaces and Unicode, several
/// modes and times with nanoseconds.
fn generate(root: &Path) -> usize {
    let mut n = 0;
    for d in 0..16 {
        for f in 0..130u64 {
            let path = root.join(format!("d{d:02}/sub {}/f{f}.txt", f % 4));
            let seed = d * 1000 + f;
            let data = random(seed, 10 + (seed as usize * 37) % 3000);
            let mode = [0o644, 0o600, 0o755, 0o640][(f % 4) as usize];
            write_file(&path, &data, mode, (1_600_000_000 + seed, (seed * 7919 % 1_000_000_000) as u32));
            n += 1;
        }
    }
    write_file(&root.join("big/one.bin"), &random(1, 3 << 20), 0o644, (1_650_000_000, 5));
    write_file(&root.join("big/twö.bin"), &random(2, 2 << 20), 0o600, (1_650_000_001, 0));
    write_file(&root.join("empty.txt"), b"", 0o644, (1_650_000_002, 123));
    write_file(&root.join("ünïcødé/日本語 file.txt"), "こんにちは".as_bytes(), 0o644, (1_650_000_003, 9));
    write_file(&root.join("with space.txt"), b"spaced", 0o755, (1_650_000_004, 0));
    write_file(&root.join("read only.txt"), b"not writable", 0o444, (1_650_000_005, 0));
    fs::create_dir_all(root.join("empty dir")).unwrap();
    fs::create_dir_all(root.join("nested/empty/deeper")).unwrap();
    fs::set_permissions(root.join("nested/empty"), fs::Permissions::from_mode(0o750)).unwrap();
    n + 6
}

#[test]
fn a_tree_pushed_edited_renamed_and_pulled_matches_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    let files = generate(&src);

    // First push: everything.
    let r = srv.json(&["push", s(&src), "proj"]);
    assert_eq!((r["files"].as_u64(), r["changed"].as_u64()), (Some(files as u64), Some(files as u64)), "{r}");
    assert_eq!(as_stored(&snapshot(&srv.tree("proj"))), as_stored(&snapshot(&src)));
    // The read-only file's mode comes back as it was (see the pull below).

    // Again: nothing but the listings.
    let r = srv.json(&["push", s(&src), "proj"]);
    assert_eq!((r["changed"].as_u64(), r["unchanged"].as_u64()), (Some(0), Some(files as u64)), "{r}");
    assert!(wire(&r) < 400 * 1024, "an unchanged tree of {files} files moved {} bytes", wire(&r));

    // Edit, rename, delete, chmod and touch some.
    for i in 0..10 {
        let p = src.join(format!("d{i:02}/sub 1/f{}.txt", 4 * i + 1));
        let mut data = fs::read(&p).unwrap();
        data.extend_from_slice(b"an edit");
        fs::write(&p, data).unwrap();
    }
    fs::create_dir_all(src.join("moved here")).unwrap();
    for i in 0..5 {
        let from = src.join(format!("d1{i}/sub 2/f{}.txt", 4 * i + 2));
        fs::rename(&from, src.join(format!("moved here/renamed {i}.txt"))).unwrap();
    }
    for i in 0..5 {
        fs::remove_file(src.join(format!("d0{i}/sub 3/f{}.txt", 4 * i + 3))).unwrap();
    }
    fs::set_permissions(src.join("d05/sub 0/f0.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let touched = fs::File::options().write(true).open(src.join("d06/sub 0/f4.txt")).unwrap();
    touched.set_modified(UNIX_EPOCH + Duration::new(1_700_000_000, 42)).unwrap();
    drop(touched);

    // Without --delete: nothing deleted; renamed files are copies.
    let r = srv.json(&["push", s(&src), "proj"]);
    assert_eq!(r["changed"].as_u64(), Some(10), "{r}");
    assert_eq!(r["copied"].as_u64(), Some(5), "{r}");
    assert_eq!(r["touched"].as_u64(), Some(2), "{r}");
    assert_eq!(r["deleted"].as_u64(), Some(0), "{r}");
    assert!(srv.stored("proj/d00/sub 3/f3.txt").is_some(), "deleted without --delete");
    // The copies sent no file data: about the ten edits' chunks.
    assert!(r["literal_bytes"].as_u64().unwrap() < 10 * 4096, "{r}");

    // With --delete: the server's copy is the tree.
    let r = srv.json(&["push", s(&src), "proj", "--delete"]);
    assert_eq!((r["changed"].as_u64(), r["deleted"].as_u64()), (Some(0), Some(10)), "{r}");
    assert_eq!(as_stored(&snapshot(&srv.tree("proj"))), as_stored(&snapshot(&src)));

    // Pulled into an empty directory: contents, times, modes, empty
    // directories, the read-only file's mode.
    let out = dir.path().join("out");
    let r = srv.json(&["pull", "proj", s(&out)]);
    assert_eq!(r["failed"].as_u64(), Some(0), "{r}");
    assert_eq!(snapshot(&out), snapshot(&src));

    // A stale copy catches up: edits, a new file, deletions.
    for i in 0..3 {
        let p = src.join(format!("d1{i}/sub 0/f{}.txt", 4 * i));
        fs::write(&p, random(900 + i as u64, 5000)).unwrap();
    }
    fs::write(src.join("new file.txt"), b"new").unwrap();
    fs::remove_file(src.join("with space.txt")).unwrap();
    fs::remove_dir_all(src.join("nested")).unwrap();
    srv.json(&["push", s(&src), "proj", "--delete"]);
    let r = srv.json(&["pull", "proj", s(&out), "--delete"]);
    assert_eq!((r["changed"].as_u64(), r["deleted"].as_u64()), (Some(4), Some(4)), "{r}");
    assert_eq!(snapshot(&out), snapshot(&src));
}

#[test]
fn excludes_and_the_ignore_file_are_honoured_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    write_file(&src.join("keep/a.txt"), b"a", 0o644, (1_600_000_000, 0));
    write_file(&src.join("keep/a.log"), b"log", 0o644, (1_600_000_000, 0));
    write_file(&src.join("build/out.o"), b"obj", 0o644, (1_600_000_000, 0));
    write_file(&src.join("keep/build/deep.o"), b"obj", 0o644, (1_600_000_000, 0));
    fs::write(src.join(".deltasyncignore"), "build/\n").unwrap();
    let r = srv.json(&["push", s(&src), "p", "--exclude", "*.log"]);
    // The ignore file stays here (`.deltasync*` names are the server's).
    assert_eq!((r["changed"].as_u64(), r["skipped"].as_u64()), (Some(1), Some(0)), "{r}");
    let stored = snapshot(&srv.tree("p"));
    let names: Vec<&str> = stored.keys().map(String::as_str).collect();
    assert_eq!(names, ["keep", "keep/a.txt"]);

    // Pulled with --delete: an excluded local file is neither replaced nor deleted.
    let out = dir.path().join("out");
    write_file(&out.join("keep/local.log"), b"mine", 0o644, (1_600_000_000, 0));
    write_file(&out.join("stale.txt"), b"old", 0o644, (1_600_000_000, 0));
    let r = srv.json(&["pull", "p", s(&out), "--delete", "--exclude", "*.log"]);
    assert_eq!(r["deleted"].as_u64(), Some(1), "{r}");
    assert_eq!(fs::read(out.join("keep/local.log")).unwrap(), b"mine");
    assert!(!out.join("stale.txt").exists());
}

#[test]
fn a_dry_run_says_what_would_change_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    write_file(&src.join("a/b.txt"), b"b", 0o644, (1_600_000_000, 0));
    write_file(&src.join("c.txt"), b"c", 0o644, (1_600_000_000, 0));
    let out = srv.cli(&["push", s(&src), "p", "--dry-run"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("send     a/b.txt") && text.contains("send     c.txt"), "{text}");
    assert!(text.contains("(dry run)"), "{text}");
    assert!(!srv.tree("p").exists(), "a dry run wrote to the server");
    let r = srv.json(&["push", s(&src), "p", "-n"]);
    assert_eq!((r["dry_run"].as_bool(), r["changed"].as_u64()), (Some(true), Some(2)), "{r}");
    srv.json(&["push", s(&src), "p"]);
    let r = srv.json(&["pull", "p", s(&dir.path().join("nowhere")), "-n"]);
    assert_eq!(r["changed"].as_u64(), Some(2), "{r}");
    assert!(!dir.path().join("nowhere").exists(), "a dry run wrote here");
}

#[test]
fn a_push_killed_midway_then_rerun_sends_only_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    let files = 40;
    for i in 0..files {
        write_file(&src.join(format!("f{i:02}.bin")), &random(i, 256 << 10), 0o644, (1_600_000_000 + i, 0));
    }
    let mut child = srv.spawn(&["push", s(&src), "p", "--limit-rate", "2M"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_dir(srv.tree("p")).map_or(0, |d| d.count()) < 8 {
        assert!(Instant::now() < deadline, "the push did not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Every file there is whole: old or new, never torn.
    let there = snapshot(&srv.tree("p"));
    let want = as_stored(&snapshot(&src));
    assert!(there.len() < files as usize, "the push finished before it was killed");
    for (name, node) in as_stored(&there) {
        assert_eq!(Some(&node), want.get(&name), "{name} is torn");
    }
    let r = srv.json(&["push", s(&src), "p"]);
    assert_eq!(r["changed"].as_u64(), Some(files - there.len() as u64), "{r}");
    assert_eq!(as_stored(&snapshot(&srv.tree("p"))), want);
}

/// Waits until what `srv` stores under `dir` is `src`, for at most `secs`.
fn wait_until_same(srv: &Server, dir: &str, src: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (have, want) = (as_stored(&snapshot(&srv.tree(dir))), as_stored(&snapshot(src)));
        if have == want {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want.keys().filter(|k| have.get(*k) != want.get(*k)).collect();
            let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
            panic!("not synced within {secs}s: missing or different {missing:?}, extra {extra:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_watched_tree_reaches_the_server_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    write_file(&src.join("a/one.txt"), b"one", 0o644, (1_600_000_000, 0));
    write_file(&src.join("a/two.txt"), b"two", 0o644, (1_600_000_000, 0));
    write_file(&src.join("gone/x.txt"), b"x", 0o644, (1_600_000_000, 0));
    let mut child = srv.spawn(&["push", s(&src), "w", "--watch", "--delete"]);
    wait_until_same(&srv, "w", &src, 20);

    // Created, changed, renamed, deleted, a new directory, a directory gone.
    fs::write(src.join("a/new.txt"), b"new").unwrap();
    fs::write(src.join("a/one.txt"), b"one, changed").unwrap();
    fs::rename(src.join("a/two.txt"), src.join("a/renamed.txt")).unwrap();
    write_file(&src.join("b/c/deep.txt"), &random(3, 100_000), 0o600, (1_600_000_000, 0));
    fs::remove_dir_all(src.join("gone")).unwrap();
    let t = Instant::now();
    wait_until_same(&srv, "w", &src, 10);
    let first = t.elapsed();

    // And again, a burst of edits to one file.
    for i in 0..50 {
        fs::write(src.join("a/new.txt"), format!("edit {i}")).unwrap();
    }
    fs::remove_file(src.join("a/renamed.txt")).unwrap();
    wait_until_same(&srv, "w", &src, 10);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(first < Duration::from_secs(10), "{first:?}");
}

#[test]
fn a_pull_never_writes_through_a_symlink_nor_deletes_for_a_missing_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    write_file(&src.join("x/f.txt"), b"into x", 0o644, (1_600_000_000, 0));
    write_file(&src.join("fifo"), b"a file here", 0o644, (1_600_000_000, 0));
    write_file(&src.join("keep.txt"), b"keep", 0o644, (1_600_000_000, 0));
    srv.json(&["push", s(&src), "p"]);

    // Locally `x` is a symlink to a directory elsewhere, and `fifo` a FIFO.
    let out = dir.path().join("out");
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir_all(&out).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("x")).unwrap();
    let made = std::process::Command::new("mkfifo").arg(out.join("fifo")).status().unwrap();
    assert!(made.success());
    let o = srv.cli(&["--json", "pull", "p", s(&out)]);
    assert_eq!(o.status.code(), Some(11), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!elsewhere.join("f.txt").exists(), "written through the symlink");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(fs::symlink_metadata(out.join("fifo")).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    assert_eq!(fs::read(out.join("keep.txt")).unwrap(), b"keep");

    // A prefix the server does not have: an error, and --delete deletes nothing.
    let o = srv.cli(&["pull", "no-such-prefix", s(&out), "--delete"]);
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("keep.txt").exists());
}

#[test]
fn a_local_copy_from_a_file_the_pull_already_replaced_is_fetched_instead() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    let (a, b) = (random(1, 2 << 20), random(2, 2 << 20));
    write_file(&src.join("d1/big"), &a, 0o644, (1_600_000_000, 0));
    srv.json(&["push", s(&src), "p"]);
    let out = dir.path().join("out");
    srv.json(&["pull", "p", s(&out)]);
    // On the server: d1/big becomes B (same size), and d2/old is A, the
    // content this side holds as d1/big until the pull replaces it.
    write_file(&src.join("d1/big"), &b, 0o644, (1_600_000_100, 0));
    write_file(&src.join("d2/old"), &a, 0o644, (1_600_000_200, 0));
    srv.json(&["push", s(&src), "p"]);
    let r = srv.json(&["pull", "p", s(&out)]);
    assert_eq!(r["failed"].as_u64(), Some(0), "{r}");
    assert!(fs::read(out.join("d1/big")).unwrap() == b);
    assert!(fs::read(out.join("d2/old")).unwrap() == a, "d2/old was copied from the replaced d1/big");
    assert_eq!(snapshot(&out), snapshot(&src));
}
