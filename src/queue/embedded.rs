//! Stub: to be implemented.
#![allow(unused)]

use std::time::Duration;

use super::{DeadLetter, Delivery, Enqueued, IdempotencyKey, Lease, QueueSettings, Result, Settle, Stats};
use crate::lead::{LeadId, QueuedLead};

#[derive(Clone)]
pub struct EmbeddedQueue {}

impl EmbeddedQueue {
    pub async fn open(dir: &std::path::Path, settings: QueueSettings) -> Result<Self> { let _ = (dir, settings); unimplemented!() }
    pub async fn enqueue(&self, lead: &QueuedLead, idempotency: Option<&IdempotencyKey>) -> Result<Enqueued> { unimplemented!() }
    pub async fn lease(&self, max: usize, wait: Duration) -> Result<Vec<Lease>> { unimplemented!() }
    pub async fn settle(&self, lease: Lease, how: Settle) -> Result<()> { unimplemented!() }
    pub async fn delivery_of(&self, id: LeadId) -> Result<Option<Delivery>> { unimplemented!() }
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> { unimplemented!() }
    pub async fn stats(&self) -> Result<Stats> { unimplemented!() }
    pub async fn ping(&self) -> Result<()> { unimplemented!() }
}
