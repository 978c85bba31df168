//! Known answers for the wire formats, computed apart from this crate (a
//! short Python script implementing the documented rules: postcard's
//! varints, tuples and enums for frames; `SHA-256("dsn1" || level ||
//! (id || len as u64 LE)*)` for tree nodes), so that a change of field
//! order, variant number, role label or hashing rule fails here even though
//! both ends of every other test would agree with each other. The Noise
//! handshake and transport have their published vectors in
//! `core/src/channel.rs`; every error code's frame is pinned in
//! `core/src/message.rs`.

use deltasync_core::channel::CipherKind;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::error::ErrorCode;
use deltasync_core::frame;
use deltasync_core::hash::Hash;
use deltasync_core::message::{Expect, FileInfo, Message, Outcome, PartialInfo};
use deltasync_core::tree::{Summary, Tree};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn h(x: u8) -> Hash {
    Hash([x; 32])
}

#[test]
fn a_frame_of_every_message_variant_is_byte_exact() {
    // The offer of both upload requests.
    let offer =
        Summary { size: 300, root: h(1), height: 2, file_hash: h(2), chunking: ChunkerKind::Fixed(4096) };
    let cases: Vec<(Message<'_>, &str)> = vec![
        (
            Message::Hello {
                version: 5,
                cipher: CipherKind::ChaChaPoly,
                key: *b"keyid-01",
                noise: &[0xaa; 3],
            },
            "0f0005006b657969642d303103aaaaaa",
        ),
        (Message::Accept { noise: &[0xbb; 2] }, "040102bbbb"),
        (Message::RetiredAuth, "0102"),
        (Message::RetiredWelcome, "0103"),
        (Message::List, "0104"),
        (Message::Stat { name: "a/b" }, "050503612f62"),
        (
            Message::Upload { name: "f", offer },
            "49060166ac020101010101010101010101010101010101010101010101010101010101010101020202020202020202020202020202020202020202020202020202020202020202018020",
        ),
        (Message::Download { name: "f" }, "03070166"),
        (Message::Delete { name: "f" }, "03080166"),
        (
            Message::Info(FileInfo {
                name: "f",
                size: 5,
                modified: 1_700_000_000,
                sha256: h(3),
                chunking: ChunkerKind::CdcScaled(2),
            }),
            "2b0901660580e2cfaa0603030303030303030303030303030303030303030303030303030303030303030202",
        ),
        (Message::ListEnd, "010a"),
        (Message::Deleted, "010b"),
        (Message::Error(ErrorCode::PermissionDenied), "020c0f"),
        (
            Message::Offer(Summary {
                size: 0,
                root: h(4),
                height: 1,
                file_hash: h(5),
                chunking: ChunkerKind::Cdc,
            }),
            "440d00040404040404040404040404040404040404040404040404040404040404040401050505050505050505050505050505050505050505050505050505050505050500",
        ),
        (Message::GetChildren { level: 1, index: 2, count: 3 }, "040e010203"),
        (
            Message::Entries { level: 1, start: 0, offset: 4096, last: true, packed: &[9, 9] },
            "090f0100802001020909",
        ),
        (Message::GetData { offset: 300, len: 5 }, "0410ac0205"),
        (Message::Data { offset: 65536, bytes: b"xyz" }, "08118080040378797a"),
        (
            Message::Done { outcome: Outcome::Written, file_hash: Some(h(6)) },
            "231201010606060606060606060606060606060606060606060606060606060606060606",
        ),
        (Message::DataZ { offset: 7, raw: 1000, bytes: &[0x28, 0xb5] }, "071307e8070228b5"),
        (
            Message::Root { root: h(7), height: 3 },
            "2214070707070707070707070707070707070707070707070707070707070707070703",
        ),
        (
            Message::UploadIf { name: "f", offer, expect: Expect::Match(h(8)) },
            "6a150166ac020101010101010101010101010101010101010101010101010101010101010101020202020202020202020202020202020202020202020202020202020202020202018020010808080808080808080808080808080808080808080808080808080808080808",
        ),
        (Message::ListAll, "0116"),
        (
            Message::Partial(PartialInfo { name: "f", size: 5, modified: 1_700_000_000 }),
            "091701660580e2cfaa06",
        ),
        (Message::Replaced, "0118"),
        (Message::GetSuffix { offset: 4096, len: 5000, have: 1000, id: 0x0102 }, "092580208827e8078202"),
        (Message::GetPieces { offset: 7, len: 300 }, "042607ac02"),
        (Message::Pieces { offset: 7, last: true, packed: &[1, 2] }, "06270701020102"),
        (Message::GetFine { offset: 7, len: 300 }, "042807ac02"),
        (Message::Fine { packed: &[1, 2, 3, 4, 5] }, "0729050102030405"),
        (Message::GetPiecesV2 { offset: 7, len: 300 }, "042a07ac02"),
        (Message::GetChildrenV2 { level: 2, index: 1, count: 3 }, "042b020103"),
    ];
    assert_eq!(cases.len(), 32, "one case per variant up to Replaced, then the deltas'");
    for (m, want) in cases {
        let mut buf = [0u8; 256];
        let n = frame::encode(&m, &mut buf).unwrap();
        assert_eq!(hex(&buf[..n]), want, "{m:?}");
        let mut dec = frame::FrameDecoder::new([0u8; 256]);
        let (_, payload) = dec.feed(&buf[..n]).unwrap();
        assert_eq!(Message::decode(payload.unwrap()).unwrap(), m);
    }
}

#[test]
fn chunk_ids_node_ids_and_roots_are_the_documented_hashes() {
    // 1 MiB in 256 fixed 4 KiB chunks: a tree five levels high.
    let data: Vec<u8> = (0..1usize << 20).map(|i| ((i * 7 + i / 4096) % 251) as u8).collect();
    let tree = Tree::build(&data[..], ChunkerKind::Fixed(4096));
    let s = tree.summary();
    assert_eq!(s.root.to_hex().as_str(), "7cf724f79df5cb86392cc93c71e26f8275b27011404c9093b0cfd1d1e8c7d7e0");
    assert_eq!(s.height, 5);
    assert_eq!(
        s.file_hash.to_hex().as_str(),
        "077c55336db7a071f9a2c209642a4015e5ee4af274e524c8315c9a7448c41bfe"
    );
    assert_eq!(
        Hash::of(&data[..4096]).to_hex().as_str(),
        "9141107b6ed1422839ed97f4674de82ae742ec2f8556c3df948da06930f94393"
    );
    // Two chunks under one node, and the empty file.
    let small: Vec<u8> = (0..5120usize).map(|i| (i % 256) as u8).collect();
    let t = Tree::build(&small[..], ChunkerKind::Fixed(4096)).summary();
    assert_eq!(
        (t.root.to_hex().as_str(), t.height),
        ("08925a31a61d8f221f64a33ae225751f0cf53c60a066909459530b0483931bcd", 1)
    );
    let e = Tree::build(&[][..], ChunkerKind::Fixed(4096)).summary();
    assert_eq!(
        (e.root.to_hex().as_str(), e.height),
        ("4bdb5586c035f7ca76416664e3bd9904c87e8289215cc800bc6b229bfc2a2276", 1)
    );
}

#[test]
fn short_ids_and_packed_listings_are_the_documented_bytes() {
    use deltasync_core::message::{PackedEntry, pack_entry, unpack_entries};
    // SHA-256(salt || id), its first 8 bytes as a little-endian u64.
    let short = h(7).short(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(short, 0xcb16_4192_f338_44fd);
    // Each entry: the short id (8 bytes, little-endian), then the length as
    // a LEB128 varint.
    let mut buf = [0u8; 40];
    let mut pos = 0;
    pack_entry(&mut buf, &mut pos, PackedEntry { short, len: 4096 }).unwrap();
    pack_entry(&mut buf, &mut pos, PackedEntry { short: 0x0102_0304_0506_0708, len: 1 }).unwrap();
    assert_eq!(hex(&buf[..pos]), "fd4438f3924116cb8020080706050403020101");
    let back: Vec<(u64, u64)> =
        unpack_entries(&buf[..pos]).map(|e| e.unwrap()).map(|e| (e.short, e.len)).collect();
    assert_eq!(back, [(short, 4096), (0x0102_0304_0506_0708, 1)]);
}
