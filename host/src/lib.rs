//! deltasync-host: what the std shells (the server, the CLI, the GUI, the
//! benchmarks) share on one machine, kept out of the sans-IO core: trees
//! built from files on several threads ([`build`]), chunk hints that spare
//! re-chunking what did not change ([`hints`]), and the machine's
//! conventions: where keys and hints live, and the clock ([`local`]).

pub mod build;
pub mod hints;
pub mod local;

/// How one step of a kernel-side copy ([`copy_step`]) went.
#[derive(Debug)]
pub enum CopyStep {
    /// This many bytes were copied.
    Copied(usize),
    /// The kernel cannot copy between these files (another file system, an
    /// old kernel) and nothing was copied: the caller copies through memory.
    Unsupported,
    /// The copy failed; `out_of_space`: for want of space.
    Failed {
        /// What the kernel said.
        error: std::io::Error,
        /// A full disk or quota.
        out_of_space: bool,
    },
}

/// Copies up to `len` bytes of `src` from `*from` (which it advances) to
/// `dst` at `dst`'s own position (where its next plain write continues),
/// inside the kernel: references to the same blocks on a file system with
/// reflinks. `first`: nothing of this copy is done yet (only then may a
/// refusal fall back to copying through memory). A source that ends early
/// fails.
pub fn copy_step(
    src: &std::fs::File,
    from: &mut u64,
    dst: &std::fs::File,
    len: usize,
    first: bool,
) -> CopyStep {
    use rustix::io::Errno;
    match rustix::fs::copy_file_range(src, Some(from), dst, None, len) {
        Ok(0) => {
            CopyStep::Failed { error: std::io::Error::other("the source ended early"), out_of_space: false }
        }
        Ok(n) => CopyStep::Copied(n),
        Err(e) if first && [Errno::XDEV, Errno::NOSYS, Errno::OPNOTSUPP, Errno::INVAL].contains(&e) => {
            CopyStep::Unsupported
        }
        Err(e) => {
            CopyStep::Failed { out_of_space: matches!(e, Errno::NOSPC | Errno::DQUOT), error: e.into() }
        }
    }
}

/// Asks the kernel to start writing bytes `from..from + len` of `file` to
/// disk now, so that the disk works while a transfer goes on and the final
/// `fsync` (which still makes the file durable and reports errors) has
/// little left. Best effort: a failure only means no early writeback.
#[allow(unsafe_code)]
pub fn start_writeback(file: &std::fs::File, from: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        let (from, len) = (from as libc::off64_t, len as libc::off64_t);
        // SAFETY: `fd` belongs to a file the caller holds for the whole
        // call; the call takes no pointers.
        let _ = unsafe { libc::sync_file_range(fd, from, len, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, len);
}
