//! Real QUIC on loopback: a chunk goes from one peer to another and is verified; a peer
//! without a certificate from the cluster CA gets nothing; corrupted bytes are caught; a
//! malformed request closes only its own connection; a stored chunk is announced only to
//! the peers not known to hold it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use quinn::crypto::rustls::QuicClientConfig;
use starling_peer::{FetchError, PeerConfig, PeerConn, PeerEndpoint, Serving};
use starling_pki::{client_config, ClusterCa, Identity};
use starling_proto::peer::{Refusal, ALPN};
use starling_proto::{ChunkHash, ReleaseId};
use starling_release::{ChunkStore, FsChunkStore};

fn config(ca: &ClusterCa, name: &str) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        region: "eu-1".into(),
        ca_cert_pem: ca.cert_pem.clone(),
        identity: ca.issue(name, SystemTime::now()).unwrap(),
        upload_slots: 8,
        upload_queue: 0,
    }
}

struct Served {
    addr: SocketAddr,
    _endpoint: Arc<PeerEndpoint>,
    _dir: tempfile::TempDir,
}

/// A peer named `origin-1` serving one chunk; its bytes and name.
fn serve(ca: &ClusterCa, corrupt: bool) -> (Served, Vec<u8>, ChunkHash) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsChunkStore::new(dir.path()).unwrap();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hash = ChunkHash::of(&bytes);
    store.put_chunk(&hash, &bytes).unwrap();
    let store: Arc<dyn ChunkStore> = if corrupt {
        Arc::new(starling_release::store::Corrupting(store))
    } else {
        Arc::new(store)
    };
    let endpoint = Arc::new(
        PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), config(ca, "origin-1")).unwrap(),
    );
    let addr = endpoint.local_addr().unwrap();
    let e = endpoint.clone();
    tokio::spawn(async move { e.serve(Serving::store(store)).await });
    (
        Served {
            addr,
            _endpoint: endpoint,
            _dir: dir,
        },
        bytes,
        hash,
    )
}

/// One chunk, as a unit of its own.
async fn fetch_one(conn: &PeerConn, hash: &ChunkHash) -> Result<Vec<u8>, FetchError> {
    let mut got = Vec::new();
    conn.fetch(hash, &[*hash], 0, || (), |_, bytes| got = bytes)
        .await?;
    Ok(got)
}

fn client(ca: &ClusterCa, name: &str) -> PeerEndpoint {
    PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), config(ca, name)).unwrap()
}

#[tokio::test]
async fn a_chunk_crosses_verified_and_a_missing_one_is_refused() {
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let (served, bytes, hash) = serve(&ca, false);
    let me = client(&ca, "eu-1-n1");
    let conn = me.connect(served.addr, "origin-1").await.unwrap();
    assert_eq!(conn.remote.node, "origin-1");
    assert_eq!(fetch_one(&conn, &hash).await.unwrap(), bytes);
    match fetch_one(&conn, &ChunkHash::of(b"nobody has this")).await {
        Err(FetchError::Refused(Refusal::NotHeld)) => {}
        other => panic!("{other:?}"),
    }
    // Several at once on one connection, each on its own stream.
    let conn = Arc::new(conn);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let conn = conn.clone();
        set.spawn(async move { fetch_one(&conn, &hash).await });
    }
    while let Some(got) = set.join_next().await {
        assert_eq!(got.unwrap().unwrap(), bytes);
    }
}

/// A unit of several chunks comes in one request, each chunk checked and handed over
/// in order; a unit the server lacks a chunk of is refused whole.
#[tokio::test]
async fn a_unit_of_several_chunks_crosses_in_one_request() {
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FsChunkStore::new(dir.path()).unwrap();
    let parts: Vec<Vec<u8>> = (0..3u8)
        .map(|i| vec![i; 300_000 + usize::from(i)])
        .collect();
    let names: Vec<ChunkHash> = parts.iter().map(|b| ChunkHash::of(b)).collect();
    for (n, b) in names.iter().zip(&parts) {
        store.put_chunk(n, b).unwrap();
    }
    let endpoint = Arc::new(
        PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), config(&ca, "origin-1")).unwrap(),
    );
    let addr = endpoint.local_addr().unwrap();
    let e = endpoint.clone();
    tokio::spawn(async move { e.serve(Serving::store(Arc::new(store))).await });
    let me = client(&ca, "eu-1-n1");
    let conn = me.connect(addr, "origin-1").await.unwrap();
    let unit = ChunkHash::of(b"a unit");
    let mut got = Vec::new();
    let mut arrived = 0;
    conn.fetch(&unit, &names, 0, || arrived += 1, |c, b| got.push((c, b)))
        .await
        .unwrap();
    assert_eq!(arrived, 1);
    let want: Vec<(ChunkHash, Vec<u8>)> = names.iter().copied().zip(parts).collect();
    assert_eq!(got, want);
    let mut asked = names.clone();
    asked.push(ChunkHash::of(b"not there"));
    match conn.fetch(&unit, &asked, 0, || (), |_, _| ()).await {
        Err(FetchError::Refused(Refusal::NotHeld)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_peer_from_another_ca_or_without_a_certificate_gets_nothing() {
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let (served, _, _) = serve(&ca, false);
    // Another cluster's certificate.
    let other = ClusterCa::generate("starling-other", SystemTime::now()).unwrap();
    let stranger = PeerEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        PeerConfig {
            // It trusts our CA, so only its own certificate is wrong.
            ca_cert_pem: ca.cert_pem.clone(),
            ..config(&other, "eu-1-n9")
        },
    )
    .unwrap();
    assert!(stranger.connect(served.addr, "origin-1").await.is_err());
    // No certificate at all.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots(&ca))
    .with_no_client_auth();
    let conn = raw_connect(tls, served.addr).await;
    let refused = match conn {
        Err(_) => true,
        // TLS 1.3 finishes the client's side first; the server's refusal closes it.
        Ok(c) => match c.open_bi().await {
            Ok((mut s, mut r)) => {
                // A proper hello: only the missing certificate can stop the answer.
                let _ = s.write_all(&hello("eu-1-n8").encode().unwrap()).await;
                let mut prefix = [0u8; 4];
                r.read_exact(&mut prefix).await.is_err()
            }
            Err(_) => true,
        },
    };
    assert!(refused, "a client without a certificate was served");
}

fn hello(node: &str) -> starling_proto::peer::Frame {
    starling_proto::peer::Frame::Hello {
        version: starling_proto::peer::PROTOCOL_VERSION,
        node: node.into(),
        region: "eu-1".into(),
    }
}

fn roots(ca: &ClusterCa) -> Arc<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut r = rustls::RootCertStore::empty();
    r.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(r)
}

async fn raw_connect(
    mut tls: rustls::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep.connect(addr, "origin-1").unwrap().await
}

#[tokio::test]
async fn corrupted_bytes_are_caught() {
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let (served, _, hash) = serve(&ca, true);
    let me = client(&ca, "eu-1-n1");
    let conn = me.connect(served.addr, "origin-1").await.unwrap();
    match fetch_one(&conn, &hash).await {
        Err(FetchError::Corrupt { expected, .. }) => assert_eq!(expected, hash),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
}

#[tokio::test]
async fn a_malformed_request_closes_only_its_connection() {
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let (served, bytes, hash) = serve(&ca, false);
    let id: Identity = ca.issue("eu-1-n2", SystemTime::now()).unwrap();
    let tls = client_config(&ca.cert_pem, &id, ALPN).unwrap();
    let conn = raw_connect(tls, served.addr).await.unwrap();
    // A proper hello on the control stream, then garbage as a request.
    let (mut cs, mut cr) = conn.open_bi().await.unwrap();
    cs.write_all(&hello("eu-1-n2").encode().unwrap())
        .await
        .unwrap();
    let mut prefix = [0u8; 4];
    cr.read_exact(&mut prefix).await.unwrap();
    let (mut s, _r) = conn.open_bi().await.unwrap();
    s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let _ = s.finish();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed()).await;
    assert!(closed.is_ok(), "the connection stayed open after garbage");
    // Everyone else is served as before.
    let me = client(&ca, "eu-1-n1");
    let good = me.connect(served.addr, "origin-1").await.unwrap();
    assert_eq!(fetch_one(&good, &hash).await.unwrap(), bytes);
}

#[tokio::test]
async fn manifests_are_fetched_verified_and_the_tracker_answers_announcements() {
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FsChunkStore::new(dir.path()).unwrap();
    let manifest = b"a manifest's bytes".to_vec();
    let release = ReleaseId::of(&manifest);
    store.put_manifest(&release, &manifest).unwrap();
    let tracker = Arc::new(std::sync::Mutex::new(starling_core::tracker::Tracker::new(
        std::time::Duration::from_secs(30),
        50,
        8,
    )));
    let member = Arc::new(
        PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), config(&ca, "member-1")).unwrap(),
    );
    let addr = member.local_addr().unwrap();
    let m = member.clone();
    tokio::spawn(async move {
        m.serve(Serving {
            store: Arc::new(store),
            stored: None,
            tracker: Some(tracker),
        })
        .await
    });
    let a = client(&ca, "eu-1-a");
    let conn_a = a.connect(addr, "member-1").await.unwrap();
    assert_eq!(conn_a.fetch_manifest(&release).await.unwrap(), manifest);
    match conn_a.fetch_manifest(&ReleaseId::of(b"unknown")).await {
        Err(FetchError::NoManifest) => {}
        other => panic!("{other:?}"),
    }
    // A holds the release; B, fetching it, is told about A.
    let announce =
        |addr: &str, holds: Vec<ReleaseId>, fetching: Vec<ReleaseId>| starling_peer::Announcement {
            addr: addr.into(),
            holds,
            fetching,
            ..Default::default()
        };
    conn_a
        .announce(&announce("10.0.0.1:7000", vec![release], vec![]))
        .await
        .unwrap();
    let b = client(&ca, "eu-1-b");
    let conn_b = b.connect(addr, "member-1").await.unwrap();
    conn_b
        .announce(&announce("10.0.0.2:7000", vec![], vec![release]))
        .await
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), conn_b.next_peers())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.release, release);
    assert!(answer.gateway, "one node in its region: a gateway");
    let peers = answer.peers;
    assert_eq!(peers.len(), 1);
    assert_eq!(
        (
            peers[0].node.as_str(),
            peers[0].addr.as_str(),
            peers[0].fetching
        ),
        ("eu-1-a", "10.0.0.1:7000", false)
    );
}

#[tokio::test]
async fn a_stored_chunk_is_announced_to_peers_not_known_to_hold_it() {
    use starling_peer::Stored;
    use starling_proto::release::{ChunkRef, Manifest, MANIFEST_VERSION};
    let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FsChunkStore::new(dir.path()).unwrap();
    let chunk = |n: u8| ChunkHash::of(&[n; 10]);
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        archive_size: 30,
        files: Vec::new(),
        chunks: (0..3)
            .map(|n| ChunkRef {
                hash: chunk(n),
                size: 10,
            })
            .collect(),
        run: None,
    };
    let (release, encoded) = manifest.encode_with_id().unwrap();
    store.put_manifest(&release, &encoded).unwrap();
    store.put_chunk(&chunk(0), &[0; 10]).unwrap();
    let (stored, _) = tokio::sync::broadcast::channel(16);
    let server = Arc::new(
        PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), config(&ca, "eu-1-s")).unwrap(),
    );
    let addr = server.local_addr().unwrap();
    let s = server.clone();
    let serving = Serving {
        store: Arc::new(store),
        stored: Some(stored.clone()),
        tracker: None,
    };
    tokio::spawn(async move { s.serve(serving).await });
    let wait = std::time::Duration::from_secs(10);
    let mut conns = Vec::new();
    for name in ["eu-1-a", "eu-1-b"] {
        let conn = client(&ca, name).connect(addr, "eu-1-s").await.unwrap();
        conn.want(&release).await.unwrap();
        // The answer to `Want` (what the server holds) says the server took it.
        let (r, first) = tokio::time::timeout(wait, conn.next_have())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r, first), (release, vec![chunk(0)]));
        conns.push(conn);
    }
    // A is known to hold chunk 1; nobody is known to hold chunk 2.
    for (n, holders) in [(1, vec!["eu-1-a".to_string()]), (2, vec![])] {
        stored
            .send(Stored {
                chunk: chunk(n),
                entered_region: false,
                holders: holders.into(),
            })
            .unwrap();
    }
    let expected = [("a", vec![chunk(2)]), ("b", vec![chunk(1), chunk(2)])];
    for (conn, (name, expected)) in conns.iter().zip(expected) {
        let mut told = Vec::new();
        while !told.contains(&chunk(2)) {
            let (_, have) = tokio::time::timeout(wait, conn.next_have())
                .await
                .unwrap()
                .unwrap();
            told.extend(have);
        }
        assert_eq!(told, expected, "told {name}");
    }
}
