//! The leader's notifier: for each event that ends a build or a deployment of a
//! repository with notification URLs (`starling_core::notify` decides which and what),
//! a signed JSON POST to each URL, tried again with backoff for up to two minutes. It
//! works from the event log, never from inside `apply`, so a slow or dead receiver
//! delays only the notifications after it, never the state machine. Its progress
//! (`MarkNotified`) goes through Raft: a new leader goes on where the last one stopped,
//! so a notification is sent at least once (receivers drop repeats by
//! `X-Starling-Delivery`).

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use starling_core::notify::{notification, Notification};
use starling_proto::Command;

use crate::member::{now_ms, Member};

/// How long one notification is tried.
const PATIENCE: Duration = Duration::from_secs(120);
/// Events handled between two `MarkNotified`.
const BATCH: usize = 64;

pub async fn notify(member: Arc<Member>) {
    let http = match starling_client::public_http_builder().and_then(|b| {
        b.timeout(Duration::from_secs(10))
            .build()
            .map_err(starling_client::ClientError::Setup)
    }) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for notifications; none will be sent");
            return;
        }
    };
    let mut events = member.events.clone();
    // Events up to here were looked at by this member; only those that notified anyone
    // cost a log entry (`MarkNotified`), so a build history without notification URLs
    // adds nothing to the log.
    let mut looked: u64 = 0;
    loop {
        let (from, last) = {
            let st = member.read();
            (looked.max(st.notified_up_to()), st.last_event_index())
        };
        if !member.raft.is_leader() || from >= last {
            // Woken by a new event, or within a second (leadership changes too).
            let _ = tokio::time::timeout(Duration::from_secs(1), events.changed()).await;
            continue;
        }
        let batch: Vec<(u64, Option<Notification>)> = {
            let st = member.read();
            if from + 1 < st.first_event_in_memory() {
                // Events that left memory before a leader got to them: their builds did
                // too, so there is nothing left to say about them.
                tracing::warn!(
                    from,
                    to = st.first_event_in_memory() - 1,
                    "events archived before they were notified; skipping them"
                );
            }
            st.events_after(from, BATCH)
                .iter()
                .map(|e| (e.index, notification(&st, e)))
                .collect()
        };
        let mut up_to = from;
        let mut sent = false;
        for (index, n) in batch {
            if let Some(n) = n {
                send(&http, &n).await;
                sent = true;
            }
            up_to = index;
        }
        looked = up_to;
        if !sent {
            // Catching up on events that notify nobody awaits nothing: let the runtime's
            // other tasks (Raft and the API among them) in between batches. Without this,
            // a leader looking through 100,000 events held its thread for 0.7 s.
            tokio::task::yield_now().await;
            continue;
        }
        let mark = Command::MarkNotified {
            index: up_to,
            at: now_ms(),
        };
        if let Err(e) = member.propose(mark).await {
            tracing::debug!(error = %e, "recording notification progress failed");
        }
    }
}

/// POST `n` to each of its URLs at once, each tried until it answers 2xx, refuses for
/// good (a 4xx other than 408 and 429), or [`PATIENCE`] runs out.
async fn send(http: &reqwest::Client, n: &Notification) {
    let posts = n.urls.iter().map(|url| async move {
        let post = || async {
            let resp = http
                .post(url)
                .header("Content-Type", "application/json")
                .header("User-Agent", "starling")
                .header("X-Starling-Event", n.event.as_str())
                .header("X-Starling-Delivery", n.index.to_string())
                .header("X-Starling-Signature-256", &n.signature)
                .body(n.body.clone())
                .send()
                .await
                .map_err(|e| (true, e.to_string()))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let again = status.is_server_error() || status == 408 || status == 429;
            Err((again, format!("answered {status}")))
        };
        let sent = post
            .retry(starling_core::retry::backoff().with_total_delay(Some(PATIENCE)))
            .when(|(again, _)| *again)
            .notify(|(_, why), after| {
                tracing::debug!(url = %redact(url), %why, ?after, "notification failed; trying again")
            })
            .await;
        match sent {
            Ok(()) => tracing::info!(url = %redact(url), event = n.event.as_str(), index = n.index, "notified"),
            Err((_, why)) => tracing::warn!(url = %redact(url), event = n.event.as_str(), index = n.index, %why, "notification given up"),
        }
    });
    futures::future::join_all(posts).await;
}

fn redact(url: &str) -> String {
    starling_proto::redact::url(url)
}
