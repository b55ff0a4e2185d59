//! A real `redis-server` per test, on a free loopback port, in its own temp dir.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
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
    child: Option<Child>,
}

impl RedisServer {
    /// A server without persistence.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for redis");
        let mut server = Self {
            port: 0,
            dir,
            options,
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
        format!("redis://127.0.0.1:{}/", self.port)
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
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", path_str(self.dir.path())])
            .args(["--appendonly", append_only])
            .args(["--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--logfile", path_str(&self.dir.path().join("redis.log"))])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); the tests need a real one: \
                     apt-get install redis-server"
                )
            });
        self.child = Some(child);
        self.wait_until_ready()
    }

    fn wait_until_ready(&mut self) -> Result<(), String> {
        let client = redis::Client::open(self.url()).expect("a valid redis url");
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

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}
