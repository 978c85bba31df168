//! This build against an earlier one, side by side in one run: the same
//! first upload of a large random file and the same 4 KiB-overwrite delta
//! upload, with each build's own server and CLI on loopback, in rotating
//! order, the disk settled (`sync`) before each transfer and the stored
//! file deleted after each round. Reports each run, the medians, the paired
//! ratios (this / earlier) and the bytes on the wire.
//!
//! The earlier build is a directory holding its `deltasync-server` and
//! `deltasync` (built from another commit). Builds before protocol version
//! 5 authenticate with `--token`/`DELTASYNC_TOKEN`, later ones with keys.
//!
//! `target/release/vs-previous EARLIER_BIN_DIR [RUNS] [SIZE_MIB]`
//! (`bench/vs-previous.sh COMMIT` builds COMMIT and runs this).

use deltasync_bench::{median, settle, timed_transfer};
use deltasync_core::sim::random_bytes;
use deltasync_server::keys::{self, KeyEntry};
use deltasync_server::process::test_key;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A server of one build, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// One build under test.
struct Build {
    label: &'static str,
    dir: PathBuf,
    /// Speaks protocol 5 (keys) rather than the plaintext versions (token).
    keyed: bool,
}

const TOKEN: &str = "bench-token";

/// Whether the server in `dir` takes `--keys` (protocol 5 and later) rather
/// than `--token` (the plaintext versions).
fn speaks_keys(dir: &Path) -> bool {
    Command::new(dir.join("deltasync-server"))
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--keys"))
}

impl Build {
    fn start(&self, root: &Path, keys_file: &Path) -> Server {
        let mut cmd = Command::new(self.dir.join("deltasync-server"));
        cmd.args(["--listen", "127.0.0.1:0", "--dashboard", "off", "--root"]).arg(root);
        if self.keyed {
            cmd.arg("--keys").arg(keys_file);
        } else {
            cmd.args(["--token", TOKEN]);
        }
        let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).spawn().expect("start server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines.next().expect("server output").unwrap();
            if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                break rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, port }
    }

    fn cli(&self, port: u16) -> Command {
        let mut c = Command::new(self.dir.join("deltasync"));
        c.env("DELTASYNC_SERVER", format!("127.0.0.1:{port}")).arg("--no-hints");
        if self.keyed {
            c.env("DELTASYNC_KEY", test_key(0xbe));
        } else {
            c.env("DELTASYNC_TOKEN", TOKEN);
        }
        c
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let earlier = PathBuf::from(args.get(1).expect("usage: vs-previous EARLIER_BIN_DIR [RUNS] [SIZE_MIB]"));
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let size: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    let here = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let work = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-prev".into()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let work = work.canonicalize().unwrap();
    let keys_file = work.join("keys.toml");
    let key = deltasync_core::channel::ClientKey::parse(&test_key(0xbe)).unwrap();
    keys::save(&keys_file, &[KeyEntry::with_key("bench", &key)]).unwrap();

    let old = work.join("old.bin");
    let mut data = random_bytes(11, size);
    std::fs::write(&old, &data).unwrap();
    let mid = size / 2;
    data[mid..mid + 4096].fill(0x5a);
    let new = work.join("new.bin");
    std::fs::write(&new, &data).unwrap();
    drop(data);

    let builds = [
        Build { label: "earlier", dir: earlier.clone(), keyed: speaks_keys(&earlier) },
        Build { label: "this", dir: here, keyed: true },
    ];
    // [build][scenario] -> seconds, and the last wire bytes.
    let mut secs = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    let mut wire = [[0u64; 2]; 2];
    println!("run build    full_s  delta_s  full_wire   delta_wire");
    for run in 0..runs {
        for k in 0..2 {
            let b = (run + k) % 2;
            let build = &builds[b];
            let root = work.join(format!("root-{}", build.label));
            let _ = std::fs::remove_dir_all(&root);
            let server = build.start(&root, &keys_file);
            settle();
            let (t_full, w_full) = timed_transfer(
                build.cli(server.port).args(["--json", "upload"]).arg(&old).args(["--as", "f"]),
            );
            settle();
            let (t_delta, w_delta) = timed_transfer(
                build.cli(server.port).args(["--json", "upload"]).arg(&new).args(["--as", "f"]),
            );
            let stored = std::fs::read(root.join("f")).unwrap();
            assert!(stored == std::fs::read(&new).unwrap(), "{}: the stored file differs", build.label);
            drop(stored);
            drop(server);
            let _ = std::fs::remove_dir_all(&root);
            println!("{run:>3} {:<7} {t_full:>7.3} {t_delta:>8.3} {w_full:>10} {w_delta:>12}", build.label);
            secs[b][0].push(t_full);
            secs[b][1].push(t_delta);
            wire[b] = [w_full, w_delta];
        }
    }
    for (s, name) in ["first upload", "4 KiB delta"].iter().enumerate() {
        let ratios: Vec<f64> = (0..runs).map(|r| secs[1][s][r] / secs[0][s][r]).collect();
        println!(
            "{name}: median earlier {:.3} s, this {:.3} s; median of paired ratios this/earlier {:.3}; wire {} -> {} bytes",
            median(secs[0][s].clone()),
            median(secs[1][s].clone()),
            median(ratios),
            wire[0][s],
            wire[1][s]
        );
    }
}
