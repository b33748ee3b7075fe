//! End to end with real processes and real git: a signed push webhook queues a build, a
//! `starling worker` leases it, checks the commit out, runs its `starling.toml` command,
//! packs the output into a release and pushes it to the origin store; the build ends
//! `succeeded` with the release id, and the manifest and chunks read back from the control
//! member re-hash to their names. A failing command and a bad spec end `failed` with a
//! clear reason.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use starling_proto::release::Manifest;
use starling_proto::{Build, BuildStatus};

fn commit(work: &Path, spec: &str, msg: &str) -> String {
    std::fs::write(work.join("starling.toml"), spec).unwrap();
    git(work, &["add", "."]);
    git(work, &["commit", "-q", "-m", msg]);
    git(work, &["rev-parse", "HEAD"])
}

async fn push(c: &Cluster, sha: &str, delivery: &str) -> u64 {
    let (body, sig) = github_push("acme/web", "main", sha, SECRET);
    let r = send_github(&c.http, &c.url(1), "push", delivery, body, &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    v["build"]["id"].as_u64().unwrap()
}

async fn wait_running(c: &Cluster, id: u64) {
    c.wait_until("the build runs", Duration::from_secs(10), async |c| {
        c.build(1, id).await.status == BuildStatus::Running
    })
    .await;
}

async fn wait_done(c: &Cluster, id: u64) -> Build {
    for _ in 0..600 {
        let b = c.build(1, id).await;
        if b.status.is_terminal() {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.dump_logs();
    panic!("build {id} did not finish in 60 s");
}

async fn add_repo(c: &Cluster, work: &Path) {
    let r = c
        .post(1, "/v1/repos", &serde_json::json!({
            "name": "acme/web", "url": format!("file://{}", work.display()), "branch": "main", "webhook_secret": SECRET
        }))
        .await;
    assert_eq!(r.status().as_u16(), 201);
}

fn new_repo(c: &Cluster) -> std::path::PathBuf {
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("index.html"), "<h1>hello</h1>\n").unwrap();
    work
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_build_is_finished_by_another() {
    let c = Cluster::start(1, &["--lease-ttl", "2s"]).await;
    let work = new_repo(&c);
    let sha = commit(
        &work,
        "[build]\ncommand = \"sleep 3 && mkdir -p dist && echo ok > dist/x\"\noutput = \"dist\"\n",
        "slow",
    );
    add_repo(&c, &work).await;
    let mut first = c.spawn_worker("wa");
    let id = push(&c, &sha, "d-slow").await;
    // Wait until the first worker runs it, then SIGKILL the worker mid-build.
    wait_running(&c, id).await;
    first.kill().await.unwrap();
    let _second = c.spawn_worker("wb");
    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
    use BuildStatus::*;
    assert_eq!(
        trail(&b),
        vec![
            (Queued, 1, None),
            (Running, 1, Some("wa/0".into())),
            (Queued, 2, None),
            (Running, 2, Some("wb/0".into())),
            (Succeeded, 2, Some("wb/0".into())),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_to_release() {
    let c = Cluster::start(1, &["--lease-ttl", "3s"]).await;
    let work = new_repo(&c);
    let good = commit(
        &work,
        "[build]\ncommand = \"mkdir -p dist/bin && cp index.html dist/ && echo $STARLING_SHA > dist/version && ln -s ../version dist/bin/v\"\noutput = \"dist\"\n",
        "good",
    );
    add_repo(&c, &work).await;
    let _worker = c.spawn_worker("w1");

    let id = push(&c, &good, "d-good").await;
    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
    let release = b.release.expect("a release id");

    // The manifest and every chunk come back from the control member and re-hash.
    let bytes = c
        .get_bytes(&format!("{}/v1/manifests/{release}", c.url(1)))
        .await;
    assert_eq!(starling_proto::ReleaseId::of(&bytes), release);
    let manifest = Manifest::decode(&bytes).unwrap();
    let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, vec!["bin", "bin/v", "index.html", "version"]);
    for ch in &manifest.chunks {
        let data = c
            .get_bytes(&format!("{}/v1/chunks/{}", c.url(1), ch.hash))
            .await;
        assert_eq!(starling_proto::ChunkHash::of(&data), ch.hash);
    }
    let releases: Vec<serde_json::Value> = c
        .get_json(&format!("{}/v1/releases?repo=acme/web", c.url(1)))
        .await;
    assert_eq!(releases.len(), 1);
    // The worker published from the output directory, with no copy of its own, and the
    // build directory is gone.
    assert!(!c.dir.path().join("w1/staging").exists());
    let left: Vec<_> = std::fs::read_dir(c.dir.path().join("w1/builds"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A failing command and a bad spec: failed, with the reason, and no release.
    let failing = commit(
        &work,
        "[build]\ncommand = \"echo compiling; exit 7\"\noutput = \"dist\"\n",
        "fails",
    );
    let b = wait_done(&c, push(&c, &failing, "d-fail").await).await;
    assert_eq!(b.status, BuildStatus::Failed);
    let reason = b.reason.clone().unwrap_or_default();
    assert!(reason.contains("exit code 7"), "{reason}");
    // The output is in the (private) log, not in the public reason.
    let log = c
        .get(&format!("{}/v1/builds/{}/logs", c.url(1), b.id))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("compiling") && !reason.contains("compiling"),
        "{log}"
    );
    assert!(b.release.is_none());

    let bad = commit(
        &work,
        "[build]\ncommand = \"true\"\noutput = \"dist\"\ncolour = \"blue\"\n",
        "bad spec",
    );
    let b = wait_done(&c, push(&c, &bad, "d-bad").await).await;
    assert_eq!(b.status, BuildStatus::Failed);
    let reason = b.reason.unwrap_or_default();
    assert!(
        reason.contains("starling.toml") && reason.contains("colour"),
        "{reason}"
    );

    // An output with a symlink to /etc is refused.
    let evil = commit(
        &work,
        "[build]\ncommand = \"mkdir -p dist && ln -s /etc dist/etc\"\noutput = \"dist\"\n",
        "evil",
    );
    let b = wait_done(&c, push(&c, &evil, "d-evil").await).await;
    assert_eq!(b.status, BuildStatus::Failed);
    assert!(b.reason.unwrap_or_default().contains("absolute path"));
    // An output path that leads out of the checkout through a link is refused.
    for (i, (cmd, output)) in [("ln -s / root", "root/etc"), ("ln -s /etc dist", "dist/.")]
        .into_iter()
        .enumerate()
    {
        let escape = commit(
            &work,
            &format!("[build]\ncommand = \"{cmd}\"\noutput = \"{output}\"\n"),
            &format!("escape {i}"),
        );
        let b = wait_done(&c, push(&c, &escape, &format!("d-escape-{i}")).await).await;
        assert_eq!(b.status, BuildStatus::Failed, "{cmd}: {b:?}");
        assert!(
            b.reason
                .clone()
                .unwrap_or_default()
                .contains("outside the checkout"),
            "{b:?}"
        );
    }
    let releases: Vec<serde_json::Value> = c
        .get_json(&format!("{}/v1/releases?repo=acme/web", c.url(1)))
        .await;
    assert_eq!(releases.len(), 1, "no partial release recorded");

    // The member counted what happened: one build succeeded and the rest failed, every
    // delivery was queued, and the release's bytes went into its origin store.
    let metrics = c
        .get(&format!("{}/metrics", c.url(1)))
        .await
        .text()
        .await
        .unwrap();
    let figure = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    assert_eq!(
        figure("starling_builds_finished_total{status=\"succeeded\"}"),
        1.0
    );
    assert_eq!(
        figure("starling_builds_finished_total{status=\"failed\"}"),
        5.0
    );
    assert_eq!(
        figure("starling_webhooks_total{forge=\"github\",outcome=\"queued\"}"),
        6.0
    );
    assert!(figure("starling_origin_chunk_bytes_total") > 0.0);
    assert_eq!(figure("starling_build_seconds_count"), 6.0);
    assert_eq!(figure("starling_raft_is_leader"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_timeout_stop_running_builds() {
    let c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    let slow = commit(
        &work,
        "[build]\ncommand = \"sleep 60\"\noutput = \"dist\"\n",
        "slow",
    );
    add_repo(&c, &work).await;
    let _worker = c.spawn_worker("wc");
    let id = push(&c, &slow, "d-cancel").await;
    wait_running(&c, id).await;
    let asked = std::time::Instant::now();
    let r = c
        .post(
            1,
            &format!("/v1/builds/{id}/cancel"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Cancelled, "{b:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        asked.elapsed()
    );

    let timing_out = commit(
        &work,
        "[build]\ncommand = \"sleep 60\"\noutput = \"dist\"\ntimeout = \"1s\"\n",
        "times out",
    );
    let b = wait_done(&c, push(&c, &timing_out, "d-timeout").await).await;
    assert_eq!(b.status, BuildStatus::TimedOut, "{b:?}");
    assert!(b.reason.unwrap_or_default().contains("timed out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_collects_old_releases_and_their_chunks() {
    let c = Cluster::start(1, &["--keep-releases", "1", "--collect-grace", "3s"]).await;
    two_releases_then_collect(&c).await;
}

/// The origin store in an S3-compatible bucket shared by two members: a build's chunks
/// and manifest land in the bucket, both members serve them, and the collector removes
/// the chunks of a collected release from the bucket.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_origin_holds_and_collects_releases() {
    let s3 = S3Server::start("starling").await;
    let args = [
        "--keep-releases",
        "1",
        "--collect-grace",
        "3s",
        "--origin",
        "s3://starling/origin",
    ];
    let c = Cluster::start_with(2, &args, &s3.env()).await;
    let (kept, only_old) = two_releases_then_collect(&c).await;
    let keys = s3.keys("origin/").await;
    for ch in &kept.chunks {
        assert!(
            keys.contains(&format!("origin/chunks/{}", ch.hash)),
            "{keys:?}"
        );
        let bytes = c
            .get_bytes(&format!("{}/v1/chunks/{}", c.url(2), ch.hash))
            .await;
        assert_eq!(starling_proto::ChunkHash::of(&bytes), ch.hash);
    }
    for ch in &only_old {
        assert!(
            !keys.contains(&format!("origin/chunks/{}", ch.hash)),
            "{keys:?}"
        );
    }
    let manifests = keys
        .iter()
        .filter(|k| k.starts_with("origin/manifests/"))
        .count();
    assert_eq!(manifests, 1, "{keys:?}");
    assert!(!std::fs::exists(c.data_dir(1).join("origin/chunks")).unwrap_or(true));
}

/// Two builds with `--keep-releases 1`: the older release is let go, its manifest and
/// the chunks only it used are collected, and the kept release loses nothing. Returns
/// the kept release's manifest and the collected chunks.
async fn two_releases_then_collect(
    c: &Cluster,
) -> (Manifest, Vec<starling_proto::release::ChunkRef>) {
    let work = new_repo(c);
    add_repo(c, &work).await;
    let _worker = c.spawn_worker("wr");
    let spec = "[build]\ncommand = \"mkdir -p dist && cp unique.bin dist/\"\noutput = \"dist\"\n";
    let mut releases = Vec::new();
    for (i, seed) in [b'A', b'B'].into_iter().enumerate() {
        std::fs::write(work.join("unique.bin"), vec![seed; 100_000]).unwrap();
        let sha = commit(&work, spec, &format!("r{i}"));
        let b = wait_done(c, push(c, &sha, &format!("d-r{i}")).await).await;
        assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
        releases.push(b.release.unwrap());
    }
    let manifest_of = |id: &starling_proto::ReleaseId| format!("{}/v1/manifests/{id}", c.url(1));
    let old = Manifest::decode(&c.get_bytes(&manifest_of(&releases[0])).await).unwrap();
    let new = Manifest::decode(&c.get_bytes(&manifest_of(&releases[1])).await).unwrap();
    let only_old: Vec<_> = old
        .chunks
        .iter()
        .filter(|ch| !new.chunks.contains(ch))
        .cloned()
        .collect();
    assert!(!only_old.is_empty());

    // The older release is let go (the record stays), then its manifest and chunks go.
    c.wait_until(
        "the old release's chunks are collected",
        Duration::from_secs(30),
        async |c| {
            let gone = c
                .get(&format!("{}/v1/chunks/{}", c.url(1), only_old[0].hash))
                .await
                .status()
                == 404;
            let manifest_gone = c
                .get(&format!("{}/v1/manifests/{}", c.url(1), releases[0]))
                .await
                .status()
                == 404;
            gone && manifest_gone
        },
    )
    .await;
    let rels: Vec<starling_proto::Release> = c
        .get_json(&format!("{}/v1/releases?repo=acme/web", c.url(1)))
        .await;
    let state: Vec<(starling_proto::ReleaseId, bool)> = rels
        .iter()
        .map(|r| (r.id, r.collected_at.is_some()))
        .collect();
    assert_eq!(state, vec![(releases[1], false), (releases[0], true)]);
    // Everything the kept release needs is still there.
    for ch in &new.chunks {
        let r = c.get(&format!("{}/v1/chunks/{}", c.url(1), ch.hash)).await;
        assert_eq!(r.status().as_u16(), 200);
    }
    (new, only_old)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_while_running_and_are_capped() {
    let c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    let sha = commit(
        &work,
        "[build]\ncommand = \"echo started; sleep 2; seq 1 300000; mkdir -p dist\"\noutput = \"dist\"\n",
        "chatty",
    );
    add_repo(&c, &work).await;
    let _worker = c.spawn_worker("wl");
    let id = push(&c, &sha, "d-logs").await;
    let log_url = format!("{}/v1/builds/{id}/logs", c.url(1));

    // The first line arrives while the build is still running.
    let mut streamed = false;
    for _ in 0..100 {
        let text = c.get(&log_url).await.text().await.unwrap();
        let b = c.build(1, id).await;
        if text.contains("started") && b.status == BuildStatus::Running {
            streamed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(streamed, "no log line while the build ran");

    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
    let text = c.get(&log_url).await.text().await.unwrap();
    assert!(text.starts_with("started\n1\n2\n"));
    assert!(text.contains("log cap of 1 MiB reached"), "no cap note");
    assert!(text.len() <= 1024 * 1024 + 100);

    // The CLI prints the same bytes, with the token from a private file; a token file
    // others can read is refused.
    use std::os::unix::fs::PermissionsExt;
    let token_file = c.dir.path().join("cli.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let cli = |mode: u32| {
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(mode)).unwrap();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["--control", &c.url(1), "--token-file"])
            .arg(&token_file)
            .args(["builds", "logs", &id.to_string(), "--follow"])
            .env_remove("STARLING_TOKEN")
            .output()
    };
    let out = cli(0o600).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    let out = cli(0o644).await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

/// A build is untrusted code. The probe looks for the worker's token everywhere a build
/// could: its parent's environment, every process's environment, the worker's data
/// directory. It finds none, and still gets a real git working tree of its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_find_no_secret_and_a_real_working_tree() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: builds run as another user only when the worker is root");
        return;
    }
    let c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    let probe = [
        "mkdir -p dist",
        "echo head=$(git rev-parse HEAD) describe=$(git describe --always)",
        "echo id=$(id -u)",
        "cat /proc/$PPID/environ",
        "ps axe",
        "cat /proc/*/environ",
        "ls -la ../../.. ../../../mirrors ../../../staging",
        "cat ../../../secret.txt",
        "grep -r test-token ../../..",
        "echo probe-done",
    ]
    .join("\n");
    std::fs::write(work.join("probe.sh"), probe).unwrap();
    let sha = commit(
        &work,
        "[build]\ncommand = \"sh probe.sh 2>&1 | tee dist.txt; mkdir -p dist; mv dist.txt dist/probe.txt\"\noutput = \"dist\"\n",
        "probe",
    );
    add_repo(&c, &work).await;
    // A secret in the worker's data directory, as a token file might be.
    let data = c.dir.path().join("wp");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("secret.txt"), TOKEN).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("secret.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // One runtime thread: release creation must not need a multi-thread runtime.
    let _worker = c.spawn_worker_with("wp", &[("STARLING_RUNTIME_THREADS", "1")]);
    let id = push(&c, &sha, "d-probe").await;
    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
    let log = c
        .get(&format!("{}/v1/builds/{id}/logs", c.url(1)))
        .await
        .text()
        .await
        .unwrap();
    assert!(log.contains("probe-done"), "{log}");
    assert!(!log.contains(TOKEN), "the build found the token:\n{log}");
    assert!(
        log.contains(&format!("head={sha} describe={}", &sha[..7])),
        "{log}"
    );
    assert!(!log.contains("id=0"), "the build ran as root:\n{log}");
    // Nor is it anywhere in the release.
    let release = b.release.unwrap();
    let m = Manifest::decode(
        &c.get_bytes(&format!("{}/v1/manifests/{release}", c.url(1)))
            .await,
    )
    .unwrap();
    for ch in &m.chunks {
        let bytes = c
            .get_bytes(&format!("{}/v1/chunks/{}", c.url(1), ch.hash))
            .await;
        assert!(!String::from_utf8_lossy(&bytes).contains(TOKEN));
    }
}

/// Output of multi-byte characters, then a failure: the build fails with its reason and
/// the worker's only slot goes on to the next build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibyte_output_does_not_kill_a_slot() {
    let c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    // `a€` 3,000 times: 12 KB of output in which most byte offsets fall inside a character.
    std::fs::write(
        work.join("euro.sh"),
        "for i in $(seq 1 3000); do printf 'a\\342\\202\\254'; done\nexit 3\n",
    )
    .unwrap();
    let euro = commit(
        &work,
        "[build]\ncommand = \"sh euro.sh\"\noutput = \"dist\"\n",
        "euros",
    );
    add_repo(&c, &work).await;
    // One runtime thread (STARLING_RUNTIME_THREADS=1): nothing may need a multi-thread runtime.
    let _worker = c.spawn_worker_with("wm", &[("STARLING_RUNTIME_THREADS", "1")]);
    let b = wait_done(&c, push(&c, &euro, "d-euro").await).await;
    assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
    assert!(b.reason.unwrap_or_default().contains("exit code 3"));
    let fine = commit(
        &work,
        "[build]\ncommand = \"mkdir -p dist && echo ok > dist/ok\"\noutput = \"dist\"\n",
        "fine",
    );
    let b = wait_done(&c, push(&c, &fine, "d-fine").await).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
}

/// A release over its repository's size limit fails the build with the reason, and no
/// member stores any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_release_fails_and_stores_nothing() {
    let c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    let big = commit(
        &work,
        "[build]\ncommand = \"mkdir -p dist && head -c 200000 /dev/urandom > dist/blob\"\noutput = \"dist\"\n",
        "big",
    );
    let r = c
        .post(
            1,
            "/v1/repos",
            &serde_json::json!({
                "name": "acme/web", "url": format!("file://{}", work.display()), "branch": "main",
                "webhook_secret": SECRET, "max_release_bytes": 100_000
            }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let _worker = c.spawn_worker("wo");
    let b = wait_done(&c, push(&c, &big, "d-big").await).await;
    assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
    let reason = b.reason.unwrap_or_default();
    assert!(reason.contains("over this repository's limit"), "{reason}");
    let chunks = c.data_dir(1).join("origin/chunks");
    let stored: Vec<_> = walk(&chunks);
    assert!(stored.is_empty(), "stored: {stored:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The control plane gone while a build publishes is not the build's fault: the worker
/// retries until the member is back, and the build succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_control_plane_does_not_fail_the_build() {
    let mut c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    let sha = commit(
        &work,
        "[build]\ncommand = \"sleep 2 && mkdir -p dist && echo ok > dist/ok\"\noutput = \"dist\"\n",
        "patient",
    );
    add_repo(&c, &work).await;
    let _worker = c.spawn_worker("wr");
    let id = push(&c, &sha, "d-patient").await;
    wait_running(&c, id).await;
    c.kill(1).await;
    // The build ends while the member is down; the worker keeps trying to publish.
    let log = c.dir.path().join("wr.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("publishing failed; retrying")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.spawn(1).await;
    c.wait_until("the member is back", Duration::from_secs(20), async |c| {
        c.status(1).await.is_some()
    })
    .await;
    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
    assert!(b.release.is_some());
}

/// A build whose handling panics fails with what happened, and the worker's only slot
/// goes on to the next build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_build_fails_and_the_slot_goes_on() {
    let c = Cluster::start(1, &[]).await;
    let work = new_repo(&c);
    let sha = commit(
        &work,
        "[build]\ncommand = \"mkdir -p dist && echo ok > dist/ok\"\noutput = \"dist\"\n",
        "ok",
    );
    add_repo(&c, &work).await;
    let r = c
        .post(
            1,
            "/v1/repos",
            &serde_json::json!({
                "name": "acme/other", "url": format!("file://{}", work.display()), "branch": "main",
                "webhook_secret": SECRET
            }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let _worker = c.spawn_worker_with("wx", &[("STARLING_FAULT_PANIC_IN_BUILD", "acme/web")]);
    let b = wait_done(&c, push(&c, &sha, "d-panic").await).await;
    assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
    assert!(b
        .reason
        .unwrap_or_default()
        .contains("worker error: injected panic"));
    let (body, sig) = github_push("acme/other", "main", &sha, SECRET);
    let r = send_github(&c.http, &c.url(1), "push", "d-after-panic", body, &sig)
        .await
        .unwrap();
    let id = r.json::<serde_json::Value>().await.unwrap()["build"]["id"]
        .as_u64()
        .unwrap();
    let b = wait_done(&c, id).await;
    assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
}
