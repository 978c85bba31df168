//! A TCP relay for tests that play the attacker on the path: it forwards
//! every connection to a server, records every byte both ways (a passive
//! capture), and may rewrite the client's frames on their way to the
//! server (an active one). Each connection is handled by its own threads;
//! everything stops when the relay is dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Rewrites the client's frames: called with the frame's index on its
/// connection (0 is the hello) and its bytes as on the wire (length header
/// included); returns what to send instead (nothing drops it, two copies
/// repeat it, a held frame sent later reorders).
pub type Meddler = Box<dyn FnMut(usize, &[u8]) -> Vec<Vec<u8>> + Send>;

/// A running relay.
pub struct Relay {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    captured: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays connections on a fresh loopback port to 127.0.0.1:`target`,
    /// passing the client's frames through `meddle` if given.
    pub fn start(target: u16, meddle: Option<Meddler>) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let meddle = Arc::new(Mutex::new(meddle));
        let (cap, halt) = (captured.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let target = SocketAddr::from(([127, 0, 0, 1], target));
                        if let Ok(server) = TcpStream::connect(target) {
                            conns.push(relay_one(client, server, cap.clone(), meddle.clone(), halt.clone()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
            for c in conns.into_iter().flatten() {
                let _ = c.join();
            }
        });
        Ok(Relay { port, captured, stop, acceptor: Some(acceptor) })
    }

    /// Every byte carried so far, both directions, in arrival order.
    pub fn captured(&self) -> Vec<u8> {
        self.captured.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Starts the two copying threads of one connection.
fn relay_one(
    client: TcpStream,
    server: TcpStream,
    captured: Arc<Mutex<Vec<u8>>>,
    meddle: Arc<Mutex<Option<Meddler>>>,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let setup = || -> io::Result<[TcpStream; 4]> {
        for s in [&client, &server] {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
        }
        Ok([client.try_clone()?, server.try_clone()?, server.try_clone()?, client.try_clone()?])
    };
    let Ok([c_in, s_out, s_in, c_out]) = setup() else { return Vec::new() };
    let (cap1, stop1) = (captured.clone(), stop.clone());
    let up = std::thread::spawn(move || {
        let mut frames = FrameSplitter::default();
        let mut index = 0;
        copy(c_in, s_out, &cap1, &stop1, |bytes, out| {
            for frame in frames.push(bytes) {
                let mut guard = meddle.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_mut() {
                    Some(m) => m(index, &frame).iter().for_each(|f| out.extend_from_slice(f)),
                    None => out.extend_from_slice(&frame),
                }
                index += 1;
            }
        });
    });
    let down =
        std::thread::spawn(move || copy(s_in, c_out, &captured, &stop, |b, out| out.extend_from_slice(b)));
    vec![up, down]
}

/// Copies `from` to `to` through `transform` until either side closes or
/// the relay stops; records what it read.
fn copy(
    mut from: TcpStream,
    mut to: TcpStream,
    captured: &Mutex<Vec<u8>>,
    stop: &AtomicBool,
    mut transform: impl FnMut(&[u8], &mut Vec<u8>),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                captured.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
                out.clear();
                transform(&buf[..n], &mut out);
                if to.write_all(&out).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Cuts a byte stream into whole frames (LEB128 length, then the payload).
#[derive(Default)]
struct FrameSplitter {
    pending: Vec<u8>,
}

impl FrameSplitter {
    fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(bytes);
        let mut frames = Vec::new();
        loop {
            let (mut len, mut shift, mut hdr) = (0usize, 0, 0);
            let complete = loop {
                let Some(&b) = self.pending.get(hdr) else { break false };
                hdr += 1;
                len |= usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break true;
                }
                if shift > 21 {
                    // Not a frame header: pass the rest through as it is.
                    frames.push(std::mem::take(&mut self.pending));
                    return frames;
                }
            };
            if !complete || self.pending.len() < hdr + len {
                return frames;
            }
            frames.push(self.pending.drain(..hdr + len).collect());
        }
    }
}

/// The payload of a frame as the relay sees it (after its length header).
pub fn payload(frame: &[u8]) -> &[u8] {
    let hdr = frame.iter().position(|b| b & 0x80 == 0).map_or(frame.len(), |i| i + 1);
    &frame[hdr..]
}

/// A frame with `payload` behind its LEB128 length header.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    let mut n = payload.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_whole_whatever_the_pieces() {
        let stream: Vec<u8> = [frame(b"a"), frame(&[7u8; 300]), frame(b"")].concat();
        for step in [1, 2, 5, stream.len()] {
            let mut s = FrameSplitter::default();
            let got: Vec<Vec<u8>> = stream.chunks(step).flat_map(|p| s.push(p)).collect();
            assert_eq!(got.len(), 3, "step {step}");
            assert_eq!(payload(&got[1]), &[7u8; 300][..]);
            assert_eq!(got.concat(), stream);
        }
    }
}
