//! Stub: the Onpipeline simulator, to be implemented.
#![allow(unused)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `leadgate sim` options.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenKind {
    Leadsin,
    ReadWrite,
    ReadOnly,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<(String, TokenKind)>,
    /// Empty: every peer is allowed.
    pub allow_ips: Vec<IpAddr>,
    pub ca_out: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReceivedLead {
    pub payload: serde_json::Value,
    pub peer_ip: IpAddr,
    pub lead_id: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestLog {
    pub at: DateTime<Utc>,
    pub peer_ip: IpAddr,
    /// None when the connection was dropped without an answer.
    pub status: Option<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    Status { status: u16, retry_after: Option<String>, message: Option<String> },
    Delay { ms: u64 },
    Drop,
    NonJson502,
}

pub struct Simulator {}

impl Simulator {
    pub async fn start(cfg: SimConfig) -> anyhow::Result<Self> { unimplemented!() }
    pub fn addr(&self) -> SocketAddr { unimplemented!() }
    pub fn base_url(&self) -> String { unimplemented!() }
    pub fn ca_pem(&self) -> &str { unimplemented!() }
    pub fn received(&self) -> Vec<ReceivedLead> { unimplemented!() }
    pub fn requests(&self) -> Vec<RequestLog> { unimplemented!() }
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) { unimplemented!() }
    pub fn set_detect_duplicates(&self, on: bool) { unimplemented!() }
    pub async fn stop(self) { unimplemented!() }
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> { unimplemented!() }
