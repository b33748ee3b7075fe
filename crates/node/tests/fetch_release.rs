//! A release fetched over real QUIC on loopback from several peers at once: an origin
//! and two nodes that each hold part of it. The fetcher's store ends with every chunk,
//! each verified; a peer in the region is preferred to the origin; a corrupting peer is
//! cut off and the release still arrives whole — with a unit per chunk and with units of
//! several chunks.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::{Rng, SeedableRng};
use starling_node::fetcher::{fetch_release, SourceSpec, TrackerSources};
use starling_peer::{PeerConfig, PeerEndpoint, Serving};
use starling_pki::ClusterCa;
use starling_proto::release::Manifest;
use starling_proto::{ChunkHash, ReleaseId};
use starling_release::{create_release, ChunkSizes, ChunkStore, FsChunkStore};
use starling_swarm::{FetchConfig, Source, Units};
use tokio::sync::broadcast;

/// A release of a few MiB of random files in small chunks (`avg` bytes on average), in
/// an origin store.
fn make_release(dir: &Path, avg: u32) -> (FsChunkStore, ReleaseId, Manifest) {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..4 {
        let bytes: Vec<u8> = (0..800_000).map(|_| rng.random()).collect();
        std::fs::write(out.join(format!("f{i}")), bytes).unwrap();
    }
    let origin = FsChunkStore::new(dir.join("origin")).unwrap();
    let sizes = ChunkSizes {
        min: avg / 4,
        avg,
        max: avg * 4,
    };
    let (id, manifest, _) = create_release(&out, &origin, sizes).unwrap();
    assert!(
        manifest.chunks.len() > 20,
        "{} chunks",
        manifest.chunks.len()
    );
    (origin, id, manifest)
}

fn endpoint(ca: &ClusterCa, name: &str) -> Arc<PeerEndpoint> {
    let cfg = PeerConfig {
        name: name.into(),
        region: "eu-1".into(),
        ca_cert_pem: ca.cert_pem.clone(),
        identity: ca.issue(name, SystemTime::now()).unwrap(),
        upload_slots: 8,
        upload_queue: 0,
    };
    Arc::new(PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap())
}

fn serve(e: &Arc<PeerEndpoint>, store: Arc<dyn ChunkStore>) {
    let e = e.clone();
    tokio::spawn(async move { e.serve(Serving::store(store)).await });
}

/// A node holding the manifest and every other unit (from `offset`).
fn partial(
    dir: &Path,
    origin: &FsChunkStore,
    id: &ReleaseId,
    m: &Manifest,
    offset: usize,
) -> FsChunkStore {
    let s = FsChunkStore::new(dir).unwrap();
    s.put_manifest(id, &origin.get_manifest(id).unwrap())
        .unwrap();
    for u in Units::of_manifest(m).iter().skip(offset).step_by(2) {
        for c in &u.chunks {
            s.put_chunk(c, &origin.get_chunk(c).unwrap()).unwrap();
        }
    }
    s
}

async fn run(corrupt_neighbour: bool, avg_chunk: u32) {
    let t = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let (origin, id, manifest) = make_release(t.path(), avg_chunk);
    let units = Units::of_manifest(&manifest);
    let longest = units.iter().map(|u| u.chunks.len()).max().unwrap_or(0);
    eprintln!(
        "{} chunks in {} units of up to {longest} chunks",
        manifest.chunks.len(),
        units.len()
    );
    if avg_chunk < 16 * 1024 {
        assert!(longest > 1, "units of one chunk");
    }
    let a = partial(&t.path().join("a"), &origin, &id, &manifest, 0);
    let b = partial(&t.path().join("b"), &origin, &id, &manifest, 1);
    let (eo, ea, eb) = (
        endpoint(&ca, "origin-1"),
        endpoint(&ca, "eu-1-a"),
        endpoint(&ca, "us-1-b"),
    );
    let a: Arc<dyn ChunkStore> = if corrupt_neighbour {
        Arc::new(starling_release::store::Corrupting(a))
    } else {
        Arc::new(a)
    };
    serve(&eo, Arc::new(origin));
    serve(&ea, a);
    serve(&eb, Arc::new(b));
    let peers = vec![
        SourceSpec {
            name: "origin-1".into(),
            addr: eo.local_addr().unwrap(),
            source: Source::Origin,
            fetching: false,
            gateway: false,
        },
        SourceSpec {
            name: "eu-1-a".into(),
            addr: ea.local_addr().unwrap(),
            source: Source::SameRegion,
            fetching: false,
            gateway: false,
        },
        SourceSpec {
            name: "us-1-b".into(),
            addr: eb.local_addr().unwrap(),
            source: Source::OtherRegion,
            fetching: false,
            gateway: false,
        },
    ];
    let sources = TrackerSources {
        gateway: true,
        peers,
        complete: false,
    };
    let mine = Arc::new(FsChunkStore::new(t.path().join("me")).unwrap());
    let (stored, mut heard) = broadcast::channel(4096);
    let me = endpoint(&ca, "eu-1-me");
    let cfg = FetchConfig {
        // Fetch what the neighbour lacks from the other region without waiting.
        cross_region_patience: Duration::ZERO,
        ..FetchConfig::default()
    };
    let report = fetch_release(
        me,
        "eu-1-me",
        id,
        &manifest,
        sources,
        tokio::sync::mpsc::unbounded_channel().1,
        mine.clone(),
        Some(stored),
        cfg,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    for c in &manifest.chunks {
        let bytes = mine.get_chunk(&c.hash).unwrap();
        assert_eq!(ChunkHash::of(&bytes), c.hash);
    }
    let mut announced = 0;
    while heard.try_recv().is_ok() {
        announced += 1;
    }
    assert!(announced > 0, "stored chunks were not announced");
    eprintln!("corrupt={corrupt_neighbour}: {report:?}");
    if corrupt_neighbour {
        assert_eq!(report.dropped.len(), 1, "{report:?}");
        assert_eq!(report.dropped[0].0, "eu-1-a");
    } else {
        assert!(report.dropped.is_empty(), "{report:?}");
        let from = |s| report.received.get(&s).copied().unwrap_or(0);
        assert!(from(Source::SameRegion) > 0, "{report:?}");
        // The neighbours hold everything between them: the origin is asked only for what
        // was asked before their first Have arrived.
        assert!(from(Source::Origin) * 4 < units.len() as u64, "{report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_arrives_whole_from_several_peers() {
    run(false, 64 * 1024).await;
    run(false, 4 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_peer_is_cut_off_and_the_release_still_arrives() {
    run(true, 64 * 1024).await;
    run(true, 4 * 1024).await;
}
