//! A TCP relay in front of the simulator that can be switched off: while down, its port
//! refuses connections (nothing listens) and open connections are cut — Onpipeline
//! unreachable, as a network fault or an outage looks to leadgate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Relay {
    pub addr: SocketAddr,
    target: SocketAddr,
    running: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Relay {
    /// Starts relaying a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Self {
            addr,
            target,
            running: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        let target = self.target;
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            // Dropping the set aborts every relayed connection.
            drop(connections);
        });
        *self.running.lock().unwrap() = Some(task);
    }

    /// Closes the port and cuts every open connection.
    pub fn down(&self) {
        if let Some(task) = self.running.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                // The old socket may take a moment to be released.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.down();
    }
}
