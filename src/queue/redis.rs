//! Stub: to be implemented.
#![allow(unused)]

use std::time::Duration;

use super::{DeadLetter, Delivery, Enqueued, IdempotencyKey, Lease, QueueSettings, Result, Settle, Stats};
use crate::lead::{LeadId, QueuedLead};

#[derive(Clone)]
pub struct RedisQueue {}

impl RedisQueue {
    pub async fn open(url: &secrecy::SecretString, prefix: &str, settings: QueueSettings, consumer: &str) -> Result<Self> { let _ = (url, prefix, settings, consumer); unimplemented!() }
    pub async fn enqueue(&self, lead: &QueuedLead, idempotency: Option<&IdempotencyKey>) -> Result<Enqueued> { unimplemented!() }
    pub async fn lease(&self, max: usize, wait: Duration) -> Result<Vec<Lease>> { unimplemented!() }
    pub async fn settle(&self, lease: Lease, how: Settle) -> Result<()> { unimplemented!() }
    pub async fn delivery_of(&self, id: LeadId) -> Result<Option<Delivery>> { unimplemented!() }
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> { unimplemented!() }
    pub async fn stats(&self) -> Result<Stats> { unimplemented!() }
    pub async fn ping(&self) -> Result<()> { unimplemented!() }
}
