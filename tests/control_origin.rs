//! The origin store on a control member: chunks and manifests are checked against their
//! names before anything is written, and read back byte for byte.

mod common;

use common::*;
use starling_release::{create_release, ChunkSizes, ChunkStore, FsChunkStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_and_manifests_are_verified_and_kept() {
    let c = Cluster::start(1, &[]).await;
    let url = c.url(1);
    let put = |path: String, body: Vec<u8>, token: Option<&str>| {
        let mut rb = c.http.put(format!("{url}{path}")).body(body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };

    // A real release, made locally the way a worker makes it.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("dist");
    std::fs::create_dir_all(out.join("bin")).unwrap();
    std::fs::write(out.join("bin/app"), vec![7u8; 300_000]).unwrap();
    std::fs::write(out.join("index.html"), "<h1>hi</h1>").unwrap();
    let local = FsChunkStore::new(t.path().join("local")).unwrap();
    let sizes = ChunkSizes {
        min: 16 * 1024,
        avg: 64 * 1024,
        max: 256 * 1024,
    };
    let (id, manifest, _) = create_release(&out, &local, sizes).unwrap();
    assert!(manifest.chunks.len() > 1);

    // The manifest is refused while its chunks are missing.
    let mbytes = local.get_manifest(&id).unwrap();
    let r = put(format!("/v1/manifests/{id}"), mbytes.clone(), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // Asked which chunks it lacks, the member names them all; a question too long is refused.
    let names: Vec<String> = manifest.chunks.iter().map(|c| c.hash.to_string()).collect();
    let missing = |chunks: Vec<String>| {
        c.http
            .post(format!("{url}/v1/chunks/missing"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "chunks": chunks }))
            .send()
    };
    let r = c
        .http
        .post(format!("{url}/v1/chunks/missing"))
        .json(&serde_json::json!({ "chunks": names }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "asked without a token");
    let r = missing(names.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["chunks"], serde_json::json!(names));
    let r = missing(vec!["0".repeat(64); 100_001]).await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let r = c
        .http
        .post(format!("{url}/v1/chunks/missing"))
        .bearer_auth(TOKEN)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    for ch in &manifest.chunks {
        let bytes = local.get_chunk(&ch.hash).unwrap();
        let r = put(format!("/v1/chunks/{}", ch.hash), bytes.clone(), None)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "chunk put without a token");
        let r = put(
            format!("/v1/chunks/{}", ch.hash),
            bytes.clone(),
            Some(TOKEN),
        )
        .await
        .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let r = put(format!("/v1/chunks/{}", ch.hash), bytes, Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            200,
            "a chunk already held is not written again"
        );
    }
    // Now that it holds them, it lacks none; a name that is not a hash is refused.
    let v: serde_json::Value = missing(names.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(v["chunks"], serde_json::json!([]));
    let mut asked = names.clone();
    asked.push("../../etc/passwd".into());
    assert_eq!(
        missing(asked).await.unwrap().status().as_u16(),
        422,
        "a name that is no digest does not parse"
    );

    // Bytes that do not hash to the name, a name that is not a hash, too much data.
    let first = &manifest.chunks[0].hash;
    let r = put(
        format!("/v1/chunks/{first}"),
        b"not these bytes".to_vec(),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = put(
        "/v1/chunks/..%2F..%2Fetc".to_string(),
        b"x".to_vec(),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let big = vec![0u8; 9 * 1024 * 1024];
    let big_hash = blake3::hash(&big).to_hex().to_string();
    let r = put(format!("/v1/chunks/{big_hash}"), big, Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);

    // Manifest: wrong id, garbage, then the real one.
    let wrong = "0".repeat(64);
    let r = put(
        format!("/v1/manifests/{wrong}"),
        mbytes.clone(),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = put(
        format!("/v1/manifests/{id}"),
        b"\xff\x00garbage".to_vec(),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = put(format!("/v1/manifests/{id}"), mbytes.clone(), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);

    // Everything reads back and re-hashes to its name.
    let got = c.get(&format!("{url}/v1/manifests/{id}")).await;
    assert_eq!(got.bytes().await.unwrap().as_ref(), mbytes.as_slice());
    for ch in &manifest.chunks {
        let got = c.get(&format!("{url}/v1/chunks/{}", ch.hash)).await;
        assert_eq!(got.status().as_u16(), 200);
        let bytes = got.bytes().await.unwrap();
        assert_eq!(
            blake3::hash(&bytes).to_hex().to_string(),
            ch.hash.to_string()
        );
    }
    let missing = c.get(&format!("{url}/v1/chunks/{}", "a".repeat(64))).await;
    assert_eq!(missing.status().as_u16(), 404);
    // Release contents are private: no token, no bytes.
    let anon = c.get_anon(&format!("{url}/v1/manifests/{id}")).await;
    assert_eq!(anon.status().as_u16(), 401);
    let anon = c
        .get_anon(&format!("{url}/v1/chunks/{}", manifest.chunks[0].hash))
        .await;
    assert_eq!(anon.status().as_u16(), 401);
}

/// A read token reads logs and release contents and writes nothing; `--public-read` opens
/// the reads to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_token_and_public_read() {
    const READ: &str = "read-only-token-0123";
    for public in [false, true] {
        let mut args = vec!["--read-token", READ];
        if public {
            args.push("--public-read");
        }
        let c = Cluster::start(1, &args).await;
        let url = c.url(1);
        let chunk = vec![42u8; 1000];
        let hash = blake3::hash(&chunk).to_hex().to_string();
        let r = c
            .http
            .put(format!("{url}/v1/chunks/{hash}"))
            .bearer_auth(READ)
            .body(chunk.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "a read token wrote a chunk");
        let r = c
            .http
            .put(format!("{url}/v1/chunks/{hash}"))
            .bearer_auth(TOKEN)
            .body(chunk.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let r = c
            .http
            .get(format!("{url}/v1/chunks/{hash}"))
            .bearer_auth(READ)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let r = c.get_anon(&format!("{url}/v1/chunks/{hash}")).await;
        assert_eq!(r.status().as_u16(), if public { 200 } else { 401 });
        let r = c.get_anon(&format!("{url}/v1/builds/1/logs")).await;
        assert_eq!(r.status().as_u16(), if public { 404 } else { 401 });
    }
}

/// An old chunk that a worker was just told is held survives collection while the worker
/// publishes (it will not send it again); once nobody asks for it, it is collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_chunks_outlive_the_grace_period() {
    let c = Cluster::start(1, &["--collect-grace", "2s"]).await;
    let url = c.url(1);
    let chunk = b"an unreferenced chunk".to_vec();
    let hash = blake3::hash(&chunk).to_hex().to_string();
    assert_eq!(c.put_chunk(1, chunk).await, 201);
    // For three grace periods and more, a worker keeps being told the chunk is here.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while std::time::Instant::now() < until {
        let r = c
            .http
            .post(format!("{url}/v1/chunks/missing"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "chunks": [hash] }))
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v["chunks"],
            serde_json::json!([]),
            "the confirmed chunk was collected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // Nobody asks any more: it goes.
    c.wait_until(
        "the chunk is collected",
        std::time::Duration::from_secs(30),
        async |c| {
            c.get(&format!("{url}/v1/chunks/{hash}"))
                .await
                .status()
                .as_u16()
                == 404
        },
    )
    .await;
}

/// A member's origin directory holds at most its quota: past it, chunk uploads get 507.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_quota_is_enforced() {
    let c = Cluster::start(1, &["--origin-quota", "100000"]).await;
    let mut statuses = Vec::new();
    for i in 0..3u8 {
        statuses.push(c.put_chunk(1, vec![i; 40_000]).await);
    }
    assert_eq!(statuses, vec![201, 201, 507]);
}
