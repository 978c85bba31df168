//! deltasync-core benchmark: bytes on the wire for edits of a large random
//! file (every byte both ways, framing included, through the real client and
//! server state machines over an in-memory link), chunking + SHA-256
//! throughput on one core, and the tree of the file built with two threads.
//!
//! `cargo run --release -p deltasync-bench --bin core-bench [SIZE_MIB] [RUNS]`

use deltasync_bench::median;
use deltasync_core::Instant;
use deltasync_core::chunker::{Chunker, ChunkerKind};
use deltasync_core::conn::Upload;
use deltasync_core::message::Outcome;
use deltasync_core::sender::Sender;
use deltasync_core::sim::{Files, KEY, Net, handshake, keys, pump, random_bytes, run, server};
use deltasync_core::tree::{Entry, Indexer, NoSink, Tree, TreeBuilder};
use deltasync_host::build::{build_tree, chunk_ids, file_hash};
use deltasync_host::hints::{ChunkHints, build_tree_hinted};
use sha2::{Digest, Sha256};
use std::time::Instant as Clock;

struct Wire {
    handshake: u64,
    sync: u64,
    literal: u64,
    outcome: Outcome,
}

/// Uploads `new` to a server holding `old` (if any); counts wire bytes.
fn upload(old: Option<&[u8]>, new: &[u8], new_tree: &Tree) -> Wire {
    let files = Files::default();
    if let Some(o) = old {
        files.borrow_mut().insert("f".into(), o.to_vec());
    }
    let mut srv = server(&files, keys());
    let (mut cp, mut sp, mut net) = (pump(), pump(), Net::new());
    let mut hs = handshake(KEY);
    let salt = run(&mut hs, &mut cp, &mut srv, &mut sp, &mut net).expect("handshake");
    let handshake = cp.sent + cp.received;
    let sender = Sender::new(new_tree, new, new_tree.summary(), salt, Instant(0));
    let mut op = Upload::new("f", sender);
    let outcome = run(&mut op, &mut cp, &mut srv, &mut sp, &mut net).expect("upload");
    assert!(outcome == Outcome::Unchanged || files.borrow()["f"] == new, "server copy differs");
    let literal = op.sender().literal_bytes();
    Wire { handshake, sync: cp.sent + cp.received - handshake, literal, outcome }
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Clock::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let size = mib << 20;
    let gb = size as f64 / 1e9;
    eprintln!("generating {mib} MiB of random data");
    let old = random_bytes(0x5eed, size);

    println!("## deltasync-core, {mib} MiB random file\n");
    println!("### Throughput (one core unless stated; median of {runs})\n");
    println!("| what | time | rate |");
    println!("|---|---|---|");
    let sha = time(runs, || Sha256::digest(&old));
    println!("| SHA-256 of the whole file (peer figure) | {sha:.3} s | {:.2} GB/s |", gb / sha);
    let scan = time(runs, || {
        let mut c = Chunker::new(ChunkerKind::Cdc);
        let (mut rest, mut n) = (&old[..], 0usize);
        while let Some(k) = c.next_boundary(rest) {
            rest = &rest[k..];
            n += 1;
        }
        n
    });
    println!("| CDC boundary scan alone | {scan:.3} s | {:.2} GB/s |", gb / scan);
    let ix = time(runs, || {
        let mut ix = Indexer::new(ChunkerKind::Cdc, NoSink);
        for piece in old.chunks(1 << 20) {
            ix.feed(piece).unwrap();
        }
        ix.finish().unwrap().0
    });
    println!(
        "| chunking + chunk SHA-256 + tree + whole-file SHA-256, one pass | {ix:.3} s | {:.2} GB/s |",
        gb / ix
    );
    let ids1 = time(runs, || chunk_ids(&old[..], ChunkerKind::Cdc, 1).unwrap().len());
    println!(
        "| chunking + chunk SHA-256 in one pass (no whole-file hash), 1 thread | {ids1:.3} s | {:.2} GB/s |",
        gb / ids1
    );
    let ids2 = time(runs, || chunk_ids(&old[..], ChunkerKind::Cdc, 2).unwrap().len());
    println!(
        "| chunking + chunk SHA-256 in one pass (no whole-file hash), 2 threads | {ids2:.3} s | {:.2} GB/s |",
        gb / ids2
    );
    let nodes2 = time(runs, || {
        let mut tb = TreeBuilder::new(NoSink);
        let mut prev = 0;
        for (id, end) in chunk_ids(&old[..], ChunkerKind::Cdc, 2).unwrap() {
            tb.push_chunk(Entry { id, len: end - prev }).unwrap();
            prev = end;
        }
        tb.finish().unwrap().0
    });
    println!(
        "| tree (chunk ids + all nodes, no whole-file hash), 2 threads | {nodes2:.3} s | {:.2} GB/s |",
        gb / nodes2
    );
    let tree2 = time(runs, || build_tree(&old[..], ChunkerKind::Cdc, 2).unwrap());
    println!("| whole tree incl. whole-file SHA-256, 2 threads | {tree2:.3} s | {:.2} GB/s |", gb / tree2);
    let fh = time(runs, || file_hash(&old[..]).unwrap());
    println!("| whole-file SHA-256 alone (streamed) | {fh:.3} s | {:.2} GB/s |", gb / fh);

    // Chunk hints: the first build also hashes its groups (BLAKE3) for the
    // next one; a rebuild with the old version's hints takes unchanged
    // groups without chunking or SHA-256 (one thread walks the file).
    let first = time(runs, || build_tree_hinted(&old[..], ChunkerKind::Cdc, 2, None).unwrap());
    println!(
        "| tree + group hashes for hints (first build), 2 threads | {first:.3} s | {:.2} GB/s |",
        gb / first
    );
    let (t, known) = build_tree_hinted(&old[..], ChunkerKind::Cdc, 2, None).unwrap();
    let hints = ChunkHints::collect(&old[..], &t, &known).unwrap();
    let mut edited = old.clone();
    edited[size / 2..size / 2 + 4096].iter_mut().for_each(|b| *b = !*b);
    let re = time(runs, || build_tree_hinted(&edited[..], ChunkerKind::Cdc, 2, Some(&hints)).unwrap());
    println!(
        "| tree with the old version's hints, after a 4 KiB overwrite | {re:.3} s | {:.2} GB/s |",
        gb / re
    );
    let mut inserted = old.clone();
    inserted.insert(0, b'!');
    let ri = time(runs, || build_tree_hinted(&inserted[..], ChunkerKind::Cdc, 2, Some(&hints)).unwrap());
    println!(
        "| tree with the old version's hints, after a 1-byte insert at 0 | {ri:.3} s | {:.2} GB/s |",
        gb / ri
    );
    drop((edited, inserted));

    let old_tree = build_tree(&old[..], ChunkerKind::Cdc, 2).unwrap();
    println!(
        "\nTree: {} chunks (mean {:.0} bytes), height {}.\n",
        old_tree.chunks(),
        size as f64 / old_tree.chunks() as f64,
        old_tree.summary().height
    );

    println!("### Bytes on the wire (both directions, framing included)\n");
    println!("| scenario | mode | sync bytes | + handshake | literal file bytes | target |");
    println!("|---|---|---|---|---|---|");
    let report = |name: &str, w: Wire, target: &str| {
        println!(
            "| {name} | {:?} | {} | {} | {} | {target} |",
            w.outcome,
            w.sync,
            w.sync + w.handshake,
            w.literal
        );
    };

    let mut new = old.clone();
    let mid = size / 2;
    for (i, b) in new[mid..mid + 4096].iter_mut().enumerate() {
        *b = !(*b) ^ i as u8;
    }
    let t = build_tree(&new[..], ChunkerKind::Cdc, 2).unwrap();
    report("4 KiB overwritten in the middle", upload(Some(&old), &new, &t), "<= 24 KiB (24576)");
    drop(new);

    let mut new = Vec::with_capacity(size + 1);
    new.push(0x42);
    new.extend_from_slice(&old);
    let t = build_tree(&new[..], ChunkerKind::Cdc, 2).unwrap();
    report("1 byte inserted at offset 0", upload(Some(&old), &new, &t), "<= 16 KiB (16384)");
    drop(new);

    report("unchanged file", upload(Some(&old), &old, &old_tree), "<= 256");
    report(
        "first, full transfer",
        upload(None, &old, &old_tree),
        &format!("<= 1.01 x size ({})", size as u64 * 101 / 100),
    );
}
