//! Source kinds. Each kind is one small module that knows how to **verify** a raw request
//! (who sent it) and how to **parse** it into fields the mapping understands. The types make
//! the order unskippable: only [`verify`] turns a `Submission<Unverified>` into a
//! `Submission<Verified>`, and only a verified submission can be parsed.

pub mod body;
pub mod form;
pub mod partner;

use std::marker::PhantomData;

use actix_web::http::header::HeaderMap;
use bytes::Bytes;

use crate::config::{Source, SourceKind};
use crate::error::IngestError;
use crate::lead::{Inbound, LeadsinPayload};
use crate::mapping;

/// A request as received, before anyone checked who sent it.
pub struct Unverified;
/// A request whose sender passed its source's check.
pub struct Verified;

/// The parts of an HTTP request a source looks at.
pub struct Submission<State> {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request's `Host` (`host[:port]`), to recognise same-origin posts.
    pub own_host: Option<String>,
    state: PhantomData<State>,
}

impl Submission<Unverified> {
    pub fn new(headers: HeaderMap, body: Bytes, own_host: Option<String>) -> Self {
        Self {
            headers,
            body,
            own_host,
            state: PhantomData,
        }
    }

    fn verified(self) -> Submission<Verified> {
        Submission {
            headers: self.headers,
            body: self.body,
            own_host: self.own_host,
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

/// What a source's parser produced.
pub enum Parsed {
    /// Flat fields, mapped with the source's `[source.fields]` and `[source.extra]`.
    Fields(Inbound),
    /// A body already in Leadsin's shape (partners).
    Leadsin(serde_json::Value),
}

/// Checks the sender with the rule of the source's kind.
pub fn verify(
    source: &Source,
    submission: Submission<Unverified>,
) -> Result<Submission<Verified>, IngestError> {
    match &source.kind {
        SourceKind::Form => form::verify(source, &submission)?,
        SourceKind::Partner { api_keys } => partner::verify(api_keys, &submission)?,
    }
    Ok(submission.verified())
}

/// Parses a verified submission.
pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Parsed, IngestError> {
    match &source.kind {
        SourceKind::Form => form::parse(source, submission).await,
        SourceKind::Partner { .. } => partner::parse(source, submission).await,
    }
}

/// Maps parsed input into the Leadsin payload with the source's rules.
pub fn map(source: &Source, parsed: &Parsed) -> Result<LeadsinPayload, IngestError> {
    match parsed {
        Parsed::Fields(fields) => mapping::map_fields(fields, &source.mapping),
        Parsed::Leadsin(value) => mapping::map_leadsin(value, &source.mapping),
    }
    .map_err(IngestError::Rejected)
}

fn body_error(_source: &Source, e: body::BodyError) -> IngestError {
    e.into()
}

fn body_limits(source: &Source) -> body::BodyLimits {
    body::BodyLimits {
        max_fields: 200,
        max_field_bytes: 64 * 1024,
        max_file_bytes: source.limits.max_body,
    }
}
