//! Source kinds. Each kind is one small module that knows how to **verify** a raw request
//! (who sent it) and how to **parse** it into fields the mapping understands. The types make
//! the order unskippable: only [`verify`] turns a `Submission<Unverified>` into a
//! `Submission<Verified>`, and only a verified submission can be parsed.

pub mod body;
pub mod facebook;
pub mod form;
pub mod google;
pub mod partner;
pub mod webhook;

use std::marker::PhantomData;

use actix_web::http::header::HeaderMap;
use bytes::Bytes;

use crate::config::{Source, SourceKind};
use crate::error::IngestError;
use crate::lead::{Inbound, Input, MetaLeadRef, Work};
use crate::mapping;
use crate::queue::IdempotencyKey;

/// A request as received, before anyone checked who sent it.
pub struct Unverified;
/// A request whose sender passed its source's check.
pub struct Verified;

/// The parts of an HTTP request a source looks at.
pub struct Submission<State> {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The gateway's own origin as this request reached it (`https://leads.example.com`), to
    /// recognise same-origin posts.
    pub own_origin: Option<String>,
    /// The raw query string (without `?`): webhooks may carry their shared key as `?key=…`.
    pub query: String,
    state: PhantomData<State>,
}

impl Submission<Unverified> {
    pub fn new(headers: HeaderMap, body: Bytes, own_origin: Option<String>) -> Self {
        Self {
            headers,
            body,
            own_origin,
            query: String::new(),
            state: PhantomData,
        }
    }

    /// The request's query string (without `?`).
    pub fn with_query(mut self, query: &str) -> Self {
        self.query = query.to_owned();
        self
    }

    fn verified(self) -> Submission<Verified> {
        Submission {
            headers: self.headers,
            body: self.body,
            own_origin: self.own_origin,
            query: self.query,
            state: PhantomData,
        }
    }
}

impl<S> Submission<S> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }
}

/// What a request carried, ready for mapping.
pub enum Content {
    /// Flat fields, mapped with the source's `[source.fields]` and `[source.extra]`.
    Fields(Inbound),
    /// A body already in Leadsin's shape (partners).
    Leadsin(serde_json::Value),
    /// A Meta lead known by its ids; read from the Graph API by the forwarder.
    Meta(MetaLeadRef),
}

/// One lead found in a request. Most requests carry one; a Meta notification may carry many.
pub struct Item {
    pub content: Content,
    /// The platform's own id of the lead: the dedupe key, so a redelivered notification
    /// queues nothing new.
    pub platform_id: Option<String>,
    /// A platform's test lead (Google's "Send test data"): answered and logged, forwarded
    /// only when the source asks for it.
    pub test: bool,
}

impl Content {
    /// A body in Leadsin's shape, its text cleaned as [`Inbound`]'s is
    /// ([`crate::lead::clean_json`]): the only way such a body becomes content.
    pub fn leadsin(mut body: serde_json::Value) -> Self {
        crate::lead::clean_json(&mut body);
        Content::Leadsin(body)
    }
}

impl Item {
    fn new(content: Content) -> Self {
        Self {
            content,
            platform_id: None,
            test: false,
        }
    }
}

/// Checks the sender with the rule of the source's kind.
pub fn verify(
    source: &Source,
    submission: Submission<Unverified>,
) -> Result<Submission<Verified>, IngestError> {
    match &source.kind {
        SourceKind::Form => form::verify(source, &submission)?,
        SourceKind::Partner { api_keys } => partner::verify(api_keys, &submission)?,
        SourceKind::Google { google_key } => google::verify(google_key, &submission)?,
        SourceKind::Webhook(hook) => webhook::verify(hook, &submission, chrono::Utc::now())?,
        SourceKind::Facebook(meta) => facebook::verify(meta, &submission)?,
    }
    Ok(submission.verified())
}

/// Parses a verified submission into the leads it carries.
pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Vec<Item>, IngestError> {
    let content = match &source.kind {
        SourceKind::Form => form::parse(source, submission).await?,
        SourceKind::Partner { .. } => partner::parse(source, submission).await?,
        SourceKind::Google { .. } => return google::parse(source, submission),
        SourceKind::Webhook(hook) => return webhook::parse(source, hook, submission).await,
        SourceKind::Facebook(_) => return facebook::parse(source, submission).await,
    };
    Ok(vec![Item::new(content)])
}

/// The methods `/in/{source_id}` takes for a source without a handshake.
pub const METHODS: &str = "POST, OPTIONS";
/// The methods `/in/{source_id}` takes for a source with a handshake (Meta's `GET`).
pub const METHODS_WITH_HANDSHAKE: &str = "POST, GET, OPTIONS";

/// The methods a source's `/in/{source_id}` takes: its `405`s' `Allow`, the preflight's
/// `Access-Control-Allow-Methods`, and `openapi.yaml`'s `AllowSource` (a test keeps it equal).
pub fn allowed_methods(kind: &SourceKind) -> &'static str {
    match kind {
        SourceKind::Facebook(_) => METHODS_WITH_HANDSHAKE,
        SourceKind::Form
        | SourceKind::Partner { .. }
        | SourceKind::Google { .. }
        | SourceKind::Webhook(_) => METHODS,
    }
}

/// The refusal of a method `source` does not take.
pub fn method_not_allowed(source: &Source) -> IngestError {
    IngestError::MethodNotAllowed {
        allowed: allowed_methods(&source.kind).into(),
    }
}

/// Answers a `GET` on a source: the subscription handshake of platforms that have one (Meta).
/// Returns the plain-text body of a `200`.
pub fn handshake(source: &Source, query: &str) -> Result<String, IngestError> {
    match &source.kind {
        SourceKind::Form
        | SourceKind::Partner { .. }
        | SourceKind::Google { .. }
        | SourceKind::Webhook(_) => Err(method_not_allowed(source)),
        SourceKind::Facebook(meta) => facebook::handshake(meta, query),
    }
}

/// The idempotency key of a platform's lead id: the one dedupe key of a platform lead, whether
/// it arrives by notification or by a backfill.
pub fn platform_key(source: &Source, platform_id: &str) -> IdempotencyKey {
    IdempotencyKey {
        source: source.id.clone(),
        key: format!("platform:{platform_id}"),
        body_digest: None,
    }
}

/// Maps what a request carried into the work the forwarder will do, with the source's rules,
/// and what the lenient mapping of a platform's lead had to repair. The repairs are not counted
/// here: the caller notes them ([`note_repaired`]) once the lead is queued new, so a
/// redelivery, a test lead that is not forwarded or a replay is not counted again.
pub fn to_work(
    source: &Source,
    content: &Content,
) -> Result<(Work, mapping::Repairs), IngestError> {
    let mut repaired = mapping::Repairs::default();
    let (payload, input) = match content {
        Content::Fields(fields) if source.kind.is_platform() => {
            let (payload, repairs) = mapping::map_fields_lenient(fields, &source.mapping);
            repaired = repairs;
            (Ok(payload), Input::from_inbound(fields))
        }
        Content::Fields(fields) => (
            mapping::map_fields(fields, &source.mapping),
            Input::from_inbound(fields),
        ),
        Content::Leadsin(body) => (
            mapping::map_leadsin(body, &source.mapping),
            Input::Leadsin { body: body.clone() },
        ),
        Content::Meta(lead) => return Ok((Work::FetchMeta { lead: lead.clone() }, repaired)),
    };
    let work = Work::Deliver {
        payload: payload.map_err(IngestError::Rejected)?,
        input,
    };
    Ok((work, repaired))
}

/// Maps a lead's original input again with the source's current rules (replay of a dead
/// letter after its mapping was fixed).
pub fn remap(source: &Source, input: &Input) -> Result<Work, IngestError> {
    let content = match input {
        Input::Fields { fields } => Content::Fields(
            fields
                .iter()
                .flat_map(|(name, values)| values.iter().map(move |v| (name.clone(), v.clone())))
                .collect(),
        ),
        Input::Leadsin { body } => Content::leadsin(body.clone()),
    };
    // A replay is not a new lead: its repairs were counted when it first arrived.
    to_work(source, &content).map(|(work, _)| work)
}

/// Counts (`leadgate_leads_repaired_total`) and logs a platform lead that the lenient mapping
/// had to repair (platform senders cannot fix their data, so their leads are never refused for
/// it; see [`mapping::map_fields_lenient`]) — field names, and the values it dropped masked;
/// nothing when there was nothing to repair. Called once per lead forwarded: Google and the
/// form tools once the lead is queued new, Meta when its lead, read from Graph, is first sent.
pub fn note_repaired(source: &Source, repaired: &mapping::Repairs) {
    if repaired.is_empty() {
        return;
    }
    metrics::counter!(crate::telemetry::metric::REPAIRED, "source" => source.id.clone())
        .increment(1);
    let fields = repaired.fields.join(", ");
    if repaired.dropped.is_empty() {
        tracing::warn!(
            source = %source.id,
            kind = source.kind.name(),
            fields,
            "A platform lead had invalid or missing fields; forwarded with what was valid."
        );
    } else {
        let dropped = repaired
            .dropped
            .iter()
            .map(|(field, value)| format!("{field}: {}", crate::telemetry::mask_email(value)))
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(
            source = %source.id,
            kind = source.kind.name(),
            fields,
            dropped,
            "A platform lead had invalid or missing fields; forwarded with what was valid. \
             The source has no unmapped_extra, so its invalid values were dropped."
        );
    }
}

/// The metadata names a source kind offers to `[source.extra]` (ids, times, page details):
/// they reach a lead only when mapped. Forms and partners have none.
pub fn metadata_names(kind: &SourceKind) -> &'static [&'static str] {
    use crate::config::sources::Preset;
    match kind {
        SourceKind::Form | SourceKind::Partner { .. } => &[],
        SourceKind::Google { .. } => &google::METADATA,
        SourceKind::Facebook(_) => &facebook::METADATA,
        SourceKind::Webhook(hook) => match hook.preset {
            Preset::Typeform => &webhook::typeform::METADATA,
            Preset::Unbounce => &webhook::unbounce::METADATA,
            Preset::Elementor => &webhook::elementor::METADATA,
            Preset::Webflow => &webhook::webflow::METADATA,
            Preset::Jotform => &webhook::jotform::METADATA,
        },
    }
}

/// Whether the source's `[source.fields]` or `[source.extra]` mentions an incoming name.
fn is_mapped(source: &Source, name: &str) -> bool {
    source.mapping.fields.iter().any(|(n, _)| n == name)
        || source.mapping.extra.iter().any(|(n, _)| n == name)
}

/// The first candidate name the source maps, else the first candidate: a platform field known
/// by several names (Google's `column_id`/`column_name`, Typeform's `ref`/title) is read under
/// whichever name the sources file uses.
fn pick_name<'a>(source: &Source, candidates: &[Option<&'a str>]) -> Option<&'a str> {
    let present = || {
        candidates
            .iter()
            .flatten()
            .copied()
            .filter(|n| !n.is_empty())
    };
    present()
        .find(|name| is_mapped(source, name))
        .or_else(|| present().next())
}

/// Platform metadata (ids, times) is offered to the mapping only under names the sources file
/// maps, so it never clutters the unmapped-fields note.
fn push_metadata(source: &Source, inbound: &mut Inbound, name: &str, value: Option<String>) {
    if let Some(value) = value.filter(|v| !v.is_empty())
        && is_mapped(source, name)
    {
        inbound.push(name, value);
    }
}

/// A JSON scalar as text: strings as they are, numbers with every digit (ids beyond 2^53 stay
/// exact), booleans as `true`/`false`; `null`, lists and objects give nothing.
fn json_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn body_limits(source: &Source) -> body::BodyLimits {
    body::BodyLimits {
        max_fields: source.limits.max_fields,
        max_field_bytes: 64 * 1024,
        max_file_bytes: source.limits.max_body,
    }
}
