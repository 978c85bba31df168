//! The async driver over `embedded-io-async`, as the tokio shells use it
//! (through `embedded-io-adapters`): a handshake and an upload between a
//! client and a server connection over an in-memory tokio duplex pipe.

use deltasync_core::Instant;
use deltasync_core::SessionError;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::Upload;
use deltasync_core::driver::{Advanced, DriveError, Pump, Session, run_async};
use deltasync_core::frame::{MAX_ENCODED, MAX_SEALED};
use deltasync_core::machine::Machine;
use deltasync_core::message::Outcome;
use deltasync_core::sender::Sender;
/// A session over heap buffers, as the simulations' pumps have.
type VecSession<M> = Session<M, Vec<u8>, Vec<u8>, Vec<u8>>;

use deltasync_core::sim::{Files, KEY, handshake, keys, pump, random_bytes, server};
use deltasync_core::tree::Tree;
use embedded_io_adapters::tokio_1::FromTokio;

/// Runs each burst of steps on the calling task (a server would use a
/// worker pool). Time never passes here.
async fn inline<M: Machine>(s: &mut VecSession<M>) -> Advanced<&mut VecSession<M>, M::Output> {
    let r = s.advance(Instant(0), |_, _| {});
    (s, r)
}

fn step_at<M: Machine>(s: &mut VecSession<M>, now: Instant) -> Advanced<&mut VecSession<M>, M::Output> {
    let r = s.advance(now, |_, _| {});
    (s, r)
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_and_server_sync_over_the_async_driver() {
    let files = Files::default();
    let old = random_bytes(1, 2 << 20);
    let mut new = old.clone();
    new[1 << 20..(1 << 20) + 4096].fill(7);
    files.borrow_mut().insert("f".into(), old);

    // A small pipe buffer forces many partial reads and writes.
    let (a, b) = tokio::io::duplex(4096);
    let (mut cio, mut sio) = (FromTokio::new(a), FromTokio::new(b));
    // The server's input buffer is smaller than most frames: whole frames
    // never fit in it, and are assembled in the frame buffer.
    let small = Pump::new(vec![0u8; 64], vec![0u8; MAX_SEALED], vec![0u8; MAX_ENCODED]);
    let mut srv = Session { machine: server(&files, keys()), pump: small };
    let never = |_| std::future::pending::<()>();

    let client = async move {
        let mut hs = Session { machine: handshake(KEY), pump: pump() };
        let salt = run_async(&mut hs, &mut cio, inline, never).await.1.unwrap();
        let tree = Tree::build(&new, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, &new[..], tree.summary(), salt, Instant(0));
        let mut up = Session { machine: Upload::new("f", sender), pump: hs.pump };
        let outcome = run_async(&mut up, &mut cio, inline, never).await.1.unwrap();
        drop(cio);
        (outcome, up.pump.sent + up.pump.received, new)
    };
    let server = async move {
        // The server runs until the client hangs up.
        let r = run_async(&mut srv, &mut sio, inline, never).await.1;
        assert!(matches!(r, Err(DriveError::Closed)), "{r:?}");
    };
    let ((outcome, wire, new), ()) = tokio::join!(client, server);
    assert_eq!(outcome, Outcome::Written);
    assert!(wire < 40_000, "a 4 KiB edit moved {wire} bytes");
    assert!(files.borrow()["f"] == new);
}

#[tokio::test(flavor = "current_thread")]
async fn a_silent_or_dribbling_peer_is_dropped_at_the_deadline_and_dribbles_wake_nothing() {
    let files = Files::default();
    for dribble in [false, true] {
        let (a, b) = tokio::io::duplex(4096);
        let (mut cio, mut sio) = (a, FromTokio::new(b));
        // The machine's clock stands still until the timer fires, then
        // jumps past the handshake's deadline.
        let runs = std::cell::Cell::new(0u32);
        let fired = std::cell::Cell::new(false);
        let mut srv = Session { machine: server(&files, keys()), pump: pump() };
        let feeder = async {
            if dribble {
                // One byte of a long frame header, then more: never a whole frame.
                use tokio::io::AsyncWriteExt;
                cio.write_all(&[0xff]).await.unwrap();
                for _ in 0..50 {
                    cio.write_all(&[0x01]).await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
            cio
        };
        let driver = async {
            // The timer waits until the dribble is over, then fires.
            let timer = |_| async {
                for _ in 0..200 {
                    tokio::task::yield_now().await;
                }
                fired.set(true);
            };
            let run = |s| {
                runs.set(runs.get() + 1);
                let now = if fired.get() { Instant(31_000) } else { Instant(0) };
                std::future::ready(step_at(s, now))
            };
            run_async(&mut srv, &mut sio, run, timer).await.1
        };
        let (_keep_open, r) = tokio::join!(feeder, driver);
        assert!(matches!(r, Err(DriveError::Session(SessionError::Timeout))), "{r:?}");
        // Once to send nothing and wait, once at the deadline: the dribbled
        // bytes never woke the machine.
        assert_eq!(runs.get(), 2, "dribble {dribble}");
    }
}
