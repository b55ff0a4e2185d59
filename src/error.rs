//! The ingest boundary's one error enum. Its status and stable code are chosen in one match;
//! client errors carry a message and per-field messages. A lead the queue could not take, for
//! whatever reason, is a `503` with `Retry-After` — the sender keeps the lead and tries again —
//! and the cause is logged, never returned.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header;
use serde::Serialize;

use crate::mapping::Rejection;

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The id is the sender's text: the message shows at most 60 characters of it.
    #[error("there is no source {:?}", crate::sources::body::shown_name(.0))]
    UnknownSource(String),
    /// A method the route does not take; `allowed` is its `Allow` header (for a source,
    /// [`crate::sources::allowed_methods`]).
    #[error("this route does not take that method; it takes {allowed}")]
    MethodNotAllowed { allowed: Cow<'static, str> },
    #[error("a valid `Authorization: Bearer <key>` header is required")]
    Unauthorized,
    /// The `Origin` is the sender's text: the message shows at most 60 characters of it.
    #[error("posts from {} are not allowed for this source", crate::sources::body::shown_name(.0))]
    OriginNotAllowed(String),
    /// A platform's or webhook's proof of origin (key, signature, timestamp) is missing or
    /// wrong. The message says which check failed, never what was expected.
    #[error("{0}")]
    Forbidden(String),
    /// A signed webhook (Meta's `X-Hub-Signature-256`) whose signature is missing or wrong.
    #[error("{0}")]
    InvalidSignature(&'static str),
    /// A subscription handshake (`GET` with `hub.mode=subscribe`) that did not verify.
    #[error("the subscription handshake did not verify")]
    HandshakeRefused,
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A `Content-Encoding` other than `identity`: the body is not read as if it were plain.
    /// Holds the header as sent, already capped for echoing.
    #[error("Content-Encoding {0:?} is not accepted; send the body unencoded")]
    UnsupportedEncoding(String),
    /// Both `Content-Length` and `Transfer-Encoding`: a proxy in front may have framed the
    /// body differently than we would (request smuggling), so neither is trusted.
    #[error("the request has both Content-Length and Transfer-Encoding; send only one")]
    AmbiguousLength,
    #[error("{0}")]
    Malformed(String),
    #[error("the body is larger than this source accepts ({limit} bytes)")]
    TooLarge { limit: usize },
    /// The whole body did not arrive within its deadline (`LEADGATE_BODY_TIMEOUT` plus an
    /// allowance for its size).
    #[error("the body did not arrive within {} seconds; send it whole, promptly", .after.as_secs_f64())]
    BodyTimeout { after: Duration },
    /// A part of the body (a field, a file, the field count) is over its cap; `fields` names
    /// the culprits when there are some.
    #[error("{message}")]
    PartTooLarge {
        message: String,
        fields: BTreeMap<String, Vec<String>>,
    },
    #[error("{}", .0.message)]
    Rejected(Rejection),
    /// The request's `Idempotency-Key` was first used, within its time to live, with a
    /// different body: nothing is queued, and the first lead is left as it was.
    #[error(
        "this Idempotency-Key was already used with a different body; send a new key for a new lead, or the same body to retry"
    )]
    IdempotencyKeyReused,
    #[error("too many requests{}", scope_text(.scope))]
    RateLimited {
        retry_after: Duration,
        scope: &'static str,
    },
    /// The lead was not queued: the gateway is shutting down (no cause) or the queue failed.
    #[error("the gateway cannot accept leads right now; try again shortly")]
    Unavailable {
        retry_after: Duration,
        cause: Option<crate::queue::Error>,
    },
}

fn scope_text(scope: &str) -> String {
    match scope {
        "ip" => " from this address".to_owned(),
        "source" => " for this source".to_owned(),
        _ => String::new(),
    }
}

/// The JSON error document every client error uses.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub code: &'a str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<&'a BTreeMap<String, Vec<String>>>,
}

/// Every code an error document can carry: each [`IngestError::code`], the mapping's
/// rejection codes, and the router's `not_found`. `openapi.yaml` lists exactly these; a test
/// there keeps the two equal.
pub const ALL_CODES: &[&str] = &[
    "unknown_source",
    "method_not_allowed",
    "unauthorized",
    "origin_not_allowed",
    "forbidden",
    "invalid_signature",
    "handshake_refused",
    "unsupported_media_type",
    "unsupported_encoding",
    "malformed_body",
    "ambiguous_length",
    "payload_too_large",
    "body_timeout",
    Rejection::VALIDATION_FAILED,
    Rejection::NAME_REQUIRED,
    Rejection::FIRST_NAME_REQUIRED,
    Rejection::LAST_NAME_REQUIRED,
    "idempotency_key_reused",
    "rate_limited",
    "unavailable",
    // Answered by `http::not_found` for routes that do not exist, outside `IngestError`.
    "not_found",
];

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::UnknownSource(_) => StatusCode::NOT_FOUND,
            IngestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::OriginNotAllowed(_)
            | IngestError::Forbidden(_)
            | IngestError::InvalidSignature(_)
            | IngestError::HandshakeRefused => StatusCode::FORBIDDEN,
            IngestError::UnsupportedMediaType(_) | IngestError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            IngestError::Malformed(_) | IngestError::AmbiguousLength => StatusCode::BAD_REQUEST,
            IngestError::TooLarge { .. } | IngestError::PartTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            IngestError::Rejected(_) | IngestError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable machine-readable code; documented in openapi.yaml.
    pub fn code(&self) -> &str {
        match self {
            IngestError::UnknownSource(_) => "unknown_source",
            IngestError::MethodNotAllowed { .. } => "method_not_allowed",
            IngestError::Unauthorized => "unauthorized",
            IngestError::OriginNotAllowed(_) => "origin_not_allowed",
            IngestError::Forbidden(_) => "forbidden",
            IngestError::InvalidSignature(_) => "invalid_signature",
            IngestError::HandshakeRefused => "handshake_refused",
            IngestError::UnsupportedMediaType(_) => "unsupported_media_type",
            IngestError::UnsupportedEncoding(_) => "unsupported_encoding",
            IngestError::Malformed(_) => "malformed_body",
            IngestError::AmbiguousLength => "ambiguous_length",
            IngestError::TooLarge { .. } | IngestError::PartTooLarge { .. } => "payload_too_large",
            IngestError::BodyTimeout { .. } => "body_timeout",
            IngestError::Rejected(r) => r.code,
            IngestError::IdempotencyKeyReused => "idempotency_key_reused",
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::Unavailable { .. } => "unavailable",
        }
    }

    pub fn fields(&self) -> Option<&BTreeMap<String, Vec<String>>> {
        match self {
            IngestError::Rejected(r) if !r.fields.is_empty() => Some(&r.fields),
            IngestError::PartTooLarge { fields, .. } if !fields.is_empty() => Some(fields),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            IngestError::RateLimited { retry_after, .. }
            | IngestError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Every `outcome` label of the received-leads metric a source of any kind can have: a
    /// lead queued, a duplicate, and each [`IngestError::outcome`] (tested to match; Google's
    /// `test` is not in it). Start-up exports a series for each.
    pub const RECEIVED_OUTCOMES: [&'static str; 6] = [
        "queued",
        "duplicate",
        "rejected",
        "rate_limited",
        "unauthorized",
        "unavailable",
    ];

    /// The `outcome` label of the received-leads metric for this refusal.
    pub fn outcome(&self) -> &'static str {
        match self {
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::Unauthorized
            | IngestError::OriginNotAllowed(_)
            | IngestError::Forbidden(_)
            | IngestError::InvalidSignature(_)
            | IngestError::HandshakeRefused => "unauthorized",
            IngestError::Unavailable { .. } => "unavailable",
            IngestError::UnknownSource(_)
            | IngestError::MethodNotAllowed { .. }
            | IngestError::UnsupportedMediaType(_)
            | IngestError::UnsupportedEncoding(_)
            | IngestError::Malformed(_)
            | IngestError::AmbiguousLength
            | IngestError::TooLarge { .. }
            | IngestError::PartTooLarge { .. }
            | IngestError::BodyTimeout { .. }
            | IngestError::Rejected(_)
            | IngestError::IdempotencyKeyReused => "rejected",
        }
    }

    /// The public message: a queue failure says nothing about its cause.
    pub fn public_message(&self) -> String {
        self.to_string()
    }

    /// Logs what needs logging: queue failures with their cause chain.
    pub fn log(&self, source: &str) {
        match self {
            IngestError::Unavailable {
                cause: Some(crate::queue::Error::Unavailable(reason)),
                ..
            } => tracing::warn!(
                source,
                reason = reason.as_str(),
                "Refused a lead because the queue is unavailable; the sender was asked to retry."
            ),
            // Not an outage but a fault (a script error, a corrupt row): worth an operator's look.
            IngestError::Unavailable {
                cause: Some(crate::queue::Error::Other(e)),
                ..
            } => tracing::error!(
                source,
                error = format!("{e:#}"),
                "The queue failed to take a lead; the sender was asked to retry."
            ),
            // A platform that fails its check is usually misconfigured and losing leads.
            IngestError::Forbidden(reason) => tracing::warn!(
                source,
                reason = reason.as_str(),
                "Refused a platform request whose key or signature did not verify."
            ),
            // A wrong app secret or verify token refuses every real request too: make it seen.
            IngestError::InvalidSignature(reason) => tracing::warn!(
                source,
                reason,
                "Refused a webhook whose signature does not verify; if the platform's own requests are refused, check the source's app secret."
            ),
            IngestError::HandshakeRefused => tracing::warn!(
                source,
                "Refused a subscription handshake; if it came from the platform, check the source's verify_token."
            ),
            other => tracing::debug!(source, code = other.code(), "Refused a request."),
        }
    }

    /// The answer for a client that reads JSON.
    pub fn json_response(&self) -> HttpResponse {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.public_message(),
                fields: self.fields(),
            },
        };
        let mut response = HttpResponse::build(self.status());
        if let Some(after) = self.retry_after() {
            response.insert_header((header::RETRY_AFTER, retry_after_seconds(after).to_string()));
        }
        if matches!(self, IngestError::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let IngestError::MethodNotAllowed { allowed } = self {
            response.insert_header((header::ALLOW, allowed.as_ref()));
        }
        self.close_if_unread(&mut response);
        response.json(body)
    }

    /// The answer for a person who submitted a plain HTML form: a readable page.
    pub fn html_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status());
        if let Some(after) = self.retry_after() {
            response.insert_header((header::RETRY_AFTER, retry_after_seconds(after).to_string()));
        }
        self.close_if_unread(&mut response);
        response
            .content_type("text/html; charset=utf-8")
            .body(crate::http::pages::error_page(self).into_string())
    }
}

impl IngestError {
    /// A body that timed out is still (slowly) arriving: the connection cannot carry another
    /// request, so the answer closes it rather than wait for the rest. A body of ambiguous
    /// length has no trustworthy end at all (RFC 9112 §6.1: close after answering).
    fn close_if_unread(&self, response: &mut actix_web::HttpResponseBuilder) {
        if matches!(
            self,
            IngestError::BodyTimeout { .. } | IngestError::AmbiguousLength
        ) {
            response.force_close();
        }
    }
}

/// Whole seconds, rounded up, at least 1: `Retry-After: 0` would invite a hot loop.
pub fn retry_after_seconds(after: Duration) -> u64 {
    after.as_secs_f64().ceil().max(1.0) as u64
}

impl From<crate::queue::Error> for IngestError {
    fn from(e: crate::queue::Error) -> Self {
        IngestError::Unavailable {
            retry_after: Duration::from_secs(5),
            cause: Some(e),
        }
    }
}

impl From<crate::sources::body::BodyError> for IngestError {
    fn from(e: crate::sources::body::BodyError) -> Self {
        use crate::sources::body::BodyError;
        match e {
            BodyError::UnsupportedMediaType { .. } => {
                IngestError::UnsupportedMediaType(e.to_string())
            }
            // Only a part inside the body can be too large here; the body itself was bounded
            // before decoding.
            BodyError::TooLarge { message, fields } => {
                IngestError::PartTooLarge { message, fields }
            }
            BodyError::Malformed { message } => IngestError::Malformed(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// One error of each variant, and of each rejection code.
    fn one_of_each() -> Vec<IngestError> {
        let rejected = |code| {
            IngestError::Rejected(Rejection {
                code,
                message: String::new(),
                fields: BTreeMap::new(),
            })
        };
        let errors = vec![
            IngestError::UnknownSource("nope".to_owned()),
            IngestError::Unauthorized,
            IngestError::OriginNotAllowed("https://evil.example".to_owned()),
            IngestError::Forbidden(String::new()),
            IngestError::InvalidSignature("the signature does not match"),
            IngestError::HandshakeRefused,
            IngestError::UnsupportedMediaType(String::new()),
            IngestError::UnsupportedEncoding("gzip".to_owned()),
            IngestError::Malformed(String::new()),
            IngestError::AmbiguousLength,
            IngestError::TooLarge { limit: 1 },
            IngestError::PartTooLarge {
                message: String::new(),
                fields: BTreeMap::new(),
            },
            IngestError::BodyTimeout {
                after: Duration::from_secs(1),
            },
            rejected(Rejection::VALIDATION_FAILED),
            rejected(Rejection::NAME_REQUIRED),
            rejected(Rejection::FIRST_NAME_REQUIRED),
            rejected(Rejection::LAST_NAME_REQUIRED),
            IngestError::IdempotencyKeyReused,
            IngestError::RateLimited {
                retry_after: Duration::from_secs(1),
                scope: "ip",
            },
            IngestError::Unavailable {
                retry_after: Duration::from_secs(1),
                cause: None,
            },
            IngestError::Unavailable {
                retry_after: Duration::from_secs(1),
                cause: Some(crate::queue::Error::Other(anyhow::anyhow!("boom"))),
            },
            IngestError::MethodNotAllowed {
                allowed: "POST, OPTIONS".into(),
            },
        ];
        // No wildcard arm: a new variant fails to compile here until it is added above.
        for error in &errors {
            match error {
                IngestError::UnknownSource(_)
                | IngestError::MethodNotAllowed { .. }
                | IngestError::Unauthorized
                | IngestError::OriginNotAllowed(_)
                | IngestError::Forbidden(_)
                | IngestError::InvalidSignature(_)
                | IngestError::HandshakeRefused
                | IngestError::UnsupportedMediaType(_)
                | IngestError::UnsupportedEncoding(_)
                | IngestError::Malformed(_)
                | IngestError::AmbiguousLength
                | IngestError::TooLarge { .. }
                | IngestError::PartTooLarge { .. }
                | IngestError::BodyTimeout { .. }
                | IngestError::Rejected(_)
                | IngestError::IdempotencyKeyReused
                | IngestError::RateLimited { .. }
                | IngestError::Unavailable { .. } => {}
            }
        }
        errors
    }

    #[test]
    fn every_refusal_s_metric_outcome_is_listed_in_received_outcomes_and_nothing_else_is() {
        let produced: BTreeSet<&str> = one_of_each().iter().map(IngestError::outcome).collect();
        let listed: BTreeSet<&str> = IngestError::RECEIVED_OUTCOMES.iter().copied().collect();
        assert_eq!(listed.len(), IngestError::RECEIVED_OUTCOMES.len());
        let missing: Vec<_> = produced.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "missing from RECEIVED_OUTCOMES: {missing:?}"
        );
        let extra: Vec<_> = listed.difference(&produced).collect();
        assert_eq!(
            extra,
            [&"duplicate", &"queued"],
            "only the two answers that accept"
        );
    }

    #[test]
    fn every_error_code_is_listed_in_all_codes_and_nothing_else_is() {
        let errors = one_of_each();
        let produced: BTreeSet<&str> = errors.iter().map(IngestError::code).collect();
        let listed: BTreeSet<&str> = ALL_CODES.iter().copied().collect();
        assert_eq!(listed.len(), ALL_CODES.len(), "ALL_CODES has a duplicate");
        for code in &produced {
            assert!(listed.contains(code), "{code} is missing from ALL_CODES");
        }
        let extra: Vec<_> = listed.difference(&produced).collect();
        assert_eq!(
            extra,
            [&"not_found"],
            "ALL_CODES lists codes no error produces"
        );
    }

    #[test]
    fn a_lead_the_queue_could_not_take_is_a_503_to_retry_whatever_the_cause() {
        let causes = [
            crate::queue::Error::Unavailable("redis: connection refused".to_owned()),
            crate::queue::Error::Other(anyhow::anyhow!("ERR Error running script: secret detail")),
        ];
        for cause in causes {
            let error = IngestError::from(cause);
            let response = error.json_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                response.headers().get(header::RETRY_AFTER).unwrap(),
                "5",
                "the sender is told when to retry"
            );
            assert_eq!(error.code(), "unavailable");
            assert!(
                !error.public_message().contains("secret detail")
                    && !error.public_message().contains("redis"),
                "the cause stays in the log: {}",
                error.public_message()
            );
        }
    }
}
