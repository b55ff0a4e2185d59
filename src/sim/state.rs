//! What the simulator remembers between requests. One mutex guards it all: every critical
//! section is a few pushes or lookups and never spans an `.await`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use chrono::Utc;
use rand::Rng;

use super::{
    Fault, ReceivedLead, RepeatedLead, RequestLog, RequestOutcome, SettingsUpdate, SimSettings,
    TokenKind,
};

/// Fixed at start: who may call.
pub(crate) struct Access {
    pub tokens: HashMap<String, TokenKind>,
    /// Empty: every peer is allowed.
    pub allow_ips: Vec<IpAddr>,
}

pub(crate) struct Shared {
    pub access: Access,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    leads: Vec<ReceivedLead>,
    /// Canonical payloads of `leads`, with the `LeadID` each was given, for duplicate detection.
    seen: HashMap<String, String>,
    /// Every POST refused with 409 as a repeat of a stored lead.
    repeats: Vec<RepeatedLead>,
    /// Each entry with the id its handler uses to settle it.
    requests: Vec<(u64, RequestLog)>,
    next_request: u64,
    next_lead: u64,
    faults: VecDeque<Fault>,
    settings: SimSettings,
}

/// Whether a lead was stored or is a repeat of a stored one.
pub(crate) enum Admission {
    Created(String),
    Duplicate,
}

impl Shared {
    pub fn new(access: Access) -> Self {
        Self {
            access,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that matters
        // to a simulator, so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs the arrival of a `/Leadsin` request and takes the next scripted fault, atomically,
    /// so concurrent requests consume faults in arrival order.
    pub fn arrive(&self, peer_ip: IpAddr) -> (u64, Option<Fault>, SimSettings) {
        let mut state = self.lock();
        let id = state.next_request;
        state.next_request += 1;
        state.requests.push((
            id,
            RequestLog {
                at: Utc::now(),
                peer_ip,
                status: None,
                outcome: RequestOutcome::InFlight,
            },
        ));
        let fault = state.faults.pop_front();
        (id, fault, state.settings.clone())
    }

    pub fn settle(&self, id: u64, status: Option<u16>, outcome: RequestOutcome) {
        let mut state = self.lock();
        if let Some((_, log)) = state.requests.iter_mut().rev().find(|(i, _)| *i == id) {
            log.status = status;
            log.outcome = outcome;
        }
    }

    /// Stores an accepted lead under a new Onpipeline-looking id, unless duplicate detection is
    /// on and the same canonical payload was stored before: then the refused repeat is recorded
    /// (which lead it repeats, when, from where) and nothing is stored.
    pub fn admit(
        &self,
        payload: serde_json::Value,
        canonical: String,
        peer_ip: IpAddr,
    ) -> Admission {
        let mut state = self.lock();
        if state.settings.detect_duplicates
            && let Some(first) = state.seen.get(&canonical).cloned()
        {
            state.repeats.push(RepeatedLead {
                lead_id: first,
                payload,
                peer_ip,
                at: Utc::now(),
            });
            return Admission::Duplicate;
        }
        state.next_lead += 1;
        let lead_id = lead_id(state.next_lead);
        state.seen.insert(canonical, lead_id.clone());
        state.leads.push(ReceivedLead {
            payload,
            peer_ip,
            lead_id: lead_id.clone(),
            received_at: Utc::now(),
        });
        Admission::Created(lead_id)
    }

    pub fn received(&self) -> Vec<ReceivedLead> {
        self.lock().leads.clone()
    }

    pub fn repeats(&self) -> Vec<RepeatedLead> {
        self.lock().repeats.clone()
    }

    pub fn requests(&self) -> Vec<RequestLog> {
        self.lock()
            .requests
            .iter()
            .map(|(_, log)| log.clone())
            .collect()
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) -> usize {
        let mut state = self.lock();
        state.faults.extend(faults);
        state.faults.len()
    }

    pub fn pending_faults(&self) -> Vec<Fault> {
        self.lock().faults.iter().cloned().collect()
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn settings(&self) -> SimSettings {
        self.lock().settings.clone()
    }

    pub fn update_settings(&self, update: SettingsUpdate) -> SimSettings {
        let mut state = self.lock();
        if let Some(on) = update.detect_duplicates {
            state.settings.detect_duplicates = on;
        }
        if let Some(ms) = update.latency_ms {
            state.settings.latency_ms = ms;
        }
        if let Some(ms) = update.answer_delay_ms {
            state.settings.answer_delay_ms = ms;
        }
        if let Some(ids) = update.custom_fields {
            state.settings.custom_fields = (!ids.is_empty()).then_some(ids);
        }
        state.settings.clone()
    }

    /// Forgets received leads (and so the duplicate memory), the refused repeats and the
    /// request log. Pending faults and settings stay.
    pub fn reset(&self) {
        let mut state = self.lock();
        state.leads.clear();
        state.seen.clear();
        state.repeats.clear();
        state.requests.clear();
    }
}

/// Shaped like the reference's sample `123456789HSY7584306`: nine digits of sequence, three
/// letters and seven random digits. The sequence keeps ids unique within one simulator.
fn lead_id(seq: u64) -> String {
    let mut rng = rand::rng();
    let letters: String = (0..3)
        .map(|_| rng.random_range(b'A'..=b'Z') as char)
        .collect();
    let digits: u32 = rng.random_range(0..10_000_000);
    format!("{seq:09}{letters}{digits:07}")
}
