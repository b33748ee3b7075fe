//! `starling demo-app`: the tiny HTTP service that `starling demo`'s sample repository
//! deploys, so that the demo needs nothing beyond this binary on a fresh machine.
//!
//! `serve` runs in a release directory (a node's `[deploy] start`): it answers `GET /`
//! with the version the build wrote into `version`, and `GET /health` with 200, or 500
//! when that version says `broken`. It listens on a loopback port the kernel picks and
//! writes it to `port`. `check` (the `[deploy] health` command) asks `/health` there.
//! The service ends by itself when its release directory is removed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

#[derive(clap::Subcommand)]
pub enum DemoAppCmd {
    /// Serve the release in the current directory.
    Serve,
    /// Exit 0 if the service of the current directory answers `/health` with 200.
    Check,
}

pub fn run(cmd: DemoAppCmd) -> Result<()> {
    match cmd {
        DemoAppCmd::Serve => serve(),
        DemoAppCmd::Check => check(),
    }
}

fn serve() -> Result<()> {
    let version = std::fs::read_to_string("version").context("reading ./version")?;
    let version = version.trim().to_string();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::fs::write("port.tmp", port.to_string())?;
    std::fs::rename("port.tmp", "port")?;
    // A release directory that is gone (pruned, or the demo cleaned up) ends the service.
    let here = std::env::current_dir()?;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if !here.join("version").exists() {
            std::process::exit(0);
        }
    });
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = answer(&mut conn, &version);
    }
    Ok(())
}

/// Read one request (at most 4 KiB of head, 2 s) and answer it.
fn answer(conn: &mut TcpStream, version: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 4096 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/health" if version.contains("broken") => {
            ("500 Internal Server Error", "unhealthy\n".to_string())
        }
        "/health" => ("200 OK", "ok\n".to_string()),
        "/" => ("200 OK", format!("acme/web version {version}\n")),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// GET `path` from the service whose port file is in `dir`; the status code and body.
pub fn get(dir: &Path, path: &str) -> Result<(u16, String)> {
    let port: u16 = std::fs::read_to_string(dir.join("port"))
        .context("the service has not written its port yet")?
        .trim()
        .parse()
        .context("a malformed port file")?;
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    conn.take(64 * 1024).read_to_string(&mut reply)?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("a malformed answer")?;
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((status, body))
}

fn check() -> Result<()> {
    let (status, body) = get(Path::new("."), "/health")?;
    if status != 200 {
        bail!("/health answered {status}: {}", body.trim());
    }
    Ok(())
}
