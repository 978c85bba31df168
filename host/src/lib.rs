//! deltasync-host: what the std shells (the server, the CLI, the GUI, the
//! benchmarks) share on one machine, kept out of the sans-IO core: trees
//! built from files on several threads ([`build`]), chunk hints that spare
//! re-chunking what did not change ([`hints`]), and the machine's
//! conventions: where keys and hints live, and the clock ([`local`]); work
//! over a file while it is written ([`readback`]).

pub mod build;
pub mod hints;
pub mod local;
pub mod readback;

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

/// The block a file system with reflinks shares: a kernel-side copy of
/// whole blocks, from and to offsets on block boundaries, becomes a
/// reference to the same blocks (XFS, btrfs); any other copy is made of new
/// blocks. 4 KiB: the block of both by default, and a multiple of the
/// page size.
pub const SHARE_BLOCK: u64 = 4096;

/// How much of a copy of `len` bytes from `from` to `to` to ask the kernel
/// for in one call so that as much as can be is shared (see
/// [`SHARE_BLOCK`]): if both offsets are as far from a block boundary,
/// first the bytes up to the next one, then whole blocks, then the rest.
/// Offsets that differ within a block cannot share anything: all at once.
pub fn clone_span(from: u64, to: u64, len: usize) -> usize {
    if from % SHARE_BLOCK != to % SHARE_BLOCK {
        return len;
    }
    let head = (SHARE_BLOCK - from % SHARE_BLOCK) % SHARE_BLOCK;
    if head > 0 {
        return len.min(head as usize);
    }
    match len - len % SHARE_BLOCK as usize {
        0 => len,
        blocks => blocks,
    }
}

/// Copies up to `len` bytes of `src` from `*from` (which it advances) to
/// `dst` at `dst`'s own position (where its next plain write continues),
/// inside the kernel: references to the same blocks on a file system with
/// reflinks, for the whole blocks of a copy that keeps the offsets' place
/// within a block (so a step may copy fewer than `len` bytes, for the next
/// one to start on a block boundary: see [`clone_span`]). `first`: nothing
/// of this copy is done yet (only then may a refusal fall back to copying
/// through memory). A source that ends early fails.
pub fn copy_step(
    src: &std::fs::File,
    from: &mut u64,
    dst: &std::fs::File,
    len: usize,
    first: bool,
) -> CopyStep {
    use rustix::io::Errno;
    let len = match rustix::fs::seek(dst, rustix::fs::SeekFrom::Current(0)) {
        Ok(at) => clone_span(*from, at, len),
        Err(_) => len,
    };
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

#[cfg(test)]
mod tests {
    use super::{SHARE_BLOCK, clone_span};

    const B: usize = SHARE_BLOCK as usize;

    #[test]
    fn a_copy_is_split_at_block_boundaries_only_when_its_offsets_agree_within_a_block() {
        // In place (a 4 KiB overwrite's neighbours): up to the boundary,
        // whole blocks, the rest.
        assert_eq!(clone_span(100, 100, 10 * B), B - 100);
        assert_eq!(clone_span(B as u64, B as u64, 10 * B + 100), 10 * B);
        assert_eq!(clone_span(11 * B as u64, 11 * B as u64, 100), 100);
        // Shifted by whole blocks (1 MiB deleted): the same.
        assert_eq!(clone_span((3 << 20) + 5, (2 << 20) + 5, 10 * B), B - 5);
        // A head shorter than the boundary: all of it.
        assert_eq!(clone_span(100, 100, 50), 50);
        // Shifted within a block (1 byte inserted): nothing can be shared.
        assert_eq!(clone_span(0, 1, 10 * B), 10 * B);
        assert_eq!(clone_span(B as u64, 100, 3 * B + 7), 3 * B + 7);
    }
}
