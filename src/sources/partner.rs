//! Partner systems pushing leads with their own API key: `Authorization: Bearer <key>`,
//! compared in constant time with every configured key. The body is JSON, either flat fields
//! (as forms use) or Leadsin's own shape.

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::{Content, Submission, Unverified, Verified, body, body_limits};
use crate::config::Source;
use crate::error::IngestError;
use crate::mapping;

pub fn verify(
    api_keys: &[SecretString],
    submission: &Submission<Unverified>,
) -> Result<(), IngestError> {
    let presented = bearer(&submission.headers).ok_or(IngestError::Unauthorized)?;
    if matches_any(presented, api_keys) {
        Ok(())
    } else {
        Err(IngestError::Unauthorized)
    }
}

/// The key of an `Authorization: Bearer <key>` header.
pub fn bearer(headers: &actix_web::http::header::HeaderMap) -> Option<&str> {
    let value = headers
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Compares with every key, without stopping early, so timing says nothing about which key
/// nearly matched. Length differences are not secret.
pub fn matches_any(presented: &str, keys: &[SecretString]) -> bool {
    let mut matched = subtle::Choice::from(0);
    for key in keys {
        matched |= key.expose_secret().as_bytes().ct_eq(presented.as_bytes());
    }
    bool::from(matched)
}

pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Content, IngestError> {
    let decoded = body::decode(
        submission.content_type(),
        submission.body.clone(),
        &body_limits(source),
    )
    .await
    .map_err(IngestError::from)?;
    match decoded {
        body::Decoded::Json(value) if mapping::looks_like_leadsin(&value, &source.mapping) => {
            body::check_leadsin_limits(&value, &body_limits(source))?;
            Ok(Content::leadsin(value))
        }
        body::Decoded::Json(value) => Ok(Content::Fields(
            body::json_to_fields(&value, &body_limits(source)).map_err(IngestError::from)?,
        )),
        body::Decoded::Fields(_) => Err(IngestError::UnsupportedMediaType(
            "partner sources accept application/json only".to_owned(),
        )),
    }
}
