//! The CLI's tables for people (`--json` prints the records instead). Each function
//! turns records into a [`Table`]; nothing here talks to the control plane.

use comfy_table::{presets, CellAlignment, Table};
use starling_proto::{
    short, AppState, Build, ClusterStatus, Deployment, DeploymentView, NodeInfo, Release, Repo,
};

/// A borderless table with a header, like `kubectl get`.
fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING).set_header(header.to_vec());
    t
}

/// Right-align the columns at `columns` (numbers).
fn numbers(t: &mut Table, columns: &[usize]) {
    for &i in columns {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// A time (ms since the epoch) for people: how long ago, within the last day; the UTC
/// date and minute otherwise (and for times to come). `-` for none.
pub fn time(ms: Option<u64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms.map_or_else(|| "-".into(), |ms| time_at(now, ms))
}

fn time_at(now: u64, ms: u64) -> String {
    let ago = now.saturating_sub(ms) / 1000;
    match ago {
        _ if ms > now + 1_000 => date(ms),
        0..60 => format!("{ago} s ago"),
        60..3_600 => format!("{} min ago", ago / 60),
        3_600..86_400 => format!("{} h ago", ago / 3_600),
        _ => date(ms),
    }
}

/// `YYYY-MM-DD HH:MM UTC` (the civil-from-days conversion of Howard Hinnant's
/// `chrono`-compatible algorithms).
pub fn date(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3_600,
        rem % 3_600 / 60
    )
}

/// A duration for people: `850 ms`, `12.3 s`, `4 min 10 s`, `2 h 5 min`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

pub fn builds(builds: &[Build]) -> Table {
    let mut t = table(&[
        "ID", "REPO", "SHA", "STATUS", "TRY", "WORKER", "CREATED", "REASON",
    ]);
    for b in builds {
        t.add_row(vec![
            b.id.to_string(),
            b.repo.clone(),
            short(&b.sha).to_string(),
            b.status.to_string(),
            b.attempt.to_string(),
            b.worker
                .as_ref()
                .map_or_else(|| "-".into(), |w| w.to_string()),
            time(Some(b.created_at)),
            b.reason.clone().unwrap_or_default(),
        ]);
    }
    numbers(&mut t, &[0, 4]);
    t
}

/// A build's state changes, oldest first.
pub fn history(b: &Build) -> Table {
    let mut t = table(&["AT", "STATUS", "TRY", "WORKER", "REASON"]);
    for h in &b.history {
        t.add_row(vec![
            time(Some(h.at)),
            h.status.to_string(),
            h.attempt.to_string(),
            h.worker.as_ref().map(|w| w.to_string()).unwrap_or_default(),
            h.reason.clone().unwrap_or_default(),
        ]);
    }
    numbers(&mut t, &[2]);
    t
}

pub fn repos(repos: &[Repo]) -> Table {
    let mut t = table(&["NAME", "BRANCH", "AUTO", "URL"]);
    for r in repos {
        t.add_row(vec![
            r.name.clone(),
            r.branch.clone(),
            r.auto_deploy.to_string(),
            r.url.clone(),
        ]);
    }
    t
}

pub fn releases(rels: &[Release]) -> Table {
    let mut t = table(&["RELEASE", "REPO", "SHA", "BUILD", "STATE"]);
    for r in rels {
        let state = if r.collected_at.is_some() {
            "collected"
        } else {
            "kept"
        };
        t.add_row(vec![
            r.id.to_string(),
            r.repo.clone(),
            short(&r.sha).to_string(),
            r.build.to_string(),
            state.to_string(),
        ]);
    }
    numbers(&mut t, &[3]);
    t
}

/// Per region, repository, release and state, how many nodes are there; then each
/// failed node with its reason.
pub fn fleet(nodes: &[NodeInfo]) -> Table {
    type Row = (String, String, String, AppState);
    let mut counts: std::collections::BTreeMap<Row, usize> = std::collections::BTreeMap::new();
    for n in nodes {
        for a in &n.apps {
            let release = a
                .release
                .map_or_else(|| "-".into(), |r| short(&r.to_hex()).to_string());
            *counts
                .entry((n.region.clone(), a.repo.clone(), release, a.state))
                .or_default() += 1;
        }
    }
    let mut t = table(&["REGION", "REPO", "RELEASE", "STATE", "NODES"]);
    for ((region, repo, release, state), n) in counts {
        t.add_row(vec![
            region,
            repo,
            release,
            state.to_string(),
            n.to_string(),
        ]);
    }
    numbers(&mut t, &[4]);
    t
}

/// The nodes whose repositories failed, and why.
pub fn failures(nodes: &[NodeInfo]) -> Option<Table> {
    let mut t = table(&["NODE", "REGION", "REPO", "ERROR"]);
    let mut any = false;
    for n in nodes {
        for a in n.apps.iter().filter(|a| a.state == AppState::Failed) {
            let error = a.error.clone().unwrap_or_default();
            t.add_row(vec![n.id.clone(), n.region.clone(), a.repo.clone(), error]);
            any = true;
        }
    }
    any.then_some(t)
}

/// Deployments, newest first.
pub fn deployments(ds: &[Deployment]) -> Table {
    let mut t = table(&[
        "ID", "REPO", "RELEASE", "FROM", "STRATEGY", "STATUS", "WAVES", "STARTED", "TOOK",
        "TRIGGER",
    ]);
    for d in ds {
        let done = d.waves.iter().filter(|w| w.done_at.is_some()).count();
        t.add_row(vec![
            d.id.to_string(),
            d.repo.clone(),
            short(&d.release.to_hex()).to_string(),
            d.from
                .map_or_else(|| "-".into(), |f| short(&f.to_hex()).to_string()),
            d.policy.strategy.to_string(),
            d.status.to_string(),
            format!("{done}/{}", d.waves.len()),
            time(Some(d.created_at)),
            d.finished_at
                .map_or_else(|| "-".into(), |f| duration(f.saturating_sub(d.created_at))),
            d.trigger.clone(),
        ]);
    }
    numbers(&mut t, &[0]);
    t
}

/// One line: where a deployment is and how many nodes hold and run its release.
pub fn deployment_summary(v: &DeploymentView) -> String {
    let (d, p) = (&v.deployment, &v.progress);
    let wave = match d.current_wave() {
        Some(i) if !d.status.is_final() => {
            format!(", wave {}/{} ({})", i + 1, d.waves.len(), d.waves[i].name)
        }
        _ => String::new(),
    };
    let reason = match (&d.reason, d.status.is_final()) {
        (Some(r), true) => format!(": {r}"),
        _ => String::new(),
    };
    format!(
        "deployment {} of {} to {}: {}{wave}; {}/{} nodes staged, {} running it, {} failed{reason}",
        d.id,
        short(&d.release.to_hex()),
        d.repo,
        d.status,
        p.staged,
        p.nodes,
        p.running,
        p.failed
    )
}

/// A deployment's waves with their nodes' progress.
pub fn waves(v: &DeploymentView) -> Table {
    let mut t = table(&[
        "WAVE", "NAME", "NODES", "STAGED", "RUNNING", "FAILED", "STARTED", "HEALTHY", "DONE",
    ]);
    for (i, w) in v.deployment.waves.iter().enumerate() {
        let p = v.progress.waves.get(i).cloned().unwrap_or_default();
        t.add_row(vec![
            (i + 1).to_string(),
            w.name.clone(),
            p.nodes.to_string(),
            p.staged.to_string(),
            p.running.to_string(),
            p.failed.to_string(),
            time(w.started_at),
            time(w.healthy_at),
            time(w.done_at),
        ]);
    }
    numbers(&mut t, &[0, 2, 3, 4, 5]);
    t
}

/// A deployment's changes, oldest first.
pub fn deploy_history(d: &Deployment) -> Table {
    let mut t = table(&["AT", "WHAT", "WAVE", "REASON"]);
    for h in &d.history {
        t.add_row(vec![
            time(Some(h.at)),
            h.what.clone(),
            h.wave
                .and_then(|i| d.waves.get(i))
                .map_or_else(String::new, |w| w.name.clone()),
            h.reason.clone().unwrap_or_default(),
        ]);
    }
    t
}

pub fn members(st: &ClusterStatus) -> Table {
    let mut t = table(&["ID", "ADDRESS", "ROLE"]);
    for m in &st.members {
        let role = if Some(m.id) == st.leader {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        t.add_row(vec![m.id.to_string(), m.addr.clone(), role.to_string()]);
    }
    numbers(&mut t, &[0]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::{BuildStatus, Member, Transition};

    fn build() -> Build {
        Build {
            id: 7,
            repo: "acme/web".into(),
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            status: BuildStatus::Failed,
            attempt: 2,
            worker: Some("w1/0".into()),
            release: None,
            reason: Some("build command failed (exit code 7)".into()),
            trigger: "github".into(),
            delivery: None,
            created_at: 1_700_000_000_000,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            cancel_requested: false,
            history: vec![Transition {
                status: BuildStatus::Queued,
                at: 1_700_000_000_000,
                attempt: 1,
                worker: None,
                reason: None,
            }],
        }
    }

    #[test]
    fn a_build_row_has_every_column() {
        let text = builds(&[build()]).trim_fmt();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            ["ID", "REPO", "SHA", "STATUS", "TRY", "WORKER", "CREATED", "REASON"]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            &row[..7],
            [
                "7",
                "acme/web",
                "0123456789ab",
                "failed",
                "2",
                "w1/0",
                "2023-11-14"
            ]
        );
        assert!(lines[1].ends_with("(exit code 7)"), "{text}");
        assert!(history(&build()).to_string().contains("queued"));
    }

    #[test]
    fn times_read_as_ago_or_as_a_date() {
        let now = 1_795_841_696_055; // 2026-11-28 04:54:56 UTC
        assert_eq!(time_at(now, now - 12_000), "12 s ago");
        assert_eq!(time_at(now, now - 3 * 60_000 - 5), "3 min ago");
        assert_eq!(time_at(now, now - 5 * 3_600_000), "5 h ago");
        assert_eq!(time_at(now, now - 86_400_000), "2026-11-27 04:54 UTC");
        assert_eq!(time_at(now, now + 86_400_000), "2026-11-29 04:54 UTC");
        assert_eq!(date(0), "1970-01-01 00:00 UTC");
        assert_eq!(date(951_782_400_000), "2000-02-29 00:00 UTC");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_340), "12.3 s");
        assert_eq!(duration(250_000), "4 min 10 s");
    }

    #[test]
    fn members_show_their_roles() {
        let st = ClusterStatus {
            id: 1,
            leader: Some(2),
            term: 4,
            last_applied: None,
            last_log_index: None,
            snapshot_index: None,
            purged_index: None,
            cluster_ca: None,
            members: vec![
                Member {
                    id: 1,
                    addr: "127.0.0.1:7001".into(),
                    voter: true,
                },
                Member {
                    id: 2,
                    addr: "127.0.0.1:7002".into(),
                    voter: true,
                },
            ],
        };
        let text = members(&st).trim_fmt();
        assert!(text.contains("127.0.0.1:7001  voter"), "{text}");
        assert!(text.contains("127.0.0.1:7002  leader"), "{text}");
    }

    #[test]
    fn the_fleet_is_counted_per_repository_and_failures_say_why() {
        use starling_proto::{AppReport, ReleaseId};
        let r = ReleaseId::of(b"r");
        let node = |id: &str, state: AppState, error: Option<&str>| {
            let apps = vec![
                AppReport {
                    release: Some(r),
                    activated_at: Some(1),
                    state,
                    error: error.map(str::to_string),
                    ..AppReport::idle("acme/web")
                },
                AppReport::idle("acme/api"),
            ];
            let (release, activated_at, state, error) = NodeInfo::summary(&apps);
            NodeInfo {
                id: id.into(),
                region: "eu".into(),
                address: "10.0.0.1:7400".into(),
                release,
                state,
                last_seen: 1,
                activated_at,
                error,
                apps,
            }
        };
        let nodes = [
            node("n1", AppState::Running, None),
            node("n2", AppState::Running, None),
            node("n3", AppState::Failed, Some("health: exit status 1")),
        ];
        assert_eq!(nodes[2].state, AppState::Failed);
        assert_eq!(nodes[0].release, None, "acme/api comes first by name");
        let text = fleet(&nodes).trim_fmt();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let hex = r.to_hex();
        let short = short(&hex);
        assert_eq!(
            rows,
            [
                vec!["REGION", "REPO", "RELEASE", "STATE", "NODES"],
                vec!["eu", "acme/api", "-", "idle", "3"],
                vec!["eu", "acme/web", short, "running", "2"],
                vec!["eu", "acme/web", short, "failed", "1"],
            ]
        );
        let failed = failures(&nodes).unwrap().trim_fmt();
        assert!(
            failed.contains("n3    eu      acme/web  health: exit status 1"),
            "{failed}"
        );
        assert!(failures(&nodes[..2]).is_none());
    }
}
