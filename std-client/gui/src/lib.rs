//! The deltasync desktop client: an egui face over `deltasync-client`.
//! It holds no protocol code: every action runs a client-library call on a
//! background thread and reports back through a channel, so the window never
//! freezes and transfers can be cancelled.

use deltasync_client::tree::{Change, TreeOptions, TreeReport};
use deltasync_client::{ClientError, Connection, Progress, RemoteFile, TransferReport, human_bytes as human};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

/// What is remembered between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Settings {
    /// Server address, HOST:PORT.
    pub server: String,
    /// This client's key (`dsk1-...`). Never saved with the settings: it
    /// comes from `--key`, `DELTASYNC_KEY` or the key file at each start.
    #[serde(skip)]
    pub key: String,
    /// Where downloads go.
    pub download_dir: String,
}

/// A transfer, running or finished.
pub struct Job {
    /// What it is, for people ("upload report.pdf").
    pub label: String,
    /// File bytes done.
    pub done: u64,
    /// File size.
    pub total: u64,
    /// When it started.
    pub started: Instant,
    /// How it is going.
    pub state: JobState,
    cancel: Arc<AtomicBool>,
}

/// How a transfer is going.
pub enum JobState {
    /// Still moving.
    Running,
    /// Finished, with what it cost.
    Done(TransferReport),
    /// A folder finished, with what it did.
    Tree(TreeReport),
    /// Failed, in plain words.
    Failed(String),
}

/// Background results. Every background job ends with exactly one of
/// `Connected`, `Refreshed`, `Finished` or `Deleted`; `Files` and `Progress`
/// come along the way.
enum Msg {
    Connected(Result<Vec<RemoteFile>, String>),
    Refreshed(Result<Vec<RemoteFile>, String>),
    Files(Result<Vec<RemoteFile>, String>),
    Progress(usize, Progress),
    Finished(usize, Result<TransferReport, String>),
    TreeFinished(usize, Result<TreeReport, String>),
    Deleted(String, Result<(), String>),
    Note(String),
}

/// The application's state.
pub struct GuiApp {
    /// Remembered settings.
    pub settings: Settings,
    /// Local file or folder to upload.
    pub upload_path: String,
    /// Folder on the server to pull.
    pub pull_prefix: String,
    /// Whether the last connection attempt succeeded.
    pub connected: bool,
    /// The server's files, as last listed.
    pub files: Vec<RemoteFile>,
    /// What happened, newest last.
    pub log: Vec<String>,
    /// Transfers, newest last.
    pub jobs: Vec<Job>,
    /// A delete waiting for confirmation.
    pub confirm_delete: Option<String>,
    /// Uploads to start once connected.
    pub queued_uploads: Vec<PathBuf>,
    /// The file dialog, when open (`egui_file`).
    pub picker: Option<egui_file::FileDialog>,
    /// Where chunk hints are kept (default: the user's cache directory).
    pub hints_dir: Option<PathBuf>,
    busy: usize,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
}

fn plain(e: &ClientError) -> String {
    e.to_string()
}

impl GuiApp {
    /// An app with these settings.
    pub fn new(settings: Settings) -> GuiApp {
        let (tx, rx) = channel();
        GuiApp {
            settings,
            upload_path: String::new(),
            pull_prefix: String::new(),
            connected: false,
            files: Vec::new(),
            log: Vec::new(),
            jobs: Vec::new(),
            confirm_delete: None,
            queued_uploads: Vec::new(),
            picker: None,
            hints_dir: deltasync_client::default_hints_dir(),
            busy: 0,
            tx,
            rx,
        }
    }

    /// Whether background work is running.
    pub fn is_busy(&self) -> bool {
        self.busy > 0
    }

    /// Adds a line to the log pane, and to stderr (so that a script can see
    /// what the window shows).
    fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        eprintln!("deltasync-gui: {line}");
        self.log.push(line);
    }

    /// Runs `work` with a fresh authenticated connection on a thread.
    fn background(
        &mut self,
        ctx: &egui::Context,
        cancel: Option<Arc<AtomicBool>>,
        work: impl FnOnce(Result<Connection, ClientError>, &Sender<Msg>) + Send + 'static,
    ) {
        let (server, key) = (self.settings.server.clone(), self.settings.key.clone());
        let hints = self.hints_dir.clone();
        let (tx, ctx) = (self.tx.clone(), ctx.clone());
        self.busy += 1;
        std::thread::spawn(move || {
            let conn = deltasync_client::ClientKey::parse(&key)
                .map_err(ClientError::BadKey)
                .and_then(|key| Connection::connect(&server, &key))
                .map(|mut c| {
                    c.set_hints_dir(hints);
                    if let Some(flag) = cancel {
                        c.set_cancel_flag(flag);
                    }
                    c
                });
            work(conn, &tx);
            ctx.request_repaint();
        });
    }

    /// Connects and lists the server's files.
    pub fn connect(&mut self, ctx: &egui::Context) {
        self.say(format!("connecting to {}", self.settings.server));
        self.background(ctx, None, |conn, tx| {
            let r = conn.and_then(|mut c| c.list()).map_err(|e| plain(&e));
            let _ = tx.send(Msg::Connected(r));
        });
    }

    /// Lists the server's files again.
    pub fn refresh(&mut self, ctx: &egui::Context) {
        self.background(ctx, None, |conn, tx| {
            let _ = tx.send(Msg::Refreshed(conn.and_then(|mut c| c.list()).map_err(|e| plain(&e))));
        });
    }

    fn start_job(&mut self, label: String) -> (usize, Arc<AtomicBool>) {
        let cancel = Arc::new(AtomicBool::new(false));
        self.jobs.push(Job {
            label: label.clone(),
            done: 0,
            total: 0,
            started: Instant::now(),
            state: JobState::Running,
            cancel: cancel.clone(),
        });
        self.say(format!("{label}: started"));
        (self.jobs.len() - 1, cancel)
    }

    /// Uploads a local file under its file name (a delta when the server
    /// has it), or pushes a folder under its name.
    pub fn upload(&mut self, ctx: &egui::Context, path: PathBuf) {
        if path.is_dir() {
            self.push_folder(ctx, path);
            return;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            self.say(format!("{}: not a file name", path.display()));
            return;
        };
        let (id, cancel) = self.start_job(format!("upload {}", deltasync_client::printable(&name)));
        let repaint = ctx.clone();
        self.background(ctx, Some(cancel), move |conn, tx| {
            let r = conn.and_then(|mut c| {
                let report = c.upload(&path, &name, |p| {
                    let _ = tx.send(Msg::Progress(id, p));
                    repaint.request_repaint();
                });
                let files = c.list();
                if let Ok(f) = files {
                    let _ = tx.send(Msg::Files(Ok(f)));
                }
                report
            });
            let _ = tx.send(Msg::Finished(id, r.map_err(|e| plain(&e))));
        });
    }

    /// Pushes the folder `path` to the server under its name, as `deltasync
    /// push` does (nothing deleted there).
    pub fn push_folder(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some(name) = path.canonicalize().ok().and_then(|p| p.file_name()?.to_str().map(str::to_string))
        else {
            self.say(format!("{}: not a folder name", path.display()));
            return;
        };
        let (id, cancel) = self.start_job(format!("push folder {}", deltasync_client::printable(&name)));
        let repaint = ctx.clone();
        self.background(ctx, Some(cancel), move |conn, tx| {
            let total = deltasync_client::tree::local_bytes(&path);
            let r = conn.and_then(|mut c| {
                let seen = Seen { id, total, tx: tx.clone(), repaint };
                let report = deltasync_client::tree::push(&mut c, &path, &name, TreeOptions::default(), seen);
                if let Ok(f) = c.list() {
                    let _ = tx.send(Msg::Files(Ok(f)));
                }
                report
            });
            let _ = tx.send(Msg::TreeFinished(id, r.map_err(|e| plain(&e))));
        });
    }

    /// Pulls the folder `prefix` from the server into the download
    /// directory, under its last name, as `deltasync pull` does.
    pub fn pull_folder(&mut self, ctx: &egui::Context, prefix: String) {
        let prefix = prefix.trim_matches('/').to_string();
        let leaf = prefix.rsplit('/').next().filter(|l| !l.is_empty()).unwrap_or("server").to_string();
        let dir = PathBuf::from(if self.settings.download_dir.is_empty() {
            "."
        } else {
            &self.settings.download_dir
        });
        let dest = dir.join(leaf);
        let (id, cancel) = self.start_job(format!("pull folder {}", deltasync_client::printable(&prefix)));
        let repaint = ctx.clone();
        self.background(ctx, Some(cancel), move |conn, tx| {
            let r = conn.and_then(|mut c| {
                let seen = Seen { id, total: 0, tx: tx.clone(), repaint };
                deltasync_client::tree::pull(&mut c, &prefix, &dest, TreeOptions::default(), seen)
            });
            let _ = tx.send(Msg::TreeFinished(id, r.map_err(|e| plain(&e))));
        });
    }

    /// Downloads `name` into the download directory (a delta against an
    /// existing copy there).
    pub fn download(&mut self, ctx: &egui::Context, name: String) {
        let dir = PathBuf::from(if self.settings.download_dir.is_empty() {
            "."
        } else {
            &self.settings.download_dir
        });
        let dest = dir.join(name.rsplit('/').next().unwrap_or(&name));
        let (id, cancel) = self.start_job(format!("download {}", deltasync_client::printable(&name)));
        let repaint = ctx.clone();
        self.background(ctx, Some(cancel), move |conn, tx| {
            let r = conn.and_then(|mut c| {
                c.download(&name, &dest, |p| {
                    let _ = tx.send(Msg::Progress(id, p));
                    repaint.request_repaint();
                })
            });
            let _ = tx.send(Msg::Finished(id, r.map_err(|e| plain(&e))));
        });
    }

    /// Deletes `name` on the server (after the user confirmed).
    pub fn delete(&mut self, ctx: &egui::Context, name: String) {
        self.say(format!("deleting {}", deltasync_client::printable(&name)));
        self.background(ctx, None, move |conn, tx| {
            let r = conn.and_then(|mut c| {
                c.delete(&name)?;
                if let Ok(f) = c.list() {
                    let _ = tx.send(Msg::Files(Ok(f)));
                }
                Ok(())
            });
            let _ = tx.send(Msg::Deleted(name, r.map_err(|e| plain(&e))));
        });
    }

    fn take_files(&mut self, r: Result<Vec<RemoteFile>, String>) {
        match r {
            Ok(f) => self.files = f,
            Err(e) => self.say(format!("could not list files: {e}")),
        }
    }

    /// Takes what the background threads reported.
    fn drain(&mut self, ctx: &egui::Context) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Connected(r) => {
                    self.busy -= 1;
                    match r {
                        Ok(files) => {
                            self.connected = true;
                            self.say(format!("connected: {} files", files.len()));
                            self.files = files;
                            for p in std::mem::take(&mut self.queued_uploads) {
                                self.upload(ctx, p);
                            }
                        }
                        Err(e) => {
                            self.connected = false;
                            self.say(format!("could not connect: {e}"));
                        }
                    }
                }
                Msg::Refreshed(r) => {
                    self.busy -= 1;
                    self.take_files(r);
                }
                Msg::Files(r) => self.take_files(r),
                Msg::Note(line) => self.say(line),
                Msg::Progress(id, p) => {
                    if let Some(j) = self.jobs.get_mut(id) {
                        j.done = p.done;
                        j.total = p.total;
                    }
                }
                Msg::Finished(id, r) => {
                    self.busy -= 1;
                    let Some(j) = self.jobs.get_mut(id) else { continue };
                    let line = match &r {
                        Ok(rep) => format!(
                            "{}: {} — {} on the wire for a {} file, saved {:.1}%{}",
                            j.label,
                            rep.mode,
                            human(rep.wire_bytes_sent + rep.wire_bytes_received),
                            human(rep.file_bytes),
                            rep.saving() * 100.0,
                            if rep.replaced {
                                " (warning: someone else changed this file on the server during the upload)"
                            } else {
                                ""
                            }
                        ),
                        Err(e) => format!("{}: failed: {e}", j.label),
                    };
                    j.state = match r {
                        Ok(rep) => JobState::Done(rep),
                        Err(e) => JobState::Failed(e),
                    };
                    self.say(line);
                }
                Msg::TreeFinished(id, r) => {
                    self.busy -= 1;
                    let Some(j) = self.jobs.get_mut(id) else { continue };
                    let line = match &r {
                        Ok(rep) => format!("{}: {}", j.label, tree_line(rep)),
                        Err(e) => format!("{}: failed: {e}", j.label),
                    };
                    j.state = match r {
                        Ok(rep) => JobState::Tree(rep),
                        Err(e) => JobState::Failed(e),
                    };
                    self.say(line);
                }
                Msg::Deleted(name, r) => {
                    self.busy -= 1;
                    match r {
                        Ok(()) => self.say(format!("deleted {}", deltasync_client::printable(&name))),
                        Err(e) => {
                            self.say(format!("could not delete {}: {e}", deltasync_client::printable(&name)))
                        }
                    }
                }
            }
        }
    }

    /// Draws the whole window.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.drain(&ctx);
        if self.is_busy() {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        for p in dropped {
            if self.connected {
                self.upload(&ctx, p);
            } else {
                self.queued_uploads.push(p);
            }
        }

        ui.heading("deltasync");
        ui.horizontal(|ui| {
            let l = ui.label("Server");
            ui.text_edit_singleline(&mut self.settings.server).labelled_by(l.id);
            let l = ui.label("Key");
            ui.add(egui::TextEdit::singleline(&mut self.settings.key).password(true)).labelled_by(l.id);
            if ui.button("Connect").clicked() {
                self.connect(&ctx);
            }
            ui.label(if self.connected { "connected" } else { "not connected" });
        });
        ui.separator();
        ui.horizontal(|ui| {
            let l = ui.label("Local file");
            ui.text_edit_singleline(&mut self.upload_path).labelled_by(l.id);
            if ui.button("Browse…").clicked() {
                let start = PathBuf::from(&self.upload_path);
                let start = start.parent().filter(|p| p.is_dir()).map(PathBuf::from);
                self.pick(egui_file::FileDialog::open_file(), start);
            }
            let can = self.connected && !self.upload_path.is_empty();
            if ui.add_enabled(can, egui::Button::new("Upload")).clicked() {
                let p = PathBuf::from(self.upload_path.clone());
                self.upload(&ctx, p);
            }
            if ui.button("Browse folder…").clicked() {
                let start = Some(PathBuf::from(&self.upload_path)).filter(|p| p.is_dir());
                self.pick(egui_file::FileDialog::select_folder(), start);
            }
            ui.label("(or drop files and folders on the window)");
        });
        ui.horizontal(|ui| {
            let l = ui.label("Folder on the server");
            ui.text_edit_singleline(&mut self.pull_prefix).labelled_by(l.id);
            let can = self.connected && !self.pull_prefix.trim_matches('/').is_empty();
            if ui.add_enabled(can, egui::Button::new("Pull folder")).clicked() {
                let p = self.pull_prefix.clone();
                self.pull_folder(&ctx, p);
            }
        });
        ui.horizontal(|ui| {
            let l = ui.label("Download to");
            ui.text_edit_singleline(&mut self.settings.download_dir).labelled_by(l.id);
        });
        ui.separator();
        ui.horizontal(|ui| {
            ui.strong("Files on the server");
            if ui.add_enabled(self.connected, egui::Button::new("Refresh")).clicked() {
                self.refresh(&ctx);
            }
        });
        let mut download = None;
        egui::Grid::new("files").striped(true).show(ui, |ui| {
            ui.strong("name");
            ui.strong("size");
            ui.strong("modified");
            ui.strong("");
            ui.end_row();
            for f in &self.files {
                ui.label(deltasync_client::printable(&f.name));
                ui.label(human(f.size));
                ui.label(f.modified.to_string());
                ui.horizontal(|ui| {
                    if ui.button("Download").clicked() {
                        download = Some(f.name.clone());
                    }
                    if ui.button("Delete").clicked() {
                        self.confirm_delete = Some(f.name.clone());
                    }
                });
                ui.end_row();
            }
        });
        if let Some(name) = download {
            self.download(&ctx, name);
        }
        ui.separator();
        ui.strong("Transfers");
        for j in self.jobs.iter().rev().take(8) {
            ui.horizontal(|ui| {
                ui.label(&j.label);
                match &j.state {
                    JobState::Running => {
                        let frac = if j.total > 0 { j.done as f32 / j.total as f32 } else { 0.0 };
                        let secs = j.started.elapsed().as_secs_f64().max(1e-3);
                        let rate = j.done as f64 / secs;
                        let left =
                            if rate > 0.0 { (j.total.saturating_sub(j.done)) as f64 / rate } else { 0.0 };
                        ui.add(egui::ProgressBar::new(frac).desired_width(200.0).show_percentage());
                        ui.label(format!("{}/s, {:.0} s left", human(rate as u64), left));
                        if ui.button("Cancel").clicked() {
                            j.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    JobState::Done(r) => {
                        ui.label(format!(
                            "{}: {} on the wire for {}, saved {:.1}%",
                            r.mode,
                            human(r.wire_bytes_sent + r.wire_bytes_received),
                            human(r.file_bytes),
                            r.saving() * 100.0
                        ));
                    }
                    JobState::Tree(r) => {
                        ui.label(tree_line(r));
                    }
                    JobState::Failed(e) => {
                        ui.colored_label(ui.visuals().error_fg_color, e);
                    }
                }
            });
        }
        ui.separator();
        ui.strong("Log");
        egui::ScrollArea::vertical().max_height(140.0).stick_to_bottom(true).show(ui, |ui| {
            for line in &self.log {
                ui.label(line);
            }
        });

        if let Some(name) = self.confirm_delete.clone() {
            egui::Window::new("Confirm delete").collapsible(false).resizable(false).show(&ctx, |ui| {
                ui.label(format!("Delete {} on the server?", deltasync_client::printable(&name)));
                ui.horizontal(|ui| {
                    if ui.button("Yes, delete").clicked() {
                        self.confirm_delete = None;
                        self.delete(&ctx, name.clone());
                    }
                    if ui.button("Keep it").clicked() {
                        self.confirm_delete = None;
                    }
                });
            });
        }
        self.file_picker(&ctx);
    }

    /// Opens `dialog` in `start`, or else the current directory.
    fn pick(&mut self, dialog: egui_file::FileDialog, start: Option<PathBuf>) {
        let start = start.or_else(|| std::env::current_dir().ok()).unwrap_or_else(|| "/".into());
        let mut dialog = dialog.initial_path(start);
        dialog.open();
        self.picker = Some(dialog);
    }

    /// The file dialog, if open: a file picked becomes the file to upload.
    fn file_picker(&mut self, ctx: &egui::Context) {
        let Some(dialog) = self.picker.as_mut() else { return };
        if dialog.show(ctx).selected() {
            if let Some(p) = dialog.path() {
                self.upload_path = p.display().to_string();
            }
            self.picker = None;
        } else if matches!(dialog.state(), egui_file::State::Closed | egui_file::State::Cancelled) {
            self.picker = None;
        }
    }
}

/// The window, for eframe.
pub struct Window(pub GuiApp);

impl eframe::App for Window {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::CentralPanel::default().show(ui, |ui| self.0.show(ui));
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.0.settings);
    }
}

/// Settings from a previous run, if any.
pub fn load_settings(storage: Option<&dyn eframe::Storage>) -> Option<Settings> {
    storage.and_then(|s| eframe::get_value(s, eframe::APP_KEY))
}

/// A tree sync's report, for people.
fn tree_line(r: &TreeReport) -> String {
    format!(
        "{} files: {} sent ({}), {} copied, {} touched, {} unchanged; {} on the wire{}",
        r.files,
        r.changed,
        human(r.file_bytes),
        r.copied,
        r.touched,
        r.unchanged,
        human(r.wire_bytes_sent + r.wire_bytes_received),
        if r.failed > 0 { format!("; {} failed (see the log)", r.failed) } else { String::new() }
    )
}

/// What a folder's sync reports, sent to the window.
struct Seen {
    id: usize,
    total: u64,
    tx: Sender<Msg>,
    repaint: egui::Context,
}

impl deltasync_client::tree::Observer for Seen {
    fn change(&mut self, change: &Change) {
        if let Change::Failed(name, why) = change {
            let _ = self.tx.send(Msg::Note(format!("{}: {why}", deltasync_client::printable(name))));
        }
    }

    fn progress(&mut self, _file: &str, _p: Progress, tree_bytes: u64) {
        let total = self.total.max(tree_bytes);
        let _ = self.tx.send(Msg::Progress(self.id, Progress { done: tree_bytes, total }));
        self.repaint.request_repaint();
    }
}
