//! The deltasync server's peak memory against the file size: for each size,
//! a fresh server on loopback takes a first upload of a pseudo-random file,
//! a delta upload after a 4 KiB overwrite in the middle, and serves a delta
//! download to a client holding the first version; then its VmHWM is read.
//! A size `A+B` (GiB) instead appends B GiB to the first version: the new
//! version keeps the old one's chunking while that suits its size, which is
//! the most chunks a server holds for one transfer (1+0.5: 1.5 GiB in
//! 4 KiB chunks).
//!
//! `cargo build --release --workspace --bins && target/release/server-rss [GIB|GIB+GIB...]`
//! (`bench/server-rss.sh` does both; files go under `BENCH_DIR`, default
//! `target/bench-work`, and are deleted at the end).

use deltasync_bench::{client, key, peak_rss_kib, timed_transfer};
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::sim::random_bytes;
use deltasync_server::process::ServerProcess;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PIECE: usize = 64 << 20;

/// Writes `len` pseudo-random bytes without holding them all in memory.
fn write_random(path: &Path, seed: u64, len: u64) {
    let mut f = File::create(path).unwrap();
    let mut done = 0u64;
    let mut k = 0;
    while done < len {
        let n = PIECE.min((len - done) as usize);
        f.write_all(&random_bytes(seed.wrapping_mul(1_000_003).wrapping_add(k), n)).unwrap();
        done += n as u64;
        k += 1;
    }
    f.sync_all().unwrap();
}

/// Runs the CLI against the server; returns (seconds, wire bytes both ways).
fn cli(bin: &Path, port: u16, args: &[&std::ffi::OsStr]) -> (f64, u64) {
    timed_transfer(client(bin, port).arg("--json").args(args))
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    if len != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut x, mut y) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut at = 0u64;
    while at < len {
        let n = PIECE.min((len - at) as usize);
        fa.read_exact_at(&mut x[..n], at).unwrap();
        fb.read_exact_at(&mut y[..n], at).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        at += n as u64;
    }
    true
}

fn main() {
    let sizes: Vec<String> = std::env::args().skip(1).collect();
    let sizes = if sizes.is_empty() { vec!["1".into(), "4".into(), "1+0.5".into()] } else { sizes };
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let (server_bin, bin) = (bin_dir.join("deltasync-server"), bin_dir.join("deltasync"));
    let work = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-work".into()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let work = work.canonicalize().unwrap();
    let hints = work.join("hints");

    println!("## deltasync-server peak RSS by file size (a fresh server per size)\n");
    println!(
        "| file | chunking | first upload | 4 KiB overwrite (or append), upload | same, download to the old copy | server peak RSS (VmHWM) |"
    );
    println!("|---|---|---|---|---|---|");
    for (seed, spec) in sizes.iter().enumerate() {
        let gib = |s: &str| (s.parse::<f64>().expect("a size in GiB") * (1u64 << 30) as f64) as u64;
        let (len, grow) = match spec.split_once('+') {
            Some((a, b)) => (gib(a), gib(b)),
            None => (gib(spec), 0),
        };
        let seed = seed as u64 + 1;
        let root = work.join(format!("root-{seed}"));
        std::fs::create_dir_all(&root).unwrap();
        let (old, new, copy) = (work.join("old"), work.join("new"), work.join("copy"));
        eprintln!("preparing {spec} GiB");
        write_random(&old, seed, len);
        std::fs::copy(&old, &new).unwrap();
        if grow == 0 {
            let mut f = std::fs::OpenOptions::new().write(true).open(&new).unwrap();
            f.seek(SeekFrom::Start(len / 2)).unwrap();
            f.write_all(&random_bytes(seed + 100, 4096)).unwrap();
        } else {
            let extra = work.join("extra");
            write_random(&extra, seed + 100, grow);
            let mut f = std::fs::OpenOptions::new().append(true).open(&new).unwrap();
            std::io::copy(&mut File::open(&extra).unwrap(), &mut f).unwrap();
            let _ = std::fs::remove_file(extra);
        }
        std::fs::copy(&old, &copy).unwrap();
        let server = ServerProcess::start(&server_bin, &root, &key(), &["--dashboard", "off"])
            .expect("start deltasync-server");
        let port = server.port;
        let h = ["--hints".as_ref(), hints.as_os_str()];
        let first =
            cli(&bin, port, &[h[0], h[1], "upload".as_ref(), old.as_os_str(), "--as".as_ref(), "f".as_ref()]);
        let up =
            cli(&bin, port, &[h[0], h[1], "upload".as_ref(), new.as_os_str(), "--as".as_ref(), "f".as_ref()]);
        let down = cli(
            &bin,
            port,
            &["--no-hints".as_ref(), "download".as_ref(), "f".as_ref(), "-o".as_ref(), copy.as_os_str()],
        );
        let rss = peak_rss_kib(server.pid());
        drop(server);
        assert!(same_bytes(&root.join("f"), &new), "the server stored a different file");
        assert!(same_bytes(&copy, &new), "the download rebuilt a different file");
        // What the client picks, as it does: the stored version's kind if
        // it suits the new size.
        let kind = ChunkerKind::keep_or_choose(Some(ChunkerKind::for_size(len)), len + grow);
        let chunking = format!("{} KiB normal", kind.normal_chunk() >> 10);
        let cell = |(s, w): (f64, u64)| format!("{s:.2} s, {w} B");
        let file = if grow == 0 { format!("{spec} GiB") } else { format!("{spec} GiB (grown)") };
        println!(
            "| {file} | {chunking} | {} | {} | {} | {:.1} MiB |",
            cell(first),
            cell(up),
            cell(down),
            rss as f64 / 1024.0
        );
        for p in [&old, &new, &copy] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&root);
    }
    let _ = std::fs::remove_dir_all(&work);
}
