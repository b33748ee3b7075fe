//! Join tokens: `stj1.<id>.<secret>.<ca-fingerprint>`. The id names the token's record;
//! the secret proves the holder was given it (members keep only its SHA-256); the CA
//! fingerprint (SHA-256 of the cluster CA's certificate) lets a new node check that the
//! control plane it talks to is the one that made the token, as kubeadm's discovery hash
//! does.

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

const PREFIX: &str = "stj1";

fn hex_of(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

impl JoinToken {
    pub fn parse(text: &str) -> Option<JoinToken> {
        let mut parts = text.trim().split('.');
        let (prefix, id, secret, fp) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let ok = prefix == PREFIX
            && parts.next().is_none()
            && hex_of(id, 8)
            && hex_of(secret, 32)
            && hex_of(fp, 64);
        ok.then(|| JoinToken {
            id: id.into(),
            secret: secret.into(),
            ca_fingerprint: fp.into(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_do_not_parse() {
        let t = JoinToken {
            id: "0a1b2c3d".into(),
            secret: "f".repeat(32),
            ca_fingerprint: "e".repeat(64),
        };
        assert_eq!(JoinToken::parse(&t.to_string()), Some(t.clone()));
        assert!(!format!("{t:?}").contains(&t.secret));
        for bad in [
            "",
            "stj1",
            "stj2.0a1b2c3d.x.y",
            &t.to_string().replace("stj1", "stj0"),
            &format!("{t}.x"),
        ] {
            assert_eq!(JoinToken::parse(bad), None, "{bad:?}");
        }
    }
}
