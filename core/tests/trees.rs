//! The server's side of tree syncs (protocol 7) over the in-memory harness:
//! directory listings within a key's prefixes, ops sent ahead of their
//! answers, and a client of protocol 6 refused before it sends anything.

use deltasync_core::access::Access;
use deltasync_core::channel::ClientKey;
use deltasync_core::conn::batch::Batch;
use deltasync_core::conn::server::ServerConn;
use deltasync_core::conn::{Listed, Query, QueryKind};
use deltasync_core::driver::DriveError;
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::message::{CAP_BATCH, CAPS, EntryKind, Message, Meta, Outcome};
use deltasync_core::plan::Op;
use deltasync_core::sim::*;
use deltasync_core::{Hash, Instant, PROTOCOL_VERSION};

type Keys = Vec<(ClientKey, Access)>;

struct Session {
    server: ServerConn<MemStore, Keys>,
    cp: StdPump,
    sp: StdPump,
    net: Net,
    version: u16,
}

/// A session whose frames each carry one message (no `CAP_BATCH`): these
/// tests watch requests go ahead of their answers frame by frame.
fn connect(files: &Files, key: ClientKey, keys: Keys, version: u16) -> Session {
    connect_as(files, key, keys, version, CAPS & !CAP_BATCH)
}

/// A session whose client announces `caps`.
fn connect_as(files: &Files, key: ClientKey, keys: Keys, version: u16, caps: u32) -> Session {
    let mut s = Session { server: server(files, keys), cp: pump(), sp: pump(), net: Net::new(), version: 0 };
    let mut hs = handshake(key).at_most(version).announcing(caps);
    run(&mut hs, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("handshake");
    s.version = hs.version();
    s
}

fn files(names: &[&str]) -> Files {
    let files = Files::default();
    for (i, n) in names.iter().enumerate() {
        files.borrow_mut().insert(n.to_string(), random_bytes(i as u64, 100 + i));
    }
    files
}

/// Lists `dir`: the entries' names and kinds, or the error.
fn list(s: &mut Session, dir: &str) -> Result<Vec<(String, EntryKind)>, Stop> {
    let mut seen = Vec::new();
    let on = |e: Listed<'_>| {
        if let Listed::Entry(e) = e {
            seen.push((e.name.to_string(), e.kind));
        }
    };
    let mut q = Query::new(QueryKind::ListDir(dir), s.version, on, Instant(0));
    run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net)?;
    Ok(seen)
}

#[test]
fn a_prefixed_key_lists_only_what_it_covers_and_the_way_to_it() {
    let f = files(&["devices/7/log", "devices/7/sub/x", "devices/70/log", "other/x", "top"]);
    let reader = ClientKey { id: *b"readerk1", secret: [7; 32] };
    let access = Access { prefixes: vec!["devices/7".into()], ..Access::full("reader") };
    let keyring = vec![(KEY, Access::full("sim")), (reader.clone(), access)];
    let mut s = connect(&f, reader, keyring.clone(), PROTOCOL_VERSION);
    let dir = EntryKind::Dir;
    assert_eq!(list(&mut s, "").unwrap(), [("devices".to_string(), dir)]);
    assert_eq!(list(&mut s, "devices").unwrap(), [("devices/7".to_string(), dir)]);
    assert_eq!(
        list(&mut s, "devices/7").unwrap(),
        [("devices/7/log".to_string(), EntryKind::File), ("devices/7/sub".to_string(), dir)]
    );
    for outside in ["other", "devices/70"] {
        let r = list(&mut s, outside);
        assert!(matches!(r, Err(Stop::Client(_))), "{outside}: {r:?}");
    }
    // The full key sees everything.
    let mut s = connect(&f, KEY, keyring, PROTOCOL_VERSION);
    assert_eq!(list(&mut s, "").unwrap().len(), 3);
    assert!(list(&mut s, "nowhere").is_err(), "no such directory");
}

#[test]
fn ops_are_answered_in_order_and_a_refused_one_fails_alone() {
    let unbatched = ops_in_order(CAPS & !CAP_BATCH);
    // Sealed several to a frame (both peers announced CAP_BATCH): the
    // same answers, in fewer frames.
    let batched = ops_in_order(CAPS);
    assert!(batched * 2 <= unbatched, "{batched} frames batched, {unbatched} not");
}

/// Runs four ops ahead of their answers on a session whose client
/// announces `caps`; checks what they did, and returns how many frames
/// went either way after the handshake.
fn ops_in_order(caps: u32) -> usize {
    let f = files(&["a", "b"]);
    let sha_a = Hash::of(&f.borrow()["a"]);
    let mut s = connect_as(&f, KEY, keys(), PROTOCOL_VERSION, caps);
    let meta = Meta { modified: 1, nanos: 2, mode: 0o644 };
    let ops = vec![
        Op::Copy { from: "a".into(), sha256: sha_a, to: "copy of a".into(), meta },
        // Not the content listed: refused, and only this one.
        Op::Copy { from: "b".into(), sha256: sha_a, to: "copy of b".into(), meta },
        Op::Delete { name: "nothing here".into(), kind: EntryKind::File },
        Op::Delete { name: "b".into(), kind: EntryKind::File },
    ];
    let mut results = Vec::new();
    let mut batch =
        Batch::new(ops, s.version, |op: &Op, r| results.push((op.name().to_string(), r)), Instant(0));
    run(&mut batch, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
    assert_eq!(
        results,
        [
            ("copy of a".to_string(), Ok(())),
            ("copy of b".to_string(), Err(ErrorCode::Conflict)),
            ("nothing here".to_string(), Err(ErrorCode::NotFound)),
            ("b".to_string(), Ok(())),
        ]
    );
    let names: Vec<String> = f.borrow().keys().cloned().collect();
    assert_eq!(names, ["a", "copy of a"]);
    assert!(f.borrow()["copy of a"] == f.borrow()["a"]);
    // Sent ahead: requests went out before the first answer came back
    // (the harness lets each side run a few steps at a time).
    let after_handshake = &s.net.frames[2..];
    if caps & CAP_BATCH == 0 {
        let before_first_answer = after_handshake.iter().take_while(|(to_server, _)| *to_server).count();
        assert!(before_first_answer >= 3, "requests waited for answers: {:?}", s.net.frames);
    }
    after_handshake.len()
}

#[test]
fn a_version_6_session_refuses_tree_requests_before_sending_them() {
    let f = files(&["a"]);
    let mut s = connect(&f, KEY, keys(), 6);
    assert_eq!(s.version, 6);
    let r = list(&mut s, "");
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Unsupported))))),
        "{r:?}"
    );
    let ops = vec![Op::Delete { name: "a".into(), kind: EntryKind::File }];
    let mut batch = Batch::new(ops, s.version, |_: &Op, _| {}, Instant(0));
    let r = run(&mut batch, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Unsupported))))),
        "{r:?}"
    );
    assert!(f.borrow().contains_key("a"), "nothing was sent");
}

/// Puts `files` (name, data, whether to send a delta): each result.
fn put(
    s: &mut Session,
    salt: [u8; 8],
    files: Vec<(&str, Vec<u8>, bool)>,
) -> Vec<(Result<Hash, ErrorCode>, u64)> {
    use deltasync_core::chunker::ChunkerKind;
    use deltasync_core::conn::put::{PutBatch, PutFile};
    let files = files
        .into_iter()
        .map(|(name, data, base)| PutFile {
            name: name.into(),
            kind: ChunkerKind::for_size(data.len() as u64),
            data,
            meta: Meta { modified: 5, nanos: 6, mode: 0o640 },
            base,
        })
        .collect();
    let mut results = Vec::new();
    let mut batch = PutBatch::new(files, salt, s.version, true, |_: &PutFile, r| results.push(r), Instant(0));
    run(&mut batch, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
    results
}

fn connect_salted(files: &Files) -> (Session, [u8; 8]) {
    let mut s =
        Session { server: server(files, keys()), cp: pump(), sp: pump(), net: Net::new(), version: 0 };
    let mut hs = handshake(KEY).announcing(CAPS & !CAP_BATCH);
    let salt = run(&mut hs, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("handshake");
    s.version = hs.version();
    (s, salt)
}

#[test]
fn puts_send_deltas_against_what_the_server_holds_and_new_files_whole() {
    let f = Files::default();
    let old = random_bytes(1, 600_000);
    f.borrow_mut().insert("big".into(), old.clone());
    let mut new = old.clone();
    new[300_000..300_100].iter_mut().for_each(|b| *b = !*b);
    let fresh = random_bytes(2, 50_000);
    let (mut s, salt) = connect_salted(&f);
    let r = put(
        &mut s,
        salt,
        vec![("big", new.clone(), true), ("fresh", fresh.clone(), false), ("empty", vec![], false)],
    );
    assert_eq!(r[0].0, Ok(Hash::of(&new)));
    assert!(r[0].1 < 100_000, "a 100-byte edit sent {} literal bytes", r[0].1);
    assert_eq!((r[1].0, r[1].1), (Ok(Hash::of(&fresh)), 50_000));
    assert_eq!(r[2].0, Ok(Hash::of(&[])));
    assert!(f.borrow()["big"] == new && f.borrow()["fresh"] == fresh && f.borrow()["empty"].is_empty());
}

#[test]
fn a_put_whose_base_changed_or_that_is_refused_fails_alone() {
    let f = Files::default();
    f.borrow_mut().insert("a".into(), random_bytes(1, 100_000));
    let (mut s, salt) = connect_salted(&f);
    // The base changes after the leaves were asked for: the delta's refs
    // would copy from another version. A name the server refuses, and a
    // fine file after both.
    let mut changed = false;
    let other = random_bytes(9, 100_000);
    let mut new = f.borrow()["a"].clone();
    new[10] ^= 1;
    {
        use deltasync_core::chunker::ChunkerKind;
        use deltasync_core::conn::put::{PutBatch, PutFile};
        let file = |name: &str, data: Vec<u8>, base| PutFile {
            name: name.into(),
            kind: ChunkerKind::for_size(data.len() as u64),
            data,
            meta: Meta::default(),
            base,
        };
        let files = vec![
            file("a", new.clone(), true),
            file(".deltasync/x", vec![1], false),
            file("b", vec![2], false),
        ];
        let mut results = Vec::new();
        let mut batch =
            PutBatch::new(files, salt, s.version, false, |_: &PutFile, r| results.push(r.0), Instant(0));
        // Once the server answered the Sig (its Offer and Entries came
        // after its handshake answer), "a" is replaced.
        while run_rounds(&mut batch, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net, 1).unwrap().is_none() {
            if !changed && s.net.frames.iter().filter(|(to_server, _)| !*to_server).count() >= 3 {
                f.borrow_mut().insert("a".into(), other.clone());
                changed = true;
            }
        }
        assert_eq!(results, [Err(ErrorCode::Conflict), Err(ErrorCode::BadName), Ok(Hash::of(&[2]))]);
    }
    assert!(changed);
    assert!(f.borrow()["a"] == other, "the other version stays");
    assert_eq!(f.borrow()["b"], [2]);
}

#[test]
fn a_write_only_key_can_put_whole_files_but_neither_list_nor_read_through_deltas() {
    let f = Files::default();
    let secret = random_bytes(5, 50_000);
    f.borrow_mut().insert("dev/secret".into(), secret.clone());
    let writer = ClientKey { id: *b"writer01", secret: [3; 32] };
    let access = Access { read: false, delete: false, ..Access::full("writer") };
    let keyring = vec![(KEY, Access::full("sim")), (writer.clone(), access)];
    let mut s = Session { server: server(&f, keyring), cp: pump(), sp: pump(), net: Net::new(), version: 0 };
    let mut hs = handshake(writer);
    let salt = run(&mut hs, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("handshake");
    s.version = hs.version();
    // A listing tells names, sizes and hashes: reading.
    let r = list(&mut s, "dev");
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::PermissionDenied))))),
        "{r:?}"
    );
    // A delta's Refs into the stored version would read it: refused (the
    // Sig first, so the Put goes whole), and the stored file stays.
    let mut edited = secret.clone();
    edited[0] ^= 1;
    let r = put(&mut s, salt, vec![("dev/secret", edited.clone(), true), ("dev/new", vec![7; 10], false)]);
    assert_eq!(r[0].0, Ok(Hash::of(&edited)), "sent whole");
    assert_eq!(r[0].1, edited.len() as u64, "no byte of the stored version was used");
    assert_eq!(r[1].0, Ok(Hash::of(&[7; 10])));
}

#[test]
fn a_write_only_keys_upload_gets_suffixes_but_no_pieces() {
    // Which pieces of its chunks the stored bytes hold tells a key far
    // more than which whole chunks are stored: a key that may not read the
    // file is asked for changed chunks whole. Its appends still go as
    // suffixes (a device's log): their id tells no more than the stored
    // version's SHA-256, which `Stat` tells a writer.
    use deltasync_core::chunker::ChunkerKind;
    use deltasync_core::conn::Upload;
    use deltasync_core::sender::Sender;
    use deltasync_core::tree::Tree;
    let stored = random_bytes(6, 1 << 20);
    let mut edited = stored.clone();
    for k in 0..16 {
        edited[(2 * k + 1) << 15] ^= 0x5a;
    }
    let writer = ClientKey { id: *b"writer02", secret: [4; 32] };
    let access = Access { read: false, delete: false, ..Access::full("writer") };
    let mut appended = stored[..20_000].to_vec();
    appended.extend_from_slice(&random_bytes(7, 924));
    let mut cost = Vec::new();
    for (key, old, new) in [
        (KEY, &stored, &edited),
        (writer.clone(), &stored, &edited),
        (writer.clone(), &stored[..20_000].to_vec(), &appended),
    ] {
        let (stored, edited) = (old.clone(), new.clone());
        let f = Files::default();
        f.borrow_mut().insert("dev/log".into(), stored.clone());
        let keyring = vec![(KEY, Access::full("sim")), (writer.clone(), access.clone())];
        let mut s =
            Session { server: server(&f, keyring), cp: pump(), sp: pump(), net: Net::new(), version: 0 };
        let salt =
            run(&mut handshake(key), &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("handshake");
        let before = s.cp.sent + s.cp.received;
        let tree = Tree::build(&edited, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, edited.as_slice(), tree.summary(), salt, Instant(0));
        let mut op = Upload::new("dev/log", sender);
        let outcome = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("upload");
        assert_eq!(outcome, Outcome::Written);
        assert!(f.borrow()["dev/log"] == edited);
        cost.push(s.cp.sent + s.cp.received - before);
    }
    // 16 chunks of about 4 KiB whole, against 16 pieces of about 256.
    assert!(cost[1] > 2 * cost[0], "reader {} bytes, write-only {} bytes", cost[0], cost[1]);
    assert!(cost[2] <= 924 + 300, "a write-only key's append of 924 bytes cost {}", cost[2]);
}

#[test]
fn fetches_come_without_waiting_and_a_missing_file_fails_alone() {
    use deltasync_core::conn::fetch::FetchBatch;
    let f = files(&["a", "d/b", "empty"]);
    f.borrow_mut().insert("empty".into(), Vec::new());
    f.borrow_mut().insert("log".into(), log_lines(4, 200_000));
    let mut s = connect(&f, KEY, keys(), PROTOCOL_VERSION);
    let names = ["a", "nope", "d/b", "empty", "log"];
    let outs: Vec<Vec<u8>> = names.iter().map(|_| Vec::new()).collect();
    let mut got = Vec::new();
    let mut batch =
        FetchBatch::new(&names, outs, s.version, |i, r| got.push((i, r.map(|(w, _)| w))), Instant(0));
    run(&mut batch, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap();
    assert_eq!(got.len(), 5);
    for (i, r) in got {
        match names[i] {
            "nope" => assert_eq!(r, Err(ErrorCode::NotFound)),
            n => assert!(r.as_deref() == Ok(&f.borrow()[n][..]), "{n}"),
        }
    }
    // Sent ahead: the requests went out before the first answer came.
    let after_handshake = &s.net.frames[2..];
    assert!(
        after_handshake.iter().take_while(|(to_server, _)| *to_server).count() >= 3,
        "{:?}",
        s.net.frames
    );
}

#[test]
fn a_fetch_refuses_a_servers_bytes_out_of_place_and_a_file_whose_hash_is_wrong() {
    use deltasync_core::conn::fetch::FetchBatch;
    use deltasync_core::machine::Machine;
    use deltasync_core::tree::Summary;
    let names = ["a", "b"];
    let outs: Vec<Vec<u8>> = vec![Vec::new(), Vec::new()];
    let got = std::cell::RefCell::new(Vec::new());
    let mut b = FetchBatch::new(
        &names,
        outs,
        PROTOCOL_VERSION,
        |i, r: Result<(Vec<u8>, _), _>| got.borrow_mut().push((i, r.map(|(w, _)| w))),
        Instant(0),
    );
    let mut out = vec![0u8; 1024];
    // Both requests go out before any answer.
    for _ in 0..2 {
        assert!(matches!(b.poll(Instant(0), &mut out), Ok(deltasync_core::machine::Poll::Transmit(_))));
    }
    let data = b"0123456789";
    let offer =
        |h| Summary { size: 10, root: Hash([1; 32]), height: 0, file_hash: h, chunking: Default::default() };
    // "a": its bytes arrive, but the hash the server ends with is not theirs.
    let wrong = Hash([7; 32]);
    b.handle(Instant(0), Message::Offer(offer(wrong))).unwrap();
    b.handle(Instant(0), Message::Data { offset: 0, bytes: data }).unwrap();
    b.handle(Instant(0), Message::Done { outcome: Outcome::Written, file_hash: Some(wrong) }).unwrap();
    assert_eq!(*got.borrow(), [(0, Err(ErrorCode::Integrity))]);
    // "b": bytes out of place, or past its size, end the session.
    b.handle(Instant(0), Message::Offer(offer(Hash::of(data)))).unwrap();
    let bad = SessionError::Protocol(ErrorCode::BadMessage);
    assert_eq!(b.handle(Instant(0), Message::Data { offset: 3, bytes: data }), Err(bad));
    assert_eq!(b.handle(Instant(0), Message::Data { offset: 0, bytes: &[0; 11] }), Err(bad));
    // An offer without a hash is no server's.
    let mut c = FetchBatch::new(
        &names,
        vec![Vec::new()],
        PROTOCOL_VERSION,
        |_, _: Result<(Vec<u8>, _), _>| {},
        Instant(0),
    );
    let _ = c.poll(Instant(0), &mut out);
    assert_eq!(c.handle(Instant(0), Message::Offer(offer(Hash::UNKNOWN))), Err(bad));
}

#[test]
fn a_put_that_takes_longer_than_the_idle_timeout_to_send_completes() {
    use deltasync_core::chunker::ChunkerKind;
    use deltasync_core::conn::put::{PutBatch, PutFile};
    let f = Files::default();
    let (mut s, salt) = connect_salted(&f);
    let data = random_bytes(3, 4 << 20);
    let files = vec![PutFile {
        name: "slow".into(),
        kind: ChunkerKind::for_size(data.len() as u64),
        data: data.clone(),
        meta: Meta { modified: 5, nanos: 6, mode: 0o640 },
        base: false,
    }];
    let mut results = Vec::new();
    let start = s.net.clock;
    let mut batch = PutBatch::new(files, salt, s.version, true, |_: &PutFile, r| results.push(r.0), start);
    // A second per turn, and no side more than 128 KiB ahead of the other:
    // sending the file takes minutes, with no answer meanwhile.
    run_paced(&mut batch, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net, 128 << 10, 1000)
        .expect("no timeout");
    assert_eq!(results, [Ok(Hash::of(&data))]);
    assert!(s.net.clock.0 - start.0 > 2 * deltasync_core::time::IDLE_TIMEOUT_MS, "not slow enough");
    assert!(f.borrow()["slow"] == data);
}

#[test]
fn a_sketch_is_whole_ids_and_at_most_sixteen_of_them() {
    use deltasync_core::machine::Machine;
    let f = Files::default();
    let bad = Err(SessionError::Protocol(ErrorCode::BadMessage));
    for (len, ok) in [(0, true), (8, true), (16 * 8, true), (7, false), (17 * 8, false)] {
        let (mut s, _) = connect_salted(&f);
        let ids = vec![1u8; len];
        let got = s.server.handle(s.net.clock, Message::Sketch { ids: &ids });
        if ok {
            assert_eq!(got, Ok(()), "{len} bytes");
        } else {
            assert_eq!(got, bad, "{len} bytes");
        }
    }
}
