//! The secure channel under attack, in the in-memory harness: any bit of any
//! frame flipped on the way ends the session as tampered and changes nothing
//! stored; arbitrary bytes never make a decoder panic; requests outside a
//! key's permissions are refused.

use deltasync_core::access::Access;
use deltasync_core::channel::{ClientKey, TAG_LEN};
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::server::Event;
use deltasync_core::conn::{Query, QueryKind, Upload};
use deltasync_core::driver::{DriveError, Step};
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::frame::FrameError;
use deltasync_core::message::Outcome;
use deltasync_core::sender::Sender;
use deltasync_core::sim::*;
use deltasync_core::tree::Tree;
use deltasync_core::{Instant, PROTOCOL_VERSION};
use proptest::prelude::*;

/// The old and new versions of the upload the relay meddles with.
fn versions() -> (Vec<u8>, Vec<u8>) {
    let old = random_bytes(7, 200_000);
    let mut new = old.clone();
    new[100_000..100_050].fill(1);
    new.extend_from_slice(&random_bytes(8, 30_000));
    (old, new)
}

/// A handshake then an upload of `new` over `old`, with `flip` set on the
/// link; the run's result, the net (its frames) and the server's events.
fn meddled_upload(flip: Option<u64>) -> (Result<Outcome, Stop>, Net, Files, Vec<Event>) {
    let (old, new) = versions();
    let files = Files::default();
    files.borrow_mut().insert("f".into(), old);
    let mut srv = server(&files, keys());
    let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
    net.piece = 1500;
    net.flip_bit = flip;
    let r = run(&mut handshake(KEY), &mut cp, &mut srv, &mut sp, &mut net).and_then(|salt| {
        let tree = Tree::build(&new, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, &new[..], tree.summary(), salt, Instant(0));
        run(&mut Upload::new("f", sender), &mut cp, &mut srv, &mut sp, &mut net)
    });
    let events = std::iter::from_fn(|| srv.next_event()).collect();
    (r, net, files, events)
}

/// Length of the LEB128 header of a frame `len` bytes long on the wire.
fn header_len(len: u64) -> u64 {
    (1..=3).find(|&h| (len - h) < 1 << (7 * h)).unwrap()
}

#[test]
fn the_clean_upload_goes_through_sealed() {
    let (r, net, files, events) = meddled_upload(None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(files.borrow()["f"] == versions().1);
    assert!(events.iter().any(|e| matches!(e, Event::Authenticated { key } if key == "sim")));
    assert!(net.frames.len() > 6, "{:?}", net.frames);
    // The handshake on the wire: the hello (62 bytes), the answer (53).
    assert_eq!(net.frames[..2], [(true, 62), (false, 53)]);
    // Every frame after the two handshake messages carries a tag.
    assert!(net.frames[2..].iter().all(|&(_, len)| len > TAG_LEN as u64 + 1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any bit of any sealed frame, header or payload, in either direction.
    #[test]
    fn flipping_any_bit_of_any_frame_is_detected(frame_pick in any::<prop::sample::Index>(), bit_pick in any::<prop::sample::Index>()) {
        let (_, clean, _, _) = meddled_upload(None);
        // Sealed frames only (from the third on), and not the server's last
        // (its Done, sent after the new version was published: tampering
        // with it makes the client fail, but the file is rightly stored).
        let sealed = &clean.frames[2..clean.frames.len() - 1];
        let k = 2 + frame_pick.index(sealed.len());
        let start: u64 = clean.frames[..k].iter().map(|f| f.1).sum();
        let (to_server, len) = clean.frames[k];
        let bit = start * 8 + bit_pick.index(len as usize * 8) as u64;
        let (r, _, files, events) = meddled_upload(Some(bit));
        let old = versions().0;
        prop_assert!(files.borrow()["f"] == old, "frame {} bit {}: the stored file changed", k, bit);
        let finished = events.iter().any(|e| matches!(e, Event::Finished { .. }));
        prop_assert!(!finished, "a transfer finished");
        let in_header = bit / 8 < start + header_len(len);
        let tampered = |e: &DriveError<()>| matches!(e,
            DriveError::Session(SessionError::Protocol(ErrorCode::Tampered) | SessionError::Peer(ErrorCode::Tampered)));
        match (&r, to_server) {
            // A payload bit: the frame does not open, on whichever side.
            (Err(Stop::Server(e)), true) | (Err(Stop::Client(e)), false) if tampered(e) => {}
            (Err(Stop::Client(e)), true) if tampered(e) => {}
            // A length bit: the frame boundary moves, so a frame fails to
            // open, is over the limit, or never completes.
            (Err(Stop::Server(e) | Stop::Client(e)), _) if in_header
                && (tampered(e) || matches!(e, DriveError::Frame(FrameError::TooLong(_)))) => {}
            (Err(Stop::Stalled), _) if in_header => {}
            other => prop_assert!(false, "frame {} (to server: {}) bit {}: {:?}", k, to_server, bit, other),
        }
    }

    /// Arbitrary bytes into a server's pump, before and after the
    /// handshake: errors, never a panic, and nothing acted on.
    #[test]
    fn arbitrary_bytes_never_panic_a_server(junk in proptest::collection::vec(any::<u8>(), 0..3000), after_handshake in any::<bool>()) {
        let files = Files::default();
        files.borrow_mut().insert("f".into(), b"kept".to_vec());
        let mut srv = server(&files, keys());
        let mut sp = pump();
        if after_handshake {
            let mut cp = pump();
            let mut net = Net::new();
            run(&mut handshake(KEY), &mut cp, &mut srv, &mut sp, &mut net).unwrap();
        }
        let n = junk.len().min(sp.input().len());
        sp.input()[..n].copy_from_slice(&junk[..n]);
        sp.filled(n);
        for _ in 0..10_000 {
            match sp.step::<_, ()>(&mut srv, Instant(0)) {
                Ok(Step::Again | Step::Write(_)) => {}
                Ok(Step::Read(_) | Step::Done(_) | Step::Finish(..)) | Err(_) => break,
            }
        }
        prop_assert!(files.borrow()["f"] == b"kept");
        prop_assert!(files.borrow().len() == 1);
    }
}

#[test]
fn requests_outside_a_keys_permissions_are_refused_and_change_nothing() {
    let device7 = ClientKey { id: *b"device-7", secret: [7; 32] };
    let reader = ClientKey { id: *b"reader!!", secret: [8; 32] };
    let keyring = vec![
        (
            device7.clone(),
            Access {
                read: false,
                delete: false,
                prefixes: vec!["devices/7".into()],
                ..Access::full("device-7")
            },
        ),
        (reader.clone(), Access { write: false, delete: false, ..Access::full("reader") }),
    ];
    let files = Files::default();
    files.borrow_mut().insert("devices/8/log".into(), b"eight".to_vec());
    files.borrow_mut().insert("devices/7/log".into(), b"seven".to_vec());
    let upload = |key: &ClientKey, name: &str, data: &[u8]| {
        let mut srv = server(&files, keyring.clone());
        let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
        let salt = run(&mut handshake(key.clone()), &mut cp, &mut srv, &mut sp, &mut net).unwrap();
        let tree = Tree::build(data, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, data, tree.summary(), salt, Instant(0));
        let r = run(&mut Upload::new(name, sender), &mut cp, &mut srv, &mut sp, &mut net);
        let events: Vec<Event> = std::iter::from_fn(|| srv.next_event()).collect();
        (r, events)
    };
    let query = |key: &ClientKey, kind: QueryKind<'_>| {
        let mut srv = server(&files, keyring.clone());
        let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
        run(&mut handshake(key.clone()), &mut cp, &mut srv, &mut sp, &mut net).unwrap();
        let mut names = Vec::new();
        let r = run(
            &mut Query::new(kind, PROTOCOL_VERSION, |i| names.push(i.name().to_string()), Instant(0)),
            &mut cp,
            &mut srv,
            &mut sp,
            &mut net,
        );
        (r.map(|_| ()), names)
    };
    let denied = |r: Result<_, Stop>| {
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::PermissionDenied)))))
    };
    // Device 7 writes its own log, not device 8's, and reads neither.
    let (r, _) = upload(&device7, "devices/7/log", b"seven, new");
    assert_eq!(r.unwrap(), Outcome::Written);
    let (r, events) = upload(&device7, "devices/8/log", b"forged");
    assert!(denied(r.map(|_| ())));
    assert!(events.iter().any(|e| matches!(e, Event::Refused { code: ErrorCode::PermissionDenied, .. })));
    assert!(denied(upload(&device7, "devices/70/log", b"x").0.map(|_| ())));
    assert!(denied(query(&device7, QueryKind::Delete("devices/7/log")).0));
    assert!(denied(query(&device7, QueryKind::List).0));
    // A read-only key lists and stats, and neither uploads nor deletes.
    let (r, names) = query(&reader, QueryKind::List);
    r.unwrap();
    assert_eq!(names, ["devices/7/log", "devices/8/log"]);
    assert!(denied(upload(&reader, "devices/8/log", b"overwrite").0.map(|_| ())));
    assert!(denied(query(&reader, QueryKind::Delete("devices/8/log")).0));
    assert!(files.borrow()["devices/8/log"] == b"eight");
    assert!(files.borrow()["devices/7/log"] == b"seven, new");
    assert_eq!(files.borrow().len(), 2);
}

#[test]
fn a_replayed_hello_gets_an_answer_but_never_a_session() {
    use deltasync_core::machine::{Machine, Poll};
    // The attacker recorded a real client's hello and its first request.
    let files = Files::default();
    files.borrow_mut().insert("f".into(), b"kept".to_vec());
    let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
    let mut real = server(&files, keys());
    run(&mut handshake(KEY), &mut cp, &mut real, &mut sp, &mut net).unwrap();
    let mut hs = handshake(KEY);
    let mut hello = vec![0u8; 256];
    let Ok(Poll::Transmit(n)) = hs.poll(Instant(0), &mut hello) else { panic!("no hello") };
    hello.truncate(n);
    let mut del = Query::new(QueryKind::Delete("f"), PROTOCOL_VERSION, |_| {}, Instant(0));
    // (Batched, it goes out once the machine waits: a step or two on.)
    let n = loop {
        match cp.step::<_, ()>(&mut del, Instant(0)) {
            Ok(Step::Write(n)) => break n,
            Ok(Step::Again) => {}
            other => panic!("no request: {other:?}"),
        }
    };
    let recorded_request = cp.output(n).to_vec();
    // Replayed to a fresh connection: the server answers the hello (it
    // cannot tell a replay), but the request that follows does not open.
    // (A real server's ephemeral key is fresh for every connection.)
    let mut victim =
        deltasync_core::conn::server::ServerConn::new(MemStore(files.clone()), keys(), [8u8; 32], Instant(0));
    let mut vp = pump();
    let replay = [hello, recorded_request.clone()].concat();
    vp.input()[..replay.len()].copy_from_slice(&replay);
    vp.filled(replay.len());
    let err = loop {
        match vp.step::<_, ()>(&mut victim, Instant(0)) {
            Ok(Step::Again | Step::Write(_)) => {}
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, DriveError::Session(SessionError::Protocol(ErrorCode::Tampered))), "{err:?}");
    assert!(std::iter::from_fn(|| victim.next_event()).all(|e| !matches!(e, Event::Authenticated { .. })));
    assert_eq!(victim.key_name(), None);
    assert!(files.borrow()["f"] == b"kept");
}

/// Sends `frames` (each a frame as `frame::encode` writes it, or bytes
/// laid out as one; an empty one: wait for the next message) one after
/// another, then waits; fails on an `Error`, and finishes on a `ListEnd`.
struct Emit(Vec<Vec<u8>>);

/// Stands first in an [`Emit`]'s frames while it waits for a message.
const PAUSED: &[u8] = &[0xee];

impl deltasync_core::machine::Machine for Emit {
    type Output = ();
    fn handle(&mut self, _: Instant, msg: deltasync_core::message::Message<'_>) -> Result<(), SessionError> {
        use deltasync_core::message::Message;
        if self.0.first().is_some_and(|f| f == PAUSED) {
            self.0.remove(0);
        }
        match msg {
            Message::Error(c) => Err(SessionError::Peer(c)),
            Message::ListEnd => {
                self.0 = vec![vec![0xdd]];
                Ok(())
            }
            _ => Ok(()),
        }
    }
    fn poll(
        &mut self,
        _: Instant,
        out: &mut [u8],
    ) -> Result<deltasync_core::machine::Poll<()>, SessionError> {
        use deltasync_core::machine::Poll;
        if self.0 == [vec![0xdd]] {
            return Ok(Poll::Done(()));
        }
        if self.0.is_empty() || self.0[0] == PAUSED {
            return Ok(Poll::Wait(Instant(u64::MAX)));
        }
        let f = self.0.remove(0);
        if f.is_empty() {
            self.0.insert(0, PAUSED.to_vec());
            return Ok(Poll::Wait(Instant(u64::MAX)));
        }
        out[..f.len()].copy_from_slice(&f);
        Ok(Poll::Transmit(f.len()))
    }
}

#[test]
fn what_a_failed_session_had_batched_is_not_sent_for_the_next() {
    use deltasync_core::frame;
    use deltasync_core::message::Message;
    let encode = |m: &Message<'_>| {
        let mut buf = vec![0u8; 4096];
        let n = frame::encode(m, &mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    let files = Files::default();
    files.borrow_mut().insert("f".into(), b"kept".to_vec());
    let mut srv = server(&files, keys());
    let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
    run(&mut handshake(KEY), &mut cp, &mut srv, &mut sp, &mut net).unwrap();
    // Two requests go out in one frame, and their answers come back in
    // one: "f" deleted, "nope" not found. The first answer has the machine
    // batch a third request; the second fails the session before it goes.
    let first = vec![
        encode(&Message::Delete { name: "f" }),
        encode(&Message::Delete { name: "nope" }),
        vec![],
        encode(&Message::Stat { name: "nope" }),
    ];
    let r = run(&mut Emit(first), &mut cp, &mut srv, &mut sp, &mut net);
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::NotFound))))),
        "{r:?}"
    );
    // The connection goes on: the next request is answered, not the
    // failed session's batched one (whose NotFound would end this one).
    let r = run(&mut Emit(vec![encode(&Message::List)]), &mut cp, &mut srv, &mut sp, &mut net);
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn a_batched_frame_whose_later_message_is_garbage_ends_the_session() {
    use deltasync_core::frame;
    use deltasync_core::message::{CAP_BATCH, CAPS, Message};
    let files = Files::default();
    files.borrow_mut().insert("f".into(), b"kept".to_vec());
    let encode = |m: &Message<'_>| {
        let mut buf = vec![0u8; 4096];
        let n = frame::encode(m, &mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    // A request, then bytes laid out as a frame that hold no message:
    // batched, both go in one sealed frame.
    for (caps, tail) in
        [(CAPS, vec![2, 0xff, 0xff]), (CAPS, vec![1, 99]), (CAPS & !CAP_BATCH, vec![2, 0xff, 0xff])]
    {
        let mut srv = server(&files, keys());
        let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
        run(&mut handshake(KEY).announcing(caps), &mut cp, &mut srv, &mut sp, &mut net).unwrap();
        let frames = vec![encode(&Message::Delete { name: "f" }), tail];
        let frames_sent = net.frames.len();
        let r = run(&mut Emit(frames), &mut cp, &mut srv, &mut sp, &mut net);
        let Err(Stop::Server(e)) = r else { panic!("the server went on: {r:?}") };
        assert!(matches!(e, DriveError::Session(SessionError::Protocol(ErrorCode::BadMessage))), "{e:?}");
        // The request before the garbage was handled, in order; batched,
        // the two went in one frame.
        assert!(!files.borrow().contains_key("f"));
        files.borrow_mut().insert("f".into(), b"kept".to_vec());
        let to_server = net.frames[frames_sent..].iter().filter(|(to_server, _)| *to_server).count();
        assert_eq!(to_server, if caps & CAP_BATCH != 0 { 1 } else { 2 }, "caps {caps}");
    }
    // A frame of more than BATCH_MAX bytes holds one message: a request
    // followed by a long one in the same frame is refused before either
    // is handled.
    let mut srv = server(&files, keys());
    let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
    run(&mut handshake(KEY), &mut cp, &mut srv, &mut sp, &mut net).unwrap();
    let zeros = vec![0u8; deltasync_core::driver::BATCH_MAX];
    let (a, b) =
        (encode(&Message::Delete { name: "f" }), encode(&Message::Data { offset: 0, bytes: &zeros }));
    // Frames as `encode` writes them: a LEB128 length, then the message.
    let leb = |mut v: usize| {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            out.push(if v > 0 { b | 0x80 } else { b });
            if v == 0 {
                return out;
            }
        }
    };
    let strip = |f: &[u8]| f[leb(f.len() - 1).len()..].to_vec();
    let both = [strip(&a), strip(&b)].concat();
    let frame = [leb(both.len()), both].concat();
    let r = run(&mut Emit(vec![frame]), &mut cp, &mut srv, &mut sp, &mut net);
    let Err(Stop::Server(e)) = r else { panic!("the server went on: {r:?}") };
    assert!(matches!(e, DriveError::Session(SessionError::Protocol(ErrorCode::BadMessage))), "{e:?}");
    assert!(files.borrow().contains_key("f"), "the request before was handled");
}
