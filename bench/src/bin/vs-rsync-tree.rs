//! Tree pushes, deltasync against an rsync daemon, in one run: push version
//! A of a real source tree (a crate from the local cargo registry, written
//! elsewhere), then version B over it, with each tool, on loopback and
//! through a relay that adds `DELAY_MS` each way (a 20 ms round trip by
//! default). Reports wall time and bytes on the wire (both ways), medians
//! of RUNS, and deltasync's ratio to rsync.
//!
//! `target/release/vs-rsync-tree TREE_A TREE_B [RUNS]` (see
//! `bench/vs-rsync-tree.sh`, which finds or fetches the trees, builds, and
//! runs this). rsync runs as `rsync -a --delete --stats`, deltasync as
//! `deltasync push --delete --json`: both keep times and modes, and
//! mirror. Both servers' roots are on the same file system (`BENCH_DIR`).
//! With `RSYNC_FSYNC=1`, rsync runs with `--fsync` (it syncs every file it
//! writes, as deltasync's server does).

use deltasync_bench::{client, key, median, rsync_daemon, settle, timed_rsync, timed_transfer};
use deltasync_server::process::ServerProcess;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Copies `from` to `to`, each piece `delay` after it was read: a link
/// with that one-way latency and the loopback's bandwidth.
fn delayed_pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&bytes).is_err() {
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// A relay on a fresh loopback port to `target`, adding `delay` each way.
/// Its threads end with the process (this benchmark's own).
fn relay(target: u16, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            delayed_pipe(client, server, delay);
            delayed_pipe(s2, c2, delay);
        }
    });
    port
}

struct Run {
    secs: f64,
    wire: u64,
}

fn rsync(port: u16, tree: &Path, dest: &str) -> Run {
    // RSYNC_FSYNC=1: the daemon syncs each file it writes, the durability
    // deltasync's server always gives.
    let fsync = std::env::var_os("RSYNC_FSYNC").is_some_and(|v| v == "1");
    let mut cmd = Command::new("rsync");
    cmd.args(["-a", "--delete", "--stats"])
        .args(fsync.then_some("--fsync"))
        .arg(format!("{}/", tree.display()))
        .arg(format!("rsync://127.0.0.1:{port}/bench/{dest}/"));
    let (secs, wire) = timed_rsync(&mut cmd);
    Run { secs, wire }
}

fn deltasync(cli: &Path, port: u16, tree: &Path, dest: &str) -> Run {
    let mut cmd = client(cli, port);
    cmd.args(["--no-hints", "--json", "push", "--delete"]).arg(tree).arg(dest);
    let (secs, wire) = timed_transfer(&mut cmd);
    Run { secs, wire }
}

/// Every file under `root`: its bytes.
fn contents(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".deltasync")) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Copies the tree `from` to `to`, as a checkout would leave it after
/// `prev` (already copied): a file with the same path and bytes as in
/// `prev` keeps its time there, every other file gets `time`. (Crates keep
/// one fixed time for every file, which would hide changes from both
/// tools' size-and-time check.)
fn checkout(from: &Path, to: &Path, prev: Option<&Path>, time: std::time::SystemTime) {
    for (rel, data) in contents(from) {
        let dst = to.join(&rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(&dst, &data).unwrap();
        let kept = prev.map(|p| p.join(&rel)).filter(|p| std::fs::read(p).is_ok_and(|old| old == data));
        let t = kept.map_or(time, |p| std::fs::metadata(p).unwrap().modified().unwrap());
        std::fs::File::options().write(true).open(&dst).unwrap().set_modified(t).unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (crate_a, crate_b) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let delay_ms: u64 = std::env::var("DELAY_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let (server_bin, cli) = (bin_dir.join("deltasync-server"), bin_dir.join("deltasync"));
    let work = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-tree".into()));
    let _ = std::fs::remove_dir_all(&work);
    for d in ["ds-root", "rsync-root", "cfg"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let work = work.canonicalize().unwrap();
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let (a, b) = (work.join(name(&crate_a)), work.join(name(&crate_b)));
    let epoch = std::time::UNIX_EPOCH;
    checkout(&crate_a, &a, None, epoch + Duration::from_secs(1_700_000_000));
    checkout(&crate_b, &b, Some(&a), epoch + Duration::from_secs(1_700_100_000));
    let (_rsyncd, rport) = rsync_daemon(&work);
    let server = ServerProcess::start(&server_bin, &work.join("ds-root"), &key(), &["--dashboard", "off"])
        .expect("start deltasync-server");
    let dport = server.port;
    std::thread::sleep(Duration::from_millis(300));
    let delay = Duration::from_millis(delay_ms);
    let links = [("loopback", rport, dport), ("relay", relay(rport, delay), relay(dport, delay))];
    let (files_a, files_b) = (contents(&a), contents(&b));
    println!(
        "## tree push, deltasync vs rsync daemon: {} ({} files) then {} ({} files), {runs} runs, medians\n",
        a.file_name().unwrap().to_string_lossy(),
        files_a.len(),
        b.file_name().unwrap().to_string_lossy(),
        files_b.len()
    );
    println!("relay: {delay_ms} ms each way ({} ms round trip)\n", 2 * delay_ms);
    println!("| link | push | tool | wall time | bytes on the wire | deltasync / rsync time | bytes |");
    println!("|---|---|---|---|---|---|---|");
    for (link, rp, dp) in links {
        // [phase][tool]: seconds of each run, bytes of the last.
        let mut secs: [[Vec<f64>; 2]; 2] = Default::default();
        let mut wire = [[0u64; 2]; 2];
        for i in 0..runs {
            let dest = format!("{link}-{i}");
            for (phase, tree) in [(0, &a), (1, &b)] {
                for k in 0..2 {
                    let tool = (i + k) % 2;
                    settle();
                    let r = if tool == 0 { rsync(rp, tree, &dest) } else { deltasync(&cli, dp, tree, &dest) };
                    secs[phase][tool].push(r.secs);
                    wire[phase][tool] = r.wire;
                }
                let want = if phase == 0 { &files_a } else { &files_b };
                for root in ["rsync-root", "ds-root"] {
                    assert!(&contents(&work.join(root).join(&dest)) == want, "{root}/{dest} is not the tree");
                }
            }
        }
        for (phase, label) in [(0, "first (A)"), (1, "second (B over A)")] {
            let (rt, dt) = (median(secs[phase][0].clone()), median(secs[phase][1].clone()));
            let (rw, dw) = (wire[phase][0], wire[phase][1]);
            println!("| {link} | {label} | rsync | {rt:.3} s | {rw} | | |");
            println!(
                "| {link} | {label} | deltasync | {dt:.3} s | {dw} | {:.2} | {:.2} |",
                dt / rt,
                dw as f64 / rw as f64
            );
        }
    }
}
