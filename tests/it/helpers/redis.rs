//! A real `redis-server` per test, on a free loopback port, in its own temp dir: plain, with
//! extra configuration, with TLS (a CA and server certificate made with rcgen), or three of
//! them joined into a Redis Cluster.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the server persists.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisOptions {
    /// `appendonly yes` with `appendfsync always`: every acknowledged write is on disk.
    pub append_only: bool,
}

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    options: RedisOptions,
    /// More `--name value` arguments, after the defaults (so they win).
    config: Vec<(String, String)>,
    /// Serves TLS only (`rediss://`), with a certificate signed by this CA.
    tls: Option<TestCa>,
    child: Option<Child>,
}

/// A throw-away CA and a server certificate for 127.0.0.1 and localhost, as PEM files.
pub struct TestCa {
    pub ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl TestCa {
    fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "leadgate test Redis CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

        let ca = Self {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
        };
        std::fs::write(&ca.ca_file, ca_cert.pem()).unwrap();
        std::fs::write(&ca.cert_file, server_cert.pem()).unwrap();
        std::fs::write(&ca.key_file, server_key.serialize_pem()).unwrap();
        ca
    }

    /// A client for `url` trusting only this CA.
    fn client(&self, url: &str) -> redis::Client {
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&self.ca_file).unwrap()),
        };
        redis::Client::build_with_tls(url, certs).expect("a valid rediss url")
    }
}

impl RedisServer {
    /// A server without persistence.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> Self {
        Self::start_configured(options, &[])
    }

    /// A server with more configuration, e.g. `[("maxmemory-policy", "allkeys-lru")]`.
    pub fn start_configured(options: RedisOptions, config: &[(&str, &str)]) -> Self {
        Self::start_as(options, config, false)
    }

    /// A server that speaks only TLS, with a certificate from a CA of its own
    /// ([`Self::ca_file`]). Fails the test when this `redis-server` was built without TLS.
    pub fn start_tls() -> Self {
        Self::start_tls_with(RedisOptions::default())
    }

    /// The same, persisting as `options` say.
    pub fn start_tls_with(options: RedisOptions) -> Self {
        Self::start_as(options, &[], true)
    }

    fn start_as(options: RedisOptions, config: &[(&str, &str)], tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for redis");
        let tls = tls.then(|| {
            leadgate::tls::install_default_provider();
            TestCa::generate(dir.path())
        });
        let mut server = Self {
            port: 0,
            dir,
            options,
            config: config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            tls,
            child: None,
        };
        // The free port may be taken by another test between probing and binding: try others.
        let mut failures = Vec::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n"));
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// The CA a TLS server's certificate chains to.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|ca| ca.ca_file.clone())
    }

    /// A client for this server (trusting its CA when it speaks TLS).
    pub fn client(&self) -> redis::Client {
        match &self.tls {
            Some(ca) => ca.client(&self.url()),
            None => redis::Client::open(self.url()).expect("a valid redis url"),
        }
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// The loopback address it listens on (for a relay in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Kills the server (SIGKILL: nothing is flushed on the way out).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, like a
    /// black-holed network.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running redis-server").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Stops the server if it runs, then starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("redis-server did not restart: {e}");
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let append_only = if self.options.append_only {
            "yes"
        } else {
            "no"
        };
        let mut command = Command::new("redis-server");
        match &self.tls {
            Some(ca) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", path_str(&ca.cert_file)])
                .args(["--tls-key-file", path_str(&ca.key_file)])
                .args(["--tls-ca-cert-file", path_str(&ca.ca_file)])
                .args(["--tls-auth-clients", "no"]),
            None => command.args(["--port", &self.port.to_string()]),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", path_str(self.dir.path())])
            .args(["--appendonly", append_only])
            .args(["--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--logfile", path_str(&self.dir.path().join("redis.log"))]);
        for (name, value) in &self.config {
            // A port that must be free too (the cluster bus) is drawn afresh on every attempt,
            // so a collision is retried like one on the main port.
            let value = if value == FREE_PORT {
                free_port().to_string()
            } else {
                value.clone()
            };
            command.arg(format!("--{name}")).arg(value);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); the tests need a real one (built with \
                     TLS, as Debian's is): apt-get install redis-server"
                )
            });
        self.child = Some(child);
        self.wait_until_ready()
    }

    fn wait_until_ready(&mut self) -> Result<(), String> {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
            if answered.is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                self.child = None;
                return Err(format!(
                    "redis-server exited with {status} while starting:\n{log}"
                ));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "redis-server on port {} did not answer PING within 10s",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three `redis-server`s with `cluster-enabled yes`, joined into a cluster of three masters
/// (no replicas) that covers every slot.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The cluster bus port is set explicitly: the default (port + 10000) may be
                // taken or out of range.
                let bus = FREE_PORT;
                RedisServer::start_configured(
                    RedisOptions::default(),
                    &[
                        ("cluster-enabled", "yes"),
                        ("cluster-config-file", "nodes.conf"),
                        ("cluster-port", bus),
                        ("cluster-node-timeout", "2000"),
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs (it comes with redis-server)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ok();
        cluster
    }

    /// Seed URLs, comma-separated, as `LEADGATE_REDIS_URL` takes them with
    /// `LEADGATE_REDIS_CLUSTER=true`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node must agree the cluster is up and know all three masters.
    fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.nodes.iter().all(|node| {
                node.client()
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .and_then(|mut conn| {
                        redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut conn)
                    })
                    .is_ok_and(|info| {
                        info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
                    })
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the redis cluster did not reach cluster_state:ok within 20s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A configuration value replaced by a free port each time the server is started.
const FREE_PORT: &str = "<free port>";

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}
