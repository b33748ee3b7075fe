//! The web page in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, by fantoccini). A build and a deployment appear on the open page and
//! update without a reload, a build's log shows once the token is given, and a rollback
//! started from the page's button puts every node back on the first release.
//!
//! Without `chromium` and `chromedriver` the test says so and passes, unless
//! `STARLING_REQUIRE_BROWSER=1` (CI), where it fails.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use starling_proto::{AppState, NodeInfo};
use tokio::io::{AsyncBufReadExt, BufReader};

/// chromedriver on a port the kernel chose, killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    url: String,
}

async fn chromedriver() -> Option<Driver> {
    let have = |bin: &str| {
        std::process::Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("chromedriver") || !have("chromium") {
        assert!(
            std::env::var_os("STARLING_REQUIRE_BROWSER").is_none(),
            "STARLING_REQUIRE_BROWSER is set but chromium or chromedriver is missing"
        );
        eprintln!("SKIPPED: the web page's browser test needs chromium and chromedriver (apt-get install chromium chromium-driver)");
        return None;
    }
    let mut child = tokio::process::Command::new("chromedriver")
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                return rest.trim_end_matches('.').parse::<u16>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("chromedriver says which port it took");
    // Keep reading its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(Driver {
        _child: child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000"]}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a browser session")
}

/// Click the first element `css` selects, as a script in the page: the page swaps its
/// sections in every few seconds, so an element found by one WebDriver call may be gone
/// by the next.
async fn click(b: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clicked = b
            .execute(
                "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;",
                vec![json!(css)],
            )
            .await
            .expect("a script");
        if clicked.as_bool() == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing to click at {css}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element `css` selects on the page as it is now ("" if none).
async fn text(b: &Client, css: &str) -> String {
    let v = b
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            vec![json!(css)],
        )
        .await
        .expect("a script");
    v.as_str().unwrap_or_default().to_string()
}

/// Wait, without reloading the page, until `css`'s text satisfies `ok`.
async fn until(b: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let t = text(b, css).await;
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed what was waited for; last: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_follows_builds_and_deployments_and_rolls_back() {
    let Some(driver) = chromedriver().await else {
        return;
    };
    let c = Cluster::start(1, &[]).await;
    let work = c.work_tree();
    c.add_repo_from(1, "acme/web", &format!("file://{}", work.display()))
        .await;
    let _worker = c.spawn_worker("w1");
    let token = c.join_token().await;
    let _nodes: Vec<_> = ["eu-1", "eu-2"]
        .iter()
        .map(|n| {
            let env = [("STARLING_JOIN_TOKEN", token.as_str())];
            c.spawn_node(n, "eu", "acme/web", &format!("{n}.log"), &env)
        })
        .collect();

    let b = browser(&driver).await;
    b.goto(&c.url(1)).await.expect("the page");
    assert_eq!(b.title().await.unwrap(), "Starling");
    until(&b, "#builds", |t| t.contains("No build yet")).await;
    until(&b, "#cluster", |t| t.contains("leader member 1")).await;

    // A push: the build and then the deployment show up on the open page.
    let spec = "[build]\ncommand = \"echo building; mkdir -p dist && cp index.html dist/\"\noutput = \"dist\"\n";
    let files = |text| [("starling.toml", spec), ("index.html", text)];
    let first = c.push("acme/web", &work, 1, 1, &files("one\n")).await;
    until(&b, "tr[data-build=\"1\"]", |t| t.contains("succeeded")).await;
    until(&b, "[data-deployment=\"1\"]", |t| t.contains("succeeded")).await;
    until(&b, "#fleet", |t| {
        t.contains("2 nodes") && t.contains("running")
    })
    .await;
    let second = c.push("acme/web", &work, 1, 2, &files("two\n")).await;
    until(&b, "tr[data-build=\"2\"]", |t| t.contains("succeeded")).await;
    until(&b, "[data-deployment=\"2\"]", |t| {
        t.contains("succeeded") && t.contains("2/2 running")
    })
    .await;
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.len() == 2 && n.iter().all(|x| x.release == Some(second))
    })
    .await;

    // Without the token the log is refused; with it, it shows.
    click(&b, "button[data-log=\"1\"]").await;
    until(&b, "#log", |t| t.contains("give the API token")).await;
    b.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    click(&b, "#save-token").await;
    click(&b, "button[data-log=\"1\"]").await;
    until(&b, "#log", |t| t.contains("building")).await;

    // A rollback from the page: a third deployment, back to the first release.
    click(&b, "[data-deployment=\"2\"] button[data-rollback]").await;
    until(&b, "#notice", |t| t.contains("rollback started")).await;
    until(&b, "[data-deployment=\"3\"]", |t| {
        t.contains("rollback") && t.contains("succeeded")
    })
    .await;
    c.wait_for_json(1, "/v1/nodes", |n: &Vec<NodeInfo>| {
        n.len() == 2
            && n.iter()
                .all(|x| x.release == Some(first) && x.state == AppState::Running)
    })
    .await;
    if let Ok(png) = b.screenshot().await {
        let _ = std::fs::write(c.dir.path().join("page.png"), png);
    }
    b.close().await.unwrap();
}
