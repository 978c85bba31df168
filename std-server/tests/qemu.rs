//! The device client end to end: the firmware in `embedded-client/firmware`
//! boots in QEMU's `mps2-an386` (Cortex-M4F with a LAN9118), and syncs its
//! log three times to the real `deltasync-server` on a loopback port, each
//! time over a new TCP connection through QEMU's user networking.
//!
//! Needs the firmware ELF in `DELTASYNC_FIRMWARE` (`bash scripts/firmware.sh`
//! builds it and prints the path; `bash scripts/test.sh` does both) and the
//! Debian packages `qemu-system-arm` and `socat`. QEMU's
//! `guestfwd=...-cmd:socat - TCP:127.0.0.1:PORT` starts one relay per guest
//! connection (the `-tcp:` form would connect once and make every guest
//! connection share one stream). The server and QEMU are stopped by the
//! test, by their own process ids, on every path.

use deltasync_core::channel::ClientKey;
use deltasync_core::hash::Hash;
use deltasync_server::keys::{self, KeyEntry};
use deltasync_server::process::ServerProcess;
use deltasync_server::relay::Relay;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The key the firmware is built with (its published QEMU test key, the
/// default of scripts/firmware.sh): device 7's, which may only upload
/// under `devices/7`.
const KEY: ClientKey = ClientKey { id: *b"device-7", secret: [0x17; 32] };
const LOG_NAME: &str = "devices/7/log";
/// A whole run takes well under a second; this only bounds a hang.
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// Records the firmware writes: 200, then 20 more.
const RECORDS: usize = 220;

/// A child process stopped by its own pid when dropped: SIGTERM, then
/// SIGKILL if it has not exited within `grace`.
struct Stopped {
    child: Child,
    grace: Duration,
}

impl Stopped {
    fn new(child: Child, grace: Duration) -> Self {
        Stopped { child, grace }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit by itself.
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if !self.grace.is_zero() {
            let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
            if self.wait_for(self.grace).is_some() {
                return;
            }
        }
        // Child::kill sends SIGKILL to exactly this pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn firmware_path() -> PathBuf {
    let path = std::env::var_os("DELTASYNC_FIRMWARE").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "DELTASYNC_FIRMWARE is not set: this test boots the firmware ELF in QEMU. \
             Run `bash scripts/test.sh` (it builds the firmware and sets it), or \
             `bash scripts/firmware.sh` and set DELTASYNC_FIRMWARE to the FIRMWARE=... path it prints"
        )
    });
    assert!(
        path.is_file(),
        "DELTASYNC_FIRMWARE={} is not a file: run `bash scripts/firmware.sh`",
        path.display()
    );
    path
}

fn require_tool(name: &str, version_arg: &str) {
    let found = Command::new(name)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "`{name}` is not installed: `apt-get install {name}` (bash scripts/test.sh installs it)");
}

/// Starts the server on an ephemeral loopback port (its log goes to the
/// test's stderr, shown when the test fails).
fn start_server(root: &Path) -> (ServerProcess, u16) {
    let bin = Path::new(env!("CARGO_BIN_EXE_deltasync-server"));
    let keys_file = root.join("keys.toml");
    keys::save(&keys_file, &[KeyEntry::device("device-7", &KEY, "devices/7")]).expect("writing the key file");
    let server =
        ServerProcess::start_with_keys(bin, &root.join("files"), &keys_file, &["--dashboard", "off"])
            .expect("starting deltasync-server");
    let port = server.port;
    (server, port)
}

/// What QEMU printed and how it ended.
struct Run {
    status: ExitStatus,
    lines: Vec<String>,
}

/// Boots `elf` with its network reaching 127.0.0.1:`port` and collects its
/// output until QEMU exits (the firmware ends the run through semihosting).
fn run_qemu(elf: &Path, port: u16) -> Run {
    let nic = format!(
        "user,model=lan9118,restrict=on,guestfwd=tcp:10.0.2.100:5001-cmd:socat - TCP:127.0.0.1:{port}"
    );
    let mut child = Command::new("qemu-system-arm")
        .args(["-M", "mps2-an386", "-nographic", "-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(elf)
        .args(["-nic", &nic])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-arm");
    // Semihosting output goes to stdout or stderr depending on QEMU's
    // version and options: read both, line by line, as it comes.
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        Box::new(child.stdout.take().expect("qemu stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("qemu stderr")),
    ]
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let line = line.trim_end().to_string();
                eprintln!("qemu: {line}");
                let _ = tx.send(line);
            }
        })
    });
    drop(tx);
    let mut qemu = Stopped::new(child, Duration::ZERO);
    let status = qemu.wait_for(QEMU_TIMEOUT);
    let status = match status {
        Some(s) => s,
        None => {
            let pid = qemu.pid();
            drop(qemu);
            let lines: Vec<String> = rx.try_iter().collect();
            panic!(
                "QEMU (pid {pid}) still running after {QEMU_TIMEOUT:?}, killed; output:\n{}",
                lines.join("\n")
            );
        }
    };
    drop(qemu);
    for r in readers {
        let _ = r.join();
    }
    Run { status, lines: rx.into_iter().collect() }
}

/// One `SYNC n key=value ...` line.
#[derive(Debug)]
struct Sync {
    outcome: String,
    fields: HashMap<String, String>,
}

impl Sync {
    fn num(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {key}= in {self:?}"))
    }

    fn text(&self, key: &str) -> &str {
        self.fields.get(key).unwrap_or_else(|| panic!("no {key}= in {self:?}"))
    }
}

fn parse_syncs(lines: &[String]) -> Vec<(u32, Sync)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("SYNC "))
        .map(|rest| {
            let mut words = rest.split_whitespace();
            let n: u32 = words.next().and_then(|w| w.parse().ok()).expect("SYNC without a number");
            let fields: HashMap<String, String> = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let outcome = fields.get("outcome").cloned().unwrap_or_default();
            (n, Sync { outcome, fields })
        })
        .collect()
}

/// Checks the shape of every record, `t=NNNNNN dev=7 temp=DD.D seq=NNNNNN
/// status=ok|warn`, with `seq` counting up from 0 and `t` increasing.
fn check_records(log: &str) {
    let mut last_t = None;
    let mut count = 0;
    for (i, line) in log.lines().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "record {i}: {line:?}");
        let t: u32 =
            f[0].strip_prefix("t=").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
        assert!(last_t < Some(t), "record {i}: time goes backwards: {line:?}");
        last_t = Some(t);
        assert_eq!(f[1], "dev=7", "{line:?}");
        let temp = f[2].strip_prefix("temp=").unwrap_or_else(|| panic!("{line:?}"));
        let celsius: f64 = temp.parse().unwrap_or_else(|_| panic!("{line:?}"));
        assert!((18.0..27.0).contains(&celsius), "{line:?}");
        assert_eq!(f[3], format!("seq={i:06}"), "{line:?}");
        assert!(f[4] == "status=ok" || f[4] == "status=warn", "{line:?}");
        count += 1;
    }
    assert_eq!(count, RECORDS, "records in the stored log");
    assert!(log.ends_with('\n'), "the log ends with a whole record");
}

#[test]
fn qemu_firmware_syncs_its_log_three_times() {
    let elf = firmware_path();
    require_tool("qemu-system-arm", "--version");
    require_tool("socat", "-V");
    let root = tempfile::tempdir().expect("temp dir");
    let (_server, port) = start_server(root.path());
    // The device's connections pass a recording relay: what an attacker on
    // its network would capture.
    let relay = Relay::start(port, None).expect("starting the relay");

    let run = run_qemu(&elf, relay.port);
    let errors: Vec<&String> = run.lines.iter().filter(|l| l.starts_with("ERROR")).collect();
    assert!(errors.is_empty(), "the firmware failed: {errors:?}");
    assert!(run.status.success(), "QEMU exited with {}; output:\n{}", run.status, run.lines.join("\n"));
    assert!(run.lines.iter().any(|l| l == "DONE"), "no DONE line:\n{}", run.lines.join("\n"));

    let syncs = parse_syncs(&run.lines);
    let numbers: Vec<u32> = syncs.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 2, 3], "SYNC lines:\n{}", run.lines.join("\n"));
    let (s1, s2, s3) = (&syncs[0].1, &syncs[1].1, &syncs[2].1);
    for (n, s) in &syncs {
        println!(
            "sync {n}: {} wire={} (sent {} + received {}) literal={} overhead={} log={} appended={}",
            s.outcome,
            s.num("wire"),
            s.num("sent"),
            s.num("received"),
            s.num("literal"),
            s.num("wire") - s.num("literal"),
            s.num("log"),
            s.num("appended"),
        );
    }

    // 1: the whole log, with little beyond it on the wire.
    assert_eq!(s1.outcome, "Written", "{s1:?}");
    assert_eq!(s1.num("log"), s1.num("appended"), "nothing dropped from the log before sync 1");
    assert_eq!(s1.num("literal"), s1.num("log"), "sync 1 sends the whole log");
    assert!(
        s1.num("wire") as f64 <= 1.05 * s1.num("log") as f64,
        "sync 1: wire {} > 1.05 x log {}",
        s1.num("wire"),
        s1.num("log")
    );

    // 2: 20 records appended: they cross the wire, with at most 300 bytes
    // besides them, the handshake included (the server asks for them as the
    // suffix of the log it holds).
    assert_eq!(s2.outcome, "Written", "{s2:?}");
    assert_eq!(
        s2.num("log"),
        s1.num("log") + s2.num("appended"),
        "sync 2's log is sync 1's plus the appended records"
    );
    assert!(s2.num("literal") >= s2.num("appended"), "the appended bytes must travel: {s2:?}");
    let limit = s2.num("appended") + 300;
    assert!(s2.num("wire") <= limit, "sync 2: wire {} > appended + 300 = {limit}", s2.num("wire"));

    // 3: nothing new: the offer and its answer.
    assert_eq!(s3.outcome, "Unchanged", "{s3:?}");
    assert_eq!(s3.num("appended"), 0);
    assert_eq!(s3.num("literal"), 0);
    assert_eq!(s3.num("log"), s2.num("log"));
    assert!(s3.num("wire") <= 300, "sync 3: wire {} > 300", s3.num("wire"));

    // The stored file is, byte for byte, the log the firmware synced last.
    let stored =
        std::fs::read(root.path().join("files").join(LOG_NAME)).expect("the server stored devices/7/log");
    assert_eq!(stored.len() as u64, s3.num("log"), "stored size");
    assert_eq!(
        Hash::of(&stored).to_hex().as_str(),
        s3.text("sha256"),
        "stored SHA-256 against the firmware's"
    );
    assert_ne!(s1.text("sha256"), s2.text("sha256"), "the log changed between syncs 1 and 2");
    // Over the encrypted channel: no 16-byte run of the log in the capture.
    let capture = relay.captured();
    assert!(
        capture.len() as u64 >= s1.num("wire") + s2.num("wire") + s3.num("wire"),
        "the relay carried it all"
    );
    let windows: std::collections::HashSet<&[u8]> = capture.windows(16).collect();
    let leaked = stored.windows(16).filter(|w| windows.contains(w)).count();
    assert_eq!(leaked, 0, "{leaked} 16-byte runs of the log crossed the network in clear");
    let text = String::from_utf8(stored).expect("the log is text");
    check_records(&text);
}
