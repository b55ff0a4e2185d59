//! Typeform (`preset = "typeform"`). JSON:
//!
//! ```json
//! { "event_id": "…", "event_type": "form_response",
//!   "form_response": { "form_id": "…", "token": "…", "landed_at": "…", "submitted_at": "…",
//!     "hidden": {"utm_source": "…"},
//!     "definition": {"fields": [{"id": "…", "ref": "…", "title": "…", "type": "…"}]},
//!     "answers": [{"type": "email", "email": "…", "field": {"id": "…", "ref": "…"}}, …] } }
//! ```
//!
//! Signed with `Typeform-Signature: sha256=<base64 HMAC-SHA256 of the raw body>` when the
//! webhook has a secret. Each answer is read under its field `ref` (or its title, or its id,
//! whichever the sources file maps); its value is the entry named by its `type`, with choices
//! (`choice.label`, `choices.labels[]`, and any `other`) joined with `", "`. An email or phone
//! answer whose name the sources file does not map is read as `email` / `phone`, so the default
//! mapping finds it. Hidden fields arrive by their names; `token`, `form_id`, `submitted_at`,
//! `landed_at` and `event_id` reach the mapping when mapped. The dedupe key is the response
//! `token` (one per submission), else the `event_id`. Other event types give no lead.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::SecretString;
use serde_json::{Map, Value};
use tracing::info;

use super::{hmac_matches, one_lead};
use crate::config::Source;
use crate::error::IngestError;
use crate::lead::Inbound;
use crate::sources::{
    Item, Submission, Unverified, Verified, body, is_mapped, json_text, pick_name, push_metadata,
};

/// Metadata offered to `[source.extra]`: the response's `token`, `form_id`, `submitted_at`
/// and `landed_at`, and the event's `event_id`.
pub const METADATA: [&str; 5] = ["token", "form_id", "submitted_at", "landed_at", "event_id"];

pub fn verify(
    secret: &SecretString,
    submission: &Submission<Unverified>,
) -> Result<(), IngestError> {
    let header = submission.header("typeform-signature").ok_or_else(|| {
        IngestError::Forbidden(
            "the Typeform-Signature header is missing; set the same secret in Typeform's \
             webhook settings"
                .to_owned(),
        )
    })?;
    let presented = header
        .trim()
        .strip_prefix("sha256=")
        .and_then(|encoded| STANDARD.decode(encoded).ok())
        .ok_or_else(|| {
            IngestError::Forbidden(
                "Typeform-Signature is not sha256= followed by base64".to_owned(),
            )
        })?;
    if hmac_matches(secret, &[&submission.body], &presented) {
        Ok(())
    } else {
        Err(IngestError::Forbidden(
            "Typeform-Signature does not match the body".to_owned(),
        ))
    }
}

pub fn parse(source: &Source, submission: &Submission<Verified>) -> Result<Vec<Item>, IngestError> {
    let event = body::parse_json(&submission.body)?;
    let event_type = event.get("event_type").and_then(Value::as_str);
    if event_type.is_some_and(|t| t != "form_response") {
        info!(source = %source.id, event_type, "Ignored a Typeform event that is not a form response.");
        return Ok(Vec::new());
    }
    let response = event
        .get("form_response")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            IngestError::Malformed("a Typeform webhook carries a form_response object".to_owned())
        })?;

    let titles = field_titles(response);
    let mut fields = Inbound::new();
    for answer in response
        .get("answers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(value) = answer_text(answer) else {
            continue;
        };
        let field = answer.get("field");
        let id = field.and_then(|f| f.get("id")).and_then(Value::as_str);
        let reference = field.and_then(|f| f.get("ref")).and_then(Value::as_str);
        let title = id.and_then(|id| titles.get(id).map(String::as_str));
        let Some(mut name) = pick_name(source, &[reference, title, id]) else {
            continue;
        };
        if !is_mapped(source, name) {
            name = match answer.get("type").and_then(Value::as_str) {
                Some("email") => "email",
                Some("phone_number") => "phone",
                _ => name,
            };
        }
        fields.push(name, value);
    }
    if let Some(Value::Object(hidden)) = response.get("hidden") {
        for (name, value) in hidden {
            if let Some(text) = json_text(value) {
                fields.push(name, text);
            }
        }
    }
    for name in METADATA {
        let holder = if name == "event_id" {
            event.as_object()
        } else {
            Some(response)
        };
        let value = holder.and_then(|h| h.get(name)).and_then(json_text);
        push_metadata(source, &mut fields, name, value);
    }
    let id = response
        .get("token")
        .and_then(json_text)
        .or_else(|| event.get("event_id").and_then(json_text));
    Ok(one_lead(fields, id))
}

/// Question titles by field id, from the form definition sent with the response.
fn field_titles(response: &Map<String, Value>) -> std::collections::HashMap<String, String> {
    response
        .get("definition")
        .and_then(|d| d.get("fields"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|field| {
            Some((
                field.get("id")?.as_str()?.to_owned(),
                field.get("title")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The answer's value, found under the key its `type` names.
fn answer_text(answer: &Value) -> Option<String> {
    let kind = answer.get("type")?.as_str()?;
    let value = answer.get(kind)?;
    let text = match value {
        Value::Object(object) => {
            // choice: {label, other?}; choices: {labels[], other?}; payment: {amount, …}.
            let mut parts: Vec<String> = Vec::new();
            if let Some(label) = object.get("label").and_then(json_text) {
                parts.push(label);
            }
            if let Some(Value::Array(labels)) = object.get("labels") {
                parts.extend(labels.iter().filter_map(json_text));
            }
            if let Some(other) = object.get("other").and_then(json_text) {
                parts.push(other);
            }
            if parts.is_empty()
                && let Some(amount) = object.get("amount").and_then(json_text)
            {
                parts.push(amount);
            }
            parts.join(", ")
        }
        Value::Array(items) => items
            .iter()
            .filter_map(json_text)
            .collect::<Vec<_>>()
            .join(", "),
        scalar => json_text(scalar)?,
    };
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fields, hook, parse_one, source, submission};
    use super::*;

    const SECRET: &str = "typeform-secret";

    fn signature(body: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn the_signature_is_checked_over_the_raw_bytes() {
        let source = source("typeform", &format!("secret = \"{SECRET}\"\n"));
        let crate::config::sources::WebhookAuth::Signature(secret) = &hook(&source).auth else {
            panic!("signature by default");
        };
        let body = br#"{"form_response":{"answers":[{"type":"text","text":"Jos\u00e9"}]}}"#;
        let good = signature(body);
        assert!(verify(secret, &submission(&[("typeform-signature", &good)], body)).is_ok());
        let mut altered = body.to_vec();
        altered[30] ^= 1;
        assert!(
            verify(
                secret,
                &submission(&[("typeform-signature", &good)], &altered)
            )
            .is_err()
        );
        assert!(verify(secret, &submission(&[], body)).is_err());
        let hex_instead = format!("sha256={}", "ab".repeat(32));
        assert!(
            verify(
                secret,
                &submission(&[("typeform-signature", &hex_instead)], body)
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn answers_are_read_by_ref_title_or_type() {
        let source = source(
            "typeform",
            "auth = \"none\"\n[source.extra]\n\"Which plan?\" = \"1\"\ntoken = \"2\"\n",
        );
        let body = br#"{"event_id":"E1","event_type":"form_response","form_response":{
            "form_id":"F1","token":"T1","hidden":{"utm_source":"ads"},
            "definition":{"fields":[{"id":"a","ref":"0a1b","title":"Which plan?"},
                                    {"id":"b","ref":"1b2c","title":"Your email"}]},
            "answers":[
              {"type":"choices","choices":{"labels":["Pro","Team"],"other":"Custom"},
               "field":{"id":"a","ref":"0a1b","type":"multiple_choice"}},
              {"type":"email","email":"ana@example.com","field":{"id":"b","ref":"1b2c"}},
              {"type":"boolean","boolean":true,"field":{"id":"c","ref":"agree"}},
              {"type":"number","number":42,"field":{"id":"d","ref":"seats"}}]}}"#;
        let item = parse_one(&source, &[], body).await;
        let f = fields(&item);
        assert_eq!(f.get("Which plan?").unwrap(), ["Pro, Team, Custom"]);
        assert_eq!(f.get("email").unwrap(), ["ana@example.com"]);
        assert_eq!(f.get("agree").unwrap(), ["true"]);
        assert_eq!(f.get("seats").unwrap(), ["42"]);
        assert_eq!(f.get("utm_source").unwrap(), ["ads"]);
        assert_eq!(f.get("token").unwrap(), ["T1"]);
        assert!(f.get("form_id").is_none());
        assert_eq!(item.platform_id.as_deref(), Some("T1"));
    }
}
