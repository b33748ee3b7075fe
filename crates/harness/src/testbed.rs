//! Several hosts on one machine, in network namespaces, with shaped links: the topology
//! the multi-host swarm test and the distribution benchmark run on.
//!
//! ```text
//!            root namespace (the test) ── mgmt veth ──┐
//!                                                      wan (router)
//!                ┌──────────── wan link r0 ────────────┼──── wan link r1 ────┐ …
//!           region 0 router (bridge)               region 1 router (bridge)
//!        origin  builder  node node …                node node node …
//! ```
//!
//! Every host is a namespace with one veth `eth0` on its region's bridge. A region's
//! router reaches the others over its own WAN link to the `wan` namespace. Shaping is
//! `tc tbf` on egress: a node's and the origin's `eth0` (their upload), and both ends of
//! each WAN link (out of and into the region). The builder is not shaped: it stands for
//! the build farm, whose upload is not what is measured. The bytes a region received over
//! its WAN link are the kernel's counter of its router's end, read with `ip -s link`.
//!
//! Addresses: region `k`'s hosts are `10.77.k.x` (gateway `.1`, origin `.2`, builder `.3`,
//! nodes from `.10`); WAN link `k` is `10.78.k.0/24`; the root namespace reaches all hosts
//! over `10.79.0.0/24` and a route to `10.77.0.0/16`. One testbed exists at a time on a
//! machine (a lock file); its namespaces are named `sl-<pid>-…` and removed when it drops,
//! and those of a process that died without dropping are removed by the next one.
//!
//! It needs root, `ip` and `tc` (iproute2); [`Testbed::unavailable`] says why not.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;

use crate::HarnessError;

/// The shape of a testbed. Rates are in bits per second.
#[derive(Debug, Clone)]
pub struct TestbedSpec {
    /// Regions; region 0 also holds the origin and the builder.
    pub regions: usize,
    pub nodes_per_region: usize,
    /// Each node's upload.
    pub node_rate: u64,
    /// The origin host's upload (shared by everything running on it).
    pub origin_rate: u64,
    /// Each region's WAN link, each way.
    pub wan_rate: u64,
}

/// One host: a namespace with an address in a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub region: usize,
}

impl Host {
    /// `program` to be run on this host (in its namespace).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }
}

/// A built topology; dropping it removes every namespace and link it made.
#[derive(Debug)]
pub struct Testbed {
    spec: TestbedSpec,
    prefix: String,
    namespaces: Vec<String>,
    origin: Host,
    builder: Host,
    nodes: Vec<Host>,
    _lock: std::fs::File,
}

const LOCK_FILE: &str = "/tmp/starling-testbed.lock";
const MGMT_ROUTE: &str = "10.77.0.0/16";

impl Testbed {
    /// Why a testbed cannot be built here (not root, no `ip` or `tc`), or `None`.
    pub fn unavailable() -> Option<String> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            });
        if uid.as_deref() != Some("0") {
            return Some("network namespaces need root".into());
        }
        for (tool, arg) in [("ip", "-V"), ("tc", "-V")] {
            let ran = std::process::Command::new(tool)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !ran.is_ok_and(|s| s.success()) {
                return Some(format!("`{tool}` (iproute2) is not installed"));
            }
        }
        None
    }

    /// Build the topology. Waits for any other testbed on this machine to be dropped.
    pub fn build(spec: TestbedSpec) -> Result<Testbed, HarnessError> {
        if spec.regions == 0 || spec.regions > 200 || spec.nodes_per_region > 200 {
            return Err(HarnessError::Testbed(format!(
                "a testbed has 1 to 200 regions of at most 200 nodes, not {spec:?}"
            )));
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(crate::io(format!("opening {LOCK_FILE}")))?;
        lock.lock()
            .map_err(crate::io(format!("locking {LOCK_FILE}")))?;
        remove_stale()?;
        let prefix = format!("sl-{}-", std::process::id());
        let mut bed = Testbed {
            prefix: prefix.clone(),
            namespaces: Vec::new(),
            origin: host(&prefix, 0, "origin", 2),
            builder: host(&prefix, 0, "builder", 3),
            nodes: Vec::new(),
            spec: spec.clone(),
            _lock: lock,
        };
        // On an error the half-built namespaces go with `bed`.
        bed.wire()?;
        Ok(bed)
    }

    fn wire(&mut self) -> Result<(), HarnessError> {
        let spec = self.spec.clone();
        let wan = self.add_netns("wan")?;
        forward(&wan)?;
        // The root namespace's way in.
        let mgmt = format!("sl{}m", std::process::id());
        ip(&format!(
            "link add {mgmt} type veth peer name mgmt netns {wan}"
        ))?;
        ip(&format!("addr add 10.79.0.2/24 dev {mgmt}"))?;
        ip(&format!("link set {mgmt} up"))?;
        ip(&format!("-n {wan} addr add 10.79.0.1/24 dev mgmt"))?;
        ip(&format!("-n {wan} link set mgmt up"))?;
        ip(&format!("route replace {MGMT_ROUTE} via 10.79.0.1"))?;
        for k in 0..spec.regions {
            let router = self.add_netns(&format!("r{k}"))?;
            forward(&router)?;
            let link = format!("r{k}");
            ip(&format!(
                "-n {wan} link add {link} type veth peer name wan netns {router}"
            ))?;
            ip(&format!("-n {wan} addr add 10.78.{k}.1/24 dev {link}"))?;
            ip(&format!("-n {wan} link set {link} up"))?;
            ip(&format!(
                "-n {wan} route add 10.77.{k}.0/24 via 10.78.{k}.2"
            ))?;
            ip(&format!("-n {router} addr add 10.78.{k}.2/24 dev wan"))?;
            ip(&format!("-n {router} link set wan up"))?;
            ip(&format!("-n {router} route add default via 10.78.{k}.1"))?;
            shape(&wan, &link, spec.wan_rate)?;
            shape(&router, "wan", spec.wan_rate)?;
            ip(&format!("-n {router} link add name sw type bridge"))?;
            ip(&format!("-n {router} addr add 10.77.{k}.1/24 dev sw"))?;
            ip(&format!("-n {router} link set sw up"))?;
            if k == 0 {
                let (origin, builder) = (self.origin.clone(), self.builder.clone());
                self.add_host(&router, &origin, Some(spec.origin_rate))?;
                self.add_host(&router, &builder, None)?;
            }
            for i in 0..spec.nodes_per_region {
                let h = host(&self.prefix, k, &format!("n{i}"), 10 + i as u8);
                self.add_host(&router, &h, Some(spec.node_rate))?;
                self.nodes.push(h);
            }
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<String, HarnessError> {
        let ns = format!("{}{name}", self.prefix);
        ip(&format!("netns add {ns}"))?;
        self.namespaces.push(ns.clone());
        ip(&format!("-n {ns} link set lo up"))?;
        Ok(ns)
    }

    fn add_host(
        &mut self,
        router: &str,
        h: &Host,
        upload: Option<u64>,
    ) -> Result<(), HarnessError> {
        let name = h
            .netns
            .strip_prefix(&self.prefix)
            .unwrap_or(&h.netns)
            .to_string();
        self.add_netns(&name)?;
        // The router's end is named after the host's last address byte: unique per region.
        let port = format!("h{}", h.ip.octets()[3]);
        let ns = &h.netns;
        ip(&format!(
            "-n {router} link add {port} type veth peer name eth0 netns {ns}"
        ))?;
        ip(&format!("-n {router} link set {port} master sw"))?;
        ip(&format!("-n {router} link set {port} up"))?;
        ip(&format!("-n {ns} addr add {}/24 dev eth0", h.ip))?;
        ip(&format!("-n {ns} link set eth0 up"))?;
        let gw = format!("10.77.{}.1", h.region);
        ip(&format!("-n {ns} route add default via {gw}"))?;
        if let Some(rate) = upload {
            shape(&h.netns, "eth0", rate)?;
        }
        Ok(())
    }

    pub fn spec(&self) -> &TestbedSpec {
        &self.spec
    }

    /// The host the control members (and the other systems' servers and seeds) run on.
    pub fn origin(&self) -> &Host {
        &self.origin
    }

    /// An unshaped host in region 0, for the build worker.
    pub fn builder(&self) -> &Host {
        &self.builder
    }

    /// Every node, region by region.
    pub fn nodes(&self) -> &[Host] {
        &self.nodes
    }

    /// Bytes that entered region `k` over its WAN link since it was made.
    pub fn wan_received(&self, k: usize) -> Result<u64, HarnessError> {
        link_bytes(&format!("{}r{k}", self.prefix), "wan", "rx")
    }

    /// Bytes `host` sent since it was made.
    pub fn sent_by(&self, host: &Host) -> Result<u64, HarnessError> {
        link_bytes(&host.netns, "eth0", "tx")
    }
}

/// The kernel's byte counter `rx` or `tx` of link `dev` in namespace `ns`.
fn link_bytes(ns: &str, dev: &str, way: &str) -> Result<u64, HarnessError> {
    let out = output(&format!("ip -n {ns} -s -j link show dev {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| HarnessError::Testbed(format!("`ip -j` printed what is not JSON: {e}")))?;
    v[0]["stats64"][way]["bytes"]
        .as_u64()
        .ok_or_else(|| HarnessError::Testbed(format!("no {way} bytes for {ns}'s {dev} in {out}")))
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veths, and with them their peers (the root
        // namespace's way in too, and the route through it).
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&format!("netns del {ns}"));
        }
    }
}

fn host(prefix: &str, region: usize, name: &str, last: u8) -> Host {
    Host {
        netns: format!("{prefix}{region}-{name}"),
        ip: Ipv4Addr::new(10, 77, region as u8, last),
        region,
    }
}

impl From<&Host> for IpAddr {
    fn from(h: &Host) -> IpAddr {
        IpAddr::V4(h.ip)
    }
}

/// Remove the namespaces of testbeds whose process is gone.
fn remove_stale() -> Result<(), HarnessError> {
    let list = output("ip netns list")?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("sl-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            ip(&format!("netns del {name}"))?;
        }
    }
    Ok(())
}

fn forward(ns: &str) -> Result<(), HarnessError> {
    ip(&format!(
        "netns exec {ns} sysctl -q -w net.ipv4.ip_forward=1"
    ))
}

/// Cap `dev`'s egress in `ns` at `rate` bits/s. The bucket holds 10 ms of traffic (at
/// least 64 KiB, so that a segmentation-offloaded burst passes whole); the queue 100 ms.
fn shape(ns: &str, dev: &str, rate: u64) -> Result<(), HarnessError> {
    let burst = (rate / 8 / 100).max(64 * 1024);
    run(&format!(
        "tc -n {ns} qdisc add dev {dev} root tbf rate {rate}bit burst {burst} latency 100ms"
    ))
}

fn ip(args: &str) -> Result<(), HarnessError> {
    run(&format!("ip {args}"))
}

fn run(line: &str) -> Result<(), HarnessError> {
    output(line).map(drop)
}

/// Run a command line (words split at spaces; none of ours has a quoted space) and give
/// its standard output.
fn output(line: &str) -> Result<String, HarnessError> {
    let mut words = line.split_whitespace();
    let program = words.next().unwrap_or_default();
    let out = std::process::Command::new(program)
        .args(words)
        .stdin(Stdio::null())
        .output()
        .map_err(crate::io(format!("running {program}")))?;
    if !out.status.success() {
        return Err(HarnessError::Testbed(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
