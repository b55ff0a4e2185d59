//! Jotform (`preset = "jotform"`): a `multipart/form-data` POST (urlencoded is read too) with
//! `formID`, `submissionID`, `formTitle`, `pretty` and `rawRequest`, a JSON string of the
//! answers keyed `q<N>_<unique name>`:
//!
//! ```json
//! {"q3_name": {"first": "Ana", "last": "López"}, "q4_email": "ana@example.com",
//!  "q5_phoneNumber": {"full": "(555) 555-0100"}, "q6_interests": ["A", "B"],
//!  "q7_date": {"month": "05", "day": "01", "year": "2024"}, "slug": "…", "event_id": "…"}
//! ```
//!
//! Answers arrive under their unique name without the `q<N>_` prefix (`name`, `email`, …).
//! Lists are joined with `", "`. A phone (`full`, or `area` + `phone`) and a date (`year`,
//! `month`, `day`) become one value; other compound answers become one field per part,
//! `<name>.<part>` (`name.first`, `name.last`, `address.city`, …). Keys of `rawRequest` that
//! are not answers (`slug`, `event_id`, …) are ignored. `form_id`, `submission_id` and
//! `form_title` reach the mapping when mapped; `submissionID` is the dedupe key. Jotform
//! does not sign: the source checks a shared key in the URL. Without `rawRequest`, the posted
//! fields named `q<N>_…` (PHP style, `q3_name[first]`) are read instead.

use serde_json::{Map, Value};

use super::{fields_of, one_lead};
use crate::config::Source;
use crate::error::IngestError;
use crate::lead::Inbound;
use crate::sources::{Item, Submission, Verified, body, body_limits, json_text, push_metadata};

/// Metadata offered to `[source.extra]`, from `formID`, `submissionID` and `formTitle`.
pub const METADATA: [&str; 3] = ["form_id", "submission_id", "form_title"];

pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Vec<Item>, IngestError> {
    let limits = body_limits(source);
    let decoded = body::decode(submission.content_type(), submission.body.clone(), &limits).await?;
    let raw = match &decoded {
        body::Decoded::Json(value) => match value.get("rawRequest") {
            Some(Value::String(text)) => Some(raw_request(text)?),
            Some(Value::Object(object)) => Some(object.clone()),
            _ => None,
        },
        body::Decoded::Fields(fields) => match fields.get("rawRequest").and_then(|v| v.first()) {
            Some(text) => Some(raw_request(text)?),
            None => None,
        },
    };
    let posted = fields_of(decoded);

    let mut fields = Inbound::new();
    match raw {
        Some(raw) => {
            for (key, value) in &raw {
                if let Some(name) = answer_name(key) {
                    push_answer(&mut fields, name, value);
                }
            }
        }
        None => {
            for (key, values) in posted.iter() {
                let Some(name) = answer_name(key) else {
                    continue;
                };
                // `name[first]` → `name.first`
                let name = name.replace('[', ".").replace(']', "");
                for value in values {
                    fields.push(name.as_str(), value.clone());
                }
            }
        }
    }
    let first = |name: &str| posted.get(name).and_then(|v| v.first()).cloned();
    let id = first("submissionID");
    for (name, posted_as) in METADATA.iter().zip(["formID", "submissionID", "formTitle"]) {
        push_metadata(source, &mut fields, name, first(posted_as));
    }
    Ok(one_lead(fields, id))
}

fn raw_request(text: &str) -> Result<Map<String, Value>, IngestError> {
    match body::parse_json(text.as_bytes()) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(IngestError::Malformed(
            "the rawRequest field is not a JSON object".to_owned(),
        )),
    }
}

/// `q3_name` → `name`; keys without the `q<N>_` prefix are not answers.
fn answer_name(key: &str) -> Option<&str> {
    let rest = key.strip_prefix('q')?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let name = rest[digits..].strip_prefix('_')?;
    (digits > 0 && !name.is_empty()).then_some(name)
}

fn push_answer(fields: &mut Inbound, name: &str, value: &Value) {
    match value {
        Value::Object(parts) => {
            let part = |key: &str| parts.get(key).and_then(json_text).filter(|t| !t.is_empty());
            if let Some(full) = part("full") {
                fields.push(name, full);
            } else if let (Some(area), Some(phone)) = (part("area"), part("phone")) {
                fields.push(name, format!("{area} {phone}"));
            } else if let (Some(year), Some(month), Some(day)) =
                (part("year"), part("month"), part("day"))
            {
                fields.push(name, format!("{year}-{month:0>2}-{day:0>2}"));
            } else {
                for (key, value) in parts {
                    if let Some(text) = joined(value) {
                        fields.push(format!("{name}.{key}"), text);
                    }
                }
            }
        }
        other => {
            if let Some(text) = joined(other) {
                fields.push(name, text);
            }
        }
    }
}

/// A scalar as text, a list of scalars joined with `", "`; blanks give nothing.
fn joined(value: &Value) -> Option<String> {
    let text = match value {
        Value::Array(items) => items
            .iter()
            .filter_map(json_text)
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
        other => json_text(other)?,
    };
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fields, parse_one, source, urlencode};
    use super::*;

    #[test]
    fn answer_names_lose_their_question_number() {
        assert_eq!(answer_name("q3_name"), Some("name"));
        assert_eq!(answer_name("q12_phoneNumber"), Some("phoneNumber"));
        assert_eq!(answer_name("slug"), None);
        assert_eq!(answer_name("q_name"), None);
        assert_eq!(answer_name("q3_"), None);
    }

    #[tokio::test]
    async fn raw_request_answers_become_fields() {
        let source = source(
            "jotform",
            "auth = \"none\"\n[source.extra]\nsubmission_id = \"1\"\n",
        );
        let raw = r#"{"slug":"submit/1","q3_name":{"first":"Ana","last":"López"},
            "q4_email":"ana@example.com","q5_phoneNumber":{"area":"555","phone":"5550100"},
            "q6_interests":["A","B"],"q7_date":{"month":"5","day":"1","year":"2024"},
            "q8_address":{"addr_line1":"1 Main St","city":"Springfield","state":""}}"#;
        let body = urlencode(&[
            ("formID", "241234567890123"),
            ("submissionID", "5912345678901234567"),
            ("rawRequest", raw),
        ]);
        let item = parse_one(
            &source,
            &[("content-type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )
        .await;
        let f = fields(&item);
        assert_eq!(f.get("name.first").unwrap(), ["Ana"]);
        assert_eq!(f.get("name.last").unwrap(), ["López"]);
        assert_eq!(f.get("email").unwrap(), ["ana@example.com"]);
        assert_eq!(f.get("phoneNumber").unwrap(), ["555 5550100"]);
        assert_eq!(f.get("interests").unwrap(), ["A, B"]);
        assert_eq!(f.get("date").unwrap(), ["2024-05-01"]);
        assert_eq!(f.get("address.city").unwrap(), ["Springfield"]);
        assert!(f.get("address.state").is_none());
        assert!(f.get("slug").is_none());
        assert_eq!(f.get("submission_id").unwrap(), ["5912345678901234567"]);
        assert!(f.get("form_id").is_none());
        assert_eq!(item.platform_id.as_deref(), Some("5912345678901234567"));
    }
}
