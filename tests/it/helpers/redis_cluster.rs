//! A private Redis Cluster per test: local `redis-server --cluster-enabled yes` processes on free
//! ports, joined with `redis-cli --cluster create`, killable for failover tests. Never 6379.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::{command, free_port, redis_server_binary, require_or_skip};

pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

fn redis_cli_binary() -> Option<PathBuf> {
    let sibling = redis_server_binary()?.with_file_name("redis-cli");
    sibling.exists().then_some(sibling)
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// A cluster node on `port`, keeping its state (`nodes.conf`) in `dir`.
fn spawn_node(port: u16, dir: &std::path::Path) -> Option<Child> {
    let child = Command::new(redis_server_binary()?)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dir", &dir.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    Some(child)
}

impl RedisCluster {
    /// Three masters, each with `replicas` replicas; `None` (with a loud message) when Redis is
    /// not installed and Redis tests are not required.
    pub fn start(replicas: usize) -> Option<RedisCluster> {
        if redis_cli_binary().is_none() {
            return require_or_skip("redis-cli");
        }
        for _ in 0..3 {
            if let Some(cluster) = RedisCluster::try_start(replicas) {
                return Some(cluster);
            }
        }
        panic!("could not start a Redis Cluster after 3 attempts");
    }

    fn try_start(replicas: usize) -> Option<RedisCluster> {
        let dir = tempfile::tempdir().expect("tempdir");
        let count = 3 * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let port = free_cluster_port();
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            nodes.push(Node {
                port,
                child: Some(spawn_node(port, &node_dir)?),
            });
        }
        let cluster = RedisCluster { nodes, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cluster.nodes.iter().all(|node| cluster.answers(node.port)) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new(redis_cli_binary()?)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        if !created.success() {
            return None;
        }
        cluster.wait_until_ok(Duration::from_secs(20));
        if replicas > 0 {
            cluster.wait_for_replicas(Duration::from_secs(20));
        }
        Some(cluster)
    }

    fn answers(&self, port: u16) -> bool {
        self.node_cmd::<String>(port, &["PING"]).is_some()
    }

    /// One command on one node, `None` when it does not answer.
    pub fn node_cmd<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> Option<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut connection = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        connection
            .set_read_timeout(Some(Duration::from_secs(2)))
            .ok()?;
        command(args).query(&mut connection).ok()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok` and agrees every slot is served.
    pub fn wait_until_ok(&self, within: Duration) {
        self.wait_until(within, "reach cluster_state:ok", || {
            self.live_ports().iter().all(|port| {
                self.node_cmd::<String>(*port, &["CLUSTER", "INFO"])
                    .is_some_and(|info| {
                        info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                    })
            })
        });
    }

    fn wait_for_replicas(&self, within: Duration) {
        self.wait_until(within, "sync every master's replica", || {
            self.masters().iter().all(|port| {
                self.node_cmd::<String>(*port, &["INFO", "replication"])
                    .is_some_and(|info| {
                        info.contains("connected_slaves:1") && info.contains("state=online")
                    })
            })
        });
    }

    /// Polls `done` every 50 ms; panics, saying the cluster did not `what`, after `within`.
    fn wait_until(&self, within: Duration, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not {what} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The ports of the live masters.
    pub fn masters(&self) -> Vec<u16> {
        self.live_ports()
            .into_iter()
            .filter(|port| self.is_master(*port))
            .collect()
    }

    /// The port of the master serving `key`.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: i64 = self
            .node_cmd(self.live_ports()[0], &["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT");
        let shards: Vec<redis::Value> = self
            .node_cmd(self.live_ports()[0], &["CLUSTER", "SLOTS"])
            .expect("CLUSTER SLOTS");
        for shard in shards {
            let redis::Value::Array(fields) = shard else {
                continue;
            };
            let (Some(redis::Value::Int(first)), Some(redis::Value::Int(last))) =
                (fields.first(), fields.get(1))
            else {
                continue;
            };
            if (*first..=*last).contains(&slot)
                && let Some(redis::Value::Array(master)) = fields.get(2)
                && let Some(redis::Value::Int(port)) = master.get(1)
            {
                return *port as u16;
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The hash slot Redis gives `key` (the oracle for streamgate's own computation).
    pub fn keyslot(&self, key: &str) -> i64 {
        self.node_cmd(self.live_ports()[0], &["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT")
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the killed node on `port` again; it rejoins the cluster (as a replica of whoever
    /// took its slots over). Waits until every master has its replica again.
    pub fn restart(&mut self, port: u16) {
        let dir = self._dir.path().join(port.to_string());
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        assert!(node.child.is_none(), "the node on {port} is running");
        node.child = spawn_node(port, &dir);
        self.wait_until_ok(Duration::from_secs(30));
        self.wait_for_replicas(Duration::from_secs(30));
    }

    /// Kills the master on `port` and waits until a replica took over its slots.
    pub fn fail_over(&mut self, port: u16) {
        let replica = self.replica_of(port);
        self.kill(port);
        // The replica waits for cluster-node-timeout, then is elected.
        self.wait_until(
            Duration::from_secs(30),
            &format!("promote the replica on {replica}"),
            || self.is_master(replica),
        );
        self.wait_until_ok(Duration::from_secs(30));
    }

    fn is_master(&self, port: u16) -> bool {
        self.node_cmd::<Vec<redis::Value>>(port, &["ROLE"])
            .is_some_and(|role| {
                matches!(role.first(), Some(redis::Value::BulkString(bytes)) if bytes == b"master")
            })
    }

    /// Stops a replica process from answering (SIGSTOP) or lets it go on (SIGCONT).
    pub fn freeze(&self, port: u16, frozen: bool) {
        let node = self
            .nodes
            .iter()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        let pid = node.child.as_ref().expect("a live node").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
    }

    /// The replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let info: String = self
            .node_cmd(port, &["INFO", "replication"])
            .expect("INFO replication");
        info.lines()
            .find_map(|line| {
                let rest = line.strip_prefix("slave0:")?;
                rest.split(',')
                    .find_map(|field| field.strip_prefix("port="))?
                    .parse()
                    .ok()
            })
            .expect("a replica")
    }

    /// Every node's URL (seeds for streamgate).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }

    /// A connection that follows the cluster, for assertions.
    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        let urls: Vec<String> = self
            .live_ports()
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect();
        redis::cluster::ClusterClient::new(urls)
            .and_then(|client| client.get_connection())
            .expect("connect to the test cluster")
    }

    /// Runs one command (routed by its key) and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        command(args)
            .query(&mut self.connection())
            .expect("redis command")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
