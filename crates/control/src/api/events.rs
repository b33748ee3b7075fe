//! The event log: long-poll and server-sent events.
//!
//! Reading the log must never starve the member: at most [`MAX_EVENT_READERS`] reads and
//! streams at once (503 beyond), streams replay in pages of [`SSE_PAGE`] events and yield
//! between pages, and a slow client stalls only its own stream (one page is buffered).
//! Raft runs on a thread of its own, so even a busy HTTP thread cannot delay a heartbeat.

use super::*;

/// Event-log reads and streams served at once by one member.
pub(crate) const MAX_EVENT_READERS: usize = 64;
/// Events per page of a stream's replay.
const SSE_PAGE: usize = 100;

fn reader_permit(m: &Member) -> Result<tokio::sync::OwnedSemaphorePermit, ApiErr> {
    m.event_readers.clone().try_acquire_owned().map_err(|_| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_EVENT_READERS} event-log readers are already served here; retry later or ask another member"),
        )
    })
}

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    #[serde(default)]
    after: u64,
    /// Long-poll for up to this long (`30s`, `500ms`, `2m`; at most 60 s) when nothing is new.
    timeout: Option<String>,
    limit: Option<usize>,
}

/// Served by any member from its applied state: the event log is append-only, so a member
/// that lags shows a prefix of the leader's, never something different.
pub(super) async fn events(
    State(m): Shared,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiErr> {
    let wait = match q.timeout.as_deref() {
        Some(t) => parse_duration(t)
            .ok_or_else(|| err(StatusCode::BAD_REQUEST, format!("bad timeout {t:?}")))?,
        None => Duration::ZERO,
    }
    .min(MAX_LEASE_WAIT);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let _permit = reader_permit(&m)?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = m.events.clone();
    loop {
        rx.borrow_and_update();
        let evs = m.read().events_after(q.after, limit);
        if !evs.is_empty()
            || tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
        {
            return Ok(Json(evs).into_response());
        }
    }
}

/// Server-sent events: every event after `after`, then each new one as it is applied.
pub(super) async fn events_stream(
    State(m): Shared,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiErr> {
    // Held as long as the stream lives.
    let permit = reader_permit(&m)?;
    let rx = m.events.clone();
    let stream = futures::stream::unfold(
        (m, rx, q.after, Vec::new(), permit),
        |(m, mut rx, after, mut pending, permit)| async move {
            loop {
                if let Some(e) = pending.pop() {
                    let e: starling_proto::Event = e;
                    let next = e.index;
                    let sse = match SseEvent::default()
                        .id(e.index.to_string())
                        .event(e.kind.clone())
                        .json_data(&e)
                    {
                        Ok(sse) => sse,
                        Err(err) => {
                            tracing::error!(index = e.index, error = %err, "event not encodable; stream ends");
                            return None;
                        }
                    };
                    return Some((Ok(sse), (m, rx, next, pending, permit)));
                }
                // Other tasks get their turn between pages of a long replay.
                tokio::task::yield_now().await;
                rx.borrow_and_update();
                let mut evs = m.read().events_after(after, SSE_PAGE);
                if evs.is_empty() {
                    rx.changed().await.ok()?;
                    continue;
                }
                evs.reverse();
                pending = evs;
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
