//! Two builds whose 50 MiB outputs differ in one file: the second release shares all but
//! a few chunks with the first, so a deploy re-ships about a megabyte at most, not 50.

use std::fs;
use std::path::Path;

use starling_release::{create_release, ChunkSizes, ChunkStore, FsChunkStore};

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn output(root: &Path, changed: &[u8]) {
    for i in 0..50u64 {
        let dir = root.join(format!("lib{}", i % 5));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("part{i}.bin")), fill(i + 1, 1 << 20)).unwrap();
    }
    fs::write(root.join("config.txt"), changed).unwrap();
}

#[test]
fn one_changed_file_ships_few_new_chunks() {
    let t = tempfile::tempdir().unwrap();
    let store = FsChunkStore::new(t.path().join("store")).unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    output(&a, b"version = 1\n");
    output(
        &b,
        b"version = 2, with a longer line that shifts everything after it\n",
    );

    let (id_a, m_a, first) = create_release(&a, &store, ChunkSizes::default()).unwrap();
    let (id_b, m_b, second) = create_release(&b, &store, ChunkSizes::default()).unwrap();
    assert_ne!(id_a, id_b);
    // Chunked in 32 MiB segments on several threads, the cuts are those of one FastCDC pass
    // over the whole archive.
    let archive: Vec<u8> = m_a
        .chunks
        .iter()
        .flat_map(|c| store.get_chunk(&c.hash).unwrap())
        .collect();
    assert_eq!(archive.len() as u64, m_a.archive_size);
    let sizes = ChunkSizes::default();
    let one_pass: Vec<usize> = fastcdc::v2020::FastCDC::new(
        &archive,
        sizes.min as usize,
        sizes.avg as usize,
        sizes.max as usize,
    )
    .map(|c| c.length)
    .collect();
    let ours: Vec<usize> = m_a.chunks.iter().map(|c| c.size as usize).collect();
    assert_eq!(ours, one_pass);
    let shared = m_b.chunks.iter().filter(|c| m_a.chunks.contains(c)).count();
    println!(
        "first release: {} chunks, {} MiB; second: {} chunks, {} new, {} new bytes ({:.1}% of {} bytes)",
        first.chunks,
        first.archive_bytes >> 20,
        second.chunks,
        second.new_chunks,
        second.new_bytes,
        100.0 * second.new_bytes as f64 / second.archive_bytes as f64,
        second.archive_bytes
    );
    assert!(second.new_chunks <= 3, "{second:?}");
    assert_eq!(shared + second.new_chunks, m_b.chunks.len());
    assert!(second.new_bytes < 8 << 20, "{second:?}");
}
