//! Test helpers that read like the API they exercise.

pub mod app;
pub mod metrics;
pub mod proxy;
pub mod redis;
pub mod tcp;

use std::time::Duration;

use chrono::Utc;
use leadgate::lead::{EmailEntry, EmailType, Input, LeadId, LeadsinPayload, QueuedLead, Work};
use tokio::time::Instant;

/// A small, valid lead from `source`.
pub fn lead(source: &str) -> QueuedLead {
    QueuedLead {
        id: LeadId::new(),
        source: source.to_owned(),
        received_at: Utc::now(),
        work: Work::Deliver {
            payload: LeadsinPayload {
                first_name: "Ana".into(),
                last_name: "Lopez".into(),
                email: vec![EmailEntry {
                    address: "ana.lopez@example.com".into(),
                    kind: EmailType::Work,
                }],
                ..Default::default()
            },
            input: Input::Fields {
                fields: vec![
                    ("name".into(), vec!["Ana Lopez".into()]),
                    ("email".into(), vec!["ana.lopez@example.com".into()]),
                ],
            },
        },
        replayed_at: None,
    }
}

/// Polls `probe` until it yields `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
