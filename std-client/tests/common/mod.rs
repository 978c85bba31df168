//! What the end-to-end tests share: the real server on an ephemeral
//! loopback port, and the real `deltasync` command pointed at it.
#![allow(dead_code)]

use deltasync_server::process::{ServerProcess, test_key};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The key the test servers grant everything to.
pub fn key() -> String {
    test_key(1)
}

pub fn server_bin() -> PathBuf {
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_deltasync"));
    let bin = cli.with_file_name("deltasync-server");
    assert!(bin.exists(), "{} is missing: build the workspace binaries first", bin.display());
    bin
}

pub struct Server {
    pub proc: ServerProcess,
    pub port: u16,
    /// The file store's root (with the object store: where its key file
    /// and scratch files go).
    pub root: PathBuf,
    /// The object store's prefix in the test bucket, if it stores there.
    pub prefix: Option<String>,
}

/// Whether [`Server::start`] stores in the test bucket (the test command
/// runs the end-to-end suite once more with `DELTASYNC_TEST_STORE=s3`).
pub fn on_s3() -> bool {
    std::env::var("DELTASYNC_TEST_STORE").is_ok_and(|v| v == "s3")
}

/// The bucket prefix standing for `root`: a server started again on the
/// same root finds the same files.
fn prefix_for(root: &Path) -> String {
    let p: String =
        root.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    format!("e2e{}", p.trim_matches('-').replace("--", "-"))
}

static SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The S3 server the test command started (`scripts/test.sh` runs
/// SeaweedFS and sets `DELTASYNC_TEST_S3` to `http://HOST:PORT/BUCKET`):
/// its endpoint and bucket.
pub fn s3() -> (String, String) {
    let url = std::env::var("DELTASYNC_TEST_S3").expect(
        "DELTASYNC_TEST_S3 is not set: the object-store tests need an S3 server \
         (scripts/test.sh starts SeaweedFS and sets it to http://127.0.0.1:8333/BUCKET)",
    );
    let (endpoint, bucket) = url.rsplit_once('/').expect("DELTASYNC_TEST_S3 is http://HOST:PORT/BUCKET");
    (endpoint.to_string(), bucket.to_string())
}

/// A prefix in the test bucket no other test (or run) uses.
pub fn s3_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{test}-{}-{nanos}", std::process::id())
}

/// What the server sets for the test bucket: SeaweedFS takes any
/// credentials; the server signs with these.
pub const S3_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "deltasync-test"),
    ("AWS_SECRET_ACCESS_KEY", "deltasync-test"),
    ("AWS_REGION", "us-east-1"),
];

/// Runs `deltasync-server gc` on the test bucket's `prefix` with `extra`
/// options; its JSON report.
pub fn s3_gc(prefix: &str, extra: &[&str]) -> serde_json::Value {
    let (endpoint, bucket) = s3();
    let out = Command::new(server_bin())
        .args(["--store", &format!("s3://{bucket}/{prefix}"), "--s3-endpoint", &endpoint])
        .args(extra)
        .arg("gc")
        .envs(S3_ENV)
        .output()
        .expect("run deltasync-server gc");
    assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("gc prints JSON")
}

impl Server {
    /// A server storing in the test bucket under `prefix` (its key file
    /// and the CLI's hints beside `root`). Servers started with the same
    /// prefix share their files.
    pub fn start_s3(root: &Path, prefix: &str, extra: &[&str]) -> Server {
        let (endpoint, bucket) = s3();
        let store = format!("s3://{bucket}/{prefix}");
        let mut args = vec!["--dashboard", "off", "--store", &store, "--s3-endpoint", &endpoint];
        args.extend_from_slice(extra);
        std::fs::create_dir_all(root).unwrap();
        let proc =
            ServerProcess::start_with_env(&server_bin(), root, &key(), &args, &S3_ENV).expect("start server");
        Server { port: proc.port, proc, root: root.to_path_buf(), prefix: Some(prefix.to_string()) }
    }

    /// A server storing under `root`, or (see [`on_s3`]) in the test
    /// bucket under a prefix standing for `root`.
    pub fn start(root: &Path) -> Server {
        if on_s3() {
            return Server::start_s3(root, &prefix_for(root), &[]);
        }
        let proc =
            ServerProcess::start(&server_bin(), root, &key(), &["--dashboard", "off"]).expect("start server");
        Server { port: proc.port, proc, root: root.to_path_buf(), prefix: None }
    }

    /// Whether it stores in the test bucket.
    pub fn is_s3(&self) -> bool {
        self.prefix.is_some()
    }

    /// A path beside the root no other call returns.
    fn scratch(&self) -> PathBuf {
        let n = SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root.with_file_name(format!("scratch-{}-{n}", self.port))
    }

    /// What the server stores as `name`, if anything: read from its root,
    /// or downloaded through it from the bucket.
    pub fn stored(&self, name: &str) -> Option<Vec<u8>> {
        if !self.is_s3() {
            return std::fs::read(self.root.join(name)).ok();
        }
        let out = self.scratch();
        let got = self.cli(&["--no-hints", "download", name, "-o", s(&out)]);
        match got.status.code() {
            Some(0) => {}
            Some(5) => return None,
            _ => panic!("downloading {name} failed: {}", String::from_utf8_lossy(&got.stderr)),
        }
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        Some(data)
    }

    /// Bytes an upload in progress (or interrupted) of `name` has stored:
    /// the largest upload file under the root, or the name's partial in
    /// the bucket.
    pub fn kept(&self, name: &str) -> u64 {
        if !self.is_s3() {
            return std::fs::read_dir(self.root.join(".deltasync/upload"))
                .map(|d| {
                    d.filter_map(Result::ok).map(|e| e.metadata().map_or(0, |m| m.len())).max().unwrap_or(0)
                })
                .unwrap_or(0);
        }
        let st = self.cli(&["--json", "stat", name]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        v["partial"]["size"].as_u64().unwrap_or(0)
    }

    /// A directory holding what the server stores under `dir`: the root's
    /// own, or a copy pulled through the server from the bucket (made
    /// afresh on each call; missing if there is no such directory; files
    /// that go while it is pulled are left out).
    pub fn tree(&self, dir: &str) -> PathBuf {
        if !self.is_s3() {
            return self.root.join(dir);
        }
        let out = self.scratch();
        let got = self.cli(&["--no-hints", "pull", dir, s(&out)]);
        match got.status.code() {
            // 11: some files went while they were pulled (the tree is being
            // changed); like a walk of the root, what goes is left out.
            Some(0 | 11) => out,
            Some(5) => {
                let _ = std::fs::remove_dir_all(&out);
                out
            }
            _ => panic!("pulling {dir} failed: {}", String::from_utf8_lossy(&got.stderr)),
        }
    }

    /// The CLI's chunk hints, beside the server's root.
    pub fn hints(&self) -> PathBuf {
        self.root.with_file_name("hints")
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_key(&key(), args)
    }

    /// The CLI pointed at this server with `key`.
    pub fn command(&self, key: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deltasync"));
        c.env("DELTASYNC_SERVER", format!("127.0.0.1:{}", self.port))
            .env("DELTASYNC_KEY", key)
            .env("DELTASYNC_HINTS", self.hints())
            .args(args);
        c
    }

    pub fn cli_with_key(&self, key: &str, args: &[&str]) -> Output {
        self.command(key, args).output().expect("run deltasync")
    }

    /// Starts the CLI in the background, its output discarded.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(&key(), args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("run deltasync")
    }

    /// Runs the CLI with `--json` and returns its one JSON object.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 1, "one JSON object expected, got {text:?}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn kill9(self) {
        self.proc.kill9();
    }
}

pub fn wire(v: &serde_json::Value) -> u64 {
    v["wire_bytes_sent"].as_u64().unwrap() + v["wire_bytes_received"].as_u64().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
