//! LEB128 unsigned varints, as postcard writes them, for frame headers and
//! packed tree listings.

/// Appends `v` to `out` at `*pos`; `None` if it does not fit.
pub(crate) fn put(out: &mut [u8], pos: &mut usize, mut v: u64) -> Option<()> {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        let slot = out.get_mut(*pos)?;
        *pos += 1;
        if v == 0 {
            *slot = byte;
            return Some(());
        }
        *slot = byte | 0x80;
    }
}

/// Reads a varint at `*pos`; `None` if truncated or longer than 10 bytes.
pub(crate) fn get(input: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *input.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encoded length of `v`.
pub(crate) fn len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_edges() {
        for v in [0u64, 1, 127, 128, 300, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut buf = [0u8; 10];
            let mut p = 0;
            put(&mut buf, &mut p, v).unwrap();
            assert_eq!(p, len(v));
            let mut q = 0;
            assert_eq!(get(&buf, &mut q), Some(v));
            assert_eq!(q, p);
        }
    }

    #[test]
    fn rejects_truncated_and_overlong() {
        assert_eq!(get(&[0x80], &mut 0), None);
        assert_eq!(get(&[0xff; 11], &mut 0), None);
        let mut tiny = [0u8; 1];
        assert_eq!(put(&mut tiny, &mut 0, 300), None);
    }
}
