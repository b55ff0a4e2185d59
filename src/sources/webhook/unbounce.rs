//! Unbounce (`preset = "unbounce"`). By default an `application/x-www-form-urlencoded` POST
//! with `page_id`, `page_url`, `page_name`, `variant`, `data.json` and `data.xml`; `data.json`
//! holds the submission as a JSON object whose every value is a list of strings:
//!
//! ```json
//! {"first_name": ["Ana"], "email": ["ana@example.com"], "ip_address": ["203.0.113.9"],
//!  "page_uuid": ["…"], "variant": ["a"], "time_submitted": ["10:57 PM UTC"],
//!  "date_submitted": ["2024-05-01"], "page_url": ["…"], "page_name": ["…"]}
//! ```
//!
//! Each form field arrives under its Unbounce field name. The page's details (`page_id`,
//! `page_url`, `page_name`, `variant`, `page_uuid`, `ip_address`, `date_submitted`,
//! `time_submitted`) reach the mapping when mapped. Unbounce does not sign its requests: the
//! source checks a shared key in the URL. Unbounce sends no submission id: the dedupe key is
//! the page id, the submission's date and time, and an HMAC-SHA256 keyed with the source's key
//! (a SHA-256 with `auth = "none"`) of `data.json` (of the flat fields when there is none) —
//! what a redelivery resends unchanged. A submission without its date and time has no dedupe
//! key: identical content may be a genuine repeat. Unconfirmed, and so
//! accepted liberally: a JSON delivery (chosen in Unbounce's settings) is read the same way,
//! with `data.json` as a string or an object, or the body itself as the data; a body without
//! `data.json` is read as flat fields.

use secrecy::SecretString;
use serde_json::Value;

use super::{field_parts, fields_of, fingerprint, has_timestamp, one_lead, push_json};
use crate::config::Source;
use crate::error::IngestError;
use crate::lead::Inbound;
use crate::sources::{Item, Submission, Verified, body, body_limits, json_text, push_metadata};

/// Unbounce's own parameters, at the top level or inside `data.json`, offered to
/// `[source.extra]` by these names.
pub const METADATA: [&str; 8] = [
    "page_id",
    "page_url",
    "page_name",
    "variant",
    "page_uuid",
    "ip_address",
    "date_submitted",
    "time_submitted",
];

pub async fn parse(
    source: &Source,
    key: Option<&SecretString>,
    submission: Submission<Verified>,
) -> Result<Vec<Item>, IngestError> {
    let limits = body_limits(source);
    let decoded = body::decode(submission.content_type(), submission.body.clone(), &limits).await?;
    let (top, data) = match decoded {
        body::Decoded::Fields(fields) => {
            let data = match fields.get("data.json").and_then(|v| v.first()) {
                Some(text) => Some(body::parse_json(text.as_bytes()).map_err(|_| {
                    IngestError::Malformed("the data.json field is not valid JSON".to_owned())
                })?),
                None => None,
            };
            (fields, data)
        }
        body::Decoded::Json(value) => {
            let data = match value.get("data.json") {
                Some(Value::String(text)) => Some(body::parse_json(text.as_bytes())?),
                Some(object @ Value::Object(_)) => Some(object.clone()),
                _ => Some(value.clone()),
            };
            (fields_of(body::Decoded::Json(value)), data)
        }
    };

    // Unbounce sends no submission id; a redelivery resends the same submission, so its
    // fingerprint is the dedupe key.
    let digest = match &data {
        Some(data) => fingerprint(key, [data.to_string().as_str()]),
        None => fingerprint(key, field_parts(&top).iter().map(String::as_str)),
    };

    let mut fields = Inbound::new();
    let mut metadata: Vec<(&str, String)> = Vec::new();
    let mut note_metadata = |name: &'static str, value: Option<String>| {
        if let Some(value) = value
            && !metadata.iter().any(|(n, _)| *n == name)
        {
            metadata.push((name, value));
        }
    };
    for name in METADATA {
        note_metadata(name, top.get(name).and_then(|v| v.first()).cloned());
    }
    match data {
        Some(Value::Object(data)) => {
            for (name, value) in &data {
                match METADATA.iter().find(|m| **m == name.as_str()) {
                    Some(meta) => note_metadata(meta, first_text(value)),
                    None => push_json(&mut fields, name, value),
                }
            }
        }
        Some(_) => {
            return Err(IngestError::Malformed(
                "data.json must hold a JSON object".to_owned(),
            ));
        }
        None => {
            for (name, values) in top.iter() {
                if !METADATA.contains(&name) && name != "data.xml" {
                    for value in values {
                        fields.push(name, value.clone());
                    }
                }
            }
        }
    }
    let meta = |name: &str| {
        metadata
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    // Only with the submission's date and time is the fingerprint one submission's: without
    // them, the same content sent again on purpose is another lead.
    let id = has_timestamp(meta("date_submitted"), meta("time_submitted")).then(|| {
        format!(
            "unbounce:{}:{} {}:{digest}",
            meta("page_id").unwrap_or(""),
            meta("date_submitted").unwrap_or(""),
            meta("time_submitted").unwrap_or("")
        )
    });
    for (name, value) in metadata {
        push_metadata(source, &mut fields, name, Some(value));
    }
    Ok(one_lead(fields, id))
}

fn first_text(value: &Value) -> Option<String> {
    match value {
        Value::Array(items) => items.first().and_then(json_text),
        other => json_text(other),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fields, parse_one, source};

    #[tokio::test]
    async fn data_json_lists_become_fields_and_page_details_metadata() {
        let source = source(
            "unbounce",
            "auth = \"none\"\n[source.extra]\npage_id = \"1\"\nvariant = \"2\"\n",
        );
        let data = r#"{"email":["ana@example.com"],"interests":["a","b"],"variant":["b"],"ip_address":["203.0.113.9"]}"#;
        let body = crate::sources::webhook::test_support::urlencode(&[
            ("page_id", "f0e1d2c3-0000-4000-8000-000000000001"),
            ("page_url", "https://unbouncepages.com/spring/"),
            ("variant", "a"),
            ("data.json", data),
        ]);
        let item = parse_one(
            &source,
            &[("content-type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )
        .await;
        let f = fields(&item);
        assert_eq!(f.get("email").unwrap(), ["ana@example.com"]);
        assert_eq!(f.get("interests").unwrap(), ["a", "b"]);
        assert_eq!(f.get("variant").unwrap(), ["a"]);
        assert_eq!(
            f.get("page_id").unwrap(),
            ["f0e1d2c3-0000-4000-8000-000000000001"]
        );
        assert!(f.get("ip_address").is_none());
        assert!(f.get("page_url").is_none());
    }

    async fn id_of(page_id: &str, data: &str) -> Option<String> {
        id_with(page_id, data, "auth = \"none\"\n").await
    }

    async fn id_with(page_id: &str, data: &str, auth: &str) -> Option<String> {
        let source = source("unbounce", auth);
        let body = crate::sources::webhook::test_support::urlencode(&[
            ("page_id", page_id),
            ("variant", "a"),
            ("data.json", data),
        ]);
        let verified = crate::sources::verify(
            &source,
            crate::sources::webhook::test_support::submission(
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("x-leadgate-key", "unbounce-key-0123456789"),
                ],
                body.as_bytes(),
            ),
        )
        .unwrap();
        let hook = crate::sources::webhook::test_support::hook(&source);
        let mut items = crate::sources::webhook::parse(&source, hook, verified)
            .await
            .unwrap();
        items.pop().unwrap().platform_id
    }

    #[tokio::test]
    async fn a_resent_submission_has_the_same_dedupe_key_and_another_submission_does_not() {
        let data = r#"{"email":["ana@example.com"],"date_submitted":["2024-05-01"],"time_submitted":["10:57 PM UTC"]}"#;
        let first = id_of("p1", data).await.unwrap();
        assert!(
            first.starts_with("unbounce:p1:2024-05-01 10:57 PM UTC:"),
            "{first}"
        );
        assert_eq!(
            first.len(),
            "unbounce:p1:2024-05-01 10:57 PM UTC:".len() + 64
        );
        // The same JSON written with other spacing is the same submission.
        let spaced = data.replace("],", "], ").replace("\":[", "\": [ ");
        assert_eq!(id_of("p1", &spaced).await.unwrap(), first);
        let other = data.replace("ana@", "ana.b@");
        assert_ne!(id_of("p1", &other).await.unwrap(), first);
        assert_ne!(id_of("p2", data).await.unwrap(), first);
    }

    #[tokio::test]
    async fn a_submission_without_its_date_and_time_has_no_dedupe_key() {
        for data in [
            r#"{"email":["ana@example.com"]}"#,
            r#"{"email":["ana@example.com"],"date_submitted":["2024-05-01"]}"#,
            r#"{"email":["ana@example.com"],"date_submitted":["2024-05-01"],"time_submitted":[" "]}"#,
        ] {
            assert_eq!(id_of("p1", data).await, None, "{data}");
        }
    }

    #[tokio::test]
    async fn the_fingerprint_is_keyed_with_the_source_s_key() {
        let data = r#"{"email":["ana@example.com"],"date_submitted":["2024-05-01"],"time_submitted":["10:57 PM UTC"]}"#;
        let open = id_of("p1", data).await.unwrap();
        let keyed = |key: &'static str| async move {
            id_with("p1", data, &format!("secret = \"{key}\"\n"))
                .await
                .unwrap()
        };
        let first = keyed("unbounce-key-0123456789").await;
        assert_eq!(first.len(), open.len());
        assert_ne!(first, open, "keyed, not the plain SHA-256 of the data");
        assert_eq!(keyed("unbounce-key-0123456789").await, first);
    }
}
