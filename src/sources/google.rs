//! Google Ads lead forms (`kind = "google"`): Google POSTs each lead as JSON to the webhook URL
//! set in the lead form, with the key typed next to that URL in the body as `google_key`.
//! There is no signature: the key, compared in constant time, is the proof of origin, so the
//! URL must be HTTPS.
//!
//! The body (Google's "webhook implementation" page; ids are int64, sent as JSON numbers):
//!
//! ```json
//! { "lead_id": "…", "api_version": "1.0", "form_id": 40000000000, "campaign_id": …,
//!   "adgroup_id": …, "creative_id": …, "asset_group_id": …, "gcl_id": "…",
//!   "google_key": "…", "is_test": false, "lead_stage": "…", "lead_submit_time": "…",
//!   "user_column_data": [ {"column_id": "FULL_NAME", "column_name": "Full Name",
//!                          "string_value": "Ana López"}, … ] }
//! ```
//!
//! Answers are read by `column_id` (older payloads had only `column_name`, which is then
//! used); a custom question is read under its `column_id`, or its `column_name` when the
//! sources file maps that instead. Metadata (`lead_id`, `form_id`, `campaign_id`,
//! `adgroup_id`, `creative_id`, `gcl_id`, `asset_group_id`, `lead_stage`, `lead_submit_time`)
//! reaches the mapping under those names when the sources file maps them; ids keep every digit
//! whether they arrive as numbers or strings. Unknown top-level fields are ignored.
//! `lead_id` is the dedupe key; `is_test` marks "Send test data" leads.

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::{
    Content, Item, Submission, Unverified, Verified, body, json_text, pick_name, push_metadata,
};
use crate::config::Source;
use crate::error::IngestError;
use crate::lead::Inbound;

/// Metadata offered to `[source.extra]` by Google's own names.
pub const METADATA: [&str; 9] = [
    "lead_id",
    "form_id",
    "campaign_id",
    "adgroup_id",
    "creative_id",
    "gcl_id",
    "asset_group_id",
    "lead_stage",
    "lead_submit_time",
];

/// Compares the body's `google_key` with the configured key, in constant time. An empty or
/// missing key never matches (Google sends `""` when the form has no key).
pub fn verify(
    google_key: &SecretString,
    submission: &Submission<Unverified>,
) -> Result<(), IngestError> {
    let lead = lead_object(&submission.body)?;
    // Google's own test sample spells it `Google_key`; real deliveries use `google_key`.
    let presented = lead
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("google_key"))
        .and_then(|(_, value)| value.as_str())
        .unwrap_or("");
    if presented.is_empty() {
        return Err(IngestError::Forbidden(
            "google_key is missing or empty; type the source's key next to the webhook URL \
             in the lead form"
                .to_owned(),
        ));
    }
    if bool::from(
        google_key
            .expose_secret()
            .as_bytes()
            .ct_eq(presented.as_bytes()),
    ) {
        Ok(())
    } else {
        Err(IngestError::Forbidden(
            "google_key does not match the key configured for this source".to_owned(),
        ))
    }
}

/// Reads one lead: its answers, the metadata the sources file maps, its id and test flag.
pub fn parse(source: &Source, submission: Submission<Verified>) -> Result<Vec<Item>, IngestError> {
    let lead = lead_object(&submission.body)?;
    let mut inbound = Inbound::new();
    if let Some(Value::Array(columns)) = lead.get("user_column_data") {
        for column in columns {
            let id = column.get("column_id").and_then(Value::as_str);
            let label = column.get("column_name").and_then(Value::as_str);
            let (Some(name), Some(value)) = (pick_name(source, &[id, label]), column_value(column))
            else {
                continue;
            };
            inbound.push(name, value);
        }
    }
    for name in METADATA {
        push_metadata(
            source,
            &mut inbound,
            name,
            lead.get(name).and_then(json_text),
        );
    }
    let lead_id = lead
        .get("lead_id")
        .and_then(json_text)
        .filter(|id| !id.trim().is_empty());
    let test = lead.get("is_test").is_some_and(is_true);
    Ok(vec![Item {
        content: Content::Fields(inbound),
        platform_id: lead_id,
        test,
    }])
}

fn lead_object(body: &[u8]) -> Result<Map<String, Value>, IngestError> {
    match body::parse_json(body)? {
        Value::Object(lead) => Ok(lead),
        _ => Err(IngestError::Malformed(
            "a Google Ads lead is a JSON object".to_owned(),
        )),
    }
}

/// `string_value`; any other `…_value` Google may add later is read the same way.
fn column_value(column: &Value) -> Option<String> {
    column.get("string_value").and_then(json_text).or_else(|| {
        column
            .as_object()?
            .iter()
            .find(|(name, _)| name.ends_with("_value"))
            .and_then(|(_, value)| json_text(value))
    })
}

/// `true`, or the string `"true"` (liberal in what is accepted).
fn is_true(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::String(s) => s.trim().eq_ignore_ascii_case("true"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderMap;
    use bytes::Bytes;

    fn source(extra: &str) -> std::sync::Arc<Source> {
        let text = format!(
            "[[source]]\nid = \"g\"\nkind = \"google\"\ngoogle_key = \"google-key-0123456789\"\n{extra}"
        );
        let sources = crate::config::Sources::parse("t.toml", &text, |_| None).unwrap();
        sources.get("g").unwrap().clone()
    }

    fn submission(body: &str) -> Submission<Unverified> {
        Submission::new(HeaderMap::new(), Bytes::from(body.to_owned()), None)
    }

    fn parsed(source: &Source, body: &str) -> Item {
        let submission = submission(body);
        let verified = super::super::verify(source, submission).unwrap();
        parse(source, verified).unwrap().pop().unwrap()
    }

    #[test]
    fn the_configured_key_verifies_and_others_do_not() {
        let source = source("");
        let crate::config::SourceKind::Google { google_key } = &source.kind else {
            panic!("a google source");
        };
        let ok = r#"{"google_key":"google-key-0123456789"}"#;
        assert!(verify(google_key, &submission(ok)).is_ok());
        for bad in [
            r#"{"google_key":"google-key-0123456780"}"#,
            r#"{"google_key":""}"#,
            r#"{}"#,
            r#"{"google_key":123}"#,
        ] {
            let err = verify(google_key, &submission(bad)).unwrap_err();
            assert_eq!(err.code(), "forbidden", "{bad}");
        }
        let capital = r#"{"Google_key":"google-key-0123456789"}"#;
        assert!(verify(google_key, &submission(capital)).is_ok());
    }

    #[test]
    fn ids_beyond_2_pow_53_keep_every_digit_as_numbers_or_strings() {
        let source = source("[source.extra]\nform_id = \"1\"\ncampaign_id = \"2\"\n");
        let item = parsed(
            &source,
            r#"{"google_key":"google-key-0123456789","lead_id":"L1",
                "form_id":9007199254740993,"campaign_id":"18014398509481985"}"#,
        );
        let Content::Fields(fields) = item.content else {
            panic!("fields");
        };
        assert_eq!(fields.get("form_id").unwrap(), ["9007199254740993"]);
        assert_eq!(fields.get("campaign_id").unwrap(), ["18014398509481985"]);
        assert_eq!(item.platform_id.as_deref(), Some("L1"));
    }

    #[test]
    fn a_column_is_read_by_its_name_when_the_table_maps_the_name() {
        let source = source("[source.extra]\n\"Preferred day\" = \"7\"\n");
        let item = parsed(
            &source,
            r#"{"google_key":"google-key-0123456789","user_column_data":[
                {"column_id":"QUESTION_1","column_name":"Preferred day","string_value":"Monday"},
                {"column_id":"QUESTION_2","column_name":"Budget","string_value":"5k"},
                {"column_name":"Old style","string_value":"x"}]}"#,
        );
        let Content::Fields(fields) = item.content else {
            panic!("fields");
        };
        assert_eq!(fields.get("Preferred day").unwrap(), ["Monday"]);
        assert_eq!(fields.get("QUESTION_2").unwrap(), ["5k"]);
        assert_eq!(fields.get("Old style").unwrap(), ["x"]);
        assert!(fields.get("QUESTION_1").is_none());
    }

    #[test]
    fn unmapped_metadata_and_the_key_never_become_fields() {
        let source = source("");
        let item = parsed(
            &source,
            r#"{"google_key":"google-key-0123456789","lead_id":"L2","form_id":1,
                "is_test":true,"surprise":{"new":"field"}}"#,
        );
        let Content::Fields(fields) = item.content else {
            panic!("fields");
        };
        assert!(fields.is_empty(), "{fields:?}");
        assert!(item.test);
    }
}
