//! deltasync-host: what the std shells (the server, the CLI, the GUI, the
//! benchmarks) share on one machine, kept out of the sans-IO core: trees
//! built from files on several threads ([`build`]), chunk hints that spare
//! re-chunking what did not change ([`hints`]), and the machine's
//! conventions: where keys and hints live, and the clock ([`local`]).

pub mod build;
pub mod hints;
pub mod local;

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
