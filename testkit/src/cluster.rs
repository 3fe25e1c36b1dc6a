//! A Redis Cluster of the test's own (3 primaries + 3 replicas of Debian's `redis-server`, AOF
//! on, node timeout 2 s), for tests that kill a node: the shared cluster of
//! `scripts/services up --cluster` serves the other tests meanwhile. Stopped and deleted on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PrivateCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    nodes: Vec<Option<Child>>,
}

/// Six free ports in a row whose cluster bus ports (+10000) are free too.
fn free_ports() -> Vec<u16> {
    let seed = u16::try_from(std::process::id() % 2000).unwrap_or(0);
    let mut base = 20000 + seed * 7;
    loop {
        let ports: Vec<u16> = (base..base + 6).collect();
        let free = ports.iter().all(|p| {
            TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && TcpListener::bind(("127.0.0.1", *p + 10000)).is_ok()
        });
        if free {
            return ports;
        }
        base += 7;
        if base > 50000 {
            base = 20000;
        }
    }
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PrivateCluster {
    /// Start six nodes and form the cluster; waits until every node says `cluster_state:ok`.
    pub fn start() -> anyhow::Result<Self> {
        let ports = free_ports();
        let dir = std::env::temp_dir().join(format!("sb-cluster-{}", uuid::Uuid::new_v4()));
        let mut nodes = Vec::new();
        for port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", "nodes.conf", "--save", ""])
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            nodes.push(Some(child));
        }
        let cluster = Self { ports, dir, nodes };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster
            .ports
            .iter()
            .all(|p| redis_cli(*p, &["PING"]).is_some_and(|s| s.contains("PONG")))
        {
            anyhow::ensure!(Instant::now() < deadline, "cluster nodes did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for p in &cluster.ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(Duration::from_secs(20))?;
        // a replica that never synced refuses to stand for election: wait for every link
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let replicas_synced = cluster.ports.iter().all(|p| {
                redis_cli(*p, &["INFO", "replication"]).is_some_and(|s| {
                    s.contains("role:master") || s.contains("master_link_status:up")
                })
            });
            if replicas_synced {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the replicas did not sync");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// `REDIS_URL` for the cluster: every node as a seed.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Wait until every running node reports `cluster_state:ok`.
    pub fn wait_ok(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .ports
                .iter()
                .zip(&self.nodes)
                .filter(|(_, n)| n.is_some())
                .all(|(p, _)| {
                    redis_cli(*p, &["CLUSTER", "INFO"])
                        .is_some_and(|s| s.contains("cluster_state:ok"))
                });
            if ok {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the cluster is not ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the primary that serves `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> anyhow::Result<u16> {
        let live = self
            .ports
            .iter()
            .zip(&self.nodes)
            .find(|(_, n)| n.is_some())
            .map(|(p, _)| *p)
            .ok_or_else(|| anyhow::anyhow!("no node runs"))?;
        let slot: u16 = redis_cli(live, &["CLUSTER", "KEYSLOT", key])
            .ok_or_else(|| anyhow::anyhow!("CLUSTER KEYSLOT failed"))?
            .trim()
            .parse()?;
        let nodes = redis_cli(live, &["CLUSTER", "NODES"])
            .ok_or_else(|| anyhow::anyhow!("CLUSTER NODES failed"))?;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            for range in &f[8..] {
                let (lo, hi) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>()?, b.parse::<u16>()?),
                    None => (range.parse::<u16>()?, range.parse::<u16>()?),
                };
                if (lo..=hi).contains(&slot) {
                    return Ok(port);
                }
            }
        }
        anyhow::bail!("no primary serves slot {slot}")
    }

    /// The port of a replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> anyhow::Result<u16> {
        let nodes = redis_cli(primary, &["CLUSTER", "NODES"])
            .ok_or_else(|| anyhow::anyhow!("CLUSTER NODES failed"))?;
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("no myself line"))?
            .to_owned();
        nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
            .and_then(|f| f[1].split(['@', ':']).nth(1)?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no replica of {primary}"))
    }

    /// A manual failover (`CLUSTER FAILOVER` on the replica): the replica takes over its
    /// primary's slots with no data lost, as in a rolling upgrade; waits until it is primary.
    pub fn manual_failover(&self, replica: u16) -> anyhow::Result<()> {
        redis_cli(replica, &["CLUSTER", "FAILOVER"])
            .ok_or_else(|| anyhow::anyhow!("CLUSTER FAILOVER failed"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis_cli(replica, &["ROLE"]).is_some_and(|r| r.starts_with("master")) {
            anyhow::ensure!(Instant::now() < deadline, "the replica did not take over");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok(Duration::from_secs(20))
    }

    /// Kill the node on `port` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.ports.iter().position(|p| *p == port)
            && let Some(mut child) = self.nodes[i].take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
