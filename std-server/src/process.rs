//! Running the real `deltasync-server` binary as a child process, for the
//! integration tests and benchmarks that drive it: start it on an ephemeral
//! loopback port, learn its ports from what it prints, and stop it by its
//! own process id.

use crate::keys::{self, KeyEntry};
use deltasync_core::channel::ClientKey;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to say where it listens.
const STARTUP: Duration = Duration::from_secs(30);

/// A running server, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ServerProcess {
    child: Child,
    /// The port its deltasync listener bound on 127.0.0.1.
    pub port: u16,
    /// The dashboard's base URL (`http://127.0.0.1:PORT/`), when it has one.
    pub dashboard: Option<String>,
    /// The key file this helper wrote (removed on drop).
    written: Option<PathBuf>,
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `from`
/// (so that a test or benchmark can play many hosts).
pub fn connect_from(from: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((from, 0)).into())?;
    sock.connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)).into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// A plain-HTTP GET of `url` (`http://HOST:PORT/PATH`, as the dashboard's
/// base URL and a path make): the status and the body (chunks joined).
/// Panics on any failure, or if no answer comes within 10 s.
pub fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("an answer within 10 s");
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Bodies here are sent with a length or chunked; undo chunking.
    let body = if resp.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

/// A number from `/proc/PID/status` (`field` with its colon, e.g.
/// `"VmHWM:"` in KiB, `"Threads:"`); 0 if the process or field is gone.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A reproducible key string for tests: id and secret filled with `seed`
/// (never use such a key outside a test).
pub fn test_key(seed: u8) -> String {
    ClientKey { id: [seed; 8], secret: [seed; 32] }.encode().to_string()
}

impl ServerProcess {
    /// Writes a key file `ROOT.keys.toml` that grants the key string `key`
    /// everything (the dashboard too), then starts the server with it (see
    /// [`Self::start_with_keys`]).
    pub fn start(bin: &Path, root: &Path, key: &str, extra: &[&str]) -> io::Result<ServerProcess> {
        Self::start_with_env(bin, root, key, extra, &[])
    }

    /// [`Self::start`], with variables `env` set for the server (an object
    /// store's credentials, say).
    pub fn start_with_env(
        bin: &Path,
        root: &Path,
        key: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> io::Result<ServerProcess> {
        let mut name = root.file_name().unwrap_or_default().to_os_string();
        name.push(".keys.toml");
        let file = root.with_file_name(name);
        let key = ClientKey::parse(key).map_err(|e| io::Error::other(e.to_string()))?;
        let entry = KeyEntry { dashboard: true, ..KeyEntry::with_key("test", &key) };
        keys::save(&file, &[entry]).map_err(io::Error::other)?;
        let mut s = Self::launch(bin, root, &file, extra, env, STARTUP)?;
        s.written = Some(file);
        Ok(s)
    }

    /// Starts `bin --listen 127.0.0.1:0 --root ROOT --keys KEYS EXTRA...`
    /// (without `--root` if `EXTRA` has `--store`)
    /// and waits until it says where it listens (and where its dashboard
    /// is, unless `EXTRA` has `--dashboard off`). Its log goes to this
    /// process's stderr; `RUST_LOG` defaults to `warn`.
    pub fn start_with_keys(
        bin: &Path,
        root: &Path,
        keys: &Path,
        extra: &[&str],
    ) -> io::Result<ServerProcess> {
        Self::start_within(bin, root, keys, extra, STARTUP)
    }

    /// [`Self::start_with_keys`], giving up (and killing it) if it has not
    /// said where it listens within `startup`.
    pub fn start_within(
        bin: &Path,
        root: &Path,
        keys: &Path,
        extra: &[&str],
        startup: Duration,
    ) -> io::Result<ServerProcess> {
        Self::launch(bin, root, keys, extra, &[], startup)
    }

    fn launch(
        bin: &Path,
        root: &Path,
        keys: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        startup: Duration,
    ) -> io::Result<ServerProcess> {
        let mut cmd = Command::new(bin);
        cmd.envs(env.iter().copied());
        cmd.args(["--listen", "127.0.0.1:0"]);
        // Files under ROOT, unless `extra` says where they are.
        if !extra.contains(&"--store") {
            cmd.arg("--root").arg(root);
        }
        cmd.arg("--keys").arg(keys).args(extra);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd.env("NO_COLOR", "1").stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let want_dashboard = !extra.windows(2).any(|w| w == ["--dashboard", "off"]);
        // Its stdout is read on a thread, so that a server that never says
        // where it listens fails the start after `STARTUP` instead of
        // hanging the caller; the thread keeps draining it afterwards, so
        // that the server never blocks on a full pipe.
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines {
                let Ok(line) = line else { break };
                // Once the start is over nobody listens: keep draining.
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + startup;
        let (mut port, mut dashboard) = (None, None);
        while port.is_none() || (want_dashboard && dashboard.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    let why = match e {
                        std::sync::mpsc::RecvTimeoutError::Timeout => {
                            format!("did not say where it listens within {startup:?}")
                        }
                        std::sync::mpsc::RecvTimeoutError::Disconnected => "exited early".to_string(),
                    };
                    return Err(io::Error::other(format!("deltasync-server {why} ({status})")));
                }
            };
            if let Some(url) = line.strip_prefix("dashboard on ") {
                dashboard = Some(url.trim().to_string());
            } else if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                port = rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|p| p.parse().ok());
            }
        }
        Ok(ServerProcess { child, port: port.expect("loop ends with a port"), dashboard, written: None })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL (a crash), without the graceful shutdown.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
        if let Some(f) = self.written.take() {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_never_says_where_it_listens_fails_the_start_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("silent-server");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t = Instant::now();
        let r = ServerProcess::start_within(
            &fake,
            dir.path(),
            &dir.path().join("k"),
            &[],
            Duration::from_secs(1),
        );
        let err = r.err().expect("a silent server cannot start");
        assert!(err.to_string().contains("did not say where it listens"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "the start gave up after {:?}", t.elapsed());
    }
}
