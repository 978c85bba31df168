//! The secure channel's ciphers on this machine: how fast each seals and
//! opens full 63 KiB frames, and how long a handshake takes (what the
//! choice of AES-GCM on hosts with AES instructions rests on).
//!
//! `target/release/cipher-bench [MIB]`

use deltasync_bench::median;
use deltasync_core::channel::{Channel, CipherKind, Handshake, TAG_LEN};
use deltasync_core::frame::MAX_FRAME;
use std::time::Instant;

fn pair(cipher: CipherKind) -> (Channel, Channel) {
    let mut c = Handshake::new(true, cipher, b"bench", &[7; 32], rand_bytes(1)).unwrap();
    let mut s = Handshake::new(false, cipher, b"bench", &[7; 32], rand_bytes(2)).unwrap();
    let (mut m, mut p) = ([0u8; 128], [0u8; 128]);
    let n = c.write(&[], &mut m).unwrap();
    s.read(&m[..n], &mut p).unwrap();
    let n = s.write(&[], &mut m).unwrap();
    c.read(&m[..n], &mut p).unwrap();
    (c.finish().unwrap(), s.finish().unwrap())
}

fn rand_bytes(seed: u8) -> [u8; 32] {
    let mut b = [seed; 32];
    b[31] = 0x40;
    b
}

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(512);
    println!("preferred on this machine: {:?}", CipherKind::preferred());
    for cipher in [CipherKind::ChaChaPoly, CipherKind::AesGcm] {
        let mut rates = Vec::new();
        for _ in 0..5 {
            let (mut c, mut s) = pair(cipher);
            let mut buf = vec![0x33u8; MAX_FRAME + TAG_LEN];
            let frames = (mib << 20) / MAX_FRAME;
            let t = Instant::now();
            for _ in 0..frames {
                let n = c.seal(&mut buf, MAX_FRAME).unwrap();
                s.open(&mut buf[..n]).unwrap();
            }
            rates.push((frames * MAX_FRAME) as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        let t = Instant::now();
        for _ in 0..200 {
            std::hint::black_box(pair(cipher));
        }
        let hs_us = t.elapsed().as_secs_f64() / 200.0 * 1e6;
        println!(
            "{}: seal+open {:.0} MB/s (median of 5 x {mib} MiB; one core does both), handshake (both sides) {:.0} us",
            cipher.protocol_name(),
            median(rates),
            hs_us
        );
    }
}
