//! Who may call what, decided from the method, the path and the headers alone — before a
//! byte of the body is read, so that an unauthenticated caller can never make a member
//! buffer a body (the Raft routes take up to 1 GiB).
//!
//! Each route's [`Access`] is in the route table (`starling_proto::routes`):
//!
//! | access | routes | credential |
//! | --- | --- | --- |
//! | cluster | `/raft/*`, `/internal/*` | the cluster key |
//! | write | every other non-GET | the API token |
//! | private read | build logs, manifests, chunks | the API token or the read token, unless the member runs with `--public-read` |
//! | public | other GETs, `/healthz`, `/metrics`, `/hooks/*` (signed per repository) | none |

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use starling_proto::routes::{Access, Endpoint, Method as RouteMethod};
use subtle::ConstantTimeEq;

use super::{err, ApiErr, Shared};
use crate::member::Member;
use crate::network::carries_cluster_key;

/// The access a request needs, from the route table. A request no route matches gets a
/// 404 from the router; if it is not a GET it needs the token first all the same, so that
/// nothing unnamed is ever open.
pub(super) fn required(method: &Method, path: &str) -> Access {
    let found = RouteMethod::parse(method.as_str()).and_then(|m| Endpoint::find(m, path));
    match found {
        Some(e) => e.route().access,
        None if method == Method::GET || method == Method::HEAD => Access::Public,
        None => Access::Write,
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn ct_eq(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Does `headers` carry what `access` needs on member `m`?
pub(super) fn check(m: &Member, access: Access, headers: &HeaderMap) -> Result<(), ApiErr> {
    let token_ok = || bearer(headers).is_some_and(|t| ct_eq(t, &m.cfg.api_token));
    match access {
        Access::Public => Ok(()),
        Access::PrivateRead => {
            let read_ok = || {
                let read = m.cfg.read_token.as_deref();
                bearer(headers).zip(read).is_some_and(|(t, r)| ct_eq(t, r))
            };
            if m.cfg.public_read || token_ok() || read_ok() {
                Ok(())
            } else {
                Err(err(
                    StatusCode::UNAUTHORIZED,
                    "build logs and release contents need a token (the API token or the read token)",
                ))
            }
        }
        Access::Write => {
            if token_ok() {
                Ok(())
            } else {
                Err(err(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token",
                ))
            }
        }
        Access::Cluster => {
            if carries_cluster_key(headers, &m.cfg.cluster_key) {
                Ok(())
            } else {
                Err(err(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong cluster key",
                ))
            }
        }
    }
}

/// Middleware: refuse a request without the credential its route needs, unread.
pub(super) async fn authorize(State(m): Shared, req: Request, next: Next) -> Response {
    let access = required(req.method(), req.uri().path());
    match check(&m, access, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            // The body is dropped unread; tell the client not to reuse the connection,
            // so that hyper does not drain a large body to keep it alive.
            let mut resp = e.into_response();
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_the_access_it_should() {
        use Access::*;
        let cases = [
            ("POST", "/raft/append", Cluster),
            ("POST", "/raft/snapshot", Cluster),
            ("POST", "/internal/join", Cluster),
            ("POST", "/hooks/github", Public),
            ("GET", "/healthz", Public),
            ("GET", "/v1/builds", Public),
            ("GET", "/v1/builds/7", Public),
            ("GET", "/v1/builds/7/logs", PrivateRead),
            ("GET", "/v1/chunks/abc", PrivateRead),
            ("GET", "/v1/manifests/abc", PrivateRead),
            ("PUT", "/v1/chunks/abc", Write),
            ("PUT", "/v1/builds/7/logs", Write),
            ("POST", "/v1/chunks/missing", Write),
            ("POST", "/v1/trigger", Write),
            ("DELETE", "/v1/cluster/members/2", Write),
            ("POST", "/v1/anything-new", Write),
        ];
        for (method, path, want) in cases {
            let method: Method = method.parse().unwrap();
            assert_eq!(required(&method, path), want, "{method} {path}");
        }
    }
}
