//! `starling control --tls`: three members that speak HTTPS to their clients and to each
//! other (Raft RPC, forwarded writes, joining), with certificates from the cluster CA;
//! clients trust it by its fingerprint, and a node by the one in its join token.

mod common;

use std::time::Duration;

use common::*;
use starling_proto::{ClusterStatus, NodeInfo};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_nodes_and_the_cli_speak_https() {
    // Joining and becoming voters already took Raft RPC over HTTPS.
    let mut c = Cluster::start(3, &["--tls"]).await;
    assert!(c.url(1).starts_with("https://"));
    let fingerprint = c.members.fingerprint().expect("a CA").to_string();
    let st: ClusterStatus = c.get_json(&format!("{}/v1/cluster", c.url(2))).await;
    assert_eq!(st.cluster_ca.as_deref(), Some(fingerprint.as_str()));

    // A write sent to a follower is forwarded to the leader over HTTPS.
    let r = c
        .post(
            2,
            "/v1/repos",
            &serde_json::json!({"name": "acme/web", "url": "file:///nowhere", "branch": "main"}),
        )
        .await;
    assert!(r.status().is_success(), "{:?}", r.text().await);

    // Plain HTTP gets no answer; a client that trusts another CA, or none, is refused.
    let plain = starling_client::http_builder(None)
        .unwrap()
        .build()
        .unwrap();
    let url = c.url(1).replacen("https://", "http://", 1);
    assert!(plain.get(format!("{url}/v1/cluster")).send().await.is_err());
    let other = starling_pki::ClusterCa::generate("other", std::time::SystemTime::now()).unwrap();
    let other_fp = starling_pki::fingerprint(&other.cert_pem).unwrap();
    for pin in [None, Some(other_fp)] {
        let client = starling_client::http_builder(Some(starling_pki::CaTrust::new(pin)))
            .unwrap()
            .build()
            .unwrap();
        let r = client.get(format!("{}/v1/cluster", c.url(1))).send().await;
        assert!(
            r.is_err(),
            "a server of the cluster CA was trusted without it"
        );
    }

    // The CLI, with and without the fingerprint.
    let cli = |pin: Option<&str>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"));
        cmd.args(["--control", &c.url(3), "repos", "list"])
            .env_remove("STARLING_CA_FINGERPRINT");
        if let Some(p) = pin {
            cmd.env("STARLING_CA_FINGERPRINT", p);
        }
        cmd.output()
    };
    let out = cli(Some(&fingerprint)).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme/web"));
    let out = cli(None).await.unwrap();
    assert!(!out.status.success(), "the CLI trusted an unknown CA");

    // A node enrols over HTTPS, trusting the CA its join token names.
    let token = c.join_token().await;
    let _node = c.spawn_node(
        "eu-1",
        "eu",
        "acme/web",
        "eu-1.log",
        &[("STARLING_JOIN_TOKEN", token.as_str())],
    );
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.iter().any(|x| x.id == "eu-1")
    })
    .await;

    // A member restarted serves HTTPS again from the CA in its state.
    c.members.kill(2).await.unwrap();
    c.spawn(2).await;
    c.wait_until(
        "member 2 answers over HTTPS",
        Duration::from_secs(30),
        async |c| {
            let r = c.http.get(format!("{}/v1/cluster", c.url(2))).send().await;
            r.is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
}
