//! The member's HTTP listener: one TCP port for clients, workers, webhooks and Raft RPC,
//! guarded so that no crowd of connections can take the member down.
//!
//! - **A connection limit.** At most `max_clients` connections are served normally; the
//!   process's file-descriptor limit is raised well above that, so `accept` never fails
//!   with "too many open files". Up to `peer_reserve` more are accepted on probation: they
//!   are served only for requests that carry the cluster key (another member's Raft RPC),
//!   so client connections cannot crowd Raft out. Beyond that, new connections are closed
//!   at once.
//! - **Timeouts.** A request's headers must arrive within `header_timeout`; a connection on
//!   which no byte moves for `idle_timeout` is closed (long-polls last at most 60 s, and
//!   event streams send a keep-alive every 15 s, so neither is idle that long).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::network::carries_cluster_key;

/// Bounds on the connections one member serves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_clients: usize,
    pub peer_reserve: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_clients: 4096,
            peer_reserve: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// The certificate a member's HTTPS listener presents: empty until the member knows the
/// cluster CA and has issued itself one; connections until then are closed.
pub type HttpsConfig = Arc<std::sync::RwLock<Option<Arc<rustls::ServerConfig>>>>;

/// Serve `app` on `listener` until the listener fails for good; over TLS when `https` is
/// given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    cluster_key: String,
    https: Option<HttpsConfig>,
) -> io::Result<()> {
    // Room for the log files, peers' and origin-store descriptors beside the connections.
    let fds = raise_fd_limit(limits.max_clients + limits.peer_reserve + 1024);
    let mut limits = limits;
    limits.max_clients = limits
        .max_clients
        .min(fds.saturating_sub(limits.peer_reserve + 1024).max(16));
    let open = Arc::new(AtomicUsize::new(0));
    let cluster_key: Arc<str> = cluster_key.into();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends pass; keep accepting once descriptors are free.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = Slot::take(&open);
        let probation = match slot.number {
            n if n <= limits.max_clients => false,
            n if n <= limits.max_clients + limits.peer_reserve => true,
            _ => {
                tracing::debug!("connection limit reached; connection closed");
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let key = cluster_key.clone();
        let tls = match &https {
            None => None,
            Some(slot) => match slot.read().unwrap_or_else(|p| p.into_inner()).clone() {
                Some(cfg) => Some(tokio_rustls::TlsAcceptor::from(cfg)),
                None => {
                    tracing::debug!("no certificate yet; connection closed");
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let watched = Watched {
                inner: tcp,
                activity: Arc::new(AtomicU64::new(0)),
                started: Instant::now(),
            };
            let activity = (watched.activity.clone(), watched.started);
            match tls {
                None => serve_connection(watched, activity, app, probation, key, limits).await,
                // The handshake is bounded like the headers that follow it.
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(watched))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, activity, app, probation, key, limits).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    (activity, started): (Arc<AtomicU64>, Instant),
    app: Router,
    probation: bool,
    cluster_key: Arc<str>,
    limits: ConnectionLimits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let refused = probation && !carries_cluster_key(req.headers(), &cluster_key);
        async move {
            if refused {
                return Ok::<_, std::convert::Infallible>(busy());
            }
            app.oneshot(req.map(Body::new)).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(limits.idle_timeout / 4);
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tick.tick() => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(last) >= limits.idle_timeout {
                    tracing::debug!("idle connection closed");
                    return;
                }
            }
        }
    }
}

fn busy() -> Response<Body> {
    let mut r = Response::new(Body::from(
        "{\"error\":\"too many connections to this member; retry later\"}",
    ));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

/// One counted connection; the count goes down when it is dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    /// This connection's place in the count (1 for the first).
    number: usize,
}

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Slot {
        let number = open.fetch_add(1, Ordering::SeqCst) + 1;
        Slot {
            open: open.clone(),
            number,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream that notes when bytes last moved (ms since `started`).
struct Watched {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    started: Instant,
}

impl Watched {
    fn touch(&self) {
        self.activity
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raise the soft limit on open files towards `want` (up to the hard limit); the limit
/// in force afterwards.
fn raise_fd_limit(want: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return want;
        }
        let target = (want as libc::rlim_t).min(lim.rlim_max);
        if lim.rlim_cur < target {
            let old = lim.rlim_cur;
            lim.rlim_cur = target;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                lim.rlim_cur = old;
            }
        }
    }
    if (lim.rlim_cur as usize) < want {
        tracing::warn!(
            limit = lim.rlim_cur,
            want,
            "the open-file limit is low; fewer client connections will be served"
        );
    }
    lim.rlim_cur as usize
}
