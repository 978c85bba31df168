//! deltasync against an rsync daemon, both on loopback, in one run: wall
//! time and bytes on the wire for the same edits of the same file, uploaded
//! over the old version on the server ("up") and downloaded over an old
//! local copy ("down"); a first full upload; an unchanged upload; and the
//! deltasync server's peak RSS. The file is pseudo-random (incompressible).
//! rsync runs twice: as it comes (what it wrote is left to the kernel to
//! write back) and with `--fsync` (its receiver syncs the file before it
//! ends, the durability deltasync always gives).
//!
//! `cargo build --release --workspace && target/release/vs-rsync [RUNS] [BIG_MIB]`
//! (needs `rsync`; `bench/vs-rsync.sh` installs it and runs this).

use deltasync_bench::{
    Edits, client, edits, key, median, peak_rss_kib, rsync_daemon, settle, timed_rsync, timed_transfer,
};
use deltasync_server::process::ServerProcess;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// rsync between the local `file` and the daemon's `name`, timed; with
/// `fsync`, the receiving side syncs the file before it ends.
fn rsync(port: u16, file: &Path, name: &str, fsync: bool, dir: Dir) -> (f64, u64) {
    let mut cmd = Command::new("rsync");
    cmd.args(["-I", "--no-whole-file", "--stats"]).args(fsync.then_some("--fsync"));
    let remote = format!("rsync://127.0.0.1:{port}/bench/{name}");
    match dir {
        Dir::Up => cmd.arg(file).arg(remote),
        Dir::Down => cmd.arg(remote).arg(file),
    };
    timed_rsync(&mut cmd)
}

/// The deltasync CLI with the hints in `hints` (or none).
fn ds(cli: &Path, port: u16, hints: Option<&Path>) -> Command {
    let mut c = client(cli, port);
    match hints {
        Some(h) => c.arg("--hints").arg(h),
        None => c.arg("--no-hints"),
    };
    c
}

/// An untimed deltasync command that must succeed.
fn ds_ok(mut c: Command, args: &[&str]) {
    let ok = c.args(args).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(ok, "deltasync {args:?} failed");
}

/// One transfer's results: its label, its direction, every run's seconds
/// per tool and the last run's bytes per tool.
type Row = (String, Dir, [Vec<f64>; 3], [u64; 3]);

fn same(a: &Path, b: &Path) {
    assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap(), "{a:?} and {b:?} differ");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let big: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let (server_bin, cli) = (bin_dir.join("deltasync-server"), bin_dir.join("deltasync"));
    let work = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-work".into()));
    let _ = std::fs::remove_dir_all(&work);
    for d in ["src", "ds-root", "rsync-root", "cfg", "local"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let work = work.canonicalize().unwrap();
    let (_rsyncd, rport) = rsync_daemon(&work);
    let server = ServerProcess::start(&server_bin, &work.join("ds-root"), &key(), &["--dashboard", "off"])
        .expect("start deltasync-server");
    let (dport, server_pid) = (server.port, server.pid());
    std::thread::sleep(std::time::Duration::from_millis(300));

    eprintln!("preparing files");
    let Edits { base, overwrite, insert, deletion, scattered, prepend } = edits(&work.join("src"), big);

    let scenarios: [(&str, Option<&Path>, &Path); 7] = [
        ("4 KiB overwrite in the middle", Some(&base), &overwrite),
        ("1 byte inserted at 0", Some(&base), &insert),
        ("1 MiB deleted in the middle", Some(&base), &deletion),
        ("64 scattered 1-byte edits", Some(&base), &scattered),
        ("100 bytes prepended", Some(&base), &prepend),
        ("first full upload", None, &base),
        ("unchanged", Some(&base), &base),
    ];
    const TOOLS: [&str; 3] = ["rsync", "rsync --fsync", "deltasync"];
    let hints = work.join("hints");
    let down_hints = work.join("down-hints");
    let mut rows: Vec<Row> = Vec::new();
    // BENCH_ONLY=TEXT runs only the scenarios whose label holds TEXT.
    let only = std::env::var("BENCH_ONLY").ok();
    for (k, (label, old, new)) in scenarios.into_iter().enumerate() {
        if only.as_deref().is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let dirs: &[Dir] = if old.is_some() && old != Some(new) { &[Dir::Up, Dir::Down] } else { &[Dir::Up] };
        for &dir in dirs {
            let mut secs: [Vec<f64>; 3] = Default::default();
            let mut wire = [0u64; 3];
            for i in 0..runs {
                // Each tool has names of its own (deltasync's in a directory
                // of its own per run: the server takes a stored file with the
                // same data as a new name's base).
                let name = |tool: usize| match tool {
                    0 => format!("s{k}-r{i}"),
                    1 => format!("s{k}-r{i}-fs"),
                    _ => format!("ds{k}-{i}/f"),
                };
                let local = |tool: usize| work.join("local").join(format!("l{tool}"));
                // Untimed: the old version where each tool will find it.
                for tool in 0..TOOLS.len() {
                    match (dir, tool, old) {
                        (Dir::Up, 0 | 1, Some(old)) => {
                            std::fs::copy(old, work.join("rsync-root").join(name(tool))).unwrap();
                        }
                        (Dir::Up, _, Some(old)) => {
                            ds_ok(ds(&cli, dport, Some(&hints)), &["upload", s(old), "--as", &name(tool)])
                        }
                        (Dir::Down, 0 | 1, Some(old)) => {
                            std::fs::copy(new, work.join("rsync-root").join(name(tool))).unwrap();
                            std::fs::copy(old, local(tool)).unwrap();
                        }
                        (Dir::Down, _, Some(old)) => {
                            // The client's hints describe its copy (the old
                            // version, which it sent); the server then gets
                            // the new one from elsewhere.
                            ds_ok(
                                ds(&cli, dport, Some(&down_hints)),
                                &["upload", s(old), "--as", &name(tool)],
                            );
                            ds_ok(ds(&cli, dport, None), &["upload", s(new), "--as", &name(tool)]);
                            std::fs::copy(old, local(tool)).unwrap();
                        }
                        _ => {}
                    }
                }
                // Timed, in an order that rotates, each after the disk settled.
                for j in 0..TOOLS.len() {
                    let tool = (i + j) % TOOLS.len();
                    settle();
                    let (t, b) = match (dir, tool) {
                        (Dir::Up, 0 | 1) => rsync(rport, new, &name(tool), tool == 1, dir),
                        (Dir::Down, 0 | 1) => rsync(rport, &local(tool), &name(tool), tool == 1, dir),
                        (Dir::Up, _) => timed_transfer(ds(&cli, dport, Some(&hints)).args([
                            "--json",
                            "upload",
                            s(new),
                            "--as",
                            &name(tool),
                        ])),
                        (Dir::Down, _) => timed_transfer(ds(&cli, dport, Some(&down_hints)).args([
                            "--json",
                            "download",
                            &name(tool),
                            "-o",
                            s(&local(tool)),
                        ])),
                    };
                    secs[tool].push(t);
                    wire[tool] = b;
                    match (dir, tool) {
                        (Dir::Up, 0 | 1) => same(&work.join("rsync-root").join(name(tool)), new),
                        (Dir::Up, _) => same(&work.join("ds-root").join(name(tool)), new),
                        (Dir::Down, _) => same(&local(tool), new),
                    }
                }
                // Every run starts with the same free space.
                for tool in 0..TOOLS.len() {
                    let _ = std::fs::remove_file(work.join("rsync-root").join(name(tool)));
                    let _ = std::fs::remove_file(local(tool));
                }
                ds_ok(ds(&cli, dport, None), &["rm", &name(2)]);
            }
            rows.push((label.to_string(), dir, secs, wire));
        }
    }
    let rss = peak_rss_kib(server_pid);
    drop(server);

    println!("## deltasync vs rsync daemon, loopback, {} MiB, {runs} runs, medians\n", big >> 20);
    println!(
        "| scenario | rsync | rsync --fsync | deltasync | deltasync / rsync, paired | / rsync --fsync, paired | bytes rsync | bytes deltasync | bytes deltasync / rsync |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, dir, secs, wire) in &rows {
        let paired = |peer: usize| median(secs[2].iter().zip(&secs[peer]).map(|(d, r)| d / r).collect());
        let m: Vec<f64> = secs.iter().map(|v| median(v.clone())).collect();
        let ratio = wire[2] as f64 / wire[0] as f64;
        println!(
            "| {}: {label} | {:.3} s | {:.3} s | {:.3} s | {:.2} | {:.2} | {} | {} | {ratio:.4} (1/{:.0}) |",
            if *dir == Dir::Up { "up" } else { "down" },
            m[0],
            m[1],
            m[2],
            paired(0),
            paired(1),
            wire[0],
            wire[2],
            1.0 / ratio,
        );
    }
    println!("\nEvery run's seconds (rsync / rsync --fsync / deltasync):\n");
    for (label, dir, secs, _) in &rows {
        let runs: Vec<String> = (0..secs[0].len())
            .map(|i| format!("{:.2}/{:.2}/{:.2}", secs[0][i], secs[1][i], secs[2][i]))
            .collect();
        println!("- {} {label}: {}", if *dir == Dir::Up { "up" } else { "down" }, runs.join(", "));
    }
    println!("\ndeltasync-server peak RSS (VmHWM) over the whole run: {:.1} MiB", rss as f64 / 1024.0);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
