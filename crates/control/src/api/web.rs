//! The web page every member serves at `/`: the cluster, deployments with their waves and
//! regions, builds with their live logs, the fleet and the event log, as HTML rendered
//! here. A little JavaScript (inline, like the styles: nothing comes from the internet)
//! swaps in `/ui/fragment` when the event stream (`/v1/events/stream`) says something
//! happened, and every two seconds while nodes report progress; actions (deploy,
//! rollback, cancel, pause) call the API with the token the reader typed in, which stays
//! in the browser.
//!
//! The page is answered by the member it reaches, from its applied state and its tracker,
//! so a follower's page may trail the leader's by a moment.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use starling_proto::short;
use starling_proto::{
    AppState, Build, BuildStatus, ClusterStatus, DeployStatus, Deployment, Event, EventKind,
    NodeInfo, Progress, RegionProgress,
};

use super::Shared;
use crate::member::{FleetReport, Member};

/// Deployments and builds the page lists.
const SHOWN_DEPLOYMENTS: usize = 8;
const SHOWN_BUILDS: usize = 15;
const SHOWN_EVENTS: usize = 12;

pub(super) async fn page(State(m): Shared) -> Response {
    let repos: Vec<String> = m.read().list_repos().into_iter().map(|r| r.name).collect();
    let last_event = m.read().last_event_index();
    let kinds: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    let mut options = String::new();
    for r in &repos {
        let _ = write!(options, "<option value=\"{}\">", esc(r));
    }
    let html = PAGE
        .replace("{{STYLE}}", STYLE)
        .replace("{{SCRIPT}}", SCRIPT)
        .replace("{{REPOS}}", &options)
        .replace("{{LAST_EVENT}}", &last_event.to_string())
        .replace(
            "{{KINDS}}",
            &serde_json::to_string(&kinds).unwrap_or_else(|_| "[]".into()),
        )
        .replace("{{LIVE}}", &fragment_html(&m));
    html_response(html)
}

pub(super) async fn fragment(State(m): Shared) -> Response {
    html_response(fragment_html(&m))
}

fn html_response(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Everything that changes: the sections the page swaps in.
fn fragment_html(m: &Member) -> String {
    let cluster = super::cluster::cluster_status(m);
    let nodes = super::builds::fleet_nodes(m);
    let (deployments, builds, events) = {
        let state = m.read();
        let builds = state.list_builds(&starling_core::state::BuildQuery {
            limit: Some(SHOWN_BUILDS),
            ..Default::default()
        });
        let after = state.last_event_index().saturating_sub(SHOWN_EVENTS as u64);
        (
            state.list_deployments(None, SHOWN_DEPLOYMENTS),
            builds,
            state.events_after(after, SHOWN_EVENTS),
        )
    };
    let mut out = String::new();
    cluster_section(&mut out, &cluster);
    deployments_section(&mut out, m, &deployments);
    builds_section(&mut out, &builds);
    fleet_section(&mut out, &nodes);
    events_section(&mut out, &events);
    out
}

fn cluster_section(out: &mut String, c: &ClusterStatus) {
    let leader = c
        .leader
        .map_or_else(|| "none (electing)".into(), |l| format!("member {l}"));
    let _ = write!(
        out,
        "<section id=\"cluster\"><h2>Control plane</h2><p class=\"sub\">answered by member {}; \
         leader <b id=\"leader\">{leader}</b>, term {}</p><div class=\"chips\">",
        c.id, c.term
    );
    for mb in &c.members {
        let role = if Some(mb.id) == c.leader {
            "leader"
        } else if mb.voter {
            "voter"
        } else {
            "learner"
        };
        let _ = write!(
            out,
            "<span class=\"chip {role}\">member {} <small>{} · {role}</small></span>",
            mb.id,
            esc(&mb.addr)
        );
    }
    out.push_str("</div></section>");
}

fn deployments_section(out: &mut String, m: &Member, deployments: &[Deployment]) {
    out.push_str("<section id=\"deployments\"><h2>Deployments</h2>");
    if deployments.is_empty() {
        out.push_str("<p class=\"empty\">No deployment yet: a successful build of a repository's branch starts one.</p>");
    }
    // Progress for the newest deployment of each repository; older ones are history.
    let mut seen = std::collections::BTreeSet::new();
    for d in deployments {
        let progress = seen.insert(d.repo.clone()).then(|| {
            let fleet = m.fleet(&d.repo);
            starling_core::rollout::progress(d, &FleetReport::view(&fleet))
        });
        deployment_card(out, d, progress.as_ref());
    }
    out.push_str("</section>");
}

fn deployment_card(out: &mut String, d: &Deployment, progress: Option<&Progress>) {
    let status = d.status.as_str();
    let _ = write!(
        out,
        "<div class=\"card deploy\" data-deployment=\"{}\"><div class=\"row\"><b>#{} {}</b> \
         <span class=\"badge {status}\">{}</span> <code title=\"{}\">{}</code> \
         <span class=\"muted\">{} · {} · {}</span>",
        d.id,
        d.id,
        esc(&d.repo),
        status.replace('_', " "),
        d.release,
        short(&d.release.to_hex()),
        d.policy.strategy,
        esc(&d.trigger),
        when(d.created_at)
    );
    if let Some(from) = d.from {
        let _ = write!(
            out,
            " <span class=\"muted\">from <code>{}</code></span>",
            short(&from.to_hex())
        );
    }
    out.push_str("<span class=\"actions\">");
    match d.status {
        DeployStatus::Rolling => {
            let _ = write!(
                out,
                "<button data-post=\"/v1/deploys/{}/pause\">Pause</button>",
                d.id
            );
        }
        DeployStatus::Paused => {
            let _ = write!(
                out,
                "<button data-post=\"/v1/deploys/{}/resume\">Resume</button>",
                d.id
            );
        }
        _ => {}
    }
    if progress.is_some() {
        let _ = write!(
            out,
            "<button class=\"warn\" data-rollback=\"{}\">Roll back</button>",
            esc(&d.repo)
        );
    }
    out.push_str("</span></div>");
    if let Some(reason) = d
        .reason
        .as_deref()
        .filter(|_| d.status != DeployStatus::Succeeded)
    {
        let _ = write!(out, "<p class=\"reason\">{}</p>", esc(reason));
    }
    if let Some(p) = progress {
        let staged = match (p.staged_p50_ms, p.staged_p99_ms) {
            (Some(a), Some(b)) => format!(" · staged in {} (p50), {} (p99)", secs(a), secs(b)),
            _ => String::new(),
        };
        let _ = write!(
            out,
            "<p class=\"sub\">{} nodes · {} staged · {} running it · {} failed{staged}</p>",
            p.nodes, p.staged, p.running, p.failed
        );
        out.push_str("<div class=\"grid\"><div><h3>Waves</h3>");
        for (i, w) in d.waves.iter().enumerate() {
            let state = if w.done_at.is_some() {
                "done"
            } else if w.healthy_at.is_some() {
                "soaking"
            } else if w.started_at.is_some() {
                "active"
            } else {
                "waiting"
            };
            let counts = p.waves.get(i).cloned().unwrap_or_default();
            bar(out, &format!("{} · {state}", w.name), &counts, state);
        }
        if d.waves.is_empty() {
            out.push_str("<p class=\"empty\">waves not planned yet</p>");
        }
        out.push_str("</div><div><h3>Regions</h3>");
        for r in &p.regions {
            bar(out, &r.name, r, "");
        }
        out.push_str("</div></div>");
    }
    out.push_str("</div>");
}

/// A progress bar of `c`: running (solid), staged (light), failed (red).
fn bar(out: &mut String, label: &str, c: &RegionProgress, class: &str) {
    let n = c.nodes.max(1) as f64;
    let pct = |x: usize| (x as f64 * 100.0 / n).round();
    let staged_only = c.staged.saturating_sub(c.running + c.failed);
    let _ = write!(
        out,
        "<div class=\"bar {class}\"><span class=\"label\">{}</span><span class=\"track\">\
         <i class=\"run\" style=\"width:{}%\"></i><i class=\"stg\" style=\"width:{}%\"></i>\
         <i class=\"bad\" style=\"width:{}%\"></i></span><span class=\"count\">{}/{} running</span></div>",
        esc(label),
        pct(c.running),
        pct(staged_only),
        pct(c.failed),
        c.running,
        c.nodes
    );
}

fn builds_section(out: &mut String, builds: &[Build]) {
    out.push_str("<section id=\"builds\"><h2>Builds</h2><table><tr><th>#</th><th>repo</th><th>commit</th><th>status</th><th>worker</th><th>created</th><th>took</th><th></th></tr>");
    for b in builds {
        let took = match (b.started_at, b.finished_at) {
            (Some(s), Some(f)) => secs(f.saturating_sub(s)),
            _ => "-".into(),
        };
        let _ = write!(
            out,
            "<tr data-build=\"{}\"><td>{}</td><td>{}</td><td><code>{}</code></td>\
             <td><span class=\"badge {}\">{}</span></td><td>{}</td><td>{}</td><td>{took}</td><td>\
             <button data-log=\"{}\">Log</button>",
            b.id,
            b.id,
            esc(&b.repo),
            short(&b.sha),
            b.status.as_str(),
            b.status.as_str().replace('_', " "),
            esc(&b.worker.as_ref().map(|w| w.to_string()).unwrap_or_default()),
            when(b.created_at),
            b.id
        );
        if matches!(b.status, BuildStatus::Queued | BuildStatus::Running) {
            let _ = write!(
                out,
                " <button data-post=\"/v1/builds/{}/cancel\">Cancel</button>",
                b.id
            );
        }
        out.push_str("</td></tr>");
        if let Some(reason) = b
            .reason
            .as_deref()
            .filter(|_| b.status != BuildStatus::Succeeded)
        {
            let _ = write!(
                out,
                "<tr class=\"why\"><td></td><td colspan=\"7\">{}</td></tr>",
                esc(reason)
            );
        }
    }
    if builds.is_empty() {
        out.push_str("<tr><td colspan=\"8\" class=\"empty\">No build yet.</td></tr>");
    }
    out.push_str("</table></section>");
}

fn fleet_section(out: &mut String, nodes: &[NodeInfo]) {
    // (region, repo, release, state) → nodes.
    let mut groups: BTreeMap<(&str, &str, String, AppState), usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for n in nodes {
        for a in &n.apps {
            let release = a
                .release
                .map_or_else(|| "-".into(), |r| short(&r.to_hex()).to_string());
            *groups
                .entry((&n.region, &a.repo, release, a.state))
                .or_default() += 1;
            if let Some(e) = a.error.as_deref() {
                failures.push((n.id.as_str(), a.repo.as_str(), e));
            }
        }
    }
    let _ = write!(
        out,
        "<section id=\"fleet\"><h2>Fleet <small>{} nodes</small></h2><table><tr><th>region</th>\
         <th>repo</th><th>release</th><th>state</th><th>nodes</th></tr>",
        nodes.len()
    );
    for ((region, repo, release, state), count) in &groups {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td><code>{release}</code></td><td><span class=\"badge {}\">{}</span></td><td>{count}</td></tr>",
            esc(region),
            esc(repo),
            state.as_str(),
            state.as_str()
        );
    }
    if groups.is_empty() {
        out.push_str(
            "<tr><td colspan=\"5\" class=\"empty\">No node has announced itself yet.</td></tr>",
        );
    }
    out.push_str("</table>");
    for (node, repo, e) in failures {
        let _ = write!(
            out,
            "<p class=\"reason\"><b>{}</b> ({}): {}</p>",
            esc(node),
            esc(repo),
            esc(e)
        );
    }
    out.push_str("</section>");
}

fn events_section(out: &mut String, events: &[Event]) {
    out.push_str("<section id=\"events\"><h2>Events</h2><ul class=\"events\">");
    for e in events.iter().rev() {
        let _ = write!(
            out,
            "<li><span class=\"muted\">#{} {}</span> <b>{}</b> {} {}</li>",
            e.index,
            when(e.at),
            e.kind.as_str(),
            esc(e.repo.as_deref().unwrap_or("")),
            esc(e.detail.as_deref().unwrap_or(""))
        );
    }
    out.push_str("</ul></section>");
}

/// A time the page's script shows as "3 min ago" (and the date on hover).
fn when(ms: u64) -> String {
    format!("<time data-ms=\"{ms}\">{ms}</time>")
}

fn secs(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} s", ms / 1000)
    }
}

/// `s` with the characters HTML gives meaning to escaped.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Starling</title><style>{{STYLE}}</style></head>
<body>
<header><h1>Starling</h1><span class="tag">builds · releases · rollouts</span>
<form id="auth" onsubmit="return false"><input id="token" type="password" placeholder="API token (for actions and logs)" autocomplete="off"><button id="save-token">Use token</button></form></header>
<main>
<div id="notice" role="status"></div>
<section id="deploy-form"><h2>Deploy</h2>
<form id="deploy" onsubmit="return false">
<input id="deploy-repo" list="repos" placeholder="repository" required><datalist id="repos">{{REPOS}}</datalist>
<input id="deploy-release" placeholder="release id (default: newest)">
<select id="deploy-strategy"><option value="">repository's strategy</option><option value="waves">waves</option><option value="all-at-once">all at once</option></select>
<button id="deploy-go">Deploy</button></form></section>
<div id="live">{{LIVE}}</div>
<section id="log-panel" hidden><h2>Build <span id="log-build"></span> log <button id="log-close">Close</button></h2><pre id="log"></pre></section>
</main>
<script>const LAST_EVENT = {{LAST_EVENT}}; const KINDS = {{KINDS}};
{{SCRIPT}}</script>
</body></html>"#;

const STYLE: &str = r#"
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--muted:#6b7385;--line:#e3e6ec;--ok:#1f9d55;--run:#2563eb;--warn:#d97706;--bad:#dc2626}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--ink)}
header{display:flex;align-items:center;gap:14px;padding:12px 24px;background:#111827;color:#fff}
header h1{margin:0;font-size:20px;letter-spacing:.5px}.tag{color:#9ca3af;font-size:12px}
#auth{margin-left:auto;display:flex;gap:6px}#auth input{width:260px}
main{max-width:1180px;margin:0 auto;padding:16px 24px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:0 0 14px}
h2{font-size:15px;margin:0 0 8px}h2 small{color:var(--muted);font-weight:normal}h3{font-size:12px;text-transform:uppercase;color:var(--muted);margin:8px 0 4px}
.sub,.muted{color:var(--muted)}.empty{color:var(--muted);font-style:italic}.reason{color:var(--bad);margin:4px 0}
table{width:100%;border-collapse:collapse}th{text-align:left;color:var(--muted);font-weight:500;font-size:12px}td,th{padding:4px 6px;border-bottom:1px solid var(--line)}
tr.why td{color:var(--bad);font-size:12px;border-bottom:1px solid var(--line)}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f3f7;padding:1px 4px;border-radius:4px}
.badge{display:inline-block;padding:0 7px;border-radius:10px;font-size:12px;background:#e5e7eb}
.badge.succeeded,.badge.running{background:#dcfce7;color:#166534}.badge.rolling,.badge.starting,.badge.fetching,.badge.queued{background:#dbeafe;color:#1e40af}
.badge.failed,.badge.rolled_back,.badge.timed_out{background:#fee2e2;color:#991b1b}.badge.paused,.badge.cancelled,.badge.superseded{background:#fef3c7;color:#92400e}
.chips{display:flex;gap:8px;flex-wrap:wrap}.chip{border:1px solid var(--line);border-radius:16px;padding:3px 10px}.chip.leader{border-color:var(--ok);background:#f0fdf4}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 12px;margin:8px 0}.row{display:flex;gap:8px;align-items:center;flex-wrap:wrap}.actions{margin-left:auto;display:flex;gap:6px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.bar{display:grid;grid-template-columns:150px 1fr 90px;gap:8px;align-items:center;margin:3px 0;font-size:12px}
.track{position:relative;height:10px;background:#eef0f4;border-radius:5px;overflow:hidden;display:flex}
.track i{display:block;height:100%}.track .run{background:var(--ok)}.track .stg{background:#93c5fd}.track .bad{background:var(--bad)}
.bar.active .label{color:var(--run);font-weight:600}.bar.soaking .label{color:var(--warn)}.count{color:var(--muted);text-align:right}
ul.events{list-style:none;margin:0;padding:0;font-size:13px}ul.events li{padding:2px 0;border-bottom:1px dashed var(--line)}
button{font:inherit;border:1px solid var(--line);background:#fff;border-radius:6px;padding:2px 10px;cursor:pointer}button:hover{border-color:var(--run)}button.warn{color:var(--bad)}
input,select{font:inherit;padding:3px 8px;border:1px solid var(--line);border-radius:6px}
#deploy{display:flex;gap:8px;flex-wrap:wrap}#deploy-release{width:340px}
#notice{min-height:0}#notice.show{background:#111827;color:#fff;border-radius:6px;padding:6px 12px;margin-bottom:10px}#notice.err{background:var(--bad)}
pre#log{background:#0b1020;color:#d1d5db;padding:10px;border-radius:6px;max-height:420px;overflow:auto;font-size:12px;white-space:pre-wrap}
"#;

const SCRIPT: &str = r#"
const $ = (id) => document.getElementById(id);
const token = () => localStorage.getItem('starling-token') || '';
$('token').value = token();
$('save-token').onclick = () => { localStorage.setItem('starling-token', $('token').value.trim()); note('token saved in this browser'); };
function note(text, bad) { const n = $('notice'); n.textContent = text; n.className = bad ? 'show err' : 'show'; clearTimeout(note.t); note.t = setTimeout(() => { n.className = ''; n.textContent = ''; }, 6000); }
function ago(ms) { const s = Math.max(0, Math.round((Date.now() - ms) / 1000)); if (s < 60) return s + ' s ago'; if (s < 3600) return Math.floor(s / 60) + ' min ago'; if (s < 86400) return Math.floor(s / 3600) + ' h ago'; return new Date(ms).toLocaleString(); }
function times() { document.querySelectorAll('time[data-ms]').forEach(t => { const ms = +t.dataset.ms; t.textContent = ago(ms); t.title = new Date(ms).toLocaleString(); }); }
let busy = false, again = false;
async function refresh() { if (busy) { again = true; return; } busy = true; try { const r = await fetch('/ui/fragment', {cache: 'no-store'}); if (r.ok) { $('live').innerHTML = await r.text(); times(); } } catch (e) {} finally { busy = false; if (again) { again = false; refresh(); } } }
let soon = null; function refreshSoon() { if (!soon) soon = setTimeout(() => { soon = null; refresh(); }, 100); }
const es = new EventSource('/v1/events/stream?after=' + LAST_EVENT);
KINDS.forEach(k => es.addEventListener(k, refreshSoon));
setInterval(refresh, 2000);
async function call(method, path, body) {
  const headers = {'Authorization': 'Bearer ' + token()}; if (body) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {method, headers, body: body ? JSON.stringify(body) : undefined});
  const text = await r.text(); let data = null; try { data = JSON.parse(text); } catch (e) {}
  if (!r.ok) { note((data && data.error) || (r.status + ' ' + text), true); return null; }
  refreshSoon(); return data;
}
document.addEventListener('click', async (ev) => {
  const b = ev.target.closest('button'); if (!b) return;
  if (b.dataset.post) { const d = await call('POST', b.dataset.post); if (d) note('done: ' + b.textContent.toLowerCase()); }
  else if (b.dataset.rollback) { const d = await call('POST', '/v1/rollback', {repo: b.dataset.rollback}); if (d) note('rollback started: deployment ' + d.id + ' to ' + d.release.slice(0, 12)); }
  else if (b.dataset.log) { showLog(+b.dataset.log); }
});
$('deploy-go').onclick = async () => {
  const body = {repo: $('deploy-repo').value.trim()}; const rel = $('deploy-release').value.trim(); const st = $('deploy-strategy').value;
  if (rel) body.release = rel; if (st) body.strategy = st;
  const d = await call('POST', '/v1/deploys', body); if (d) note('deployment ' + d.id + ' started: ' + d.release.slice(0, 12) + ' to ' + d.repo);
};
let logBuild = null, logOffset = 0, logTimer = null;
async function pollLog() {
  if (logBuild === null) return;
  const r = await fetch('/v1/builds/' + logBuild + '/logs?offset=' + logOffset, {headers: {'Authorization': 'Bearer ' + token()}});
  if (r.ok) { const t = await r.text(); if (t) { $('log').textContent += t; logOffset += new TextEncoder().encode(t).length; $('log').scrollTop = 1e9; } }
  else if (logOffset === 0) { $('log').textContent = 'cannot read the log (' + r.status + '): give the API token above'; }
}
function showLog(id) { logBuild = id; logOffset = 0; $('log').textContent = ''; $('log-build').textContent = '#' + id; $('log-panel').hidden = false; clearInterval(logTimer); pollLog(); logTimer = setInterval(pollLog, 1000); $('log-panel').scrollIntoView(); }
$('log-close').onclick = () => { logBuild = null; clearInterval(logTimer); $('log-panel').hidden = true; };
times();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_users_is_escaped() {
        assert_eq!(
            esc("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
    }
}
