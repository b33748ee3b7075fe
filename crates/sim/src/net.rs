//! The model network: links with rates, and flows that share them.
//!
//! A flow crosses up to four links: its sender's upload first, then its receiver's
//! download, and when it leaves a region, that region's WAN link out and the other
//! region's WAN link in. Sharing is max-min fair at the sender and equal elsewhere:
//! every other link divides its rate equally among its flows (its *share*), and a
//! sender's upload is water-filled among its flows, each capped by the smallest share of
//! its other links, so that what one flow cannot use (its receiver is busy with others)
//! goes to the sender's other flows. A flow runs at the smaller of the two. This is
//! max-min fairness except where a download or a WAN link carries flows held back
//! elsewhere; there it is pessimistic (their unused share is not handed on). When a flow
//! starts or ends, its sender's upload is filled again, and so is the upload of every
//! sender whose flow crosses a link whose share changed; those flows get new rates.
//!
//! [`Network::max_min_total`] computes exact max-min rates (progressive filling over
//! every link) for the flows of the moment, to check this against.
//!
//! Time is in nanoseconds from the start of the run, rates in bytes per second.

pub type LinkId = u32;
pub type FlowId = u32;

#[derive(Debug)]
struct Link {
    /// Bytes per second; `f64::INFINITY` for an unshaped link.
    rate: f64,
    flows: Vec<FlowId>,
    /// Bytes that crossed it, counted when a flow ends.
    carried: f64,
    /// For a sender's upload: the water level its flows are filled to.
    level: f64,
}

#[derive(Debug)]
struct Flow<T> {
    links: Vec<LinkId>,
    remaining: f64,
    rate: f64,
    since: u64,
    /// Bytes sent so far.
    moved: f64,
    version: u64,
    payload: T,
}

/// A flow whose finishing time changed: an event to queue. Events of an older version of
/// the same flow are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finish {
    pub flow: FlowId,
    pub version: u64,
    pub at: u64,
}

#[derive(Debug)]
pub struct Network<T> {
    links: Vec<Link>,
    flows: Vec<Option<Flow<T>>>,
    free: Vec<FlowId>,
    /// Versions are unique across flows: a flow id is used again once its flow ended,
    /// and a stale event of the old flow must not match the new one.
    versions: u64,
}

impl<T> Default for Network<T> {
    fn default() -> Self {
        Network {
            links: Vec::new(),
            flows: Vec::new(),
            free: Vec::new(),
            versions: 0,
        }
    }
}

impl<T> Network<T> {
    /// A link of `rate` bytes per second (`f64::INFINITY`: unshaped).
    pub fn add_link(&mut self, rate: f64) -> LinkId {
        self.links.push(Link {
            rate,
            flows: Vec::new(),
            carried: 0.0,
            level: f64::INFINITY,
        });
        (self.links.len() - 1) as LinkId
    }

    /// The sum of the current rates of `link`'s flows, bytes per second, and its rate.
    pub fn load(&self, link: LinkId) -> (f64, f64) {
        let l = &self.links[link as usize];
        let used = l.flows.iter().map(|&f| self.flow(f).rate).sum();
        (used, l.rate)
    }

    /// Diagnostic: the total rate of the current flows under exact max-min fairness
    /// (progressive filling over every link), against the model's.
    pub fn max_min_total(&self) -> (f64, f64) {
        let live: Vec<&Flow<T>> = self.flows.iter().flatten().collect();
        let model = live.iter().map(|f| f.rate).sum();
        let mut cap: Vec<f64> = self.links.iter().map(|l| l.rate).collect();
        let mut n = vec![0usize; self.links.len()];
        for f in &live {
            for &l in &f.links {
                n[l as usize] += 1;
            }
        }
        let mut frozen = vec![false; live.len()];
        let mut rate = vec![0.0; live.len()];
        loop {
            let delta = (0..cap.len())
                .filter(|&l| n[l] > 0 && cap[l].is_finite())
                .map(|l| cap[l] / n[l] as f64)
                .fold(f64::INFINITY, f64::min);
            if !delta.is_finite() {
                break;
            }
            for (k, f) in live.iter().enumerate() {
                if !frozen[k] {
                    rate[k] += delta;
                    for &l in &f.links {
                        cap[l as usize] -= delta;
                    }
                }
            }
            let full: Vec<bool> = cap
                .iter()
                .zip(&self.links)
                .map(|(c, l)| *c <= l.rate * 1e-9)
                .collect();
            for (k, f) in live.iter().enumerate() {
                if !frozen[k] && f.links.iter().any(|&l| full[l as usize]) {
                    frozen[k] = true;
                    for &l in &f.links {
                        n[l as usize] -= 1;
                    }
                }
            }
        }
        (rate.iter().sum(), model)
    }

    /// The link's rate, bytes per second.
    pub fn rate_of(&self, link: LinkId) -> f64 {
        self.links[link as usize].rate
    }

    /// Bytes that crossed `link` in flows that ended.
    pub fn carried(&self, link: LinkId) -> f64 {
        self.links[link as usize].carried
    }

    /// Start sending `bytes` over `links` (the sender's upload first) at `now`: the new
    /// flow, and the flows whose finishing time changed, this one among them.
    pub fn start(
        &mut self,
        now: u64,
        links: Vec<LinkId>,
        bytes: u64,
        payload: T,
    ) -> (FlowId, Vec<Finish>) {
        let flow = Flow {
            links,
            remaining: bytes as f64,
            rate: 0.0,
            since: now,
            moved: 0.0,
            version: 0,
            payload,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id as usize] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                (self.flows.len() - 1) as FlowId
            }
        };
        let links = self.flow(id).links.clone();
        for &l in &links {
            self.links[l as usize].flows.push(id);
        }
        (id, self.reshare(now, &links))
    }

    /// Whether `finish` is the flow's latest finishing time (not a stale event).
    pub fn is_current(&self, finish: &Finish) -> bool {
        self.flows
            .get(finish.flow as usize)
            .and_then(Option::as_ref)
            .is_some_and(|f| f.version == finish.version)
    }

    /// The flow's rate now, bytes per second.
    pub fn rate(&self, flow: FlowId) -> Option<f64> {
        Some(self.flows.get(flow as usize)?.as_ref()?.rate)
    }

    pub fn payload(&self, flow: FlowId) -> Option<&T> {
        self.flows.get(flow as usize)?.as_ref().map(|f| &f.payload)
    }

    /// End `flow` at `now`, finished or cut short: its payload, the bytes it moved, and
    /// the other flows whose finishing time changed.
    pub fn end(&mut self, now: u64, flow: FlowId) -> Option<(T, f64, Vec<Finish>)> {
        let mut f = self.flows.get_mut(flow as usize)?.take()?;
        self.free.push(flow);
        advance(&mut f, now);
        for &l in &f.links {
            let link = &mut self.links[l as usize];
            link.flows.retain(|&x| x != flow);
        }
        let moved = f.moved;
        for &l in &f.links {
            self.links[l as usize].carried += moved;
        }
        let changed = self.reshare(now, &f.links);
        Some((f.payload, moved, changed))
    }

    fn flow(&self, id: FlowId) -> &Flow<T> {
        self.flows[id as usize]
            .as_ref()
            .unwrap_or_else(|| unreachable!("flow {id} is live"))
    }

    /// A link's equal share.
    fn share(&self, l: LinkId) -> f64 {
        let link = &self.links[l as usize];
        link.rate / link.flows.len().max(1) as f64
    }

    /// What a flow may get from every link but its sender's.
    fn cap(&self, f: &Flow<T>) -> f64 {
        f.links[1..]
            .iter()
            .map(|&l| self.share(l))
            .fold(f64::INFINITY, f64::min)
    }

    /// Water-fill sender link `l` among its flows, each capped by its other links.
    fn fill(&mut self, l: LinkId) {
        let link = &self.links[l as usize];
        let mut caps: Vec<f64> = link.flows.iter().map(|&f| self.cap(self.flow(f))).collect();
        caps.sort_by(f64::total_cmp);
        let (mut left, n) = (link.rate, caps.len());
        let mut level = f64::INFINITY;
        for (i, c) in caps.iter().enumerate() {
            let even = left / (n - i) as f64;
            if *c >= even {
                level = even;
                break;
            }
            left -= c;
        }
        self.links[l as usize].level = level;
    }

    /// New rates after the flows of `links` (the sender's upload first) changed.
    fn reshare(&mut self, now: u64, links: &[LinkId]) -> Vec<Finish> {
        let Some((&sender, others)) = links.split_first() else {
            return Vec::new();
        };
        let mut senders = vec![sender];
        let mut touched: Vec<FlowId> = Vec::new();
        for &l in others {
            for &f in &self.links[l as usize].flows {
                touched.push(f);
                senders.push(self.flow(f).links[0]);
            }
        }
        senders.sort_unstable();
        senders.dedup();
        for &l in &senders {
            self.fill(l);
            touched.extend(self.links[l as usize].flows.iter().copied());
        }
        touched.sort_unstable();
        touched.dedup();
        let mut out = Vec::with_capacity(touched.len());
        for id in touched {
            let rate = {
                let f = self.flow(id);
                self.links[f.links[0] as usize].level.min(self.cap(f))
            };
            let Some(f) = self.flows.get_mut(id as usize).and_then(Option::as_mut) else {
                continue;
            };
            advance(f, now);
            if f.rate == rate && f.version > 0 {
                continue;
            }
            f.rate = rate;
            self.versions += 1;
            f.version = self.versions;
            let secs = if rate.is_finite() && rate > 0.0 {
                f.remaining.max(0.0) / rate
            } else if rate.is_infinite() {
                0.0
            } else {
                // A link of rate 0: never, unless the rates change.
                1e9
            };
            out.push(Finish {
                flow: id,
                version: f.version,
                at: now + (secs * 1e9).ceil() as u64,
            });
        }
        out
    }
}

fn advance<T>(f: &mut Flow<T>, now: u64) {
    let dt = now.saturating_sub(f.since) as f64 / 1e9;
    let left = f.remaining.max(0.0);
    let sent = if f.rate.is_infinite() {
        left
    } else {
        (f.rate * dt).min(left)
    };
    f.remaining -= sent;
    f.moved += sent;
    f.since = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_share_a_link_and_move_all_their_bytes() {
        let mut n: Network<u8> = Network::default();
        let up = n.add_link(100.0);
        let down = n.add_link(f64::INFINITY);
        let (a, f1) = n.start(0, vec![up, down], 100, 1);
        assert_eq!(f1.len(), 1);
        assert_eq!(f1[0].at, 1_000_000_000, "alone: 100 bytes at 100 B/s");
        // Half a second later a second flow halves the first's rate.
        let (b, f2) = n.start(500_000_000, vec![up], 100, 2);
        let fa = f2.iter().find(|f| f.flow == a).copied().unwrap();
        assert!(!n.is_current(&f1[0]));
        assert_eq!(fa.at, 1_500_000_000, "50 bytes left at 50 B/s");
        let (_, moved, rest) = n.end(fa.at, a).unwrap();
        assert!((moved - 100.0).abs() < 1e-6, "moved {moved}");
        let fb = rest.iter().find(|f| f.flow == b).copied().unwrap();
        // b moved 50 bytes at 50 B/s, then 50 more at 100 B/s.
        assert_eq!(fb.at, 2_000_000_000);
        let (_, moved, _) = n.end(fb.at, b).unwrap();
        assert!((moved - 100.0).abs() < 1e-6, "moved {moved}");
        assert!((n.carried(up) - 200.0).abs() < 1e-6);
    }

    #[test]
    fn a_sender_gives_what_one_receiver_cannot_take_to_its_other_flow() {
        let mut n: Network<u8> = Network::default();
        let up = n.add_link(100.0);
        let slow = n.add_link(20.0);
        let fast = n.add_link(f64::INFINITY);
        let (a, first) = n.start(0, vec![up, slow], 100, 1);
        // `a` is held to 20 by its receiver.
        assert_eq!(first[0].at, 5_000_000_000);
        let (b, f) = n.start(0, vec![up, fast], 160, 2);
        // `b` gets the other 80, and `a` keeps its 20.
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].flow, f[0].at), (b, 2_000_000_000));
        assert!(n.is_current(&first[0]) && first[0].flow == a);
    }

    #[test]
    fn exact_max_min_hands_on_what_a_download_share_leaves_unused() {
        let mut n: Network<u8> = Network::default();
        let (slow_up, fast_up, down) = (n.add_link(20.0), n.add_link(1000.0), n.add_link(100.0));
        n.start(0, vec![slow_up, down], 1000, 1);
        n.start(0, vec![fast_up, down], 1000, 2);
        // The model gives each flow half the download, and the slow sender's flow uses
        // 20 of its 50; exact max-min gives the other flow the 30 left.
        let (exact, model) = n.max_min_total();
        assert!((model - 70.0).abs() < 1e-9, "model {model}");
        assert!((exact - 100.0).abs() < 1e-6, "exact {exact}");
    }

    #[test]
    fn a_stale_event_never_ends_a_flow_that_took_its_id() {
        let mut n: Network<u8> = Network::default();
        let up = n.add_link(100.0);
        let (a, first) = n.start(0, vec![up], 100, 1);
        let (b, _) = n.start(0, vec![up], 100, 2);
        // `a` is cut short; its id goes to a new flow.
        let (_, _, _) = n.end(100_000_000, a).unwrap();
        let (c, _) = n.start(100_000_000, vec![up], 100, 3);
        assert_eq!(c, a);
        assert!(!n.is_current(&first[0]));
        assert!(n.payload(b).is_some());
    }
}
