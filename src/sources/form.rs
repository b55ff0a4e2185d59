//! Website forms: posted by a browser as the form's `action`, or by JavaScript with `fetch`.
//! Verification is the browser's `Origin`: a page on an origin the source does not allow may
//! not post (same-origin pages always may). Requests without `Origin` (old browsers, curl,
//! server-side posts) are accepted: the origin check protects against other sites' pages, not
//! against scripts, which the rate limits handle.

use super::{Parsed, Submission, Unverified, Verified, body, body_error, body_limits};
use crate::config::Source;
use crate::error::IngestError;

pub fn verify(source: &Source, submission: &Submission<Unverified>) -> Result<(), IngestError> {
    match submission.header("origin") {
        None => Ok(()),
        Some(origin) if is_allowed(source, origin, submission.own_origin.as_deref()) => Ok(()),
        Some(origin) => Err(IngestError::OriginNotAllowed(origin.to_owned())),
    }
}

/// Whether a page at `origin` may post to `source`: allow-listed, or the gateway's own origin.
pub fn is_allowed(source: &Source, origin: &str, own_origin: Option<&str>) -> bool {
    source.allows_origin(origin) || own_origin.is_some_and(|own| own.eq_ignore_ascii_case(origin))
}

pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Parsed, IngestError> {
    let decoded = body::decode(
        submission.content_type(),
        submission.body.clone(),
        &body_limits(source),
    )
    .await
    .map_err(|e| body_error(source, e))?;
    match decoded {
        body::Decoded::Fields(fields) => Ok(Parsed::Fields(fields)),
        body::Decoded::Json(value) => Ok(Parsed::Fields(
            body::json_to_fields(&value, &body_limits(source))
                .map_err(|e| body_error(source, e))?,
        )),
    }
}
