//! Meta backfill: for every form in a facebook source's `backfill_forms`, list the form's
//! leads periodically (`GET {graph}/{form_id}/leads`, filtered on `time_created`) and queue any
//! lead never seen, so a lead whose webhook notification Meta never sent (or that was refused
//! while leadgate was down) still arrives. Each lead is queued as a [`Work::FetchMeta`] under
//! the same idempotency key as a notified one ([`sources::platform_key`]), so a lead seen both
//! ways is queued once; overlapping listings are therefore harmless.
//!
//! The cursor lives in memory: after start-up the first listing reaches back
//! [`FIRST_WINDOW`]; every successful listing then moves it to the time that listing began,
//! minus [`OVERLAP`] (Graph may show a lead a little after its `created_time`). The first window
//! stays inside the 48 hours for which idempotency keys are remembered: a lead listed again
//! is always still recognised.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{BackfillForm, MetaSource, Source, SourceKind, Sources};
use crate::forwarder::DeliveryState;
use crate::graph::{Credentials, GraphClient, GraphError};
use crate::lead::{LeadId, MetaLeadRef, QueuedLead, Work};
use crate::queue::{Enqueued, Queue};
use crate::sources;

/// How far back a listing may reach: well under the 48 h for which idempotency keys are kept.
pub const FIRST_WINDOW: Duration = Duration::from_secs(23 * 3600);

/// How far each listing reaches behind the start of the previous one.
pub const OVERLAP: Duration = Duration::from_secs(5 * 60);

/// Pages read per listing at most (of [`crate::graph::LIST_PAGE_SIZE`] leads): a bound, so a
/// cursor Graph keeps returning cannot loop forever.
const MAX_PAGES: usize = 100;

/// Starts one task per backfill form of every facebook source; each stops when `shutdown`
/// turns true.
pub fn spawn(
    sources: &Sources,
    queue: Queue,
    graph: GraphClient,
    state: Arc<DeliveryState>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for source in sources.iter() {
        let SourceKind::Facebook(meta) = &source.kind else {
            continue;
        };
        for form in &meta.backfill_forms {
            let job = Job {
                source: source.clone(),
                form: form.clone(),
                queue: queue.clone(),
                graph: graph.clone(),
                state: state.clone(),
            };
            info!(source = %source.id, form_id = %form.form_id, every = %humantime::format_duration(meta.backfill_every), "Meta backfill scheduled.");
            tasks.push(tokio::spawn(job.run(meta.backfill_every, shutdown.clone())));
        }
    }
    tasks
}

/// What one listing did.
struct Listing {
    queued: usize,
    /// Every page was read (not cut short at `MAX_PAGES`).
    complete: bool,
}

struct Job {
    source: Arc<Source>,
    form: BackfillForm,
    queue: Queue,
    graph: GraphClient,
    state: Arc<DeliveryState>,
}

impl Job {
    async fn run(self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut since = Utc::now() - FIRST_WINDOW;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = shutdown.changed() => {
                    // Shutting down, or the gateway that owned the signal is gone.
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
            }
            let started = Utc::now();
            // Never reach back past the window in which a lead's id is still remembered: an
            // older lead whose dedupe key has expired would be queued a second time. After a
            // long outage the leads older than that are left to their notifications.
            since = since.max(started - FIRST_WINDOW);
            match self.list_since(since.timestamp()).await {
                Ok(Listing { queued, complete }) => {
                    if queued > 0 {
                        info!(source = %self.source.id, form_id = %self.form.form_id, queued, "Meta backfill queued leads that had no notification.");
                    }
                    // A listing cut short at the page limit starts from the same point again.
                    if complete {
                        since = started - OVERLAP;
                    }
                }
                Err(e) => self.failed(e),
            }
        }
    }

    fn meta(&self) -> &MetaSource {
        match &self.source.kind {
            SourceKind::Facebook(meta) => meta,
            _ => unreachable!("backfill jobs are built for facebook sources only"),
        }
    }

    /// Lists the form's leads created after `since` and queues those never seen.
    async fn list_since(&self, since: i64) -> Result<Listing, ListError> {
        let meta = self.meta();
        let token = meta.page_token(&self.form.page_id).ok_or(ListError::Graph(
            GraphError::NeedsAttention {
                message: format!(
                    "no access token is configured for Meta page {}",
                    self.form.page_id
                ),
            },
        ))?;
        let credentials = Credentials {
            token,
            app_secret: &meta.app_secret,
        };
        let mut queued = 0;
        let mut complete = false;
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .graph
                .form_leads(&self.form.form_id, since, after.as_deref(), &credentials)
                .await
                .map_err(ListError::Graph)?;
            for lead in &page.leads {
                if self.enqueue(lead).await.map_err(ListError::Queue)? {
                    queued += 1;
                }
            }
            match page.after {
                Some(next) => after = Some(next),
                None => {
                    complete = true;
                    break;
                }
            }
        }
        if self.state.unpark(&self.source.id, &self.form.page_id) {
            info!(page_id = %self.form.page_id, "The Graph API lists this Meta page's leads again.");
        }
        Ok(Listing { queued, complete })
    }

    /// Queues one listed lead unless its id was seen; returns whether it was queued.
    async fn enqueue(&self, lead: &crate::graph::GraphLead) -> crate::queue::Result<bool> {
        let queued = QueuedLead {
            id: LeadId::new(),
            source: self.source.id.clone(),
            received_at: Utc::now(),
            work: Work::FetchMeta {
                lead: MetaLeadRef {
                    leadgen_id: lead.id.clone(),
                    page_id: self.form.page_id.clone(),
                    form_id: lead
                        .form_id
                        .clone()
                        .or_else(|| Some(self.form.form_id.clone())),
                    ad_id: lead.ad_id.clone(),
                    adgroup_id: None,
                    created_time: lead.created_time.clone(),
                },
            },
            replayed_at: None,
        };
        let key = sources::platform_key(&self.source, &lead.id);
        match self.queue.enqueue(&queued, Some(&key)).await? {
            Enqueued::Queued => {
                info!(source = %self.source.id, lead_id = %queued.id, leadgen_id = %lead.id, "Meta backfill queued a lead.");
                Ok(true)
            }
            // A platform key carries no body digest, so it is never a conflict.
            Enqueued::Replayed { .. } | Enqueued::Conflict { .. } => Ok(false),
        }
    }

    fn failed(&self, e: ListError) {
        let (source, form_id) = (&self.source.id, &self.form.form_id);
        match e {
            ListError::Graph(GraphError::NeedsAttention { message }) => {
                if self.state.park(source, &self.form.page_id, &message) {
                    error!(%source, form_id, page_id = %self.form.page_id, reason = message, "ALERT: the Meta backfill cannot list this form; fix the page token or the app's permissions.");
                }
            }
            ListError::Graph(e) => {
                warn!(%source, form_id, reason = e.message(), "The Meta backfill could not list a form; it tries again at the next interval.");
            }
            ListError::Queue(e) => {
                warn!(%source, form_id, error = %e, "The Meta backfill could not queue a lead; it tries again at the next interval.");
            }
        }
    }
}

enum ListError {
    Graph(GraphError),
    Queue(crate::queue::Error),
}
