//! Where a worker's next piece of build output goes in a member's copy of the log.
//!
//! Workers send every member the output from the offset that member last acknowledged, so
//! a retry repeats bytes and a member that missed a round sees a gap. The member keeps a
//! prefix of the output, at most [`LOG_CAP`] bytes, and then a note that the rest was
//! dropped.

/// Bytes of log kept per build; what comes after is dropped, with [`CAP_NOTE`] saying so.
pub const LOG_CAP: u64 = 1024 * 1024;
pub const CAP_NOTE: &[u8] = b"\n[starling: log cap of 1 MiB reached; later output not kept]\n";

/// What to do with `len` bytes that start at `offset` of the output, on a member holding
/// `held` bytes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAppend {
    /// Write `body[skip..skip + take]`, then the cap note if `cap_note`; the log is then
    /// `length` bytes long (not counting the note). `take` may be 0: nothing new, or the
    /// cap was passed before.
    Write {
        skip: usize,
        take: usize,
        cap_note: bool,
        length: u64,
    },
    /// The bytes start past the end of what is held; the sender must resend from `held`.
    Gap { held: u64 },
}

pub fn plan_append(held: u64, offset: u64, len: usize) -> LogAppend {
    // `held` counts the cap note too once it is written; past the cap, accept and drop.
    if held >= LOG_CAP {
        return LogAppend::Write {
            skip: 0,
            take: 0,
            cap_note: false,
            length: held,
        };
    }
    if offset > held {
        return LogAppend::Gap { held };
    }
    let skip = usize::try_from(held - offset)
        .unwrap_or(usize::MAX)
        .min(len);
    let fresh = len - skip;
    let room = usize::try_from(LOG_CAP - held).unwrap_or(usize::MAX);
    let take = fresh.min(room);
    LogAppend::Write {
        skip,
        take,
        cap_note: fresh > room,
        length: held + take as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_skipped_and_gaps_refused() {
        assert_eq!(
            plan_append(10, 4, 10),
            LogAppend::Write {
                skip: 6,
                take: 4,
                cap_note: false,
                length: 14
            }
        );
        assert_eq!(
            plan_append(10, 0, 5),
            LogAppend::Write {
                skip: 5,
                take: 0,
                cap_note: false,
                length: 10
            }
        );
        assert_eq!(plan_append(10, 11, 5), LogAppend::Gap { held: 10 });
    }

    #[test]
    fn the_cap_cuts_once_and_then_drops() {
        let held = LOG_CAP - 3;
        assert_eq!(
            plan_append(held, held, 10),
            LogAppend::Write {
                skip: 0,
                take: 3,
                cap_note: true,
                length: LOG_CAP
            }
        );
        let after = LOG_CAP + CAP_NOTE.len() as u64;
        assert_eq!(
            plan_append(after, 0, 10),
            LogAppend::Write {
                skip: 0,
                take: 0,
                cap_note: false,
                length: after
            }
        );
    }
}
