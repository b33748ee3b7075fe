//! Every HTTP route of a control member, in one table: its method and path, which member
//! answers it, what credential it needs and how large a body it may carry.
//!
//! The member's router is built from this table (one handler per [`Endpoint`], checked
//! by an exhaustive `match`), its access check and its leader-or-local decision look
//! requests up here, and `starling-client` makes its URLs from it. A route added here
//! is therefore routed, protected and reachable from the client in one change.

use std::fmt::Display;

use crate::MAX_MISSING_QUERY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// The method named `name`; `HEAD` is a `GET` without the body.
    pub fn parse(name: &str) -> Option<Method> {
        match name {
            "GET" | "HEAD" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }
}

/// Which member answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// The leader: writes, and reads that must be linearizable. A follower forwards
    /// them; a `GET` with `stale=true` is answered by the member it reaches.
    ByLeader,
    /// The member the request reaches: its own copy of the origin store and build logs,
    /// its own view of the cluster, the event log, the Raft RPC.
    Here,
}

/// The credential a request needs, checked from the headers before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (webhooks are signed per repository instead).
    Public,
    /// The API token or the read token, unless the member serves them publicly: build
    /// output and release contents may hold anything.
    PrivateRead,
    /// The API token.
    Write,
    /// The cluster key, which only members hold.
    Cluster,
}

/// One route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    /// The path, with `{name}` for each parameter (axum's syntax).
    pub path: &'static str,
    pub answered: Answered,
    pub access: Access,
    /// Largest body accepted.
    pub body_limit: usize,
}

/// Requests of the JSON API: a repository, a trigger, a completion with its reason.
pub const MAX_API_BODY: usize = 1024 * 1024;
/// Webhook deliveries; GitHub caps payloads at 25 MB but pushes are far smaller.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;
/// A piece of build output: at most the whole log a member keeps (1 MiB) and a byte.
pub const MAX_LOG_BODY: usize = 2 * 1024 * 1024;
/// Largest chunk accepted: the FastCDC maximum with room to spare.
pub const MAX_CHUNK: usize = 8 * 1024 * 1024;
/// Largest missing-chunks question: its names and their JSON quoting.
pub const MAX_MISSING_BODY: usize = MAX_MISSING_QUERY * 80;
/// Largest manifest accepted (a million files is ~100 MiB; far beyond a sane release).
pub const MAX_MANIFEST: usize = 64 * 1024 * 1024;
/// An enrolment: a join token, a name and a region.
pub const MAX_ENROLL_BODY: usize = 4 * 1024;
/// A vote is a few dozen bytes.
pub const MAX_VOTE_BODY: usize = 64 * 1024;
/// A batch of log entries: each is a command made from an API request of at most
/// `MAX_API_BODY`, and openraft sends a few hundred at most.
pub const MAX_APPEND_BODY: usize = 256 * 1024 * 1024;
/// A whole state image: it grows with the history (about 5.6 GB at 2 million builds).
/// It is streamed to a file, never held in memory.
pub const MAX_SNAPSHOT_BODY: usize = 64 << 30;

/// Every endpoint a control member serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Healthz,
    Metrics,
    Cluster,
    RemoveMember,
    ListRepos,
    PutRepo,
    Trigger,
    ListBuilds,
    ShowBuild,
    CancelBuild,
    ReadLog,
    AppendLog,
    Heartbeat,
    Complete,
    Lease,
    ListReleases,
    ListNodes,
    Events,
    EventsStream,
    GithubHook,
    GitlabHook,
    GetChunk,
    PutChunk,
    MissingChunks,
    GetManifest,
    PutManifest,
    RaftAppend,
    RaftVote,
    RaftSnapshot,
    Join,
    /// The cluster CA, for a member joining an HTTPS cluster: it needs a certificate to
    /// serve before Raft can bring it the CA.
    ClusterCa,
    Snapshot,
    CreateJoinToken,
    Enroll,
    ListGoals,
    Deploy,
    ListDeploys,
    ShowDeploy,
    PauseDeploy,
    ResumeDeploy,
    Rollback,
    /// The web page, and the part of it that changes.
    WebPage,
    WebFragment,
}

impl Endpoint {
    pub const ALL: [Endpoint; 43] = [
        Endpoint::Healthz,
        Endpoint::Metrics,
        Endpoint::Cluster,
        Endpoint::RemoveMember,
        Endpoint::ListRepos,
        Endpoint::PutRepo,
        Endpoint::Trigger,
        Endpoint::ListBuilds,
        Endpoint::ShowBuild,
        Endpoint::CancelBuild,
        Endpoint::ReadLog,
        Endpoint::AppendLog,
        Endpoint::Heartbeat,
        Endpoint::Complete,
        Endpoint::Lease,
        Endpoint::ListReleases,
        Endpoint::ListNodes,
        Endpoint::Events,
        Endpoint::EventsStream,
        Endpoint::GithubHook,
        Endpoint::GitlabHook,
        Endpoint::GetChunk,
        Endpoint::PutChunk,
        Endpoint::MissingChunks,
        Endpoint::GetManifest,
        Endpoint::PutManifest,
        Endpoint::RaftAppend,
        Endpoint::RaftVote,
        Endpoint::RaftSnapshot,
        Endpoint::Join,
        Endpoint::ClusterCa,
        Endpoint::Snapshot,
        Endpoint::CreateJoinToken,
        Endpoint::Enroll,
        Endpoint::ListGoals,
        Endpoint::Deploy,
        Endpoint::ListDeploys,
        Endpoint::ShowDeploy,
        Endpoint::PauseDeploy,
        Endpoint::ResumeDeploy,
        Endpoint::Rollback,
        Endpoint::WebPage,
        Endpoint::WebFragment,
    ];

    /// The table.
    pub const fn route(self) -> Route {
        use Access::*;
        use Answered::*;
        use Method::*;
        let (method, path, answered, access, body_limit) = match self {
            Endpoint::Healthz => (Get, "/healthz", Here, Public, 0),
            Endpoint::Metrics => (Get, "/metrics", Here, Public, 0),
            Endpoint::Cluster => (Get, "/v1/cluster", Here, Public, 0),
            Endpoint::RemoveMember => (Delete, "/v1/cluster/members/{id}", ByLeader, Write, 0),
            Endpoint::ListRepos => (Get, "/v1/repos", ByLeader, Public, 0),
            Endpoint::PutRepo => (Post, "/v1/repos", ByLeader, Write, MAX_API_BODY),
            Endpoint::Trigger => (Post, "/v1/trigger", ByLeader, Write, MAX_API_BODY),
            Endpoint::ListBuilds => (Get, "/v1/builds", ByLeader, Public, 0),
            Endpoint::ShowBuild => (Get, "/v1/builds/{id}", ByLeader, Public, 0),
            Endpoint::CancelBuild => (Post, "/v1/builds/{id}/cancel", ByLeader, Write, 0),
            Endpoint::ReadLog => (Get, "/v1/builds/{id}/logs", Here, PrivateRead, 0),
            Endpoint::AppendLog => (Put, "/v1/builds/{id}/logs", Here, Write, MAX_LOG_BODY),
            Endpoint::Heartbeat => (
                Post,
                "/v1/builds/{id}/heartbeat",
                ByLeader,
                Write,
                MAX_API_BODY,
            ),
            Endpoint::Complete => (
                Post,
                "/v1/builds/{id}/complete",
                ByLeader,
                Write,
                MAX_API_BODY,
            ),
            Endpoint::Lease => (Post, "/v1/leases", ByLeader, Write, MAX_API_BODY),
            Endpoint::ListReleases => (Get, "/v1/releases", ByLeader, Public, 0),
            // Nodes announce to every member: each answers from its own tracker.
            Endpoint::ListNodes => (Get, "/v1/nodes", Here, Public, 0),
            Endpoint::Events => (Get, "/v1/events", Here, Public, 0),
            Endpoint::EventsStream => (Get, "/v1/events/stream", Here, Public, 0),
            Endpoint::GithubHook => (Post, "/hooks/github", ByLeader, Public, MAX_WEBHOOK_BODY),
            Endpoint::GitlabHook => (Post, "/hooks/gitlab", ByLeader, Public, MAX_WEBHOOK_BODY),
            Endpoint::GetChunk => (Get, "/v1/chunks/{hash}", Here, PrivateRead, 0),
            Endpoint::PutChunk => (Put, "/v1/chunks/{hash}", Here, Write, MAX_CHUNK),
            Endpoint::MissingChunks => (Post, "/v1/chunks/missing", Here, Write, MAX_MISSING_BODY),
            Endpoint::GetManifest => (Get, "/v1/manifests/{id}", Here, PrivateRead, 0),
            Endpoint::PutManifest => (Put, "/v1/manifests/{id}", Here, Write, MAX_MANIFEST),
            Endpoint::RaftAppend => (Post, "/raft/append", Here, Cluster, MAX_APPEND_BODY),
            Endpoint::RaftVote => (Post, "/raft/vote", Here, Cluster, MAX_VOTE_BODY),
            Endpoint::RaftSnapshot => (Post, "/raft/snapshot", Here, Cluster, MAX_SNAPSHOT_BODY),
            Endpoint::Join => (Post, "/internal/join", ByLeader, Cluster, MAX_API_BODY),
            Endpoint::ClusterCa => (Get, "/internal/ca", Here, Cluster, 0),
            Endpoint::Snapshot => (Post, "/internal/snapshot", Here, Cluster, 0),
            Endpoint::CreateJoinToken => (Post, "/v1/join-tokens", ByLeader, Write, MAX_API_BODY),
            // Authenticated by the join token in the body, which is small.
            Endpoint::Enroll => (Post, "/v1/enroll", ByLeader, Public, MAX_ENROLL_BODY),
            Endpoint::ListGoals => (Get, "/v1/goals", ByLeader, Public, 0),
            Endpoint::Deploy => (Post, "/v1/deploys", ByLeader, Write, MAX_API_BODY),
            Endpoint::ListDeploys => (Get, "/v1/deploys", ByLeader, Public, 0),
            Endpoint::ShowDeploy => (Get, "/v1/deploys/{id}", ByLeader, Public, 0),
            Endpoint::PauseDeploy => (Post, "/v1/deploys/{id}/pause", ByLeader, Write, 0),
            Endpoint::ResumeDeploy => (Post, "/v1/deploys/{id}/resume", ByLeader, Write, 0),
            Endpoint::Rollback => (Post, "/v1/rollback", ByLeader, Write, MAX_API_BODY),
            Endpoint::WebPage => (Get, "/", Here, Public, 0),
            Endpoint::WebFragment => (Get, "/ui/fragment", Here, Public, 0),
        };
        Route {
            method,
            path,
            answered,
            access,
            body_limit,
        }
    }

    /// The endpoint `method` and `path` (without the query) reach, if any. A literal
    /// segment wins over a parameter (`/v1/chunks/missing` is not a chunk).
    pub fn find(method: Method, path: &str) -> Option<Endpoint> {
        let mut best: Option<(Endpoint, usize)> = None;
        for e in Endpoint::ALL {
            let r = e.route();
            if r.method != method {
                continue;
            }
            if let Some(literals) = match_path(r.path, path) {
                if best.is_none_or(|(_, l)| literals > l) {
                    best = Some((e, literals));
                }
            }
        }
        best.map(|(e, _)| e)
    }

    /// The path of this endpoint with its parameters filled in, in order.
    pub fn path(self, args: &[&(dyn Display + Sync)]) -> String {
        let pattern = self.route().path;
        let mut out = String::with_capacity(pattern.len() + 16);
        let mut args = args.iter();
        for (i, seg) in pattern.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            if seg.starts_with('{') {
                match args.next() {
                    Some(a) => out.push_str(&a.to_string()),
                    None => out.push_str(seg),
                }
            } else {
                out.push_str(seg);
            }
        }
        debug_assert!(args.next().is_none(), "too many arguments for {pattern}");
        out
    }
}

impl Route {
    /// Whether the member a request reaches answers it itself: the route says so, or it
    /// is a read that accepts a stale answer.
    pub fn answered_here(&self, stale_ok: bool) -> bool {
        self.answered == Answered::Here || (self.method == Method::Get && stale_ok)
    }
}

/// The number of literal segments if `path` fits `pattern`.
fn match_path(pattern: &str, path: &str) -> Option<usize> {
    let mut literals = 0;
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(literals),
            (Some(w), Some(h)) if w.starts_with('{') => {
                if h.is_empty() {
                    return None;
                }
            }
            (Some(w), Some(h)) if w == h => literals += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_found_by_its_own_route() {
        for e in Endpoint::ALL {
            let r = e.route();
            let args: [&(dyn Display + Sync); 2] = [&"x1", &"x2"];
            let path = e.path(&args[..r.path.matches('{').count()]);
            assert_eq!(Endpoint::find(r.method, &path), Some(e), "{path}");
        }
    }

    #[test]
    fn routes_are_unique_and_literals_win() {
        for (i, a) in Endpoint::ALL.iter().enumerate() {
            for b in &Endpoint::ALL[i + 1..] {
                let (ra, rb) = (a.route(), b.route());
                assert!(
                    ra.method != rb.method || ra.path != rb.path,
                    "{a:?} = {b:?}"
                );
            }
        }
        assert_eq!(
            Endpoint::find(Method::Post, "/v1/chunks/missing"),
            Some(Endpoint::MissingChunks)
        );
        assert_eq!(
            Endpoint::find(Method::Get, "/v1/chunks/missing"),
            Some(Endpoint::GetChunk)
        );
        assert_eq!(Endpoint::find(Method::Get, "/v1/builds/"), None);
        assert_eq!(Endpoint::find(Method::Get, "/v1/builds/1/logs/x"), None);
        assert_eq!(Endpoint::find(Method::Post, "/v1/builds"), None);
    }

    #[test]
    fn paths_are_filled_in_order() {
        assert_eq!(Endpoint::AppendLog.path(&[&42]), "/v1/builds/42/logs");
        assert_eq!(Endpoint::Lease.path(&[]), "/v1/leases");
    }

    #[test]
    fn writes_go_to_the_leader_and_stale_reads_stay() {
        let list = Endpoint::ListBuilds.route();
        assert!(!list.answered_here(false));
        assert!(list.answered_here(true));
        assert!(!Endpoint::Trigger.route().answered_here(true));
        assert!(Endpoint::PutChunk.route().answered_here(false));
        // Every mutating route needs a credential or a signature.
        for e in Endpoint::ALL {
            let r = e.route();
            if r.method != Method::Get && r.access == Access::Public {
                assert!(
                    matches!(
                        e,
                        Endpoint::GithubHook | Endpoint::GitlabHook | Endpoint::Enroll
                    ),
                    "{e:?}"
                );
            }
        }
    }
}
