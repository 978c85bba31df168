//! Clicks through the GUI headlessly (egui_kittest, through the AccessKit
//! tree) against the real server: connect, upload, list, download, delete,
//! with the files checked byte for byte.

use deltasync_core::sim::random_bytes;
use deltasync_gui::{GuiApp, JobState, Settings};
use deltasync_server::process::{ServerProcess, test_key};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn server_bin() -> PathBuf {
    // The test binary lives in target/<profile>/deps; the server one level up.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("deltasync-server");
    assert!(bin.exists(), "{} is missing: build the workspace binaries first", bin.display());
    bin
}

/// Steps the UI until `done` holds (background work reports through the
/// UI's channel), failing after 20 s.
fn wait(h: &mut Harness<'_, GuiApp>, what: &str, done: impl Fn(&GuiApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(h.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log: {:?}", h.state().log);
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
}

/// A server on `dir/root` that knows `key`, and the window set up for it
/// (downloads to `dir/downloads`, hints in `dir/hints`, never the real
/// home's), not yet connected.
fn window(dir: &std::path::Path, key: &str) -> (ServerProcess, Harness<'static, GuiApp>) {
    let srv = ServerProcess::start(&server_bin(), &dir.join("root"), key, &["--dashboard", "off"]).unwrap();
    let downloads = dir.join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let settings = Settings {
        server: format!("127.0.0.1:{}", srv.port),
        key: key.to_string(),
        download_dir: downloads.display().to_string(),
    };
    let mut app = GuiApp::new(settings);
    app.hints_dir = Some(dir.join("hints"));
    let h = Harness::builder()
        .with_size([1000.0, 800.0])
        .build_ui_state(|ui, app: &mut GuiApp| app.show(ui), app);
    (srv, h)
}

#[test]
fn connect_upload_list_download_and_delete_by_clicking() {
    let dir = tempfile::tempdir().unwrap();
    let (root, downloads) = (dir.path().join("root"), dir.path().join("downloads"));
    let key = test_key(4);
    let (_srv, mut h) = window(dir.path(), &key);

    // A key the server does not know is reported in plain words.
    h.state_mut().settings.key = test_key(5);
    h.get_by_label("Connect").click();
    wait(&mut h, "the refusal", |a| a.log.iter().any(|l| l.contains("authentication failed")));
    assert!(!h.state().connected);

    h.state_mut().settings.key = key.clone();
    h.get_by_label("Connect").click();
    wait(&mut h, "connecting", |a| a.connected);

    // Upload, by typing the path and clicking.
    let data = random_bytes(21, 700_000);
    let local = dir.path().join("report.bin");
    std::fs::write(&local, &data).unwrap();
    h.get_by_label("Local file").click();
    h.get_by_label("Local file").type_text(&local.display().to_string());
    h.run_ok();
    assert_eq!(h.state().upload_path, local.display().to_string());
    h.get_by_label("Upload").click();
    wait(&mut h, "the upload", |a| a.jobs.iter().any(|j| matches!(j.state, JobState::Done(_))));
    assert_eq!(std::fs::read(root.join("report.bin")).unwrap(), data);
    assert!(
        dir.path().join("hints").read_dir().unwrap().count() > 0,
        "the upload's hints are in the test's directory"
    );

    // The list shows it (after an explicit refresh too).
    h.get_by_label("Refresh").click();
    wait(&mut h, "the listing", |a| a.files.iter().any(|f| f.name == "report.bin"));
    h.get_by_label("report.bin");

    // A second upload of an edited file goes as a delta.
    let mut edited = data.clone();
    edited[350_000] ^= 1;
    std::fs::write(&local, &edited).unwrap();
    h.get_by_label("Upload").click();
    wait(&mut h, "the delta upload", |a| {
        a.jobs.iter().filter(|j| matches!(j.state, JobState::Done(_))).count() == 2
    });
    match &h.state().jobs[1].state {
        JobState::Done(r) => assert_eq!(r.mode.to_string(), "delta"),
        _ => unreachable!(),
    }
    assert!(h.state().log.iter().any(|l| l.contains("delta")));

    // Download.
    h.get_by_label("Download").click();
    wait(&mut h, "the download", |a| {
        a.jobs.iter().filter(|j| matches!(j.state, JobState::Done(_))).count() == 3
    });
    assert_eq!(std::fs::read(downloads.join("report.bin")).unwrap(), edited);

    // Delete, with confirmation: "Keep it" keeps it, "Yes, delete" deletes.
    h.get_by_label("Delete").click();
    h.run_ok();
    h.get_by_label("Keep it").click();
    h.run_ok();
    assert!(root.join("report.bin").exists());
    h.get_by_label("Delete").click();
    h.run_ok();
    h.get_by_label("Yes, delete").click();
    wait(&mut h, "the delete", |a| a.log.iter().any(|l| l == "deleted report.bin"));
    assert!(!root.join("report.bin").exists());
    wait(&mut h, "the list to empty", |a| a.files.is_empty());
    h.get_by_label("Refresh").click();
    wait(&mut h, "all background work to end", |a| !a.is_busy());
}

#[test]
fn browse_opens_the_file_dialog_which_picks_the_file_to_upload() {
    let settings = Settings { server: "127.0.0.1:1".into(), key: String::new(), download_dir: ".".into() };
    // (egui_file's path and file name inputs carry no accessible name:
    // the harness's check of every widget is off for this test only.)
    let mut h = Harness::builder()
        .with_size([1000.0, 800.0])
        .with_accessibility_check(false)
        .build_ui_state(|ui, app: &mut GuiApp| app.show(ui), GuiApp::new(settings));
    h.get_by_label("Browse…").click();
    h.run();
    assert!(h.state().picker.is_some(), "the dialog is open");
    // The maintained dialog (egui_file), with its own buttons.
    h.get_by_label("Cancel").click();
    h.run();
    assert!(h.state().picker.is_none(), "cancel closes it");
    assert!(h.state().upload_path.is_empty());
    // It opens where the file to upload is, and a file picked there
    // becomes the one to upload.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pick.txt"), b"x").unwrap();
    h.state_mut().upload_path = dir.path().join("nothing-yet").display().to_string();
    h.get_by_label("Browse…").click();
    h.run();
    h.get_by_label_contains("pick.txt").click();
    h.run();
    h.get_by_label("Open").click();
    h.run();
    assert!(h.state().picker.is_none(), "a pick closes it");
    assert_eq!(PathBuf::from(&h.state().upload_path), dir.path().join("pick.txt"));
}

#[test]
fn a_folder_is_pushed_and_pulled_by_clicking() {
    let dir = tempfile::tempdir().unwrap();
    let (root, downloads) = (dir.path().join("root"), dir.path().join("downloads"));
    let (_srv, mut h) = window(dir.path(), &test_key(6));
    h.get_by_label("Connect").click();
    wait(&mut h, "connecting", |a| a.connected);

    let folder = dir.path().join("photos");
    let files = [
        ("a.jpg", random_bytes(1, 30_000)),
        ("trip/b.jpg", random_bytes(2, 2_000_000)),
        ("trip/c.txt", vec![]),
    ];
    for (name, data) in &files {
        let p = folder.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    h.get_by_label("Local file").click();
    h.get_by_label("Local file").type_text(&folder.display().to_string());
    h.run_ok();
    h.get_by_label("Upload").click();
    wait(&mut h, "the push", |a| a.jobs.iter().any(|j| matches!(j.state, JobState::Tree(_))));
    match &h.state().jobs[0].state {
        JobState::Tree(r) => assert_eq!((r.files, r.changed, r.failed), (3, 3, 0)),
        _ => unreachable!(),
    }
    for (name, data) in &files {
        assert_eq!(&std::fs::read(root.join("photos").join(name)).unwrap(), data, "{name} on the server");
    }

    h.get_by_label("Folder on the server").click();
    h.get_by_label("Folder on the server").type_text("photos");
    h.run_ok();
    h.get_by_label("Pull folder").click();
    wait(&mut h, "the pull", |a| a.jobs.iter().filter(|j| matches!(j.state, JobState::Tree(_))).count() == 2);
    for (name, data) in &files {
        assert_eq!(&std::fs::read(downloads.join("photos").join(name)).unwrap(), data, "{name} pulled");
    }
    wait(&mut h, "all background work to end", |a| !a.is_busy());
}
