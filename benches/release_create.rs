//! Release creation throughput (list + plan + chunk + hash, then store the chunks or leave
//! them in place) on an output of realistic content — a mix of compressible text and
//! random binary — printed beside the raw single-threaded BLAKE3 hashing throughput of
//! the same bytes, measured in the same run. Target (issue 3): release creation at least
//! half as fast as raw hashing.
//!
//! It also prints what each step costs on one thread, so that a miss can be traced to
//! the step that causes it; creation into a pack on disk, on tmpfs and as one file per
//! chunk, since writing the chunks is the step that depends most on the machine; and
//! what a worker does now: chunks left in the output directory, read back (and checked)
//! only when a member lacks them.
//!
//! `cargo bench --bench release_create` (env `BENCH_RELEASE_MIB`, default 1024).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use starling_release::cuts::CutPlanner;
use starling_release::{
    archive, create_release, create_release_with, ChunkSizes, ChunkStore, DirectoryChunks,
    FsChunkStore, ManifestsOnly, PackStore, ReleaseOptions,
};

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

/// Read every file (from the page cache) and hash it with one BLAKE3 hasher per file: the
/// baseline, what `b3sum` on one thread would do.
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

/// Median of three timed runs of `f` (given the run's number), each after [`settle`].
fn median3(mut f: impl FnMut(usize)) -> f64 {
    let mut times: Vec<f64> = (0..3)
        .map(|run| {
            settle();
            let start = Instant::now();
            f(run);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[1]
}

/// Write back dirty pages, so that the kernel flushing earlier writes does not compete
/// with the run being timed for the two CPUs.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
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
    let sizes = ChunkSizes::default();
    println!(
        "conditions: {cpus} CPUs, output of {} MiB (half text, half random) in {}, page cache warm, dirty pages synced before each run, medians of 3",
        bytes >> 20,
        t.path().display()
    );
    println!(
        "chunks:     FastCDC min {} KiB, avg {} KiB, max {} KiB; stores: one pack file (what workers used to stage in), or a directory of chunk files (neither fsyncs; the origin store does, on publish)",
        sizes.min >> 10,
        sizes.avg >> 10,
        sizes.max >> 10
    );
    let mbs = |b: u64, s: f64| b as f64 / (1 << 20) as f64 / s;
    let row = |name: &str, secs: f64, b: u64| {
        println!("{name:<46} {secs:>8.2} {:>10.0}", mbs(b, secs));
    };

    // What each step costs on one thread, on the same archive bytes.
    settle();
    let files = archive::list(&out).unwrap_or_else(|e| panic!("{e}"));
    let plan = archive::ArchivePlan::new(&files).unwrap_or_else(|e| panic!("{e}"));
    let mut archive = vec![0u8; plan.len() as usize];
    plan.read_at(&out, &files, 0, &mut archive)
        .unwrap_or_else(|e| panic!("{e}"));
    let read = median3(|_| {
        plan.read_at(&out, &files, 0, &mut archive)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let planner = CutPlanner::new(sizes);
    let mut cuts = Vec::new();
    let cut = median3(|_| cuts = planner.chain(&archive, 0, archive.len()));
    let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &archive[w[0]..w[1]]).collect();
    let hash = median3(|_| {
        for c in &chunks {
            std::hint::black_box(blake3::hash(c));
        }
    });
    // Stores stay alive until the end, so that removing one is not timed.
    let mut packs = Vec::new();
    let pack =
        |name: String| PackStore::create(t.path().join(name)).unwrap_or_else(|e| panic!("{e}"));
    let files_store =
        |name: String| FsChunkStore::staging(t.path().join(name)).unwrap_or_else(|e| panic!("{e}"));
    let write_all = |store: &dyn ChunkStore| {
        for (i, c) in chunks.iter().enumerate() {
            store
                .put_chunk(&starling_proto::ChunkHash::of(&i.to_le_bytes()), c)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    let write_pack = median3(|run| {
        let p = pack(format!("wp{run}"));
        write_all(&p);
        packs.push(p);
    });
    let write_files = median3(|run| write_all(&files_store(format!("wf{run}"))));
    let n = archive.len() as u64;
    println!();
    println!(
        "{:<46} {:>8} {:>10}",
        "one step, one thread", "seconds", "MiB/s"
    );
    row("read the archive from the files", read, n);
    row("FastCDC cuts", cut, n);
    row("BLAKE3 of every chunk", hash, n);
    row("write the chunks into a pack", write_pack, n);
    row("write the chunks as one file each", write_files, n);
    let sum = read + cut + hash + write_pack;
    println!(
        "{:<46} {:>8} {:>10.0}",
        format!("bound: {cpus} CPUs, steps overlapped, pack"),
        "",
        mbs(n, sum / cpus.max(1) as f64)
    );
    drop(archive);

    let raw = median3(|_| {
        std::hint::black_box(raw_hash(&out));
    });
    let mut made = None;
    let create = median3(|run| {
        let p = pack(format!("p{run}"));
        made = Some(create_release(&out, &p, sizes).unwrap_or_else(|e| panic!("{e}")));
        packs.push(p);
    });
    let Some((id, _, stats)) = made else {
        panic!("no release was made")
    };
    // The same into memory (tmpfs), where the disk's writeback speed does not count.
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let create_shm = shm.as_ref().map(|d| {
        median3(|run| {
            let p = PackStore::create(d.path().join(format!("p{run}")))
                .unwrap_or_else(|e| panic!("{e}"));
            create_release(&out, &p, sizes).unwrap_or_else(|e| panic!("{e}"));
            packs.push(p);
        })
    });
    let create_files = median3(|run| {
        let (made, _, _) = create_release(&out, &files_store(format!("f{run}")), sizes)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(made, id);
    });
    // What a worker does now: the chunks stay in the output directory.
    let mut manifest = None;
    let in_place = median3(|_| {
        let opts = ReleaseOptions {
            sizes,
            ..ReleaseOptions::default()
        };
        let (made, m, _) = create_release_with(&out, &ManifestsOnly::default(), opts)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(made, id);
        manifest = Some(m);
    });
    // ... and what it reads back when it sends every chunk (none held by the members).
    let Some(manifest) = manifest else {
        panic!("no release was made")
    };
    let chunks = DirectoryChunks::new(&out, &manifest).unwrap_or_else(|e| panic!("{e}"));
    let read_back = median3(|_| {
        for c in &manifest.chunks {
            std::hint::black_box(chunks.get_chunk(&c.hash).unwrap_or_else(|e| panic!("{e}")));
        }
    });
    let held = files_store("f2".into());
    let recreate = median3(|_| {
        let (again, _, s) = create_release(&out, &held, sizes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((again, s.new_chunks), (id, 0));
    });
    println!();
    println!("{:<46} {:>8} {:>10}", "whole", "seconds", "MiB/s");
    row("raw BLAKE3 of the same bytes (1 thread)", raw, bytes);
    row("create release into a pack (workers before)", create, bytes);
    if let Some(secs) = create_shm {
        row("create release into a pack on tmpfs", secs, bytes);
    }
    row("create release, one file per chunk", create_files, bytes);
    row(
        "create release, chunks left in place (worker)",
        in_place,
        bytes,
    );
    row("read every chunk back in place, checked", read_back, bytes);
    row("create again (all chunks stored)", recreate, bytes);
    println!();
    println!(
        "release {id}: {} chunks, archive {} MiB",
        stats.chunks,
        stats.archive_bytes >> 20,
    );
    println!(
        "ratio create/raw-hash: into a pack {:.2}, chunks left in place {:.2} (target >= 0.50); \
         pack on tmpfs: {}; all chunks already stored: {:.2}",
        raw / create,
        raw / in_place,
        create_shm.map_or("-".into(), |s| format!("{:.2}", raw / s)),
        raw / recreate
    );
    drop(packs);
}
