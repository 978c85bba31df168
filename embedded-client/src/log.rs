//! A log of records in a fixed region, as firmware keeps it in RAM or flash.

/// A record cannot fit in the store even when it is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordTooLarge;

/// Newline-terminated records in `N` bytes. When a new record does not fit,
/// the oldest whole records are dropped to make room: the log always holds
/// the most recent complete records, and its start moves forward, which
/// content-defined chunking turns into a cheap sync (the dropped prefix costs
/// nothing, the rest is reused).
pub struct LogStore<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for LogStore<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> LogStore<N> {
    /// An empty log.
    pub const fn new() -> Self {
        LogStore { buf: [0; N], len: 0 }
    }

    /// The log's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `record` and a newline. Returns how many bytes of the oldest
    /// records were dropped to make room. A record containing a newline is
    /// stored as several records.
    pub fn append(&mut self, record: &[u8]) -> Result<usize, RecordTooLarge> {
        let need = record.len() + 1;
        if need > N {
            return Err(RecordTooLarge);
        }
        let mut dropped = 0;
        if self.len + need > N {
            // Drop whole records from the front until the new one fits.
            let must_free = self.len + need - N;
            let mut cut = 0;
            while cut < must_free {
                match self.buf[cut..self.len].iter().position(|&b| b == b'\n') {
                    Some(i) => cut += i + 1,
                    None => cut = self.len,
                }
            }
            self.buf.copy_within(cut..self.len, 0);
            self.len -= cut;
            dropped = cut;
        }
        self.buf[self.len..self.len + record.len()].copy_from_slice(record);
        self.buf[self.len + record.len()] = b'\n';
        self.len += need;
        Ok(dropped)
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_drops_the_oldest_whole_records() {
        let mut l = LogStore::<16>::new();
        assert_eq!(l.append(b"aaaa"), Ok(0));
        assert_eq!(l.append(b"bbbb"), Ok(0));
        assert_eq!(l.append(b"cccc"), Ok(0));
        assert_eq!(l.as_bytes(), b"aaaa\nbbbb\ncccc\n");
        // 15 + 5 > 16: "aaaa\n" goes.
        assert_eq!(l.append(b"dddd"), Ok(5));
        assert_eq!(l.as_bytes(), b"bbbb\ncccc\ndddd\n");
        // A big record drops several.
        assert_eq!(l.append(b"eeeeeeeeee"), Ok(10));
        assert_eq!(l.as_bytes(), b"dddd\neeeeeeeeee\n");
        assert_eq!(l.append(&[b'x'; 16]), Err(RecordTooLarge));
        assert_eq!(l.append(&[b'x'; 15]), Ok(16));
        assert_eq!(l.len(), 16);
    }
}
