//! Kernel-side copies share blocks on a file system with reflinks when the
//! copied range keeps its place within a block, even if it starts and ends
//! off block boundaries (as reused chunks do): [`copy_step`] copies up to
//! the next boundary, then whole blocks, then the rest.
//!
//! Makes an XFS file system (reflinks on) in a file, mounts it on a loop
//! device and unmounts it when done: needs root and `mkfs.xfs` (package
//! xfsprogs, which `scripts/test.sh` installs).

use deltasync_host::{CopyStep, copy_step};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted XFS file system, unmounted and removed on drop.
struct Xfs {
    dir: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Xfs {
    fn new() -> Xfs {
        let dir = std::env::temp_dir().join(format!("deltasync-reflink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut fs = Xfs { mnt: dir.join("mnt"), dir, mounted: false };
        let img = fs.dir.join("xfs.img");
        // XFS's smallest file system; sparse, so it takes little room.
        File::create(&img).unwrap().set_len(320 << 20).unwrap();
        run(
            Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&img),
            "mkfs.xfs (install xfsprogs)",
        );
        std::fs::create_dir(&fs.mnt).unwrap();
        run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&fs.mnt), "mount -o loop (needs root)");
        fs.mounted = true;
        fs
    }

    /// Bytes of the file system in use, once the files in `closed` (the
    /// handles of which are dropped first: XFS gives back the room it set
    /// aside past a file's end when the file is closed) are synced.
    fn used(&self, closed: Vec<File>) -> u64 {
        for f in closed {
            f.sync_all().unwrap();
        }
        let s = rustix::fs::statvfs(&self.mnt).unwrap();
        (s.f_blocks - s.f_bfree) * s.f_frsize
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        other => panic!("{what}: {other:?}"),
    }
}

fn create(path: &Path) -> File {
    File::options().read(true).write(true).create_new(true).open(path).unwrap()
}

const MIB: u64 = 1 << 20;

#[test]
fn a_copy_that_keeps_its_place_in_a_block_shares_all_its_whole_blocks() {
    let fs = Xfs::new();
    let bytes = deltasync_core::sim::random_bytes(1, 16 * MIB as usize);
    let old = create(&fs.mnt.join("old"));
    old.write_all_at(&bytes, 0).unwrap();
    let before = fs.used(vec![old]);
    let old = File::open(fs.mnt.join("old")).unwrap();

    // As a new version of a 100-byte edit at the start is written: new
    // bytes, then the old ones from the same offset to 100 bytes from the
    // end (neither end on a block boundary), in the receivers' 4 MiB steps.
    let (at, end) = (100u64, bytes.len() as u64 - 100);
    let mut new = create(&fs.mnt.join("new"));
    new.write_all(&[7; 100]).unwrap();
    let mut from = at;
    while from < end {
        let step = (end - from).min(4 * MIB) as usize;
        let first = from == at;
        match copy_step(&old, &mut from, &new, step, first) {
            CopyStep::Copied(_) => {}
            other => panic!("{other:?}"),
        }
    }
    let shared = fs.used(vec![new]) - before;

    let mut got = Vec::new();
    File::open(fs.mnt.join("new")).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got.len() as u64, end);
    assert!(got[..100].iter().all(|&b| b == 7));
    assert!(got[100..] == bytes[100..end as usize], "the copy differs from its source");
    // New blocks only for the two partial ones (and the file's metadata).
    assert!(shared < MIB, "{shared} bytes of new blocks for a 16 MiB copy");

    // The same copy asked in one call: the kernel copies it all (the
    // range is off block boundaries), which is what the steps avoid.
    let before = fs.used(vec![]);
    let whole = create(&fs.mnt.join("whole"));
    whole.write_all_at(&[7; 100], 0).unwrap();
    let n = rustix::fs::copy_file_range(
        &old,
        Some(&mut at.clone()),
        &whole,
        Some(&mut at.clone()),
        (end - at) as usize,
    )
    .unwrap();
    assert_eq!(n as u64, end - at);
    let copied = fs.used(vec![whole]) - before;
    assert!(
        copied > 15 * MIB,
        "one call shared blocks too ({copied} bytes new): this test shows nothing here"
    );
}
