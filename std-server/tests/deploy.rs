//! The systemd unit in `deploy/`: systemd accepts it, and the server starts
//! with exactly its command lines (the key created by `ExecStartPre`, then
//! `ExecStart`), its paths moved into a temporary directory and its
//! addresses onto free loopback ports. The server is stopped by its pid.
//! Also: a server that cannot raise its open-file limit to its cap says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNIT: &str = include_str!("../../deploy/deltasync-server.service");

/// The unit with its binary and state directory replaced.
fn localised(bin: &Path, state: &Path) -> String {
    UNIT.replace("/usr/local/bin/deltasync-server", bin.to_str().unwrap())
        .replace("/var/lib/deltasync", state.to_str().unwrap())
}

/// The value of `key=` in the unit, continuation lines joined.
fn setting(unit: &str, key: &str) -> String {
    let joined = unit.replace("\\\n", " ");
    let line =
        joined.lines().find(|l| l.starts_with(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}="));
    line[key.len() + 1..].to_string()
}

#[test]
fn systemd_accepts_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_deltasync-server"));
    let unit = dir.path().join("deltasync-server.service");
    std::fs::write(&unit, localised(&bin, Path::new("/var/lib/deltasync"))).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test.sh installs it)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    for needed in
        ["User=deltasync", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=", "LimitNOFILE="]
    {
        assert!(UNIT.lines().any(|l| l.starts_with(needed)), "the unit has no {needed}");
    }
}

#[test]
fn the_units_command_lines_start_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_deltasync-server"));
    let unit = localised(&bin, &state);
    let pre = setting(&unit, "ExecStartPre");
    let script = pre.strip_prefix("/bin/sh -c '").and_then(|s| s.strip_suffix('\'')).expect("a sh -c line");
    for _ in 0..2 {
        // Twice: the second run must leave the first key alone.
        let ok = Command::new("/bin/sh").arg("-c").arg(script).env("HOME", dir.path()).status().unwrap();
        assert!(ok.success());
    }
    let key = std::fs::read_to_string(state.join("owner.key")).unwrap();
    assert!(key.starts_with("dsk1-"), "{key}");

    let start = setting(&unit, "ExecStart");
    let mut args: Vec<String> = start.split_whitespace().map(str::to_string).collect();
    for a in args.iter_mut() {
        if a == "[::]:5001" || a == "127.0.0.1:8000" {
            *a = "127.0.0.1:0".into();
        }
    }
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .env("HOME", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut port = None;
    while port.is_none() && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        port = line.split("listening on 127.0.0.1:").nth(1).map(|r| r.split(',').next().unwrap().to_string());
    }
    let stopped = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(stopped.success());
    let status = child.wait().unwrap();
    let port = port.expect("the server started with the unit's command line");
    assert!(port.parse::<u16>().is_ok(), "{port}");
    assert!(status.success(), "the server ended with {status} after SIGTERM");
    assert!(state.join("files").is_dir(), "the storage root was not created");
}

#[test]
fn a_server_that_cannot_raise_its_file_limit_says_so() {
    // Under a hard limit of 512 open files, --max-connections 10000 cannot
    // be held: the server starts anyway and says what to raise.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_deltasync-server"));
    let keys = state.join("keys.toml");
    let added = Command::new(&bin).arg("--keys").arg(&keys).args(["key", "add", "k"]).output().unwrap();
    assert!(added.status.success());
    let mut child = Command::new("prlimit")
        .arg("--nofile=512:512")
        .arg(&bin)
        .arg("--keys")
        .arg(&keys)
        .arg("--root")
        .arg(state.join("files"))
        .args(["--listen", "127.0.0.1:0", "--dashboard", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => break,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    let stopped = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(stopped.success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("open-file limit") && log.contains("LimitNOFILE"), "{log}");
}
