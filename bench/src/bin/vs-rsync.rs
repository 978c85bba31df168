//! deltasync against an rsync daemon, both on loopback, in one run: wall
//! time and bytes on the wire for the same edits of the same files, and the
//! deltasync server's peak RSS. (a)-(d) use pseudo-random bytes; (e) a generated
//! service log (text), where deltasync compresses what it sends. rsync runs
//! twice: as it comes (its daemon leaves what it wrote to the kernel to write
//! back) and with `--fsync` (it syncs the file before it ends, the
//! durability deltasync's server always gives).
//!
//! `cargo build --release --workspace && target/release/vs-rsync [RUNS] [BIG_MIB] [LOG_MIB]`
//! (needs `rsync`; `bench/vs-rsync.sh` installs it and runs this).

use deltasync_bench::{client, key, median, peak_rss_kib, rsync_daemon, settle, timed_rsync, timed_transfer};
use deltasync_core::sim::random_bytes;
use deltasync_server::process::ServerProcess;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn write_random(path: &Path, seed: u64, len: usize) {
    std::fs::write(path, random_bytes(seed, len)).unwrap();
}

struct Run {
    secs: f64,
    wire: u64,
}

/// rsync's upload of `file` as `name`; with `fsync`, the daemon syncs the
/// file it wrote before it ends (`--fsync`), as deltasync's server does.
fn rsync(port: u16, file: &Path, name: &str, fsync: bool) -> Run {
    let mut cmd = Command::new("rsync");
    cmd.args(["-I", "--no-whole-file", "--stats"])
        .args(fsync.then_some("--fsync"))
        .arg(file)
        .arg(format!("rsync://127.0.0.1:{port}/bench/{name}"));
    let (secs, wire) = timed_rsync(&mut cmd);
    Run { secs, wire }
}

fn deltasync(cli: &Path, port: u16, file: &Path, name: &str, opts: &[&str]) -> Run {
    let (secs, wire) = timed_transfer(
        client(cli, port).args(opts).args(["--json", "upload"]).arg(file).args(["--as", name]),
    );
    Run { secs, wire }
}

/// Deletes `name` from the deltasync server (untimed).
fn remove(cli: &Path, port: u16, name: &str) {
    let ok = client(cli, port).args(["rm", name]).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(ok, "deltasync rm {name} failed");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let big: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    let logsz: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100) << 20;
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let (server_bin, cli) = (bin_dir.join("deltasync-server"), bin_dir.join("deltasync"));
    let work = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-work".into()));
    let _ = std::fs::remove_dir_all(&work);
    for d in ["src", "ds-root", "rsync-root", "cfg"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let work = work.canonicalize().unwrap();

    // rsync daemon on loopback.
    let (_rsyncd, rport) = rsync_daemon(&work);

    // deltasync server on loopback.
    let server = ServerProcess::start(&server_bin, &work.join("ds-root"), &key(), &["--dashboard", "off"])
        .expect("start deltasync-server");
    let (dport, server_pid) = (server.port, server.pid());
    std::thread::sleep(std::time::Duration::from_millis(300));

    eprintln!("preparing files");
    let base = work.join("src/base");
    write_random(&base, 1, big);
    let log = work.join("src/log");
    write_random(&log, 2, logsz);
    let overwrite = work.join("src/overwrite");
    let insert = work.join("src/insert");
    let appended = work.join("src/appended");
    let (text_old, text_new) = (work.join("src/text-old"), work.join("src/text-new"));
    {
        let mut d = std::fs::read(&base).unwrap();
        let mid = d.len() / 2;
        d[mid..mid + 4096].iter_mut().for_each(|b| *b = !*b);
        std::fs::write(&overwrite, &d).unwrap();
        d[mid..mid + 4096].iter_mut().for_each(|b| *b = !*b);
        d.insert(0, b'!');
        std::fs::write(&insert, &d).unwrap();
        let mut l = std::fs::read(&log).unwrap();
        let extra = work.join("src/extra");
        write_random(&extra, 3, 1 << 20);
        l.extend_from_slice(&std::fs::read(&extra).unwrap());
        std::fs::write(&appended, &l).unwrap();
        // A text log: the first LOG_MIB of it, then all of it (1 MiB more).
        let text = deltasync_core::sim::log_lines(4, logsz + (1 << 20));
        let cut = text[..logsz].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        std::fs::write(&text_old, &text[..cut]).unwrap();
        std::fs::write(&text_new, &text).unwrap();
    }

    println!("## deltasync vs rsync daemon, loopback, {runs} runs, medians\n");
    println!("| scenario | tool | wall time | bytes on the wire |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    let scenarios: [(&str, &Path, Option<&Path>); 5] = [
        ("(a) 4 KiB overwrite in the middle", &overwrite, Some(&base)),
        ("(b) 1 byte inserted at offset 0", &insert, Some(&base)),
        ("(c) 1 MiB appended to a log", &appended, Some(&log)),
        ("(d) first full upload", &base, None),
        ("(e) 1 MiB of text appended to a text log", &text_new, Some(&text_old)),
    ];
    let hints = work.join("hints");
    let hints = hints.to_str().unwrap();
    // The tools, each under its own name on its server; deltasync's each in
    // a directory of its own, and removed once timed (the server takes a
    // stored file with the same data as a new name's base: the other
    // deltasync's copy would make a first upload free).
    const TOOLS: [&str; 4] = ["rsync", "rsync --fsync", "deltasync", "deltasync --no-hints"];
    let named = |tool: usize, name: &str| match tool {
        0 => name.to_string(),
        1 => format!("{name}-fs"),
        2 => format!("ds/{name}"),
        _ => format!("ds-nh/{name}"),
    };
    let run_tool = |tool: usize, file: &Path, name: &str| -> Run {
        let name = named(tool, name);
        match tool {
            0 | 1 => rsync(rport, file, &name, tool == 1),
            2 => deltasync(&cli, dport, file, &name, &["--hints", hints]),
            _ => deltasync(&cli, dport, file, &name, &["--no-hints"]),
        }
    };
    for (label, new, old) in scenarios {
        // Per tool: seconds of every run, and the last run's bytes.
        let mut secs: [Vec<f64>; 4] = Default::default();
        let mut wire = [0u64; 4];
        for i in 0..runs {
            let name = format!("f{i}-{}", label.as_bytes()[1] as char);
            // Put the old version in place for every tool (untimed); the
            // client with hints keeps those of what it sent as `name`, as it
            // would after syncing the old version of a file.
            if let Some(old) = old {
                for tool in 0..TOOLS.len() {
                    run_tool(tool, old, &name);
                }
            }
            // Each timed run starts with nothing left to write back (rsync
            // without --fsync leaves its writes to the kernel, which would
            // otherwise slow down whoever runs next); the order rotates.
            for k in 0..TOOLS.len() {
                let tool = (i + k) % TOOLS.len();
                settle();
                let r = run_tool(tool, new, &name);
                secs[tool].push(r.secs);
                wire[tool] = r.wire;
                let root = if tool < 2 { "rsync-root" } else { "ds-root" };
                let stored = work.join(root).join(named(tool, &name));
                assert!(std::fs::read(&stored).unwrap() == std::fs::read(new).unwrap(), "{stored:?} differs");
                // A deltasync file goes at once: the server reuses a stored
                // file's data for a new name (the other variant's copy would
                // make its upload free).
                if tool >= 2 {
                    remove(&cli, dport, &named(tool, &name));
                }
            }
            // The servers start every run with the same free space.
            for tool in 0..2 {
                let _ = std::fs::remove_file(work.join("rsync-root").join(named(tool, &name)));
            }
        }
        // Each run times the tools back to back: the paired ratios are
        // steadier than a ratio of medians on a noisy machine.
        let paired =
            |t: usize, peer: usize| median(secs[t].iter().zip(&secs[peer]).map(|(d, r)| d / r).collect());
        let runs_text: Vec<String> = (0..runs)
            .map(|i| format!("{:.2}/{:.2}/{:.2}/{:.2}", secs[0][i], secs[1][i], secs[2][i], secs[3][i]))
            .collect();
        let m: Vec<f64> = secs.iter().map(|v| median(v.clone())).collect();
        for (tool, tool_name) in TOOLS.iter().enumerate() {
            println!("| {label} | {tool_name} | {:.3} s | {} |", m[tool], wire[tool]);
        }
        ratios.push((
            label,
            [m[2] / m[0], paired(2, 0), paired(3, 0), paired(2, 1), paired(3, 1)],
            runs_text.join(" "),
            wire[2] as f64 / wire[0] as f64,
        ));
    }
    let rss = peak_rss_kib(server_pid);
    drop(server);
    println!(
        "\n| scenario | deltasync / rsync, ratio of medians | paired | --no-hints / rsync, paired | deltasync / rsync --fsync, paired | --no-hints / rsync --fsync, paired | runs (rsync / rsync --fsync / deltasync / --no-hints, s) | bytes deltasync / rsync |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, r, runs, b) in ratios {
        let r: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
        println!("| {label} | {} | {runs} | {b:.4} (1/{:.0}) |", r.join(" | "), 1.0 / b);
    }
    println!("\ndeltasync-server peak RSS (VmHWM) over the whole run: {:.1} MiB", rss as f64 / 1024.0);
}
