//! Hiding credentials that users put in repository URLs (`https://user:token@host/r.git`)
//! wherever a URL is shown or logged. The stored URL keeps them, because `git` needs them;
//! only workers receive it whole, inside their authenticated lease.

/// `url` with its userinfo replaced by `***`: `https://***@host/r.git`.
pub fn url(url: &str) -> String {
    text(url)
}

/// `text` with the userinfo of every `scheme://user:pass@host` in it replaced by `***`
/// (git's error messages repeat the URL they were given).
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || "'\"<>`".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden() {
        assert_eq!(
            url("https://user:pa55@host/r.git"),
            "https://***@host/r.git"
        );
        assert_eq!(
            url("https://tok@host:8443/a/b"),
            "https://***@host:8443/a/b"
        );
        assert_eq!(url("https://host/r.git"), "https://host/r.git");
        assert_eq!(url("file:///srv/r.git"), "file:///srv/r.git");
        assert_eq!(url("git@host:r.git"), "git@host:r.git");
        assert_eq!(url("https://a:b@c@host/r"), "https://***@host/r");
        let msg = "fatal: unable to access 'https://u:s3cret@git.example.com/r.git/': 403\nretry https://x:y@h";
        let shown = text(msg);
        assert!(
            !shown.contains("s3cret") && !shown.contains("x:y"),
            "{shown}"
        );
        assert!(
            shown.contains("'https://***@git.example.com/r.git/'"),
            "{shown}"
        );
        assert_eq!(text("no urls here"), "no urls here");
        assert_eq!(text("ends with ://"), "ends with ://");
    }
}
