//! What users and forges really send: the forges' documented webhook payloads (whole, as
//! fixture files), GitHub's default form encoding and its mixed-case names, repository
//! names that must be refused, commit ids in every spelling, and credentials in URLs.

mod common;

use common::*;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crates/core/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture")
}

async fn add(c: &Cluster, name: &str, url: &str, branch: &str) -> reqwest::Response {
    c.post(
        1,
        "/v1/repos",
        &json!({"name": name, "url": url, "branch": branch, "webhook_secret": SECRET}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_forge_payloads_are_understood() {
    let c = Cluster::start(1, &[]).await;
    // GitHub says `Octocat/Hello-World`; names compare without regard to case.
    assert_eq!(
        add(&c, "octocat/hello-world", "file:///x", "main")
            .await
            .status(),
        201
    );
    assert_eq!(
        add(&c, "mike/diaspora", "file:///y", "master")
            .await
            .status(),
        201
    );
    assert_eq!(
        add(&c, "jsmith/example", "file:///z", "master")
            .await
            .status(),
        201
    );

    // GitHub's default content type for a new webhook: a form with a `payload` field.
    let push = String::from_utf8(fixture("github_push.json")).unwrap();
    let form = format!("payload={}", urlencode(&push));
    let r = c
        .http
        .post(format!("{}/hooks/github", c.url(1)))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", "d-form")
        .header("X-Hub-Signature-256", sign(SECRET, form.as_bytes()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["build"]["repo"], "octocat/hello-world");
    assert_eq!(
        body["build"]["sha"],
        "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
    );

    let ping = fixture("github_ping.json");
    let sig = sign(SECRET, &ping);
    let r = send_github(&c.http, &c.url(1), "ping", "d-ping", ping, &sig)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // GitLab's push carries a `repository` object without `full_name`.
    for (file, event, want) in [
        ("gitlab_push_hook.json", "Push Hook", 201),
        ("gitlab_tag_push_hook.json", "Tag Push Hook", 202),
    ] {
        let r = c
            .http
            .post(format!("{}/hooks/gitlab", c.url(1)))
            .header("X-Gitlab-Event", event)
            .header("X-Gitlab-Token", SECRET)
            .header("X-Gitlab-Event-UUID", format!("uuid-{file}"))
            .header("Content-Type", "application/json")
            .body(fixture(file))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, want, "{file}: {}", r.text().await.unwrap());
    }

    // A content type Starling cannot read says what to change.
    let r = c
        .http
        .post(format!("{}/hooks/github", c.url(1)))
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sign(SECRET, b"<xml/>"))
        .header("Content-Type", "text/xml")
        .body("<xml/>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("application/json"));
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_commit_ids_and_credentials() {
    let c = Cluster::start(1, &[]).await;
    for bad in [".", ".git", "-rf", "a//b", "a/b/", "a/../b", "a b"] {
        let r = add(&c, bad, "file:///x", "main").await;
        assert_eq!(r.status().as_u16(), 400, "name {bad:?} was accepted");
    }

    // A real repository to resolve branches, tags and HEAD in.
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    git(work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("a"), "1").unwrap();
    git(work, &["add", "."]);
    git(work, &["commit", "-q", "-m", "one"]);
    git(work, &["tag", "-a", "v1", "-m", "v1"]);
    let head = git(work, &["rev-parse", "HEAD"]);
    let url = format!("file://{}", work.display());
    assert_eq!(add(&c, "Acme/Web", &url, "main").await.status(), 201);

    let trigger = async |sha: Option<&str>| -> (u16, Value) {
        let mut req = json!({"repo": "acme/WEB"});
        if let Some(s) = sha {
            req["sha"] = json!(s);
        }
        let r = c.post(1, "/v1/trigger", &req).await;
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    };
    let (status, first) = trigger(Some("main")).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["build"]["sha"], head.as_str());
    assert_eq!(first["build"]["repo"], "acme/web");
    // The same commit in other spellings is the same commit.
    for spelling in [
        None,
        Some("HEAD"),
        Some("v1"),
        Some(head.to_uppercase().as_str()),
    ] {
        let (status, again) = trigger(spelling).await;
        assert_eq!(status, 200, "{spelling:?}: {again}");
        assert_eq!(again["outcome"], "duplicate_commit");
        assert_eq!(again["build"]["id"], first["build"]["id"]);
    }
    let (status, answer) = trigger(Some("zz")).await;
    assert_eq!(status, 404, "{answer}");
    let (status, _) = trigger(Some("--upload-pack=x")).await;
    assert_eq!(status, 400);

    // Credentials in a URL are never shown.
    let secret_url = "https://deploy:s3cr3t-pw@127.0.0.1:9/private.git";
    let r = add(&c, "acme/private", secret_url, "main").await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("s3cr3t"), "{text}");
    let repos = c
        .get(&format!("{}/v1/repos", c.url(1)))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        repos.contains("https://***@127.0.0.1:9/private.git"),
        "{repos}"
    );
    assert!(!repos.contains("s3cr3t"), "{repos}");
    let r = c
        .post(1, "/v1/trigger", &json!({"repo": "acme/private"}))
        .await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("s3cr3t"), "{text}");
    let events = c
        .get(&format!("{}/v1/events?after=0", c.url(1)))
        .await
        .text()
        .await
        .unwrap();
    assert!(!events.contains("s3cr3t"), "{events}");
}
