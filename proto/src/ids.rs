//! Identifiers that are BLAKE3 digests: a chunk's hash and a release's id. In memory they
//! are 32 bytes, so two spellings can never be two things and a malformed one cannot be
//! made; on the wire (JSON, the manifest's postcard encoding, paths) they are 64
//! lowercase hex digits, exactly as the strings they replace were, so nothing already
//! written changes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The first 12 characters of a commit id or a hex digest, as people are shown it.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {what} {text:?}: expected 64 hexadecimal digits")]
pub struct DigestError {
    what: &'static str,
    text: String,
}

macro_rules! digest_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 32]);

        impl $name {
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                $name(bytes)
            }

            /// The BLAKE3 digest of `data`.
            pub fn of(data: &[u8]) -> Self {
                $name(*blake3::hash(data).as_bytes())
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// 64 lowercase hex digits.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parse 64 hex digits (either case).
            pub fn parse(text: &str) -> Result<Self, DigestError> {
                let mut bytes = [0u8; 32];
                match hex::decode_to_slice(text, &mut bytes) {
                    Ok(()) => Ok($name(bytes)),
                    Err(_) => Err(DigestError {
                        what: $what,
                        text: text.chars().take(80).collect(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = DigestError;
            fn from_str(s: &str) -> Result<Self, DigestError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Hex;
                impl serde::de::Visitor<'_> for Hex {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a {} (64 hexadecimal digits)", $what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(Hex)
            }
        }
    };
}

digest_id!(
    /// A chunk's name: the BLAKE3 digest of its bytes.
    ChunkHash,
    "chunk hash"
);

digest_id!(
    /// A release's id: the BLAKE3 digest of its manifest's canonical encoding.
    ReleaseId,
    "release id"
);

/// A build slot's name, `<worker>/<slot>` (e.g. `w1/0`): who holds a lease.
///
/// Read as written (the log holds names from before this type); [`WorkerId::new`] is the
/// rule the API holds a lease request to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    /// 1 to 200 bytes without control characters.
    pub fn new(name: &str) -> Result<WorkerId, crate::NameError> {
        let ok = (1..=200).contains(&name.len()) && !name.chars().any(char::is_control);
        if ok {
            Ok(WorkerId(name.to_string()))
        } else {
            Err(crate::NameError::Worker(name.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// For tests and literals; the API checks names with [`WorkerId::new`].
impl From<&str> for WorkerId {
    fn from(name: &str) -> Self {
        WorkerId(name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_read_and_write_as_the_strings_they_replace() {
        let h = ChunkHash::of(b"abc");
        let hex = blake3::hash(b"abc").to_hex().to_string();
        assert_eq!(h.to_string(), hex);
        assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{hex}\""));
        assert_eq!(
            postcard::to_allocvec(&h).unwrap(),
            postcard::to_allocvec(&hex).unwrap(),
            "the manifest's encoding (and so every release id) is unchanged"
        );
        let back: ChunkHash = postcard::from_bytes(&postcard::to_allocvec(&hex).unwrap()).unwrap();
        assert_eq!(back, h);
        assert_eq!(ChunkHash::parse(&hex.to_uppercase()), Ok(h));
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(66)] {
            assert!(ReleaseId::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_str::<ReleaseId>(&format!("\"{bad}\"")).is_err());
        }
    }
}
