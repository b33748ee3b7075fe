//! Notifications: a repository's URL gets a signed JSON POST when its build ends and
//! when its deployment ends, with a Slack-compatible `text`; a receiver that fails at
//! first gets the same delivery again.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::*;

#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_and_deployment_ends_are_posted_signed_and_retried() {
    // The receiver: the first POST fails with 503, the rest succeed.
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let got = got.clone();
                async move {
                    let mut all = got.lock().unwrap();
                    all.push(Received { headers, body });
                    if all.len() == 1 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let c = Cluster::start(1, &[]).await;
    let work = c.work_tree();
    std::fs::write(
        work.join("starling.toml"),
        "[build]\ncommand = \"mkdir -p dist && echo hi > dist/index.html\"\noutput = \"dist\"\n",
    )
    .unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    let r = c
        .post(
            1,
            "/v1/repos",
            &serde_json::json!({
                "name": "acme/web", "url": format!("file://{}", work.display()),
                "webhook_secret": SECRET, "notify": [hook], "notify_secret": "n0tify",
                "rollout": {"strategy": "all-at-once", "soak_ms": 500},
            }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let _worker = c.spawn_worker("w1");
    let (body, sig) = github_push("acme/web", "main", &sha, SECRET);
    let r = send_github(&c.http, &c.url(1), "push", "d-1", body, &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);

    // No node runs the repository: its one wave is healthy at once and the deployment
    // ends after its soak.
    let deadline = Instant::now() + Duration::from_secs(90);
    let events = loop {
        let events: Vec<String> = got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| {
                Some(
                    r.headers
                        .get("x-starling-event")?
                        .to_str()
                        .ok()?
                        .to_string(),
                )
            })
            .collect();
        if events.iter().any(|e| e == "deploy:completed") {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "no deploy:completed; got {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The build's notification was refused once and delivered again, before the
    // deployment's.
    assert_eq!(
        events,
        ["build:completed", "build:completed", "deploy:completed"]
    );
    let all = got.lock().unwrap().clone();
    assert_eq!(
        all[0].headers.get("x-starling-delivery"),
        all[1].headers.get("x-starling-delivery"),
        "a retry is the same delivery"
    );
    for r in &all {
        let sig = r
            .headers
            .get("x-starling-signature-256")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            sig,
            starling_core::webhook::github_signature("n0tify", &r.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["repo"], "acme/web");
        assert!(v["text"].as_str().unwrap().starts_with("acme/web "), "{v}");
    }
    let deploy: serde_json::Value = serde_json::from_slice(&all[2].body).unwrap();
    assert_eq!(deploy["deployment"]["status"], "succeeded");
    assert!(
        deploy["text"].as_str().unwrap().contains("succeeded"),
        "{deploy}"
    );
}
