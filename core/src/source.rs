//! How file contents reach the state machines: random-access reads of a
//! version, and in-order writes of the new one.

use core::any::Any;

/// A read or write of file contents failed; the shell keeps the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFailed;

/// Random-access reads of one version of a file.
pub trait Source {
    /// Fills all of `buf` from `offset`; an error if the range is not there.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed>;

    /// What holds bytes `offset..offset + len` as the store knows it (a
    /// file, a stored version's chunks), and where they start in it, if
    /// they lie in one such thing: an [`Output`] of the same store may copy
    /// them from there without the bytes passing through the receiver
    /// ([`Output::copy_from`]).
    fn locate(&self, offset: u64, len: u64) -> Option<(&dyn Any, u64)> {
        let _ = (offset, len);
        None
    }
}

/// In-order writes of the version being received.
pub trait Output {
    /// Appends `data`.
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed>;

    /// Whether the last failure was for want of space (the disk or a quota
    /// is full), which the receiver reports as such.
    fn out_of_space(&self) -> bool {
        false
    }

    /// Offers to compute the tree of everything written, chunked as `kind`,
    /// by itself (on another thread, say, while the receiver keeps reading
    /// the network). A receiver fetching a whole version asks first; on
    /// `true` it skips chunking and hashing, and takes the tree from
    /// [`Output::finish_tree`] to verify the version.
    #[cfg(feature = "alloc")]
    fn index_in_background(&mut self, kind: crate::chunker::ChunkerKind) -> bool {
        let _ = kind;
        false
    }

    /// The tree of everything written, once all of it is (only called after
    /// [`Output::index_in_background`] returned `true`). Its whole-file hash
    /// may be [`crate::Hash::UNKNOWN`].
    #[cfg(feature = "alloc")]
    fn finish_tree(&mut self) -> Result<crate::tree::Tree, IoFailed> {
        Err(IoFailed)
    }

    /// Appends `len` bytes of `src` (what a [`Source::locate`] gave) from
    /// `offset` without passing them through the caller: a kernel-side
    /// copy, references to chunks stored already. `Ok(false)`: not
    /// possible here (another store's thing, say), nothing was written,
    /// the caller copies them itself. Only used when the receiver needs no
    /// hash over these bytes.
    fn copy_from(&mut self, src: &dyn Any, offset: u64, len: u64) -> Result<bool, IoFailed> {
        let _ = (src, offset, len);
        Ok(false)
    }

    /// Whether the output's owner checks the whole-file SHA-256 of what
    /// was written against the offer's itself (the new tree carries the
    /// offer's claim): the receiver then hashes no byte it reuses, and may
    /// copy reused ranges with [`Output::copy_from`].
    fn hashes_file(&self) -> bool {
        false
    }
}

impl Source for &[u8] {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        let start = usize::try_from(offset).map_err(|_| IoFailed)?;
        let end = start.checked_add(buf.len()).ok_or(IoFailed)?;
        buf.copy_from_slice(self.get(start..end).ok_or(IoFailed)?);
        Ok(())
    }
}

impl<S: Source + ?Sized> Source for &mut S {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        (**self).read_at(offset, buf)
    }

    fn locate(&self, offset: u64, len: u64) -> Option<(&dyn Any, u64)> {
        (**self).locate(offset, len)
    }
}

impl<S: Source> Source for Option<S> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        self.as_mut().ok_or(IoFailed)?.read_at(offset, buf)
    }

    fn locate(&self, offset: u64, len: u64) -> Option<(&dyn Any, u64)> {
        self.as_ref()?.locate(offset, len)
    }
}

/// Two sources read as one: `b`'s bytes follow the first `a_size` of `a`.
/// A read across the seam is split there (a tree entry's range never
/// crosses it, but the old bytes a delta compares with may).
impl<A: Source, B: Source> Source for crate::tree::Chain<A, B> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        if offset < self.a_size {
            let n = (self.a_size - offset).min(buf.len() as u64) as usize;
            let (head, tail) = buf.split_at_mut(n);
            self.a.read_at(offset, head)?;
            if tail.is_empty() { Ok(()) } else { self.b.read_at(0, tail) }
        } else {
            self.b.read_at(offset - self.a_size, buf)
        }
    }

    fn locate(&self, offset: u64, len: u64) -> Option<(&dyn Any, u64)> {
        if offset < self.a_size {
            (offset.checked_add(len)? <= self.a_size).then(|| self.a.locate(offset, len))?
        } else {
            self.b.locate(offset - self.a_size, len)
        }
    }
}

#[cfg(feature = "alloc")]
impl Output for alloc::vec::Vec<u8> {
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
        self.extend_from_slice(data);
        Ok(())
    }
}

#[cfg(feature = "alloc")]
impl Source for alloc::vec::Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        self.as_slice().read_at(offset, buf)
    }
}

#[cfg(feature = "std")]
pub use file::FileSource;

#[cfg(feature = "std")]
mod file {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    /// A file read with positional reads (no shared cursor).
    #[derive(Debug)]
    pub struct FileSource(pub File);

    impl Source for FileSource {
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
            self.0.read_exact_at(buf, offset).map_err(|_| IoFailed)
        }

        /// The file itself: an output on the same file system copies from
        /// it inside the kernel.
        fn locate(&self, offset: u64, _len: u64) -> Option<(&dyn Any, u64)> {
            Some((&self.0, offset))
        }
    }

    impl<W: std::io::Write> Output for std::io::BufWriter<W> {
        fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
            std::io::Write::write_all(self, data).map_err(|_| IoFailed)
        }
    }
}
