//! Webflow form submissions (`preset = "webflow"`). JSON:
//!
//! ```json
//! { "triggerType": "form_submission",
//!   "payload": { "name": "Contact", "siteId": "…", "formId": "…", "id": "…",
//!                "submittedAt": "2024-05-01T10:00:00.000Z",
//!                "data": {"Name": "Ana López", "Email": "ana@example.com",
//!                         "Phone Number": 15550000000},
//!                "schema": [ … ] } }
//! ```
//!
//! (The legacy v1 shape, `{name, site, data, d, _id}` at the top level, is read too.) Values
//! may be JSON numbers or booleans; they are forwarded as text with every digit. Fields arrive
//! under their Webflow field names; `form_name`, `site_id`, `form_id`, `submission_id` and
//! `submitted_at` reach the mapping when mapped. The submission `id` is the dedupe key.
//!
//! Webhooks created through an OAuth app (or the API with an app's secret) are signed:
//! `x-webflow-timestamp` (milliseconds since the epoch) and `x-webflow-signature`, the hex
//! HMAC-SHA256 of `"<timestamp>:<raw body>"` keyed with the app's client secret. A request
//! whose timestamp is more than five minutes from now is refused, so a captured request
//! cannot be replayed later. Webhooks created in the site dashboard are not signed: use
//! `auth = "key"` and `?key=…` in the URL for those.

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::Value;
use tracing::info;

use super::{hmac_matches, one_lead, push_json};
use crate::config::Source;
use crate::error::IngestError;
use crate::lead::Inbound;
use crate::sources::{Item, Submission, Unverified, Verified, body, json_text, push_metadata};

/// How far a signed request's timestamp may be from now, either way.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

pub fn verify(
    secret: &SecretString,
    submission: &Submission<Unverified>,
    now: DateTime<Utc>,
) -> Result<(), IngestError> {
    let missing = |name: &str| {
        IngestError::Forbidden(format!(
            "the {name} header is missing; only webhooks created through a Webflow app are \
             signed (use auth = \"key\" for others)"
        ))
    };
    let timestamp = submission
        .header("x-webflow-timestamp")
        .ok_or_else(|| missing("x-webflow-timestamp"))?;
    let signature = submission
        .header("x-webflow-signature")
        .ok_or_else(|| missing("x-webflow-signature"))?;
    let presented = hex::decode(signature.trim())
        .map_err(|_| IngestError::Forbidden("x-webflow-signature is not hex".to_owned()))?;
    if !hmac_matches(
        secret,
        &[timestamp.as_bytes(), b":", &submission.body],
        &presented,
    ) {
        return Err(IngestError::Forbidden(
            "x-webflow-signature does not match the timestamp and body".to_owned(),
        ));
    }
    let sent_ms = timestamp_ms(timestamp).ok_or_else(|| {
        IngestError::Forbidden("x-webflow-timestamp is not a number of milliseconds".to_owned())
    })?;
    if sent_ms.abs_diff(now.timestamp_millis()) > MAX_SKEW_MS {
        return Err(IngestError::Forbidden(
            "x-webflow-timestamp is more than 5 minutes from now (a replayed request, or a \
             clock out of sync)"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Milliseconds, as Webflow documents; a value that can only be seconds (before 1973 as
/// milliseconds) is read as seconds.
fn timestamp_ms(text: &str) -> Option<i64> {
    let value: i64 = text.trim().parse().ok()?;
    if value.abs() < 100_000_000_000 {
        value.checked_mul(1000)
    } else {
        Some(value)
    }
}

/// Metadata offered to `[source.extra]`: the form's `name`, `siteId` (v1: `site`), `formId`,
/// the submission's `id` (v1: `_id`) and `submittedAt` (v1: `d`).
pub const METADATA: [&str; 5] = [
    "form_name",
    "site_id",
    "form_id",
    "submission_id",
    "submitted_at",
];

pub fn parse(source: &Source, submission: &Submission<Verified>) -> Result<Vec<Item>, IngestError> {
    let event = body::parse_json(&submission.body)?;
    let trigger = event.get("triggerType").and_then(Value::as_str);
    if trigger.is_some_and(|t| t != "form_submission") {
        info!(source = %source.id, trigger, "Ignored a Webflow event that is not a form submission.");
        return Ok(Vec::new());
    }
    let payload = event.get("payload").unwrap_or(&event);
    let data = payload
        .get("data")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            IngestError::Malformed("a Webflow form submission carries a data object".to_owned())
        })?;
    let mut fields = Inbound::new();
    for (name, value) in data {
        push_json(&mut fields, name, value);
    }
    let text = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| payload.get(*n).and_then(json_text))
    };
    let id = text(&["id", "_id"]);
    let posted_as: [&[&str]; 5] = [
        &["name"],
        &["siteId", "site"],
        &["formId"],
        &["id", "_id"],
        &["submittedAt", "d"],
    ];
    for (name, keys) in METADATA.iter().zip(posted_as) {
        push_metadata(source, &mut fields, name, text(keys));
    }
    Ok(one_lead(fields, id))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::super::test_support::{fields, hook, parse_one, source, submission};
    use super::*;

    const SECRET: &str = "webflow-client-secret";

    fn sign(timestamp: &str, body: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(b":");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn a_signature_within_five_minutes_verifies_and_a_stale_one_does_not() {
        let source = source("webflow", &format!("secret = \"{SECRET}\"\n"));
        let crate::config::sources::WebhookAuth::Signature(secret) = &hook(&source).auth else {
            panic!("signature by default");
        };
        let body = br#"{"payload":{"data":{"Name":"Jos\u00e9"}}}"#;
        let sent = Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).unwrap();
        let ts = sent.timestamp_millis().to_string();
        let signed = submission(
            &[
                ("x-webflow-timestamp", &ts),
                ("x-webflow-signature", &sign(&ts, body)),
            ],
            body,
        );
        let minutes = |m| sent + chrono::Duration::minutes(m);
        assert!(verify(secret, &signed, minutes(0)).is_ok());
        assert!(verify(secret, &signed, minutes(4)).is_ok());
        assert!(verify(secret, &signed, minutes(-4)).is_ok());
        assert!(verify(secret, &signed, minutes(6)).is_err());
        assert!(verify(secret, &signed, minutes(-6)).is_err());

        let other_ts = (sent.timestamp_millis() + 1).to_string();
        let moved = submission(
            &[
                ("x-webflow-timestamp", &other_ts),
                ("x-webflow-signature", &sign(&ts, body)),
            ],
            body,
        );
        assert!(verify(secret, &moved, minutes(0)).is_err());
        assert!(verify(secret, &submission(&[], body), minutes(0)).is_err());
    }

    #[tokio::test]
    async fn numbers_keep_their_digits_and_metadata_is_offered_when_mapped() {
        let source = source(
            "webflow",
            "auth = \"none\"\n[source.extra]\nform_name = \"1\"\n",
        );
        let body = br#"{"triggerType":"form_submission","payload":{"name":"Contact",
            "siteId":"S1","id":"6321a8f0a0e1b2c3d4e5f601","formId":"F1",
            "data":{"Name":"Ana","Phone Number":15550000000,"Subscribe":true,"Notes":null}}}"#;
        let item = parse_one(&source, &[], body).await;
        let f = fields(&item);
        assert_eq!(f.get("Phone Number").unwrap(), ["15550000000"]);
        assert_eq!(f.get("Subscribe").unwrap(), ["true"]);
        assert!(f.get("Notes").is_none());
        assert_eq!(f.get("form_name").unwrap(), ["Contact"]);
        assert!(f.get("site_id").is_none());
        assert_eq!(
            item.platform_id.as_deref(),
            Some("6321a8f0a0e1b2c3d4e5f601")
        );
    }
}
