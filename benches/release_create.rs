//! Release creation throughput (list + pack + chunk + hash + store) on an output of
//! realistic content — a mix of compressible text and random binary — printed beside the
//! raw single-threaded BLAKE3 hashing throughput of the same bytes, measured in the same
//! run. Target (issue 3): release creation at least half as fast as raw hashing.
//!
//! `cargo bench --bench release_create` (env `BENCH_RELEASE_MIB`, default 1024).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use starling_release::{create_release, ChunkSizes, FsChunkStore};

/// Deterministic pseudo-random bytes (xorshift64*), so every run packs the same content.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const WORDS: [&str; 16] = [
    "fn", "let", "match", "return", "struct", "impl", "self", "config", "value", "error", "Result",
    "String", "async", "await", "pub", "use",
];

/// Text that compresses like source code or logs.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let n = 3 + (rng.next() % 9) as usize;
        for _ in 0..n {
            out.extend_from_slice(WORDS[(rng.next() % 16) as usize].as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// About `total` bytes in files of 4 KiB to 16 MiB, half text and half random binary.
fn make_output(root: &Path, total: u64) -> u64 {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut written = 0u64;
    let mut i = 0;
    while written < total {
        let dir = root.join(format!("d{}", i % 17));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let size = (4096u64 << (rng.next() % 13)).min(total - written).max(1) as usize;
        let bytes = if i % 2 == 0 {
            text(&mut rng, size)
        } else {
            let mut b = vec![0u8; size];
            rng.fill(&mut b);
            b
        };
        fs::write(dir.join(format!("f{i}.bin")), &bytes).unwrap_or_else(|e| panic!("{e}"));
        written += size as u64;
        i += 1;
    }
    written
}

/// Read every file (from the page cache) and hash it with one BLAKE3 hasher per file.
fn raw_hash(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{e}")) {
            let p = e.unwrap_or_else(|e| panic!("{e}")).path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let mut f = fs::File::open(&p).unwrap_or_else(|e| panic!("{e}"));
            let mut h = blake3::Hasher::new();
            loop {
                let n = f.read(&mut buf).unwrap_or_else(|e| panic!("{e}"));
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
            std::hint::black_box(h.finalize());
        }
    }
    total
}

fn main() {
    let mib: u64 = std::env::var("BENCH_RELEASE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = t.path().join("output");
    let bytes = make_output(&out, mib << 20);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "conditions: {cpus} CPUs, output of {} MiB (half text, half random) in {}",
        bytes >> 20,
        t.path().display()
    );
    let sizes = ChunkSizes::default();
    println!("chunks:     FastCDC min {} KiB, avg {} KiB, max {} KiB; store: a worker's staging directory (no fsync; the origin store fsyncs on publish)", sizes.min >> 10, sizes.avg >> 10, sizes.max >> 10);

    // Warm the page cache so both measurements read from memory.
    raw_hash(&out);
    let start = Instant::now();
    let hashed = raw_hash(&out);
    let raw = start.elapsed().as_secs_f64();

    let store = FsChunkStore::staging(t.path().join("store")).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let (id, manifest, stats) =
        create_release(&out, &store, sizes).unwrap_or_else(|e| panic!("{e}"));
    let create = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let (id2, _, again) = create_release(&out, &store, sizes).unwrap_or_else(|e| panic!("{e}"));
    let recreate = start.elapsed().as_secs_f64();
    assert_eq!(id, id2);

    let mbs = |b: u64, s: f64| b as f64 / (1 << 20) as f64 / s;
    println!();
    println!("{:<34} {:>10} {:>10}", "step", "seconds", "MiB/s");
    println!(
        "{:<34} {:>10.2} {:>10.0}",
        "raw BLAKE3 of the same bytes",
        raw,
        mbs(hashed, raw)
    );
    println!(
        "{:<34} {:>10.2} {:>10.0}",
        "create release (empty store)",
        create,
        mbs(bytes, create)
    );
    println!(
        "{:<34} {:>10.2} {:>10.0}",
        "create again (all chunks stored)",
        recreate,
        mbs(bytes, recreate)
    );
    println!();
    println!(
        "release {id}: {} chunks, archive {} MiB, {} new chunks; second run stored {} new",
        stats.chunks,
        stats.archive_bytes >> 20,
        stats.new_chunks,
        again.new_chunks
    );
    println!(
        "ratio create/raw-hash: {:.2} (target >= 0.50)",
        mbs(bytes, create) / mbs(hashed, raw)
    );
    std::hint::black_box(manifest);
}
