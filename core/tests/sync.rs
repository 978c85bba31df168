//! Client <-> server sessions over the in-memory harness: both directions,
//! every kind of edit, authentication, disconnects and timeouts.

use deltasync_core::access::Access;
use deltasync_core::channel::ClientKey;
use deltasync_core::chunker::{ChunkerKind, PIECE_MAX};
use deltasync_core::conn::server::Event;
use deltasync_core::conn::{Download, Listed, Query, QueryKind, Upload};
use deltasync_core::driver::DriveError;
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::message::{CAP_DELTA, CAPS, Outcome};
use deltasync_core::receiver::{Base, ReceiveStats, Receiver};
use deltasync_core::sender::Sender;
use deltasync_core::sim::*;
use deltasync_core::tree::{FixedTree, Summary, Tree};
use deltasync_core::{Hash, Instant, PROTOCOL_VERSION};
use proptest::prelude::*;

type Keys = Vec<(ClientKey, Access)>;

struct Session {
    server: deltasync_core::conn::server::ServerConn<MemStore, Keys>,
    sp: StdPump,
    cp: StdPump,
    net: Net,
    salt: [u8; 8],
}

fn connect(files: &Files, piece: usize) -> Session {
    connect_announcing(files, piece, CAPS)
}

/// A session whose client announces only `caps`.
fn connect_announcing(files: &Files, piece: usize, caps: u32) -> Session {
    let mut s =
        Session { server: server(files, keys()), sp: pump(), cp: pump(), net: Net::new(), salt: [0; 8] };
    s.net.piece = piece;
    let mut hs = handshake(KEY).announcing(caps);
    s.salt = run(&mut hs, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("handshake");
    s
}

struct Report {
    outcome: Outcome,
    /// Bytes on the wire both ways, framing included (handshake excluded).
    wire: u64,
}

fn upload(s: &mut Session, name: &str, data: &[u8], kind: ChunkerKind) -> Report {
    let before = s.cp.sent + s.cp.received;
    let tree = Tree::build(data, kind);
    let sender = Sender::new(&tree, data, tree.summary(), s.salt, s.net.clock);
    let mut op = Upload::new(name, sender);
    let outcome = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
    Report { outcome, wire: s.cp.sent + s.cp.received - before }
}

fn download(s: &mut Session, name: &str, local: Option<&[u8]>) -> (Report, Vec<u8>) {
    download_deltas(s, name, local, true)
}

/// A download that asks for deltas within chunks or not.
fn download_deltas(s: &mut Session, name: &str, local: Option<&[u8]>, deltas: bool) -> (Report, Vec<u8>) {
    let before = s.cp.sent + s.cp.received;
    let tree = local.map(|d| Tree::build(d, ChunkerKind::Cdc));
    let base = local.zip(tree.as_ref()).map(|(d, t)| Base { tree: t, source: d });
    let mut op = Download::new(name, s.salt, base, Vec::new(), s.net.clock).deltas(deltas).fine(deltas);
    let outcome = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("download");
    let (out, tree) = op.take_result().unwrap();
    if outcome == Outcome::Written {
        assert_eq!(tree.unwrap().summary().file_hash, Hash::of(&out));
    }
    (Report { outcome, wire: s.cp.sent + s.cp.received - before }, out)
}

#[derive(Clone, Debug)]
enum Edit {
    Overwrite { at: usize, bytes: Vec<u8> },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Append(Vec<u8>),
    Truncate(usize),
    Move { from: usize, len: usize, to: usize },
    Zeros(usize),
}

fn apply(old: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = old.to_vec();
    for e in edits {
        let n = v.len();
        match e {
            Edit::Overwrite { at, bytes } => {
                let at = at % (n + 1);
                let end = (at + bytes.len()).min(n);
                v[at..end].copy_from_slice(&bytes[..end - at]);
            }
            Edit::Insert { at, bytes } => {
                let at = at % (n + 1);
                v.splice(at..at, bytes.iter().copied());
            }
            Edit::Delete { at, len } => {
                let at = at % (n + 1);
                let end = (at + len).min(n);
                v.drain(at..end);
            }
            Edit::Append(bytes) => v.extend_from_slice(bytes),
            Edit::Truncate(len) => v.truncate(len % (n + 1)),
            Edit::Move { from, len, to } => {
                let from = from % (n + 1);
                let end = (from + len).min(n);
                let piece: Vec<u8> = v.drain(from..end).collect();
                let to = to % (v.len() + 1);
                v.splice(to..to, piece);
            }
            Edit::Zeros(len) => v = vec![0u8; *len],
        }
    }
    v
}

fn edit() -> impl Strategy<Value = Edit> {
    let bytes = proptest::collection::vec(any::<u8>(), 1..9000);
    prop_oneof![
        (any::<usize>(), bytes.clone()).prop_map(|(at, bytes)| Edit::Overwrite { at, bytes }),
        (any::<usize>(), bytes.clone()).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1usize..20_000).prop_map(|(at, len)| Edit::Delete { at, len }),
        bytes.prop_map(Edit::Append),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..30_000, any::<usize>()).prop_map(|(from, len, to)| Edit::Move {
            from,
            len,
            to
        }),
        (0usize..100_000).prop_map(Edit::Zeros),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any old file, any edits: an upload and a download reproduce the new
    /// file byte for byte.
    #[test]
    fn any_edit_round_trips_both_ways(
        seed in any::<u64>(),
        len in 0usize..300_000,
        edits in proptest::collection::vec(edit(), 1..4),
        piece in prop_oneof![Just(usize::MAX), 1usize..5000],
        kind in prop_oneof![
            Just(ChunkerKind::Cdc),
            Just(ChunkerKind::CLASSIC),
            Just(ChunkerKind::CdcScaled(1)),
        ],
    ) {
        let old = random_bytes(seed, len);
        let new = apply(&old, &edits);

        // Upload: the server holds `old`, the client sends `new`.
        let files = Files::default();
        files.borrow_mut().insert("f".into(), old.clone());
        let mut s = connect(&files, piece);
        let r = upload(&mut s, "f", &new, kind);
        prop_assert_ne!(r.outcome, Outcome::Integrity);
        prop_assert!(files.borrow()["f"] == new, "upload rebuilt a different file");

        // Download: the server holds `new`, the client has `old`.
        let (r, got) = download(&mut s, "f", Some(&old));
        prop_assert_ne!(r.outcome, Outcome::Integrity);
        prop_assert!(got == new || r.outcome == Outcome::Unchanged, "download rebuilt a different file");
        if r.outcome == Outcome::Unchanged {
            prop_assert!(old == new);
        }
    }
}

#[test]
fn a_small_edit_costs_little_and_an_unchanged_file_almost_nothing() {
    let old = random_bytes(7, 8 << 20);
    let mut new = old.clone();
    new[4 << 20..(4 << 20) + 4096].fill(0xAB);
    let files = Files::default();
    files.borrow_mut().insert("big".into(), old.clone());
    let mut s = connect(&files, usize::MAX);

    let r = upload(&mut s, "big", &new, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(r.wire < 24 * 1024, "4 KiB overwrite cost {} bytes", r.wire);

    let r = upload(&mut s, "big", &new, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert!(r.wire < 200, "unchanged upload cost {} bytes", r.wire);

    let (r, got) = download(&mut s, "big", Some(&old));
    assert_eq!(r.outcome, Outcome::Written);
    assert!(got == new);
    assert!(r.wire < 24 * 1024, "4 KiB download delta cost {} bytes", r.wire);
}

/// `n` one-byte edits spread evenly over `data`.
fn scattered(data: &[u8], n: usize) -> Vec<u8> {
    let mut v = data.to_vec();
    for k in 0..n {
        let at = (2 * k + 1) * v.len() / (2 * n);
        v[at] ^= 0x5a;
    }
    v
}

/// Uploads `new` over `old` from a client announcing `caps`; checks it is
/// stored byte for byte and returns its bytes on the wire.
fn upload_over(old: &[u8], new: &[u8], caps: u32) -> u64 {
    let files = Files::default();
    files.borrow_mut().insert("f".into(), old.to_vec());
    let mut s = connect_announcing(&files, usize::MAX, caps);
    let r = upload(&mut s, "f", new, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(files.borrow()["f"] == new, "upload rebuilt a different file");
    r.wire
}

#[test]
fn a_byte_changed_in_a_chunk_costs_a_piece_not_the_chunk_both_ways() {
    let old = random_bytes(21, 4 << 20);
    let new = scattered(&old, 32);
    // Uploads: the server asks for pieces only of a client that answers
    // them (CAP_DELTA).
    let wire = [CAPS, CAPS & !CAP_DELTA].map(|caps| upload_over(&old, &new, caps));
    // 32 chunks of 4 KiB on average re-sent whole, against pieces of 256.
    assert!(wire[0] * 2 < wire[1], "upload: {} bytes with deltas, {} without", wire[0], wire[1]);
    // Downloads, asking for deltas or not.
    let files = Files::default();
    files.borrow_mut().insert("f".into(), new.clone());
    let mut s = connect(&files, usize::MAX);
    let mut down = [0u64; 2];
    for (i, deltas) in [true, false].into_iter().enumerate() {
        let (r, got) = download_deltas(&mut s, "f", Some(&old), deltas);
        assert_eq!(r.outcome, Outcome::Written);
        assert!(got == new, "download rebuilt a different file");
        down[i] = r.wire;
    }
    assert!(down[0] * 2 < down[1], "download: {} bytes with deltas, {} without", down[0], down[1]);
    println!("upload {wire:?}, download {down:?}");
}

#[test]
fn a_byte_changed_costs_its_fine_pieces_not_its_piece_both_ways() {
    use deltasync_core::message::CAP_FINE;
    let old = random_bytes(22, 4 << 20);
    let new = scattered(&old, 32);
    // Uploads: a server asks for fine pieces only of a client that
    // announced CAP_FINE.
    let wire = [CAPS, CAPS & !CAP_FINE].map(|caps| upload_over(&old, &new, caps));
    // Downloads from a server that announced it, or from one that did not.
    let mut down = [0u64; 2];
    for (i, caps) in [CAPS, CAPS & !CAP_FINE].into_iter().enumerate() {
        let files = Files::default();
        files.borrow_mut().insert("f".into(), new.clone());
        let mut s = connect_announcing(&files, usize::MAX, caps);
        let fine = caps & CAP_FINE != 0;
        let tree = Tree::build(&old, ChunkerKind::Cdc);
        let base = Base { tree: &tree, source: &old[..] };
        let mut op = Download::new("f", s.salt, Some(base), Vec::new(), s.net.clock).deltas(true).fine(fine);
        let outcome = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("download");
        assert_eq!(outcome, Outcome::Written);
        assert!(op.take_result().unwrap().0 == new, "download rebuilt a different file");
        down[i] = s.cp.sent + s.cp.received;
    }
    println!("upload {wire:?}, download {down:?} (with fine pieces, without)");
    // Pieces of 64 to 1,024 bytes whose cuts are slow to fall in place
    // again after a change, against fine pieces around the changed byte.
    assert!(wire[0] * 3 < wire[1] * 2, "upload: {} bytes with fine pieces, {} without", wire[0], wire[1]);
    assert!(down[0] * 3 < down[1] * 2, "download: {} bytes with fine pieces, {} without", down[0], down[1]);
}

#[test]
fn a_grown_last_chunk_asked_as_a_suffix_is_not_cut_into_fine_pieces() {
    use deltasync_core::chunker::for_each_chunk;
    // An old version whose last chunk is 500 bytes (no chunk is cut
    // before 2 KiB).
    let base = random_bytes(61, 300_000);
    let mut lens = Vec::new();
    for_each_chunk(ChunkerKind::Cdc, &base, |c| lens.push(c.len()));
    let boundary: usize = lens[..lens.len() - 1].iter().sum();
    let old = base[..boundary + 500].to_vec();
    // A byte changed in the middle (so runs are compared piece by piece),
    // the last chunk's first bytes changed and 300 bytes appended: the
    // last run is asked as the old last chunk's suffix, and refused.
    let mut new = old.clone();
    new[100_000] ^= 0x55;
    new[boundary..boundary + 16].iter_mut().for_each(|b| *b = !*b);
    new.extend_from_slice(&random_bytes(62, 300));
    let files = Files::default();
    files.borrow_mut().insert("f".into(), old.clone());
    let mut s = connect(&files, usize::MAX);
    let r = upload(&mut s, "f", &new, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(files.borrow()["f"] == new, "upload rebuilt a different file");
    files.borrow_mut().insert("f".into(), new.clone());
    let (r, got) = download(&mut s, "f", Some(&old));
    assert_eq!(r.outcome, Outcome::Written);
    assert!(got == new, "download rebuilt a different file");
}

/// The payload of one frame `encode` wrote.
fn payload(frame: &[u8]) -> &[u8] {
    let mut at = 0;
    while frame[at] & 0x80 != 0 {
        at += 1;
    }
    &frame[at + 1..]
}

/// A receiver holding `old` asking (with deltas) for `new` of an honest
/// sender whose `Pieces` pass through `meddle` first: the receiver's end,
/// and the new tree if it accepted one.
fn meddled_sync(
    old: &[u8],
    new: &[u8],
    meddle: impl FnMut(u64, &[(u64, u64)]) -> Vec<(u64, u64)>,
) -> (Result<Outcome, SessionError>, Option<Tree>) {
    meddled_sync_as(old, new, false, meddle)
}

/// [`meddled_sync`]; with `fine`, the receiver also compares changed pieces
/// by their fine pieces, and `meddle` changes the `Fine` answers instead
/// (with the offset asked, ids widened).
fn meddled_sync_as(
    old: &[u8],
    new: &[u8],
    fine: bool,
    mut meddle: impl FnMut(u64, &[(u64, u64)]) -> Vec<(u64, u64)>,
) -> (Result<Outcome, SessionError>, Option<Tree>) {
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::{Message, PackedEntry, pack_entry, pack_fine, unpack_entries, unpack_fine};
    let (salt, now) = ([5u8; 8], Instant(0));
    let (old_tree, new_tree) = (Tree::build(old, ChunkerKind::Cdc), Tree::build(new, ChunkerKind::Cdc));
    let base = Base { tree: &old_tree, source: old };
    let mut rx =
        Receiver::new(new_tree.summary(), salt, Some(base), Vec::new(), now).unwrap().deltas(true).fine(fine);
    let mut tx = Sender::new(&new_tree, new, new_tree.summary(), salt, now);
    let (mut buf, mut packed) = (vec![0u8; 80 * 1024], vec![0u8; 64 * 1024]);
    let mut asked = std::collections::VecDeque::new();
    for _ in 0..100_000 {
        match rx.poll(now, &mut buf) {
            Ok(Poll::Done(o)) => return (Ok(o), rx.into_parts().1),
            Ok(Poll::Transmit(n)) => {
                let m = Message::decode(payload(&buf[..n])).unwrap();
                if let Message::GetFine { offset, .. } = m {
                    asked.push_back(offset);
                }
                tx.handle(now, m).unwrap()
            }
            Ok(Poll::Wait(_)) => {}
            Err(e) => return (Err(e), None),
        }
        let Ok(Poll::Transmit(n)) = tx.poll(now, &mut buf) else { continue };
        let r = match Message::decode(payload(&buf[..n])).unwrap() {
            Message::Fine { packed: p } if fine => {
                let listed: Vec<(u64, u64)> =
                    unpack_fine(p).unwrap().map(|(id, n)| (u64::from(id), n)).collect();
                let mut pos = 0;
                for (id, len) in meddle(asked.pop_front().unwrap(), &listed) {
                    pack_fine(&mut packed, &mut pos, id as u32, len as usize).unwrap();
                }
                rx.handle(now, Message::Fine { packed: &packed[..pos] })
            }
            Message::Pieces { offset, last, packed: p } if !fine => {
                let listed: Vec<(u64, u64)> =
                    unpack_entries(p).map(|e| e.map(|e| (e.short, e.len)).unwrap()).collect();
                let mut pos = 0;
                for (short, len) in meddle(offset, &listed) {
                    pack_entry(&mut packed, &mut pos, PackedEntry { short, len }).unwrap();
                }
                rx.handle(now, Message::Pieces { offset, last, packed: &packed[..pos] })
            }
            m => rx.handle(now, m),
        };
        if let Err(e) = r {
            return (Err(e), None);
        }
    }
    panic!("the sync did not end");
}

#[test]
fn damaged_or_lying_pieces_are_refused_and_nothing_is_accepted() {
    let old = random_bytes(31, 200_000);
    let new = scattered(&old, 4);
    let bad = Err(SessionError::Protocol(ErrorCode::BadMessage));
    // Honest: accepted, byte for byte.
    let (r, tree) = meddled_sync(&old, &new, |_, p| p.to_vec());
    assert_eq!(r, Ok(Outcome::Written));
    assert_eq!(tree.unwrap().summary().file_hash, Hash::of(&new));
    // A piece longer than a piece can be (the first ones joined, the range
    // still covered exactly).
    let (r, tree) = meddled_sync(&old, &new, |_, p| {
        let k = (1..=p.len()).find(|&k| p[..k].iter().map(|e| e.1).sum::<u64>() > PIECE_MAX as u64).unwrap();
        let mut out = vec![(p[0].0, p[..k].iter().map(|e| e.1).sum())];
        out.extend_from_slice(&p[k..]);
        out
    });
    assert_eq!(r, bad);
    assert!(tree.is_none());
    // Pieces shorter than the chunker cuts them, anywhere but at a range's
    // end (a run of 64 KiB listed as 65,536 one-byte pieces would be as
    // many segments to hold and copy).
    let (r, tree) = meddled_sync(&old, &new, |_, p| {
        let (id, len) = p[0];
        let mut out = vec![(id, 1), (id, len - 1)];
        out.extend_from_slice(&p[1..]);
        out
    });
    assert_eq!(r, bad);
    assert!(tree.is_none());
    // Pieces that do not cover the range asked, or cover more.
    for cut in [true, false] {
        let (r, tree) = meddled_sync(&old, &new, |_, p| {
            let mut p = p.to_vec();
            if cut {
                p.pop();
            } else {
                p.push((1, 64));
            }
            p
        });
        assert_eq!(r, bad, "cut {cut}");
        assert!(tree.is_none());
    }
    // Pieces whose ids claim the old bytes where they changed: the copied
    // old bytes fail the rebuilt tree's check.
    let (r, tree) = meddled_sync(&old, &new, |offset, p| {
        let mut at = offset;
        p.iter()
            .map(|&(_, len)| {
                let id = deltasync_core::hash::piece_id(&[5; 8], &old[at as usize..(at + len) as usize]);
                at += len;
                (id, len)
            })
            .collect()
    });
    assert_eq!(r, Ok(Outcome::Integrity));
    assert!(tree.is_none());
}

#[test]
fn damaged_or_lying_fine_pieces_are_refused_and_nothing_is_accepted() {
    use deltasync_core::chunker::{FINE_MAX, FINE_MIN};
    let old = random_bytes(33, 200_000);
    let new = scattered(&old, 4);
    let bad = Err(SessionError::Protocol(ErrorCode::BadMessage));
    // Honest: accepted, byte for byte, with fine pieces listed.
    let mut listed = 0;
    let (r, tree) = meddled_sync_as(&old, &new, true, |_, p| {
        listed += p.len();
        p.to_vec()
    });
    assert_eq!(r, Ok(Outcome::Written));
    assert_eq!(tree.unwrap().summary().file_hash, Hash::of(&new));
    assert!(listed > 0, "no fine pieces were asked for");
    // A fine piece longer than the chunker cuts them (the first ones
    // joined, the range still covered exactly).
    let (r, tree) = meddled_sync_as(&old, &new, true, |_, p| {
        let k = (1..=p.len()).find(|&k| p[..k].iter().map(|e| e.1).sum::<u64>() > FINE_MAX as u64).unwrap();
        let mut out = vec![(p[0].0, p[..k].iter().map(|e| e.1).sum())];
        out.extend_from_slice(&p[k..]);
        out
    });
    assert_eq!(r, bad);
    assert!(tree.is_none());
    // One shorter than the chunker cuts them, but at the range's end.
    let (r, tree) = meddled_sync_as(&old, &new, true, |_, p| {
        let (id, len) = p[0];
        assert!(len > FINE_MIN as u64);
        let mut out = vec![(id, 1), (id, len - 1)];
        out.extend_from_slice(&p[1..]);
        out
    });
    assert_eq!(r, bad);
    assert!(tree.is_none());
    // Fine pieces that do not cover the range, or cover more; an empty one.
    for how in 0..3 {
        let (r, tree) = meddled_sync_as(&old, &new, true, |_, p| {
            let mut p = p.to_vec();
            match how {
                0 => drop(p.pop()),
                1 => p.push((1, 20)),
                _ => p.insert(0, (1, 0)),
            }
            p
        });
        assert_eq!(r, bad, "case {how}");
        assert!(tree.is_none());
    }
    // Ids that claim the old bytes where they changed: what is rebuilt
    // fails its chunk's check.
    let (r, tree) = meddled_sync_as(&old, &new, true, |offset, p| {
        let mut at = offset as usize;
        p.iter()
            .map(|&(_, len)| {
                let id = deltasync_core::message::fine_id(&[5; 8], &old[at..at + len as usize]);
                at += len as usize;
                (u64::from(id), len)
            })
            .collect()
    });
    assert_eq!(r, Ok(Outcome::Integrity));
    assert!(tree.is_none());
}

/// Old bytes that count what is read of them.
struct Counted<'a>(&'a [u8], std::rc::Rc<std::cell::Cell<u64>>);

impl deltasync_core::source::Source for Counted<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), deltasync_core::source::IoFailed> {
        self.1.set(self.1.get() + buf.len() as u64);
        deltasync_core::source::Source::read_at(&mut self.0, offset, buf)
    }
}

/// What an honest sync of `old` to `new` with deltas cost the receiver:
/// its outcome, the requests it sent (by name), the old bytes it read
/// beyond those it reused, and its counters.
fn watched_sync(old: &[u8], new: &[u8]) -> (Outcome, Vec<&'static str>, u64, ReceiveStats) {
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::Message;
    let (salt, now) = ([5u8; 8], Instant(0));
    let (old_tree, new_tree) = (Tree::build(old, ChunkerKind::Cdc), Tree::build(new, ChunkerKind::Cdc));
    let read = std::rc::Rc::new(std::cell::Cell::new(0));
    let base = Base { tree: &old_tree, source: Counted(old, read.clone()) };
    let mut rx = Receiver::new(new_tree.summary(), salt, Some(base), Vec::new(), now).unwrap().deltas(true);
    let mut tx = Sender::new(&new_tree, new, new_tree.summary(), salt, now);
    let mut buf = vec![0u8; 80 * 1024];
    let mut asked = Vec::new();
    for _ in 0..100_000 {
        match rx.poll(now, &mut buf).unwrap() {
            Poll::Done(o) => {
                let stats = rx.stats();
                assert!(o != Outcome::Written || rx.into_parts().0 == new);
                return (o, asked, read.get() - stats.reused_bytes, stats);
            }
            Poll::Transmit(n) => {
                let m = Message::decode(payload(&buf[..n])).unwrap();
                asked.push(match m {
                    Message::GetSuffix { .. } => "GetSuffix",
                    Message::GetPieces { .. } => "GetPieces",
                    Message::GetData { .. } => "GetData",
                    Message::GetChildren { .. } => "GetChildren",
                    _ => "other",
                });
                tx.handle(now, m).unwrap();
            }
            Poll::Wait(_) => {}
        }
        if let Ok(Poll::Transmit(n)) = tx.poll(now, &mut buf) {
            rx.handle(now, Message::decode(payload(&buf[..n])).unwrap()).unwrap();
        }
    }
    panic!("the sync did not end");
}

#[test]
fn the_old_bytes_compared_with_changed_chunks_stay_near_the_changed_ones() {
    // A changed chunk is compared with the old bytes around where it was:
    // as many as it holds and a piece more on each side, not 32 KiB
    // whatever its size (a sender changing every other chunk would have
    // the receiver hash 16 times the file).
    let old = random_bytes(41, 2 << 20);
    let new = scattered(&old, 48);
    let (o, asked, extra, stats) = watched_sync(&old, &new);
    assert_eq!(o, Outcome::Written);
    let leaves = |data: &[u8]| {
        use deltasync_core::tree::TreeView;
        let t = Tree::build(data, ChunkerKind::Cdc);
        (0..t.level_len(0)).map(|i| t.entry(0, i).unwrap()).map(|e| (e.id, e.len)).collect::<Vec<_>>()
    };
    let old_ids: std::collections::HashSet<_> = leaves(&old).into_iter().map(|e| e.0).collect();
    let changed: Vec<u64> =
        leaves(&new).into_iter().filter(|e| !old_ids.contains(&e.0)).map(|e| e.1).collect();
    let bound = 2 * changed.iter().map(|&len| len + PIECE_MAX as u64).sum::<u64>();
    assert!(asked.contains(&"GetPieces"), "{asked:?}");
    assert!(
        extra <= bound,
        "{extra} old bytes read beyond those reused, for {} changed chunks",
        changed.len()
    );
    assert!(stats.literal_bytes < 48 * 2 * PIECE_MAX as u64, "{stats:?}");
}

#[test]
fn a_refused_probe_is_not_asked_again() {
    // A small file that grew, but not at its end: the probe (its old bytes
    // as the new start) is refused, and the walk that follows does not ask
    // the same again.
    let old = random_bytes(42, 3000);
    let mut new = old.clone();
    new[0] ^= 1;
    new.extend_from_slice(&random_bytes(43, 1000));
    let (o, asked, _, _) = watched_sync(&old, &new);
    assert_eq!(o, Outcome::Written);
    assert_eq!(asked.iter().filter(|&&a| a == "GetSuffix").count(), 1, "{asked:?}");
    // Appended to: one probe, and only the new bytes come.
    let mut grown = old.clone();
    grown.extend_from_slice(&random_bytes(44, 1000));
    let (o, asked, _, stats) = watched_sync(&old, &grown);
    assert_eq!(o, Outcome::Written);
    assert_eq!(asked, ["GetSuffix"]);
    assert_eq!(stats.literal_bytes, 1000);
}

#[test]
fn a_receiver_asking_for_more_deltas_than_the_file_holds_is_refused() {
    // Each refused GetSuffix costs its sender the hash of up to 64 KiB and
    // its receiver a few bytes: a sender hashes no more for deltas than an
    // honest receiver could ask (the file's pieces, the fine pieces of at
    // most all of them, and two suffixes).
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::{DELTA_MAX, Message};
    let data = random_bytes(45, 200_000);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    let now = Instant(0);
    let mut tx = Sender::new(&tree, data.as_slice(), tree.summary(), [5; 8], now);
    let mut buf = vec![0u8; 80 * 1024];
    let ask = Message::GetSuffix { offset: 0, len: DELTA_MAX + 1, have: DELTA_MAX, id: 1 };
    let mut answered = 0u64;
    let refused = loop {
        if let Err(e) = tx.handle(now, ask) {
            break e;
        }
        assert!(matches!(tx.poll(now, &mut buf), Ok(Poll::Transmit(_))));
        answered += 1;
        assert!(answered < 100, "never refused");
    };
    assert_eq!(refused, SessionError::Protocol(ErrorCode::TooManyRequests));
    assert_eq!(answered, (2 * 200_000 + 2 * DELTA_MAX) / DELTA_MAX);
}

/// An old version whose bytes an output can copy by itself.
struct Located(Vec<u8>);

impl deltasync_core::source::Source for Located {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), deltasync_core::source::IoFailed> {
        deltasync_core::source::Source::read_at(&mut self.0.as_slice(), offset, buf)
    }
    fn locate(&self, offset: u64, _len: u64) -> Option<(&dyn std::any::Any, u64)> {
        Some((&self.0, offset))
    }
}

/// An output that copies located ranges itself, and whose owner checks
/// the file's SHA-256 when `checked`.
#[derive(Default)]
struct Copying {
    data: Vec<u8>,
    copied: u64,
    checked: bool,
}

impl deltasync_core::source::Output for Copying {
    fn write(&mut self, data: &[u8]) -> Result<(), deltasync_core::source::IoFailed> {
        self.data.extend_from_slice(data);
        Ok(())
    }
    fn copy_from(
        &mut self,
        src: &dyn std::any::Any,
        offset: u64,
        len: u64,
    ) -> Result<bool, deltasync_core::source::IoFailed> {
        let Some(v) = src.downcast_ref::<Vec<u8>>() else { return Ok(false) };
        self.data.extend_from_slice(&v[offset as usize..(offset + len) as usize]);
        self.copied += len;
        Ok(true)
    }
    fn hashes_file(&self) -> bool {
        self.checked
    }
}

#[test]
fn an_output_that_checks_the_file_hash_itself_gets_reused_ranges_to_copy() {
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::Message;
    let old = random_bytes(41, 1 << 20);
    let mut new = old.clone();
    new[500_000..504_096].iter_mut().for_each(|b| *b ^= 0x33);
    let (old_tree, new_tree) = (Tree::build(&old, ChunkerKind::Cdc), Tree::build(&new, ChunkerKind::Cdc));
    for checked in [true, false] {
        let (salt, now) = ([6u8; 8], Instant(0));
        let base = Base { tree: &old_tree, source: Located(old.clone()) };
        let out = Copying { checked, ..Copying::default() };
        let mut rx = Receiver::new(new_tree.summary(), salt, Some(base), out, now).unwrap();
        let mut tx = Sender::new(&new_tree, &new[..], new_tree.summary(), salt, now);
        let mut buf = vec![0u8; 80 * 1024];
        let outcome = loop {
            match rx.poll(now, &mut buf).unwrap() {
                Poll::Done(o) => break o,
                Poll::Transmit(n) => tx.handle(now, Message::decode(payload(&buf[..n])).unwrap()).unwrap(),
                Poll::Wait(_) => {}
            }
            if let Ok(Poll::Transmit(n)) = tx.poll(now, &mut buf) {
                rx.handle(now, Message::decode(payload(&buf[..n])).unwrap()).unwrap();
            }
        };
        assert_eq!(outcome, Outcome::Written);
        let (out, tree) = rx.into_parts();
        assert!(out.data == new, "rebuilt a different file (checked {checked})");
        // The new tree carries the offer's SHA-256 either way: computed, or
        // the claim the output's owner checks.
        assert_eq!(tree.unwrap().summary().file_hash, Hash::of(&new));
        if checked {
            assert!(out.copied > (new.len() as u64) * 9 / 10, "only {} bytes copied", out.copied);
        } else {
            assert_eq!(out.copied, 0, "bytes hashed as they are rebuilt cannot be copied unseen");
        }
    }
}

#[test]
fn an_append_sends_the_appended_bytes_and_little_else() {
    let old = random_bytes(22, 20_000);
    let mut new = old.clone();
    new.extend_from_slice(&random_bytes(23, 924));
    let files = Files::default();
    files.borrow_mut().insert("log".into(), old.clone());
    let mut s = connect(&files, usize::MAX);
    let r = upload(&mut s, "log", &new, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(files.borrow()["log"] == new);
    println!("append of 924 bytes: {} bytes on the wire", r.wire);
    assert!(r.wire <= 924 + 300, "an append of 924 bytes cost {} bytes", r.wire);
    // A last chunk that does not extend the old one is sent whole.
    let mut other = new.clone();
    let n = other.len();
    other[n - 1000] ^= 1;
    let r = upload(&mut s, "log", &other, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(files.borrow()["log"] == other);
}

#[test]
fn an_offer_chunked_too_finely_for_its_size_is_refused() {
    // The tree a server would have to hold for 2 GiB in 4 KiB chunks is not
    // bounded; the offer alone decides, before anything is read or written.
    let files = Files::default();
    files.borrow_mut().insert("big".into(), random_bytes(14, 10_000));
    let mut s = connect(&files, usize::MAX);
    let data = random_bytes(15, 4096);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    let offer = Summary { size: 2 << 30, ..tree.summary() };
    let sender = Sender::new(&tree, &data[..], offer, s.salt, s.net.clock);
    let mut op = Upload::new("big", sender);
    let err = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap_err();
    assert!(
        matches!(err, Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Unsupported)))),
        "{err:?}"
    );
    assert_eq!(files.borrow()["big"].len(), 10_000, "the stored version is untouched");
    // The same connection still serves a sane offer.
    let r = upload(&mut s, "big", &data, ChunkerKind::for_size(data.len() as u64));
    assert_eq!(r.outcome, Outcome::Written);
    assert!(files.borrow()["big"] == data);
}

#[test]
fn text_crosses_compressed_both_ways_and_noise_as_it_is() {
    let text = log_lines(16, 2 << 20);
    let noise = random_bytes(17, 2 << 20);
    let files = Files::default();
    let mut s = connect(&files, 777);
    for (name, data) in [("log", &text), ("noise", &noise)] {
        let before = s.cp.sent + s.cp.received;
        let tree = Tree::build(data, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, &data[..], tree.summary(), s.salt, s.net.clock).compress(true);
        let mut op = Upload::new(name, sender);
        assert_eq!(run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap(), Outcome::Written);
        assert_eq!(op.sender().literal_bytes(), data.len() as u64, "literal bytes count the raw file bytes");
        let up = s.cp.sent + s.cp.received - before;
        assert!(files.borrow()[name] == *data, "{name} stored exactly");
        // The server compresses a download for a client that announced zstd.
        let (down, got) = download(&mut s, name, None);
        assert!(got == *data, "{name} downloaded exactly");
        let len = data.len() as u64;
        if name == "log" {
            assert!(up < len / 3 && down.wire < len / 3, "{name}: {up} up, {} down for {len}", down.wire);
        } else {
            assert!(up < len + len / 50 && down.wire < len + len / 50, "{name}: {up} up, {} down", down.wire);
        }
    }
    // Not asked for: bytes go as they are (in a directory of its own:
    // beside `log`, the server would take that as the upload's base).
    let r = upload(&mut s, "plain/text", &text, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(r.wire >= text.len() as u64, "{} wire bytes", r.wire);
}

#[test]
fn a_damaged_or_oversized_compressed_frame_is_a_bad_message() {
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::Message;
    use deltasync_core::receiver::Receiver;
    let data = log_lines(18, 4000);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    let packed = zstd::bulk::compress(&data, 3).unwrap();
    let cases: [(u32, &[u8]); 3] = [
        (data.len() as u32, b"not a zstd frame"),
        // Decompresses to more than it claims.
        (100, &packed),
        (0, &packed),
    ];
    for (raw, bytes) in cases {
        let mut rx: Receiver<Tree, Vec<u8>, Vec<u8>> =
            Receiver::new(tree.summary(), [0; 8], None, Vec::new(), Instant(0)).unwrap();
        let mut buf = vec![0u8; 1 << 17];
        // Nothing to reuse: it asks for the whole file.
        assert!(matches!(rx.poll(Instant(0), &mut buf).unwrap(), Poll::Transmit(_)));
        let err = rx.handle(Instant(0), Message::DataZ { offset: 0, raw, bytes }).unwrap_err();
        assert_eq!(err, SessionError::Protocol(ErrorCode::BadMessage), "raw {raw}");
    }
    // The same frame, claimed right, is taken.
    let mut rx: Receiver<Tree, Vec<u8>, Vec<u8>> =
        Receiver::new(tree.summary(), [0; 8], None, Vec::new(), Instant(0)).unwrap();
    let mut buf = vec![0u8; 1 << 17];
    rx.poll(Instant(0), &mut buf).unwrap();
    rx.handle(Instant(0), Message::DataZ { offset: 0, raw: data.len() as u32, bytes: &packed }).unwrap();
    assert!(rx.progress() == data.len() as u64);
}

#[test]
fn a_first_upload_sends_the_file_once() {
    let data = random_bytes(8, 3 << 20);
    let files = Files::default();
    let mut s = connect(&files, usize::MAX);
    let r = upload(&mut s, "new", &data, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(r.wire < data.len() as u64 * 101 / 100, "{} wire bytes for {}", r.wire, data.len());
    assert!(files.borrow()["new"] == data);
}

#[test]
fn an_offer_without_the_file_hash_gets_it_from_the_server() {
    let old = random_bytes(12, 1 << 20);
    let mut new = old.clone();
    new[1000] ^= 1;
    let files = Files::default();
    let mut s = connect(&files, 5000);
    let mut offer = |data: &[u8], file_hash: Option<Hash>| {
        let tree = Tree::build(data, ChunkerKind::Cdc);
        let summary = Summary { file_hash: file_hash.unwrap_or(Hash::UNKNOWN), ..tree.summary() };
        let sender = Sender::new(&tree, data, summary, s.salt, s.net.clock);
        let mut op = Upload::new("f", sender);
        let o = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
        (o, op.sender().reported_hash())
    };
    assert_eq!(offer(&old, None), (Outcome::Written, Some(Hash::of(&old))));
    assert_eq!(offer(&new, None), (Outcome::Written, Some(Hash::of(&new))));
    assert_eq!(offer(&new, None), (Outcome::Unchanged, Some(Hash::of(&new))));
    // A hash the client did send is checked, and not sent back.
    assert_eq!(offer(&old, Some(Hash::of(b"not this file"))), (Outcome::Integrity, None));
    assert!(files.borrow()["f"] == new, "a failed upload keeps the old version");
    assert_eq!(offer(&old, Some(Hash::of(&old))), (Outcome::Written, None));
    assert!(files.borrow()["f"] == old);
}

#[test]
fn a_whole_version_indexed_by_the_store_is_still_checked() {
    // With no old version the store indexes the upload itself; a wrong
    // root, and a wrong whole-file hash, must still be refused.
    let data = random_bytes(13, 200_000);
    let files = Files::default();
    let mut s = connect(&files, 3000);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    assert_eq!(upload(&mut s, "m", &data, ChunkerKind::Cdc).outcome, Outcome::Written);
    let lies = [
        (Summary { root: Hash::of(b"another root"), ..tree.summary() }, Ok(Outcome::Integrity)),
        (Summary { file_hash: Hash::of(b"another file"), ..tree.summary() }, Err(ErrorCode::Integrity)),
    ];
    for (summary, want) in lies {
        let sender = Sender::new(&tree, &data[..], summary, s.salt, s.net.clock);
        let mut op = Upload::new("n", sender);
        let got = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).map_err(|e| match e {
            Stop::Client(DriveError::Session(SessionError::Peer(c))) => c,
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(got, want);
        assert!(!files.borrow().contains_key("n"), "nothing published");
    }
    assert_eq!(upload(&mut s, "n", &data, ChunkerKind::Cdc).outcome, Outcome::Written);
    assert!(files.borrow()["n"] == data);
}

#[test]
fn a_device_sender_without_alloc_uploads_and_appends() {
    let files = Files::default();
    let mut s = connect(&files, 700);
    let mut log = random_bytes(11, 20_000);
    for round in 0..3 {
        let (summary, tree) = FixedTree::<64>::build(&log, ChunkerKind::Cdc).unwrap();
        let sender = Sender::new(&tree, &log[..], summary, s.salt, Instant(0));
        let mut op = Upload::new("devices/7/log", sender);
        let o = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
        assert_eq!(o, Outcome::Written, "round {round}");
        assert!(files.borrow()["devices/7/log"] == log);
        log.extend_from_slice(&random_bytes(round, 500));
    }
}

#[test]
fn list_stat_delete() {
    let files = Files::default();
    files.borrow_mut().insert("a".into(), b"hello".to_vec());
    files.borrow_mut().insert("d/b".into(), vec![1; 10]);
    let mut s = connect(&files, usize::MAX);
    let mut names = Vec::new();
    let mut q = Query::new(
        QueryKind::List,
        PROTOCOL_VERSION,
        |i| match i {
            Listed::File(f) => names.push((f.name.to_string(), f.size)),
            Listed::Partial(_) | Listed::Entry(_) => panic!("a plain listing has no partials or entries"),
        },
        Instant(0),
    );
    run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
    assert_eq!(names, vec![("a".to_string(), 5), ("d/b".to_string(), 10)]);

    let mut q = Query::new(QueryKind::Stat("a"), PROTOCOL_VERSION, |_| {}, Instant(0));
    let st = run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap().unwrap();
    assert_eq!(st.sha256, Hash::of(b"hello"));

    let mut q = Query::new(QueryKind::Delete("a"), PROTOCOL_VERSION, |_| {}, Instant(0));
    run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
    assert!(!files.borrow().contains_key("a"));

    let mut q = Query::new(QueryKind::Stat("a"), PROTOCOL_VERSION, |_| {}, Instant(0));
    match run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net) {
        Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::NotFound)))) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[test]
fn bad_names_are_refused_and_the_connection_survives() {
    let files = Files::default();
    let mut s = connect(&files, usize::MAX);
    for bad in ["../escape", "/abs", "a/../../b", "nul\0"] {
        let data = b"x".to_vec();
        let tree = Tree::build(&data, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, &data[..], tree.summary(), s.salt, Instant(0));
        let mut op = Upload::new(bad, sender);
        match run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net) {
            Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::BadName)))) => {}
            other => panic!("{bad:?}: expected BadName, got {other:?}"),
        }
    }
    assert!(files.borrow().is_empty());
    assert!(
        std::iter::from_fn(|| s.server.next_event())
            .any(|e| matches!(e, Event::Refused { code: ErrorCode::BadName, .. }))
    );
    let r = upload(&mut s, "ok", b"fine", ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
}

#[test]
fn a_wrong_or_unknown_key_fails_on_both_sides() {
    let files = Files::default();
    files.borrow_mut().insert("f".into(), b"kept".to_vec());
    let wrong_secret = ClientKey { secret: [0x43; 32], ..KEY };
    let unknown_id = ClientKey { id: *b"nobody!!", ..KEY };
    for key in [wrong_secret, unknown_id] {
        let mut srv = server(&files, keys());
        let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
        let mut hs = handshake(key);
        // The server refuses the hello (and tells the client so, in clear).
        let err = match run(&mut hs, &mut cp, &mut srv, &mut sp, &mut net) {
            Err(Stop::Server(e @ DriveError::Session(SessionError::Protocol(ErrorCode::AuthFailed)))) => e,
            other => panic!("a wrong key got through: {other:?}"),
        };
        assert_eq!(sp.farewell(&err), Some(&[2u8, 12, 4][..]));
        assert!(!sp.is_secure() && !cp.is_secure(), "no channel without the key");
        assert!(std::iter::from_fn(|| srv.next_event()).all(|e| !matches!(e, Event::Authenticated { .. })));
    }
    assert!(files.borrow()["f"] == b"kept");
}

#[test]
fn a_plaintext_hello_of_version_3_or_4_gets_a_version_mismatch() {
    use deltasync_core::driver::{Pump, Step};
    for version in [3u8, 4] {
        let files = Files::default();
        let mut srv = server(&files, keys());
        let mut sp = pump();
        // A version 3/4 client's first frame: Hello{version, caps, nonce}.
        let mut hello = vec![35u8, 0, version, 1];
        hello.extend_from_slice(&[0x5a; 32]);
        sp.input()[..hello.len()].copy_from_slice(&hello);
        sp.filled(hello.len());
        let err = loop {
            match Pump::step::<_, ()>(&mut sp, &mut srv, Instant(0)) {
                Ok(Step::Again) => {}
                Ok(other) => panic!("{version}: {other:?}"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, DriveError::Session(SessionError::Protocol(ErrorCode::VersionMismatch))),
            "{err:?}"
        );
        // The old peer is told in clear, as the plaintext versions framed it.
        assert_eq!(sp.farewell(&err), Some(&[2u8, 12, 3][..]));
    }
}

#[test]
fn a_cut_connection_keeps_the_old_version() {
    let old = random_bytes(1, 1 << 20);
    let new = random_bytes(2, 1 << 20);
    for cut in [50u64, 300, 5_000, 200_000, 900_000] {
        let files = Files::default();
        files.borrow_mut().insert("f".into(), old.clone());
        let mut s = connect(&files, 3000);
        s.net.cut_after = Some(s.net.carried + cut);
        let tree = Tree::build(&new, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, &new[..], tree.summary(), s.salt, Instant(0));
        let mut op = Upload::new("f", sender);
        let r = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
        assert!(r.is_err(), "cut at {cut} should fail the upload");
        assert!(files.borrow()["f"] == old, "cut at {cut} damaged the stored file");
    }
}

#[test]
fn a_silent_peer_times_out() {
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::Message;
    let files = Files::default();
    files.borrow_mut().insert("f".into(), random_bytes(3, 100_000));
    let mut server = connect(&files, usize::MAX).server;
    let mut out = vec![0u8; deltasync_core::frame::MAX_ENCODED];
    // Between requests: the idle timeout counts from the last message.
    server.handle(Instant(1_000), Message::Stat { name: "f" }).unwrap();
    assert!(matches!(server.poll(Instant(1_000), &mut out), Ok(Poll::Transmit(_))), "Info");
    assert!(matches!(server.poll(Instant(1_000), &mut out), Ok(Poll::Transmit(_))), "ListEnd");
    assert_eq!(server.poll(Instant(1_000), &mut out), Ok(Poll::Wait(Instant(31_000))));
    assert_eq!(server.poll(Instant(30_999), &mut out), Ok(Poll::Wait(Instant(31_000))));
    // A download asked for, then silence: the sender waits for requests
    // exactly the idle timeout after the last message, then gives up.
    server.handle(Instant(5_000), Message::Download { name: "f" }).unwrap();
    assert!(matches!(server.poll(Instant(5_000), &mut out), Ok(Poll::Transmit(_))), "Offer");
    assert_eq!(server.poll(Instant(5_000), &mut out), Ok(Poll::Wait(Instant(35_000))));
    assert_eq!(server.poll(Instant(34_999), &mut out), Ok(Poll::Wait(Instant(35_000))));
    assert_eq!(server.poll(Instant(35_000), &mut out), Err(SessionError::Timeout));
}

#[test]
fn the_handshake_deadline_counts_from_the_accept() {
    use deltasync_core::frame::FrameDecoder;
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::Message;
    let files = Files::default();
    for proves in [false, true] {
        let mut server = server(&files, keys()).timeouts(Instant(0), 2_000, 60_000);
        let mut out = vec![0u8; deltasync_core::frame::MAX_ENCODED];
        assert_eq!(server.poll(Instant(0), &mut out), Ok(Poll::Wait(Instant(2_000))));
        // A hello arriving late (or replayed by someone without the key)
        // does not move the deadline.
        let mut client = handshake(KEY);
        let Ok(Poll::Transmit(n)) = client.poll(Instant(0), &mut out) else { panic!("hello") };
        let mut dec = FrameDecoder::new(vec![0u8; 4096]);
        let hello = dec.feed(&out[..n]).unwrap().1.unwrap().to_vec();
        server.handle(Instant(1_500), Message::decode(&hello).unwrap()).unwrap();
        assert!(matches!(server.poll(Instant(1_500), &mut out), Ok(Poll::Transmit(_))), "Accept");
        assert!(!server.is_authenticated());
        assert_eq!(server.poll(Instant(1_500), &mut out), Ok(Poll::Wait(Instant(2_000))));
        if !proves {
            assert_eq!(server.poll(Instant(2_000), &mut out), Err(SessionError::Timeout));
            continue;
        }
        // A first frame that opened (the pump only passes those): from
        // now on the idle timeout counts from each message.
        server.handle(Instant(1_600), Message::List).unwrap();
        assert!(server.is_authenticated());
        assert!(matches!(server.poll(Instant(1_600), &mut out), Ok(Poll::Transmit(_))), "ListEnd");
        assert_eq!(server.poll(Instant(1_600), &mut out), Ok(Poll::Wait(Instant(61_600))));
    }
}

#[test]
fn a_download_offer_without_the_file_hash_is_refused() {
    use deltasync_core::machine::Machine;
    use deltasync_core::message::Message;
    let mut op: Download<'_, Tree, &[u8], Vec<u8>> = Download::new("f", [0; 8], None, Vec::new(), Instant(0));
    let mut buf = [0u8; 256];
    op.poll(Instant(0), &mut buf).unwrap();
    let known = Tree::build(b"abc", ChunkerKind::Cdc).summary();
    let offer = Summary { file_hash: Hash::UNKNOWN, ..known };
    assert_eq!(
        op.handle(Instant(0), Message::Offer(offer)),
        Err(SessionError::Protocol(ErrorCode::BadMessage))
    );
}

/// An upload offered without its root, which its sender learns only once
/// `after` file bytes went out (and never before the offer).
struct LateRoot<'a> {
    op: Upload<'a, &'a Tree, &'a [u8]>,
    root: (Hash, u8),
    after: u64,
    polls: u32,
}

impl deltasync_core::machine::Machine for LateRoot<'_> {
    type Output = Outcome;

    fn handle(
        &mut self,
        now: Instant,
        msg: deltasync_core::message::Message<'_>,
    ) -> Result<(), SessionError> {
        self.op.handle(now, msg)
    }

    fn poll(
        &mut self,
        now: Instant,
        out: &mut [u8],
    ) -> Result<deltasync_core::machine::Poll<Outcome>, SessionError> {
        if self.polls > 0 && self.op.sender().literal_bytes() >= self.after {
            self.op.sender_mut().set_root(self.root.0, self.root.1);
        }
        self.polls += 1;
        self.op.poll(now, out)
    }
}

/// Uploads `data` as `name` with its root (or `root`, if given) sent late.
fn upload_root_late(
    s: &mut Session,
    name: &str,
    data: &[u8],
    root: Option<Hash>,
    after: u64,
) -> (Result<Outcome, Stop>, Option<Hash>, u64) {
    let before = s.cp.sent + s.cp.received;
    let tree = Tree::build(data, ChunkerKind::Cdc);
    let empty = Tree::build(&[], ChunkerKind::Cdc);
    let offer = Summary { root: Hash::UNKNOWN, height: 0, file_hash: Hash::UNKNOWN, ..tree.summary() };
    let sender = Sender::new(&empty, data, offer, s.salt, s.net.clock);
    let root = (root.unwrap_or(tree.summary().root), tree.summary().height);
    let mut m = LateRoot { op: Upload::new(name, sender), root, after, polls: 0 };
    let r = run(&mut m, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    (r, m.op.sender().reported_hash(), s.cp.sent + s.cp.received - before)
}

#[test]
fn a_first_upload_may_send_its_root_while_or_after_its_bytes_go_out() {
    for len in [0usize, 1, 4096, 100_000, 3 << 20] {
        let data = random_bytes(len as u64 + 40, len);
        for after in [0, len as u64 / 2, len as u64] {
            let files = Files::default();
            let mut s = connect(&files, 7000);
            let (r, hash, wire) = upload_root_late(&mut s, "new", &data, None, after);
            assert_eq!(r.unwrap(), Outcome::Written, "{len} bytes, root after {after}");
            assert_eq!(hash, Some(Hash::of(&data)));
            assert!(files.borrow()["new"] == data);
            assert!(wire < len as u64 * 101 / 100 + 300, "{wire} wire bytes for {len}");
            // The stored tree is the one the root pinned: an edit is a delta.
            let mut edited = data.clone();
            edited.push(7);
            let r = upload(&mut s, "new", &edited, ChunkerKind::Cdc);
            assert_eq!(r.outcome, Outcome::Written);
            assert!(r.wire < 40_000, "{} wire bytes for a one-byte append", r.wire);
            assert!(files.borrow()["new"] == edited);
        }
    }
}

#[test]
fn a_late_root_that_does_not_match_publishes_nothing() {
    let data = random_bytes(41, 300_000);
    let files = Files::default();
    let mut s = connect(&files, 5000);
    let (r, _, _) = upload_root_late(&mut s, "f", &data, Some(Hash::of(b"another root")), 1000);
    assert_eq!(r.unwrap(), Outcome::Integrity);
    assert!(!files.borrow().contains_key("f"), "nothing published");
    // The connection stays usable.
    assert_eq!(upload(&mut s, "f", &data, ChunkerKind::Cdc).outcome, Outcome::Written);
}

#[test]
fn an_offer_without_its_root_to_a_server_holding_the_name_is_asked_for_the_tree() {
    let old = random_bytes(42, 500_000);
    let mut new = old.clone();
    new[250_000] ^= 1;
    let files = Files::default();
    files.borrow_mut().insert("f".into(), old.clone());
    let mut s = connect(&files, 5000);
    let (r, _, _) = upload_root_late(&mut s, "f", &new, None, 0);
    match r {
        Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::NeedTree)))) => {}
        other => panic!("expected NeedTree, got {other:?}"),
    }
    assert!(files.borrow()["f"] == old);
    // Offered again with its tree, on the same connection: a delta.
    let r = upload(&mut s, "f", &new, ChunkerKind::Cdc);
    assert_eq!(r.outcome, Outcome::Written);
    assert!(r.wire < 30_000, "{} wire bytes", r.wire);
    assert!(files.borrow()["f"] == new);
}

#[test]
fn a_root_is_taken_once_and_only_when_the_offer_lacked_it() {
    use deltasync_core::machine::Machine;
    use deltasync_core::message::Message;
    use deltasync_core::receiver::Receiver;
    let data = random_bytes(43, 10_000);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    let (root, height) = (tree.summary().root, tree.summary().height);
    let without = Summary { root: Hash::UNKNOWN, height: 0, ..tree.summary() };
    let mut rx: Receiver<&Tree, &[u8], Vec<u8>> =
        Receiver::new(without, [0; 8], None, Vec::new(), Instant(0)).unwrap();
    let bad = |c| Err(SessionError::Protocol(c));
    assert_eq!(
        rx.handle(Instant(0), Message::Root { root: Hash::UNKNOWN, height }),
        bad(ErrorCode::BadMessage)
    );
    assert_eq!(rx.handle(Instant(0), Message::Root { root, height }), Ok(()));
    assert_eq!(rx.handle(Instant(0), Message::Root { root, height }), bad(ErrorCode::UnexpectedMessage));
    let mut rx: Receiver<&Tree, &[u8], Vec<u8>> =
        Receiver::new(tree.summary(), [0; 8], None, Vec::new(), Instant(0)).unwrap();
    assert_eq!(rx.handle(Instant(0), Message::Root { root, height }), bad(ErrorCode::UnexpectedMessage));
}

#[test]
fn a_missing_root_is_waited_for_as_long_as_hashing_the_file_may_take() {
    use deltasync_core::machine::{Machine, Poll};
    use deltasync_core::message::Message;
    use deltasync_core::receiver::Receiver;
    let data = random_bytes(44, 1_000_000);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    let without = Summary { root: Hash::UNKNOWN, height: 0, ..tree.summary() };
    let receive_all = |rx: &mut Receiver<&Tree, &[u8], Vec<u8>>| {
        let mut out = vec![0u8; 1024];
        assert!(matches!(rx.poll(Instant(0), &mut out), Ok(Poll::Transmit(_))), "GetData");
        for (k, piece) in data.chunks(60_000).enumerate() {
            rx.handle(Instant(0), Message::Data { offset: k as u64 * 60_000, bytes: piece }).unwrap();
        }
    };
    let mut out = vec![0u8; 1024];
    // The 30 s idle timeout, plus 62 ms: 1 MB hashed at the assumed 16 MB/s.
    let mut rx: Receiver<&Tree, &[u8], Vec<u8>> =
        Receiver::new(without, [0; 8], None, Vec::new(), Instant(0)).unwrap();
    receive_all(&mut rx);
    assert!(matches!(rx.poll(Instant(0), &mut out), Ok(Poll::Wait(_))));
    assert!(matches!(rx.poll(Instant(30_050), &mut out), Ok(Poll::Wait(_))));
    let (root, height) = (tree.summary().root, tree.summary().height);
    rx.handle(Instant(30_050), Message::Root { root, height }).unwrap();
    assert_eq!(rx.poll(Instant(30_050), &mut out), Ok(Poll::Done(Outcome::Written)));
    assert!(rx.into_parts().0 == data);
    // A root that never comes times out in the end.
    let mut rx: Receiver<&Tree, &[u8], Vec<u8>> =
        Receiver::new(without, [0; 8], None, Vec::new(), Instant(0)).unwrap();
    receive_all(&mut rx);
    assert!(matches!(rx.poll(Instant(0), &mut out), Ok(Poll::Wait(_))));
    assert!(matches!(rx.poll(Instant(30_061), &mut out), Ok(Poll::Wait(_))));
    assert_eq!(rx.poll(Instant(30_062), &mut out), Err(SessionError::Timeout));
}

/// A machine that always has something to send, and ends only when its
/// peer says an error.
struct Chatty;

impl deltasync_core::machine::Machine for Chatty {
    type Output = ();
    fn handle(&mut self, _: Instant, msg: deltasync_core::message::Message<'_>) -> Result<(), SessionError> {
        match msg {
            deltasync_core::message::Message::Error(c) => Err(SessionError::Peer(c)),
            _ => Ok(()),
        }
    }
    fn poll(
        &mut self,
        _: Instant,
        out: &mut [u8],
    ) -> Result<deltasync_core::machine::Poll<()>, SessionError> {
        let n = deltasync_core::frame::encode(&deltasync_core::message::Message::List, out).unwrap();
        Ok(deltasync_core::machine::Poll::Transmit(n))
    }
}

#[test]
fn two_machines_that_talk_forever_end_the_simulation() {
    // A machine that loops (here two that always have something to send)
    // must fail its test, not hang it.
    let mut net = Net::default();
    let r = run(&mut Chatty, &mut pump(), &mut Chatty, &mut pump(), &mut net);
    assert!(matches!(r, Err(Stop::Endless)), "{r:?}");
}

#[test]
fn after_a_failed_write_the_peers_last_word_is_read() {
    // A machine that always has something to send, and a peer that closed
    // after saying why (its write side shut): the driver reports what the
    // peer said, not the broken pipe.
    use deltasync_core::driver::run_blocking;
    struct Closed(Vec<u8>);
    impl embedded_io::ErrorType for Closed {
        type Error = embedded_io::ErrorKind;
    }
    impl embedded_io::Read for Closed {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, embedded_io::ErrorKind> {
            let n = self.0.len().min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }
    impl embedded_io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> Result<usize, embedded_io::ErrorKind> {
            Err(embedded_io::ErrorKind::BrokenPipe)
        }
        fn flush(&mut self) -> Result<(), embedded_io::ErrorKind> {
            Ok(())
        }
    }
    let mut io = Closed(vec![2, 12, 17]);
    let r = run_blocking(&mut Chatty, &mut io, &mut deltasync_core::sim::pump(), || Instant(0));
    assert!(matches!(r, Err(DriveError::Session(SessionError::Peer(ErrorCode::NoSpace)))), "{r:?}");
    // Nothing said: the broken pipe it is.
    let r =
        run_blocking(&mut Chatty, &mut Closed(Vec::new()), &mut deltasync_core::sim::pump(), || Instant(0));
    assert!(matches!(r, Err(DriveError::Io(embedded_io::ErrorKind::BrokenPipe))), "{r:?}");
}

/// Runs `op` over a slow link: a second passes with every turn, and a side
/// writes only while less than 128 KiB it sent is unread.
fn run_slowly<C: deltasync_core::machine::Machine>(op: &mut C, s: &mut Session) -> C::Output {
    run_paced(op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net, 128 << 10, 1000).expect("no timeout")
}

#[test]
fn a_transfer_longer_than_the_idle_timeout_completes_both_ways() {
    // The idle timeout counts from when a side stops sending, not from when
    // it last heard from its peer: sending the file here takes minutes.
    let files = Files::default();
    let mut s = connect(&files, usize::MAX);
    let data = random_bytes(31, 2 << 20);
    let tree = Tree::build(&data, ChunkerKind::Cdc);
    let sender = Sender::new(&tree, &data[..], tree.summary(), s.salt, s.net.clock);
    let mut op = Upload::new("slow", sender);
    let start = s.net.clock;
    assert_eq!(run_slowly(&mut op, &mut s), Outcome::Written);
    assert!(files.borrow()["slow"] == data);
    assert!(s.net.clock.0 - start.0 > 2 * deltasync_core::time::IDLE_TIMEOUT_MS, "not slow enough");
    let start = s.net.clock;
    let mut op = Download::new("slow", s.salt, None::<Base<Tree, &[u8]>>, Vec::new(), s.net.clock);
    assert_eq!(run_slowly(&mut op, &mut s), Outcome::Written);
    assert!(op.take_result().unwrap().0 == data);
    assert!(s.net.clock.0 - start.0 > 2 * deltasync_core::time::IDLE_TIMEOUT_MS, "not slow enough");
}
