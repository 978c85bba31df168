//! `deltasync`: upload, download, list and delete files on a deltasync
//! server, sending only what changed.

use clap::{Parser, Subcommand};
use deltasync_client::{
    ClientError, Connection, Expect, Progress, RemotePartial, TransferReport, find_key, human_bytes as human,
    printable,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// deltasync client: transfers files to and from a deltasync server with
/// delta sync.
#[derive(Parser, Debug)]
#[command(name = "deltasync", version, after_help = EXIT_CODES)]
struct Cli {
    /// Server address.
    #[arg(long, env = "DELTASYNC_SERVER", default_value = "127.0.0.1:5001", global = true)]
    server: String,
    /// This client's key (dsk1-...), as `deltasync-server key add` printed
    /// it. Prefer DELTASYNC_KEY or --key-file: a command line is visible
    /// to other users of the machine.
    #[arg(long, env = "DELTASYNC_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// File holding this client's key [default: $XDG_CONFIG_HOME/deltasync/key
    /// or ~/.config/deltasync/key, which a server on this machine writes].
    #[arg(long, env = "DELTASYNC_KEY_FILE", global = true, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// The session's cipher: aes-256-gcm or chacha20-poly1305 [default:
    /// aes-256-gcm on CPUs with AES and carry-less multiply instructions,
    /// chacha20-poly1305 elsewhere; `cipher-bench` measures both].
    #[arg(long, env = "DELTASYNC_CIPHER", global = true, value_parser = parse_cipher)]
    cipher: Option<deltasync_client::CipherKind>,
    /// Print one JSON object per result on stdout, and no progress bars.
    #[arg(long, global = true)]
    json: bool,
    /// Send at most this many bytes per second (suffixes K, M, G: powers of 1024).
    #[arg(long, global = true, value_parser = parse_rate)]
    limit_rate: Option<u64>,
    /// Where to keep chunk hints: what each file's chunks were when it was
    /// last uploaded, so that the next upload re-reads only what changed
    /// [default: $XDG_CACHE_HOME/deltasync/hints or ~/.cache/deltasync/hints].
    #[arg(long, env = "DELTASYNC_HINTS", global = true, value_name = "DIR")]
    hints: Option<PathBuf>,
    /// Use and keep no chunk hints: chunk and hash every file in full.
    #[arg(long, global = true)]
    no_hints: bool,
    /// Send and receive file bytes as they are. By default they are
    /// compressed with zstd (level 3) both ways when the server supports it
    /// and a piece shrinks by at least 1/16; incompressible data is then
    /// only tried now and then.
    #[arg(long, global = true)]
    no_compress: bool,
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 2 usage, 3 authentication, 4 network (or turned away), \
5 not found, 6 integrity, 7 refused by the server, 8 local file error, 9 the server's storage is full, \
10 conflict (upload --if-match/--if-absent found another version), 11 a push or pull finished but \
some of its files failed (each was reported), 130 cancelled.";

#[derive(Subcommand, Debug)]
enum Command {
    /// List the files on the server (size, modification time, the start of
    /// the SHA-256, name).
    Ls {
        /// Also list interrupted uploads the server keeps (the next upload
        /// of the name resumes from one; `rm` drops it), with their size and
        /// age.
        #[arg(short, long)]
        all: bool,
    },
    /// Describe one file on the server, and what an interrupted upload of
    /// it left (exit 5 if there is no file, even when that is shown).
    Stat {
        /// Remote name.
        name: String,
    },
    /// Upload a file (a delta whenever the server holds a version).
    Upload {
        /// Local file.
        path: PathBuf,
        /// Remote name [default: the file's name].
        #[arg(long = "as")]
        name: Option<String>,
        /// Publish only if the server's version is still this one (its
        /// SHA-256, as `stat` shows it); otherwise exit 10 and leave the
        /// server's version as it is. Without it the last writer wins.
        #[arg(long, value_name = "SHA256", value_parser = parse_sha256, conflicts_with = "if_absent")]
        if_match: Option<deltasync_client::Hash>,
        /// Publish only if the server holds no version of the name (else
        /// exit 10).
        #[arg(long)]
        if_absent: bool,
    },
    /// Download a file (a delta against an existing local copy).
    Download {
        /// Remote name.
        name: String,
        /// Local path [default: the remote name's last component].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Push a local directory tree to the server: new and changed files go
    /// as deltas, renamed and copied ones as copies on the server (no file
    /// data); times and permission bits are kept. Symlinks are skipped with
    /// a warning. Nothing is deleted without --delete.
    Push {
        /// Local directory.
        dir: PathBuf,
        /// Where on the server its contents go [default: the directory's
        /// name; "/" for the server's root].
        prefix: Option<String>,
        /// After the push, keep watching the directory and push every
        /// change within about a second (renames too, and deletions with
        /// --delete), until interrupted.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        tree: TreeArgs,
    },
    /// Pull a tree from the server into a local directory (made if
    /// missing): changed files come as deltas against the local copies,
    /// each replaced only once complete and verified; times and permission
    /// bits are kept.
    Pull {
        /// Prefix on the server ("/" for everything).
        prefix: String,
        /// Local directory [default: the prefix's last component].
        dir: Option<PathBuf>,
        #[command(flatten)]
        tree: TreeArgs,
    },
    /// Delete a file on the server.
    Rm {
        /// Remote name.
        name: String,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish,
    /// elvish, powershell); e.g. `deltasync completions bash >
    /// ~/.local/share/bash-completion/completions/deltasync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff); e.g. `deltasync man | man -l -`.
    Man,
}

/// What `push` and `pull` share.
#[derive(clap::Args, Debug)]
struct TreeArgs {
    /// Delete what the destination has and the source does not (after
    /// everything else is done; excluded names are kept).
    #[arg(long)]
    delete: bool,
    /// Leave out names matching GLOB (gitignore syntax; repeatable). A
    /// `.deltasyncignore` file at the local directory's root adds more.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Say what would change, and change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Compare contents (SHA-256) even where size and time agree.
    #[arg(short, long)]
    checksum: bool,
    /// Print every change (`--dry-run` always does).
    #[arg(short, long)]
    verbose: bool,
}

impl TreeArgs {
    fn options(&self) -> deltasync_client::tree::TreeOptions {
        deltasync_client::tree::TreeOptions {
            delete: self.delete,
            checksum: self.checksum,
            dry_run: self.dry_run,
            excludes: self.exclude.clone(),
        }
    }
}

/// Prints a tree sync's changes and draws its progress.
struct TreeShow {
    verbose: bool,
    json: bool,
    bar: Option<ProgressBar>,
    files: u64,
}

impl TreeShow {
    /// A display for a sync whose source holds `total` bytes (`None`:
    /// not known beforehand, a pull's).
    fn new(args: &TreeArgs, json: bool, bars: bool, total: Option<u64>) -> TreeShow {
        let bar = bars.then(|| {
            let (b, template) = match total {
                Some(t) => {
                    (ProgressBar::new(t), "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                }
                None => (ProgressBar::new_spinner(), "{spinner} {msg} {bytes} {bytes_per_sec}"),
            };
            b.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        });
        TreeShow { verbose: args.verbose || args.dry_run, json, bar, files: 0 }
    }

    fn line(&self, l: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| out(l)),
            None => out(l),
        }
    }
}

impl deltasync_client::tree::Observer for TreeShow {
    fn change(&mut self, change: &deltasync_client::tree::Change) {
        use deltasync_client::tree::Change;
        let line = match change {
            Change::Sent(n, size) => {
                self.files += 1;
                format!("send     {} ({})", printable(n), human(*size))
            }
            Change::Copied { from, to } => format!("copy     {} <- {}", printable(to), printable(from)),
            Change::Touched(n) => format!("touch    {}", printable(n)),
            Change::MadeDir(n) => format!("mkdir    {}/", printable(n)),
            Change::Deleted(n) => format!("delete   {}", printable(n)),
            Change::Skipped(n, why) => {
                let l = format!("deltasync: warning: skipped {}: {why}", printable(n));
                match &self.bar {
                    Some(b) => b.suspend(|| eprintln!("{l}")),
                    None => eprintln!("{l}"),
                }
                return;
            }
            Change::Failed(n, why) => {
                let l = format!("deltasync: error: {}: {why}", printable(n));
                match &self.bar {
                    Some(b) => b.suspend(|| eprintln!("{l}")),
                    None => eprintln!("{l}"),
                }
                return;
            }
        };
        if self.verbose && !self.json {
            self.line(&line);
        }
    }

    fn progress(&mut self, _file: &str, _p: Progress, tree_bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_position(tree_bytes);
            b.set_message(format!("{} files sent", self.files));
        }
    }
}

/// Ends a push or pull: its bar cleared, its summary (or JSON object)
/// printed, and exit 11 if some of its files failed.
fn tree_done(
    r: Result<deltasync_client::tree::TreeReport, ClientError>,
    bar: Option<ProgressBar>,
    verb: &str,
    json: bool,
) -> Result<(), ClientError> {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = r?;
    out(&if json { erased::Json::to_json(&r) } else { tree_summary(verb, &r) });
    if r.failed > 0 {
        return Err(ClientError::Incomplete(r.failed));
    }
    Ok(())
}

/// Where `push DIR` goes without a prefix: under the directory's name.
fn push_prefix(dir: &std::path::Path, prefix: Option<String>) -> Result<String, ClientError> {
    match prefix {
        Some(p) => Ok(p),
        None => Ok(std::fs::canonicalize(dir)
            .map_err(|e| ClientError::Local(dir.to_path_buf(), e))?
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .unwrap_or_default()),
    }
}

fn tree_summary(verb: &str, r: &deltasync_client::tree::TreeReport) -> String {
    let secs = r.duration_ms as f64 / 1000.0;
    format!(
        "{verb}{}: {} files, {} changed ({}), {} copied, {} touched, {} unchanged, {} deleted, {} skipped; \
         sent {}, received {}, {:.2}s",
        if r.dry_run { " (dry run)" } else { "" },
        r.files,
        r.changed,
        human(r.file_bytes),
        r.copied,
        r.touched,
        r.unchanged,
        r.deleted,
        r.skipped,
        human(r.wire_bytes_sent),
        human(r.wire_bytes_received),
        secs
    )
}

fn parse_sha256(s: &str) -> Result<deltasync_client::Hash, String> {
    deltasync_client::Hash::from_hex(s.trim()).ok_or_else(|| "a SHA-256: 64 hex digits".to_string())
}

/// How long ago `secs` (since the Unix epoch) was, for people: `40s`,
/// `12m`, `5h`, `3d`.
fn age(secs: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let a = now.saturating_sub(secs);
    match a {
        0..60 => format!("{a}s"),
        60..3600 => format!("{}m", a / 60),
        3600..86400 => format!("{}h", a / 3600),
        _ => format!("{}d", a / 86400),
    }
}

/// A line of `ls --all` for an interrupted upload (columns as a file's:
/// size, time, then what it is in place of the hash).
fn partial_line(p: &RemotePartial) -> String {
    let what = format!("partial, {}", age(p.modified));
    format!("{:>12}  {}  {what:<16}  {}", p.size, when(p.modified), printable(&p.name))
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.trim().chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("not a rate: {s:?} (try 500K or 10M)"))?;
    n.checked_mul(mul).filter(|&r| r > 0).ok_or_else(|| format!("rate out of range: {s:?}"))
}

fn summary(r: &TransferReport, verb: &str) -> String {
    let secs = r.duration_ms as f64 / 1000.0;
    let rate = if secs > 0.0 { r.file_bytes as f64 / secs } else { 0.0 };
    format!(
        "{verb} {} ({}): {} file, sent {}, received {}, saved {:.1}%, {:.2}s, {}/s",
        printable(&r.name),
        r.mode,
        human(r.file_bytes),
        human(r.wire_bytes_sent),
        human(r.wire_bytes_received),
        r.saving() * 100.0,
        secs,
        human(rate as u64)
    )
}

/// Prints a line on stdout; a closed pipe is not an error.
fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
}

fn bar(show: bool, label: &str) -> Option<ProgressBar> {
    show.then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(printable(label).into_owned());
        b
    })
}

fn tick(b: &Option<ProgressBar>) -> impl FnMut(Progress) + '_ {
    move |p| {
        if let Some(b) = b {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    }
}

fn parse_cipher(s: &str) -> Result<deltasync_client::CipherKind, String> {
    deltasync_client::CipherKind::from_name(s).ok_or_else(|| "chacha20-poly1305 or aes-256-gcm".to_string())
}

/// `secs` since the Unix epoch as local time, for people (JSON keeps the
/// number).
fn when(secs: u64) -> String {
    use chrono::{Local, TimeZone};
    match i64::try_from(secs).ok().and_then(|s| Local.timestamp_opt(s, 0).single()) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => secs.to_string(),
    }
}

/// Commands that need no server: completions and the manual page, both
/// from the same definitions as the parser.
fn local_command(command: &Command) -> Option<std::io::Result<()>> {
    use clap::CommandFactory;
    let mut out = std::io::stdout().lock();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "deltasync", &mut out);
            Some(Ok(()))
        }
        Command::Man => Some(clap_mangen::Man::new(Cli::command()).render(&mut out)),
        _ => None,
    }
}

fn run(cli: Cli) -> Result<(), ClientError> {
    if let Some(r) = local_command(&cli.command) {
        // A closed pipe (`| head`) is not an error.
        return match r {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(ClientError::Local("stdout".into(), e))
            }
            _ => Ok(()),
        };
    }
    let key = find_key(cli.key, cli.key_file)?;
    let hints = if cli.no_hints { None } else { cli.hints.or_else(deltasync_client::default_hints_dir) };
    let connect = || -> Result<Connection, ClientError> {
        let mut c = Connection::connect_using(
            &cli.server,
            &key,
            !cli.no_compress,
            cli.cipher.unwrap_or_else(deltasync_client::CipherKind::preferred),
        )?;
        if let Some(r) = cli.limit_rate {
            c.limit_rate(r);
        }
        c.set_hints_dir(hints.clone());
        Ok(c)
    };
    if let Command::Push { dir, prefix, watch: true, tree } = &cli.command {
        let prefix = push_prefix(dir, prefix.clone())?;
        let show = TreeShow::new(tree, cli.json, false, None);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let json = cli.json;
        let report = move |r: &deltasync_client::tree::TreeReport| {
            let changed = r.changed + r.copied + r.touched + r.deleted + r.made_dirs + r.failed;
            if json {
                out(&deltasync_client::json_line(r).unwrap_or_default());
            } else if changed > 0 {
                out(&tree_summary("pushed", r));
            }
        };
        return deltasync_client::tree::watch(connect, dir, &prefix, tree.options(), show, &stop, report);
    }
    let mut c = connect()?;
    let bars = !cli.json && std::io::stderr().is_terminal();
    let json = |v: &dyn erased::Json| out(&v.to_json());
    match cli.command {
        Command::Ls { all } => {
            let (files, partials) = if all { c.list_all()? } else { (c.list()?, Vec::new()) };
            if cli.json && all {
                json(&serde_json::json!({ "files": files, "partials": partials }));
            } else if cli.json {
                json(&files);
            } else {
                if !files.is_empty() || !partials.is_empty() {
                    out(&format!("{:>12}  {:<19}  {:<16}  NAME", "SIZE", "MODIFIED", "SHA256"));
                }
                for f in files {
                    out(&format!(
                        "{:>12}  {}  {}  {}",
                        f.size,
                        when(f.modified),
                        &f.sha256.to_hex()[..16],
                        printable(&f.name)
                    ));
                }
                for p in &partials {
                    out(&partial_line(p));
                }
            }
        }
        Command::Stat { name } => {
            let d = c.describe(&name)?;
            if cli.json {
                json(&d);
            } else {
                if let Some(f) = &d.file {
                    out(&format!(
                        "{}: {} bytes, modified {}, sha256 {}",
                        printable(&f.name),
                        f.size,
                        when(f.modified),
                        f.sha256
                    ));
                }
                if let Some(p) = &d.partial {
                    out(&format!(
                        "{}: interrupted upload, {} bytes kept, last written {} ({} ago); the next upload \
                         resumes from it, rm drops it",
                        printable(&p.name),
                        p.size,
                        when(p.modified),
                        age(p.modified)
                    ));
                }
            }
            // Only an interrupted upload: shown, but there is no such file.
            if d.file.is_none() {
                return Err(ClientError::NotFound(name));
            }
        }
        Command::Rm { name } => {
            c.delete(&name)?;
            if cli.json {
                json(&serde_json::json!({ "name": name, "deleted": true }));
            } else {
                out(&format!("deleted {}", printable(&name)));
            }
        }
        Command::Upload { path, name, if_match, if_absent } => {
            let name = match name {
                Some(n) => n,
                None => {
                    path.file_name().and_then(|n| n.to_str()).map(str::to_string).ok_or_else(|| {
                        ClientError::Local(path.clone(), std::io::Error::other("no file name"))
                    })?
                }
            };
            let b = bar(bars, &name);
            let expect = if if_absent { Some(Expect::Absent) } else { if_match.map(Expect::Match) };
            let r = c.upload_if(&path, &name, expect, tick(&b))?;
            if let Some(b) = b {
                b.finish_and_clear();
            }
            if cli.json {
                json(&r)
            } else {
                out(&summary(&r, "uploaded"));
            }
            if r.replaced && !cli.json {
                let what = if r.mode == deltasync_client::Mode::Unchanged {
                    "the server now holds another version than this file"
                } else {
                    "this version replaced that one (use --if-match to refuse instead)"
                };
                eprintln!(
                    "deltasync: warning: {} was changed on the server by someone else while this upload ran; {what}",
                    printable(&name)
                );
            }
        }
        Command::Download { name, output } => {
            let dest = output.unwrap_or_else(|| PathBuf::from(name.rsplit('/').next().unwrap_or(&name)));
            let b = bar(bars, &name);
            let r = c.download(&name, &dest, tick(&b))?;
            if let Some(b) = b {
                b.finish_and_clear();
            }
            if cli.json { json(&r) } else { out(&summary(&r, "downloaded")) }
        }
        Command::Push { dir, prefix, tree, .. } => {
            let prefix = push_prefix(&dir, prefix)?;
            let total = bars.then(|| deltasync_client::tree::local_bytes(&dir));
            let show = TreeShow::new(&tree, cli.json, bars, total);
            let bar = show.bar.clone();
            let r = deltasync_client::tree::push(&mut c, &dir, &prefix, tree.options(), show);
            return tree_done(r, bar, "pushed", cli.json);
        }
        Command::Pull { prefix, dir, tree } => {
            let prefix = prefix.trim_matches('/').to_string();
            let dir = dir.unwrap_or_else(|| {
                PathBuf::from(prefix.rsplit('/').next().filter(|l| !l.is_empty()).unwrap_or("."))
            });
            let show = TreeShow::new(&tree, cli.json, bars, None);
            let bar = show.bar.clone();
            let r = deltasync_client::tree::pull(&mut c, &prefix, &dir, tree.options(), show);
            return tree_done(r, bar, "pulled", cli.json);
        }
        // Served above, before connecting.
        Command::Completions { .. } | Command::Man => {}
    }
    Ok(())
}

mod erased {
    /// Anything printable as one line of JSON.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            deltasync_client::json_line(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let err = serde_json::json!({ "error": e.to_string(), "exit_code": e.exit_code() });
                eprintln!("{}", deltasync_client::json_line(&err).unwrap_or_default());
            } else {
                eprintln!("deltasync: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
