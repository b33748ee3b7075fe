//! The event log: long-poll and server-sent events.

use super::*;

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
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = m.events.clone();
    let stream = futures::stream::unfold(
        (m, rx, q.after, Vec::new()),
        |(m, mut rx, after, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop() {
                    let e: starling_proto::Event = e;
                    let next = e.index;
                    let sse = SseEvent::default()
                        .id(e.index.to_string())
                        .event(e.kind.clone())
                        .json_data(&e)
                        .unwrap_or_default();
                    return Some((Ok(sse), (m, rx, next, pending)));
                }
                rx.borrow_and_update();
                let mut evs = m.read().events_after(after, 1000);
                if evs.is_empty() {
                    rx.changed().await.ok()?;
                    continue;
                }
                evs.reverse();
                pending = evs;
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
