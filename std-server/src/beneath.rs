//! File-system access that cannot leave a directory: every path is resolved
//! by the kernel beneath the root's descriptor (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and every change to a name
//! (create, rename, link, unlink) is made relative to its parent directory's
//! descriptor, resolved that way. Nothing is checked by path and opened
//! later: a directory swapped for a symlink between two calls is refused by
//! the second, never followed. No symlink under the root is ever followed,
//! whether it points inside or out.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How every path under the root is resolved.
fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// A directory that everything below is reached through.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    /// A directory under the root held by descriptor (see [`Root::pin`]).
    pinned: OnceLock<(String, OwnedFd)>,
}

/// `rel` split into its parent directory (`""` for the root) and its last
/// component.
fn split(rel: &str) -> (&str, &str) {
    match rel.rsplit_once('/') {
        Some((dir, leaf)) => (dir, leaf),
        None => ("", rel),
    }
}

impl Root {
    /// Opens the directory at `path` (created if missing).
    pub fn open(path: &Path) -> io::Result<Root> {
        std::fs::create_dir_all(path)?;
        let path = path.canonicalize()?;
        let fd = rustix::fs::open(&path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(err)?;
        Ok(Root { fd, path, pinned: OnceLock::new() })
    }

    /// Where the root is (for messages; never used to reach a file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, paths under the top-level directory `name` are
    /// resolved through the descriptor opened here, not by name: renaming
    /// that directory away and putting another in its place changes
    /// nothing. It must belong to this process's user and be writable by
    /// nobody else (else someone else could swap what is inside).
    pub fn pin(&self, name: &str) -> io::Result<()> {
        let fd = self.dir(name)?;
        let st = rustix::fs::fstat(&fd).map_err(err)?;
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to uid {} with mode {:o}: it must belong to this user (uid {me}) and be \
                     writable by nobody else",
                    self.path.join(name).display(),
                    st.st_uid,
                    st.st_mode & 0o7777
                ),
            ));
        }
        self.pinned.set((name.to_string(), fd)).map_err(|_| io::Error::other("already pinned"))
    }

    /// Takes an exclusive lock on the root directory itself (released when
    /// the process ends); fails at once if another process holds it.
    pub fn lock(&self) -> io::Result<()> {
        rustix::fs::flock(&self.fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(err)
    }

    /// Whether others than the owner may rename entries of the root (it is
    /// group- or world-writable without the sticky bit).
    pub fn others_may_rename(&self) -> bool {
        rustix::fs::fstat(&self.fd).is_ok_and(|s| s.st_mode & 0o022 != 0 && s.st_mode & 0o1000 == 0)
    }

    /// The descriptor `rel` is resolved from, and what is left of it.
    fn base<'a>(&'a self, rel: &'a str) -> (BorrowedFd<'a>, &'a str) {
        if let Some((name, fd)) = self.pinned.get() {
            if rel == name {
                return (fd.as_fd(), "");
            }
            if let Some(rest) = rel.strip_prefix(name.as_str()).and_then(|r| r.strip_prefix('/')) {
                return (fd.as_fd(), rest);
            }
        }
        (self.fd.as_fd(), rel)
    }

    /// Opens `rel` (components separated by `/`, none empty, `.` or `..`)
    /// with `flags`, creating it with `mode` if `flags` say so.
    fn open_raw(&self, rel: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let (base, rel) = self.base(rel);
        let rel = if rel.is_empty() { "." } else { rel };
        // NONBLOCK: opening a FIFO must not wait for a writer (it is then
        // refused as no regular file); no effect on files and directories.
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK;
        rustix::fs::openat2(base, rel, flags, mode, resolve()).map_err(err)
    }

    /// A directory under the root.
    pub fn dir(&self, rel: &str) -> io::Result<OwnedFd> {
        self.open_raw(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
    }

    /// Opens a regular file for reading.
    pub fn open_file(&self, rel: &str) -> io::Result<File> {
        regular(self.open_raw(rel, OFlags::RDONLY, Mode::empty())?)
    }

    /// Creates a new file (failing if `rel` exists, whatever it is),
    /// read-write, with `mode` less the umask.
    pub fn create_new(&self, rel: &str, mode: u32) -> io::Result<File> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
        regular(self.open_raw(rel, flags, Mode::from_raw_mode(mode))?)
    }

    /// Opens a regular file read-write, creating it (mode 0600) if missing.
    pub fn create_or_open(&self, rel: &str) -> io::Result<File> {
        regular(self.open_raw(rel, OFlags::RDWR | OFlags::CREATE, Mode::from_raw_mode(0o600))?)
    }

    /// Metadata of `rel` itself (a symlink is reported as one, not
    /// followed).
    pub fn stat(&self, rel: &str) -> io::Result<rustix::fs::Stat> {
        let (dir, leaf) = split(rel);
        let d = self.dir(dir)?;
        rustix::fs::statat(&d, leaf, AtFlags::SYMLINK_NOFOLLOW).map_err(err)
    }

    /// Whether `rel` is a regular file.
    pub fn is_file(&self, rel: &str) -> bool {
        self.stat(rel).is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::RegularFile)
    }

    /// Creates `rel` and the directories above it with `mode` (less the
    /// umask).
    pub fn create_dirs_mode(&self, rel: &str, mode: u32) -> io::Result<()> {
        let mut done = String::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            let d = self.dir(&done)?;
            match rustix::fs::mkdirat(&d, part, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(err(e)),
            }
            if !done.is_empty() {
                done.push('/');
            }
            done.push_str(part);
        }
        // What exists must be a directory reached without symlinks.
        self.dir(rel).map(drop)
    }

    /// Creates `rel` and the directories above it (mode 0700).
    pub fn create_dirs(&self, rel: &str) -> io::Result<()> {
        self.create_dirs_mode(rel, 0o700)
    }

    /// Renames `from` to `to` (replacing a file there).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let ((fd, fl), (td, tl)) = (split(from), split(to));
        let (f, t) = (self.dir(fd)?, self.dir(td)?);
        rustix::fs::renameat(&f, fl, &t, tl).map_err(err)
    }

    /// Renames `from` to `to` unless `to` exists (then `AlreadyExists`,
    /// and nothing moved): one step, whoever else writes the directory.
    pub fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
        let ((fd, fl), (td, tl)) = (split(from), split(to));
        let (f, t) = (self.dir(fd)?, self.dir(td)?);
        rustix::fs::renameat_with(&f, fl, &t, tl, rustix::fs::RenameFlags::NOREPLACE).map_err(err)
    }

    /// Makes `to` a second name of the file `from` (a symlink is never
    /// followed).
    pub fn hard_link(&self, from: &str, to: &str) -> io::Result<()> {
        let ((fd, fl), (td, tl)) = (split(from), split(to));
        let (f, t) = (self.dir(fd)?, self.dir(td)?);
        rustix::fs::linkat(&f, fl, &t, tl, AtFlags::empty()).map_err(err)
    }

    /// Removes the name `rel` (a file or a symlink; never what it points to).
    pub fn remove_file(&self, rel: &str) -> io::Result<()> {
        let (dir, leaf) = split(rel);
        rustix::fs::unlinkat(self.dir(dir)?, leaf, AtFlags::empty()).map_err(err)
    }

    /// Removes the empty directory `rel`.
    pub fn remove_dir(&self, rel: &str) -> io::Result<()> {
        let (dir, leaf) = split(rel);
        rustix::fs::unlinkat(self.dir(dir)?, leaf, AtFlags::REMOVEDIR).map_err(err)
    }

    /// Removes `rel` and everything below it (symlinks are removed, never
    /// followed).
    pub fn remove_all(&self, rel: &str) -> io::Result<()> {
        for (name, kind) in self.entries(rel)? {
            let child = join(rel, &name);
            if kind == FileType::Directory { self.remove_all(&child)? } else { self.remove_file(&child)? }
        }
        self.remove_dir(rel)
    }

    /// Syncs the directory `rel` (after a rename into it).
    pub fn sync_dir(&self, rel: &str) -> io::Result<()> {
        rustix::fs::fsync(self.dir(rel)?).map_err(err)
    }

    /// The entries of directory `rel` (names that are not UTF-8 are left
    /// out), with their types, sorted by name.
    pub fn entries(&self, rel: &str) -> io::Result<Vec<(String, FileType)>> {
        let d = self.dir(rel)?;
        let mut out = Vec::new();
        for e in rustix::fs::Dir::read_from(d.as_fd()).map_err(err)? {
            let e = e.map_err(err)?;
            let Ok(name) = e.file_name().to_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            let kind = match e.file_type() {
                FileType::Unknown => match self.stat(&join(rel, name)) {
                    Ok(s) => FileType::from_raw_mode(s.st_mode),
                    Err(_) => continue,
                },
                k => k,
            };
            out.push((name.to_string(), kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// The file behind `fd` if it is a regular file.
fn regular(fd: OwnedFd) -> io::Result<File> {
    let f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(f)
}

/// `dir/name`, or `name` at the root.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_reached_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("d"), dir.path().join("in")).unwrap();
        std::os::unix::fs::symlink("d/f", dir.path().join("link")).unwrap();
        assert!(root.open_file("d/f").is_ok());
        for rel in ["out/secret", "in/f", "link", "../x", "/etc/passwd"] {
            assert!(root.open_file(rel).is_err(), "{rel} was opened");
        }
        assert!(root.create_new("out/new", 0o600).is_err());
        assert!(root.create_dirs("out/sub").is_err());
        assert!(!outside.path().join("new").exists() && !outside.path().join("sub").exists());
        assert!(root.rename("d/f", "out/stolen").is_err());
        assert!(!outside.path().join("stolen").exists());
        // Removing a symlink removes the link, not its target.
        root.remove_file("out").unwrap();
        assert!(outside.path().join("secret").exists());
        assert!(!root.is_file("link"));
    }
}
