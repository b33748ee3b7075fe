//! Enrolment end to end: the first leader makes the cluster CA; `starling join-token
//! create` prints a token; two nodes exchange it for certificates through a follower;
//! with them they open a mutually authenticated QUIC connection. A wrong secret, a
//! token for another cluster and an expired token get nothing.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;
use starling_peer::{PeerConfig, PeerEndpoint};
use starling_pki::Identity;
use starling_proto::join_token::JoinToken;
use starling_proto::EnrollReply;

async fn token(c: &Cluster, ttl: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["--control", &c.url(1), "join-token", "create", "--ttl", ttl])
        .env("STARLING_TOKEN", TOKEN)
        .output()
        .await
        .expect("run starling join-token create");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().last().expect("a token").to_string()
}

async fn enroll(c: &Cluster, via: u64, token: &str, name: &str) -> reqwest::Response {
    c.http
        .post(format!("{}/v1/enroll", c.url(via)))
        .json(&json!({"token": token, "name": name, "region": "eu-1"}))
        .send()
        .await
        .expect("enroll")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_enroll_with_a_join_token_and_talk_mutual_tls() {
    let c = Cluster::start(3, &[]).await;
    // The first leader makes the CA right after it starts.
    c.wait_for_cluster_ca().await;
    let t = token(&c, "1h").await;
    let parsed = JoinToken::parse(&t).expect("a well-formed token");

    let mut ids = Vec::new();
    for name in ["eu-1-n1", "eu-1-n2"] {
        let r = enroll(&c, 2, &t, name).await;
        assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
        let reply: EnrollReply = r.json().await.unwrap();
        // The CA is the one the token names.
        assert_eq!(
            starling_pki::fingerprint(&reply.ca_cert_pem).unwrap(),
            parsed.ca_fingerprint
        );
        ids.push((name, reply));
    }
    // The two certificates work together.
    let endpoint = |(name, r): &(&str, EnrollReply)| {
        PeerEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            PeerConfig {
                name: name.to_string(),
                region: "eu-1".into(),
                ca_cert_pem: r.ca_cert_pem.clone(),
                identity: Identity {
                    cert_pem: r.cert_pem.clone(),
                    key_pem: r.key_pem.clone(),
                },
                upload_slots: 4,
                upload_queue: 0,
            },
        )
        .unwrap()
    };
    let server = std::sync::Arc::new(endpoint(&ids[0]));
    let client = endpoint(&ids[1]);
    let addr = server.local_addr().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(starling_release::FsChunkStore::new(store_dir.path()).unwrap());
    let s = server.clone();
    tokio::spawn(async move { s.serve(starling_peer::Serving::store(store)).await });
    let conn = client.connect(addr, "eu-1-n1").await.expect("mutual TLS");
    assert_eq!(conn.remote.node, "eu-1-n1");

    // The member serves the swarm on its HTTP port number over UDP: a node announces
    // itself there and shows up in GET /v1/nodes.
    let member_addr = c.members.addr(1);
    let release = starling_proto::ReleaseId::of(b"some release");
    let mut announced = false;
    for _ in 0..100 {
        if let Ok(m) = client.connect(member_addr, "member-1").await {
            let a = starling_peer::Announcement {
                addr: addr.to_string(),
                holds: vec![release],
                fetching: vec![],
                apps: vec![starling_proto::AppReport {
                    release: Some(release),
                    activated_at: Some(1_700_000_000_000),
                    state: starling_proto::AppState::Running,
                    ..starling_proto::AppReport::idle("acme/web")
                }],
            };
            m.announce(&a).await.unwrap();
            announced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(announced, "member 1 never served the swarm");
    let nodes: Vec<starling_proto::NodeInfo> = c
        .wait_for_json(1, "/v1/nodes", |n: &Vec<starling_proto::NodeInfo>| {
            !n.is_empty()
        })
        .await;
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (
            nodes[0].id.as_str(),
            nodes[0].region.as_str(),
            nodes[0].state.as_str()
        ),
        ("eu-1-n2", "eu-1", "running")
    );
    assert_eq!(nodes[0].release, Some(release));

    // A wrong secret, another cluster's token, a malformed one, a bad name.
    let wrong = JoinToken {
        secret: "0".repeat(32),
        ..parsed.clone()
    };
    let foreign = JoinToken {
        ca_fingerprint: "0".repeat(64),
        ..parsed.clone()
    };
    for (what, tok, name, want) in [
        ("wrong secret", wrong.to_string(), "eu-1-n3", 401),
        ("another cluster", foreign.to_string(), "eu-1-n3", 401),
        ("malformed", "stj1.nope".to_string(), "eu-1-n3", 401),
        ("bad name", t.clone(), "Not A Label", 400),
    ] {
        let r = enroll(&c, 3, &tok, name).await;
        assert_eq!(r.status().as_u16(), want, "{what}");
    }
    // Making a token needs the API token.
    let r = c
        .http
        .post(format!("{}/v1/join-tokens", c.url(1)))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // A token that expires stops working.
    // Taken before the token exists, so it cannot expire sooner than a second after this
    // (less the millisecond that times in ms round away).
    let made = SystemTime::now();
    let short = token(&c, "1s").await;
    c.wait_until(
        "the short token expires",
        Duration::from_secs(20),
        async |c| enroll(c, 1, &short, "eu-1-n4").await.status().as_u16() == 401,
    )
    .await;
    assert!(
        made.elapsed().unwrap() >= Duration::from_millis(998),
        "refused before it expired"
    );
}
