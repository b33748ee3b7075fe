//! The event log: long-poll and server-sent events.
//!
//! Reading the log must never starve the member. Waiting is cheap and many may wait (up
//! to [`MAX_EVENT_READERS`] long-polls and streams per member, 503 beyond); the work —
//! reading a page of events and encoding it — is done by at most [`PAGE_WORKERS`] readers
//! at a time, the others queue for their turn. Streams replay in pages of [`SSE_PAGE`]
//! events and hold one page at a time, so a slow client stalls only its own stream. Raft
//! shares the HTTP runtime's thread, so these bounds are also what keep a crowd of
//! readers from delaying a heartbeat.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::Deserialize;
use starling_proto::parse_duration;

use super::{err, ApiErr, Shared, MAX_WAIT};
use crate::member::Member;

/// Long-polls and streams of the event log served at once by one member.
pub(crate) const MAX_EVENT_READERS: usize = 1024;
/// Readers reading and encoding a page at the same moment.
pub(crate) const PAGE_WORKERS: usize = 4;
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

/// How long a long-poll may wait: its `timeout` parameter, at most [`MAX_WAIT`].
pub(super) fn long_poll_wait(timeout: Option<&str>) -> Result<Duration, ApiErr> {
    let wait = match timeout {
        Some(t) => parse_duration(t)
            .ok_or_else(|| err(StatusCode::BAD_REQUEST, format!("bad timeout {t:?}")))?,
        None => Duration::ZERO,
    };
    Ok(wait.min(MAX_WAIT))
}

/// Wait for a turn to read and encode a page; `None` if the member is shutting down.
async fn page_turn(m: &Member) -> Option<tokio::sync::SemaphorePermit<'_>> {
    m.event_pages.acquire().await.ok()
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
    let wait = long_poll_wait(q.timeout.as_deref())?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let _permit = reader_permit(&m)?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = m.events.clone();
    loop {
        rx.borrow_and_update();
        if m.read().last_event_index() > q.after
            || tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
        {
            let _turn = page_turn(&m).await;
            let after = q.after;
            let evs = super::blocking(&m, move |m| m.events_after(after, limit)).await?;
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
                if let Some(sse) = pending.pop() {
                    return Some((Ok(sse), (m, rx, after, pending, permit)));
                }
                rx.borrow_and_update();
                if m.read().last_event_index() <= after {
                    rx.changed().await.ok()?;
                    continue;
                }
                // Every other task gets a turn between pages: a connection would otherwise
                // pump pages for as long as its socket takes them.
                tokio::task::yield_now().await;
                // Read and encode one page in turn with the other readers.
                let (page, next) = {
                    let _turn = page_turn(&m).await?;
                    let evs = super::blocking(&m, move |m| m.events_after(after, SSE_PAGE))
                        .await
                        .ok()?;
                    let next = evs.last().map_or(after, |e| e.index);
                    (encode_page(&evs)?, next)
                };
                pending = page;
                pending.reverse();
                let after = next;
                return pending
                    .pop()
                    .map(|sse| (Ok(sse), (m, rx, after, pending, permit)));
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Server-sent events of `evs`; `None` (the stream ends) if one cannot be encoded.
fn encode_page(evs: &[starling_proto::Event]) -> Option<Vec<SseEvent>> {
    evs.iter()
        .map(|e| {
            SseEvent::default()
                .id(e.index.to_string())
                .event(e.kind.as_str())
                .json_data(e)
                .map_err(|err| {
                    tracing::error!(index = e.index, error = %err, "event not encodable; stream ends")
                })
                .ok()
        })
        .collect()
}
