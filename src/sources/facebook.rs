//! Meta (Facebook/Instagram) Lead Ads, `kind = "facebook"`.
//!
//! * `GET /in/{id}` answers Meta's subscription handshake ([`handshake`]).
//! * `POST /in/{id}` carries a notification: [`verify`] checks `X-Hub-Signature-256` over the
//!   raw bytes, [`parse`] turns every `entry[].changes[]` with `field = "leadgen"` into one
//!   [`Item`] holding the lead's ids only — Meta never sends the answers in the notification.
//! * The forwarder later reads the lead from the Graph API ([`crate::graph`]) and maps it with
//!   [`to_deliver`]: `field_data` by each question's key, plus the notification's metadata.
//!
//! Ids (page, form, ad, lead) can exceed 2^53, so they are kept as strings whether Meta sends
//! them as JSON strings or numbers, never through a float ([`meta_id`]).

use std::collections::HashMap;

use actix_web::web::Query;
use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tracing::warn;

use super::{Content, Item, Submission, Unverified, Verified};
use crate::config::{MetaSource, Source};
use crate::error::IngestError;
use crate::graph::GraphLead;
use crate::lead::{EmailType, Inbound, Input, LeadsinPayload, MetaLeadRef, PhoneType, Work};
use crate::mapping::{self, MappingRules, Target};

/// The longest `hub.challenge` echoed back. Meta sends a short integer; the cap only keeps the
/// endpoint from reflecting arbitrary amounts of text.
const MAX_CHALLENGE: usize = 256;

/// The names of Meta's metadata that `[source.extra]` (or `[source.fields]`) can map, with the
/// Graph lead's own fields (`adset_id`, `campaign_id`, `platform`, `is_organic`) besides the
/// notification's.
pub const METADATA: [&str; 10] = [
    "leadgen_id",
    "page_id",
    "form_id",
    "ad_id",
    "adgroup_id",
    "created_time",
    "adset_id",
    "campaign_id",
    "platform",
    "is_organic",
];

/// Meta's standard question keys and where they go when the source's tables do not say
/// otherwise. `job_title`, `date_of_birth`, `gender` and custom questions have no standard
/// Leadsin field: map them with `[source.extra]` (or they go to `unmapped_extra`).
pub fn default_fields() -> Vec<(String, Target)> {
    [
        ("full_name", Target::FullName),
        ("first_name", Target::FirstName),
        ("last_name", Target::LastName),
        ("email", Target::Email(EmailType::Work)),
        ("work_email", Target::Email(EmailType::Work)),
        ("phone_number", Target::Phone(PhoneType::Mobile)),
        ("work_phone_number", Target::Phone(PhoneType::Work)),
        ("company_name", Target::OrgName),
        ("street_address", Target::AddressLine1),
        ("city", Target::City),
        ("state", Target::Region),
        ("province", Target::Region),
        ("zip_code", Target::Postcode),
        ("post_code", Target::Postcode),
        ("country", Target::Country),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_owned(), t))
    .collect()
}

/// Meta's subscription check: `hub.mode=subscribe` and `hub.verify_token` equal (in constant
/// time) to the configured token answer the `hub.challenge` value, as plain text. Anything
/// else is refused; an empty configured token never verifies, so a missing token on both sides
/// cannot compare equal.
pub fn handshake(meta: &MetaSource, query: &str) -> Result<String, IngestError> {
    let params = Query::<HashMap<String, String>>::from_query(query)
        .map_err(|_| IngestError::HandshakeRefused)?
        .into_inner();
    let configured = meta.verify_token.expose_secret().as_bytes();
    let presented = params.get("hub.verify_token").map(String::as_bytes);
    let token_ok = match presented {
        Some(presented) if !configured.is_empty() => bool::from(configured.ct_eq(presented)),
        _ => false,
    };
    let mode_ok = params.get("hub.mode").is_some_and(|m| m == "subscribe");
    let challenge = params
        .get("hub.challenge")
        .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE)
        .filter(|c| c.bytes().all(|b| b.is_ascii_graphic()));
    match challenge {
        Some(challenge) if token_ok && mode_ok => Ok(challenge.clone()),
        _ => Err(IngestError::HandshakeRefused),
    }
}

/// `X-Hub-Signature-256: sha256=<hex>`: the HMAC-SHA256 of the body exactly as received, keyed
/// with the app secret, compared in constant time. Meta sends its body with non-ASCII text
/// `\u`-escaped and signs those bytes, so the raw bytes are what must be hashed — never JSON
/// parsed and serialised again.
pub fn verify(meta: &MetaSource, submission: &Submission<Unverified>) -> Result<(), IngestError> {
    let header = submission
        .header("x-hub-signature-256")
        .ok_or(IngestError::InvalidSignature(
            "the X-Hub-Signature-256 header is missing",
        ))?;
    let signature = header
        .trim()
        .strip_prefix("sha256=")
        .filter(|hex| hex.len() == 64)
        .and_then(|hex| hex::decode(hex).ok())
        .ok_or(IngestError::InvalidSignature(
            "X-Hub-Signature-256 must be sha256= followed by 64 hex digits",
        ))?;
    if signature_matches(
        meta.app_secret.expose_secret().as_bytes(),
        &submission.body,
        &signature,
    ) {
        Ok(())
    } else {
        Err(IngestError::InvalidSignature(
            "X-Hub-Signature-256 does not match the body",
        ))
    }
}

fn signature_matches(key: &[u8], body: &[u8], signature: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(signature).is_ok()
}

/// The notification's shape; unknown keys are ignored, as Meta adds fields over time.
#[derive(Deserialize)]
struct Notification {
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    /// The page id; read leniently (through [`LeadgenValue`]'s rules) so one odd entry cannot
    /// refuse the batch.
    #[serde(default)]
    id: serde_json::Value,
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Change {
    #[serde(default)]
    field: String,
    #[serde(default)]
    value: serde_json::Value,
}

#[derive(Deserialize)]
struct LeadgenValue {
    #[serde(with = "meta_id")]
    leadgen_id: String,
    #[serde(default, with = "meta_id::option")]
    page_id: Option<String>,
    #[serde(default, with = "meta_id::option")]
    form_id: Option<String>,
    #[serde(default, with = "meta_id::option")]
    ad_id: Option<String>,
    #[serde(default, with = "meta_id::option")]
    adgroup_id: Option<String>,
    /// Unix seconds in Meta's sample; a string is taken too.
    #[serde(default, with = "meta_id::option")]
    created_time: Option<String>,
}

/// Every `leadgen` change of every entry becomes one item, deduplicated on its `leadgen_id`.
/// A change that cannot be read (no lead id) is logged and skipped rather than refusing the
/// batch: Meta would redeliver the whole batch for 36 hours, holding up the good leads in it.
pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Vec<Item>, IngestError> {
    let notification: Notification = serde_json::from_slice(&submission.body).map_err(|e| {
        IngestError::Malformed(format!("the body is not a Meta webhook notification: {e}"))
    })?;
    let mut items = Vec::new();
    for (entry_index, entry) in notification.entry.into_iter().enumerate() {
        for change in entry.changes {
            if change.field != "leadgen" {
                continue;
            }
            let value = match LeadgenValue::deserialize(&change.value) {
                Ok(value) => value,
                Err(e) => {
                    warn!(source = %source.id, entry = entry_index, error = %e, "Skipped a leadgen change that carries no readable lead id.");
                    continue;
                }
            };
            let entry_page = meta_id::deserialize(&entry.id).ok();
            let Some(page_id) = value.page_id.or(entry_page) else {
                warn!(source = %source.id, entry = entry_index, leadgen_id = %value.leadgen_id, "Skipped a leadgen change without a page id.");
                continue;
            };
            let lead = MetaLeadRef {
                leadgen_id: value.leadgen_id.clone(),
                page_id,
                form_id: value.form_id,
                ad_id: value.ad_id,
                adgroup_id: value.adgroup_id,
                created_time: value.created_time,
            };
            items.push(Item {
                content: Content::Meta(lead),
                platform_id: Some(value.leadgen_id),
                test: false,
            });
        }
    }
    Ok(items)
}

/// Maps a lead read from the Graph API with the source's rules: the work to deliver, its
/// payload, and the names of the fields the lenient mapping had to repair (never values).
pub fn to_deliver(
    source: &Source,
    lead: &MetaLeadRef,
    graph: &GraphLead,
) -> (LeadsinPayload, Work, mapping::Repairs) {
    let inbound = inbound(lead, graph, &source.mapping);
    let (payload, repaired) = mapping::map_fields_lenient(&inbound, &source.mapping);
    let work = Work::Deliver {
        payload: payload.clone(),
        input: Input::from_inbound(&inbound),
    };
    (payload, work, repaired)
}

/// The fields of a Graph lead: `field_data` by each question's key, in Meta's order, then the
/// metadata the source maps (metadata it does not map is left out, so it never fills the
/// unmapped-fields note). A question whose key equals a metadata name keeps its own value.
pub fn inbound(lead: &MetaLeadRef, graph: &GraphLead, rules: &MappingRules) -> Inbound {
    let mut inbound = Inbound::new();
    for field in &graph.field_data {
        for value in &field.values {
            inbound.push(field.name.as_str(), value.as_str());
        }
    }
    let mapped = |name: &str| {
        rules.fields.iter().any(|(f, _)| f == name) || rules.extra.iter().any(|(f, _)| f == name)
    };
    let created_time = graph
        .created_time
        .as_deref()
        .or(lead.created_time.as_deref())
        .map(onpipeline_time);
    let metadata = [
        ("leadgen_id", Some(lead.leadgen_id.clone())),
        ("page_id", Some(lead.page_id.clone())),
        (
            "form_id",
            graph.form_id.clone().or_else(|| lead.form_id.clone()),
        ),
        ("ad_id", graph.ad_id.clone().or_else(|| lead.ad_id.clone())),
        // The legacy name of the ad id: the notification's value, else Graph's ad id.
        (
            "adgroup_id",
            lead.adgroup_id.clone().or_else(|| graph.ad_id.clone()),
        ),
        ("created_time", created_time),
        ("adset_id", graph.adset_id.clone()),
        ("campaign_id", graph.campaign_id.clone()),
        ("platform", graph.platform.clone()),
        ("is_organic", graph.is_organic.map(|b| b.to_string())),
    ];
    for (name, value) in metadata {
        if let Some(value) = value
            && mapped(name)
            && inbound.get(name).is_none()
        {
            inbound.push(name, value);
        }
    }
    inbound
}

/// Meta's times — `2022-02-03T16:16:51+0000` from the Graph API, Unix seconds in
/// notifications, or RFC 3339 — as Onpipeline's DATETIME (`YYYY-MM-DD HH:MM:SS`, UTC). Text
/// that is none of these is kept as it came.
pub fn onpipeline_time(raw: &str) -> String {
    parse_time(raw)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| raw.trim().to_owned())
}

/// Parses the time forms Meta uses.
pub fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(seconds) = raw.parse::<i64>() {
        return DateTime::from_timestamp(seconds, 0);
    }
    DateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%z")
        .or_else(|_| DateTime::parse_from_rfc3339(raw))
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S")
                .ok()
                .map(|t| t.and_utc())
        })
}

/// Serde helpers for Meta ids: a JSON string, or a JSON integer written out in full. serde_json
/// reads integers up to 2^64 exactly (as `u64`/`i64`), so no digit is lost; a number with a
/// fraction or exponent, or beyond `u64`, cannot be an id and is refused.
pub mod meta_id {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    struct IdVisitor;

    impl Visitor<'_> for IdVisitor {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an id as a string or an integer")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            let v = v.trim();
            if v.is_empty() {
                return Err(E::custom("an id must not be empty"));
            }
            Ok(v.to_owned())
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
            Err(E::custom(
                "an id that is not a whole number below 2^64 cannot be kept exactly",
            ))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(IdVisitor)
    }

    /// The same, for optional ids: absent and `null` are `None`.
    pub mod option {
        use serde::{Deserialize, Deserializer};

        #[derive(Deserialize)]
        struct Id(#[serde(with = "super")] String);

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
            Ok(Option::<Id>::deserialize(d)?.map(|Id(id)| id))
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
    use bytes::Bytes;
    use secrecy::SecretString;

    use super::*;
    use crate::config::Sources;

    const SECRET: &str = "app-secret-for-tests";

    fn meta(verify_token: &str) -> MetaSource {
        MetaSource {
            app_secret: SecretString::from(SECRET),
            verify_token: SecretString::from(verify_token),
            page_tokens: Vec::new(),
            backfill_forms: Vec::new(),
            backfill_every: std::time::Duration::from_secs(600),
        }
    }

    fn sign(body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn submission(body: &'static [u8], signature: Option<&str>) -> Submission<Unverified> {
        let mut headers = HeaderMap::new();
        if let Some(signature) = signature {
            headers.insert(
                HeaderName::from_static("x-hub-signature-256"),
                HeaderValue::from_str(signature).unwrap(),
            );
        }
        Submission::new(headers, Bytes::from_static(body), None)
    }

    #[test]
    fn handshake_echoes_the_challenge_for_the_configured_token() {
        let query = "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=s3cret";
        assert_eq!(handshake(&meta("s3cret"), query).unwrap(), "1158201444");
    }

    #[test]
    fn handshake_refuses_a_wrong_token_a_wrong_mode_or_no_challenge() {
        let m = meta("s3cret");
        for query in [
            "hub.mode=subscribe&hub.challenge=1&hub.verify_token=nope",
            "hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=s3cret",
            "hub.mode=subscribe&hub.verify_token=s3cret",
            "hub.mode=subscribe&hub.challenge=%3Cscript%3E%20x&hub.verify_token=s3cret",
            "",
        ] {
            assert!(
                matches!(handshake(&m, query), Err(IngestError::HandshakeRefused)),
                "{query}"
            );
        }
    }

    #[test]
    fn an_empty_configured_token_never_verifies() {
        let m = meta("");
        for query in [
            "hub.mode=subscribe&hub.challenge=1&hub.verify_token=",
            "hub.mode=subscribe&hub.challenge=1",
        ] {
            assert!(handshake(&m, query).is_err(), "{query}");
        }
    }

    #[test]
    fn a_signature_over_the_escaped_bytes_verifies_and_one_over_decoded_text_does_not() {
        let escaped: &'static [u8] = br#"{"entry":[{"id":"1","changes":[{"field":"leadgen","value":{"leadgen_id":"2","note":"\u00e4\u00f6\u00e5"}}]}]}"#;
        let decoded = String::from_utf8(escaped.to_vec())
            .unwrap()
            .replace(r"\u00e4\u00f6\u00e5", "äöå");
        let m = meta("t");
        assert!(verify(&m, &submission(escaped, Some(&sign(escaped)))).is_ok());
        assert!(verify(&m, &submission(escaped, Some(&sign(decoded.as_bytes())))).is_err());
    }

    #[test]
    fn missing_malformed_and_wrong_signatures_are_refused() {
        let body: &'static [u8] = br#"{"entry":[]}"#;
        let m = meta("t");
        let good = sign(body);
        let upper = format!("sha256={}", good["sha256=".len()..].to_uppercase());
        assert!(
            verify(&m, &submission(body, Some(&upper))).is_ok(),
            "hex is case-insensitive"
        );
        let not_hex = format!("sha256={}", "zz".repeat(32));
        for bad in [
            None,
            Some("sha256="),
            Some(&good["sha256=".len()..]),
            Some("sha1=0123"),
            Some(&good[..good.len() - 1]),
            Some(not_hex.as_str()),
        ] {
            assert!(
                matches!(
                    verify(&m, &submission(body, bad)),
                    Err(IngestError::InvalidSignature(_))
                ),
                "{bad:?}"
            );
        }
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(verify(&m, &submission(body, Some(&flipped))).is_err());
    }

    fn facebook_source() -> std::sync::Arc<Source> {
        let text = r#"
[[source]]
id = "fb"
kind = "facebook"
app_secret = "x"
verify_token = "y"
[source.extra]
leadgen_id = "1"
created_time = "2"
"#;
        Sources::parse("t.toml", text, |_| None)
            .unwrap()
            .get("fb")
            .unwrap()
            .clone()
    }

    async fn parse_body(body: &'static [u8]) -> Vec<Item> {
        let source = facebook_source();
        let submission = submission(body, None).verified();
        parse(&source, submission).await.unwrap()
    }

    fn lead_ref(item: &Item) -> &MetaLeadRef {
        match &item.content {
            Content::Meta(lead) => lead,
            _ => panic!("a Meta item"),
        }
    }

    #[tokio::test]
    async fn every_leadgen_change_of_every_entry_is_one_item_and_other_fields_are_ignored() {
        let items = parse_body(
            br#"{"object":"page","entry":[
              {"id":"111","time":1700000000,"changes":[
                {"field":"leadgen","value":{"leadgen_id":"901","form_id":"77","page_id":"111","created_time":1700000000}},
                {"field":"feed","value":{"item":"status"}}]},
              {"id":"222","time":1700000001,"changes":[
                {"field":"leadgen","value":{"leadgen_id":"902","form_id":"78"}},
                {"field":"leadgen","value":{"form_id":"79"}}]}]}"#,
        )
        .await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].platform_id.as_deref(), Some("901"));
        assert_eq!(
            lead_ref(&items[0]).created_time.as_deref(),
            Some("1700000000")
        );
        // The page comes from the entry when the change does not name it.
        assert_eq!(lead_ref(&items[1]).page_id, "222");
        assert_eq!(lead_ref(&items[1]).form_id.as_deref(), Some("78"));
    }

    #[tokio::test]
    async fn ids_beyond_two_to_the_53_stay_exact_as_numbers_or_strings() {
        let items = parse_body(
            br#"{"entry":[{"id":112233445566778899,"changes":[
                {"field":"leadgen","value":{"leadgen_id":9007199254740993,"form_id":"18014398509481985","ad_id":123456789012345678}}]}]}"#,
        )
        .await;
        let lead = lead_ref(&items[0]);
        assert_eq!(lead.leadgen_id, "9007199254740993");
        assert_eq!(lead.page_id, "112233445566778899");
        assert_eq!(lead.form_id.as_deref(), Some("18014398509481985"));
        assert_eq!(lead.ad_id.as_deref(), Some("123456789012345678"));
    }

    #[tokio::test]
    async fn a_fractional_id_is_skipped_rather_than_rounded() {
        let items = parse_body(
            br#"{"entry":[{"id":"1","changes":[{"field":"leadgen","value":{"leadgen_id":9.007199254740993e15}}]}]}"#,
        )
        .await;
        assert!(items.is_empty());
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_malformed() {
        let source = facebook_source();
        let result = parse(&source, submission(b"hub.mode=x", None).verified()).await;
        assert!(matches!(result, Err(IngestError::Malformed(_))));
    }

    #[test]
    fn meta_times_parse_in_each_form_meta_uses() {
        for raw in [
            "2022-02-03T16:16:51+0000",
            "2022-02-03T16:16:51+00:00",
            "2022-02-03T17:16:51+0100",
            "2022-02-03T16:16:51Z",
            "1643905011",
        ] {
            assert_eq!(onpipeline_time(raw), "2022-02-03 16:16:51", "{raw}");
        }
        assert_eq!(onpipeline_time("yesterday"), "yesterday");
    }

    fn graph_lead(json: serde_json::Value) -> GraphLead {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn field_data_and_mapped_metadata_become_fields_and_unmapped_metadata_stays_out() {
        let source = facebook_source();
        let lead = MetaLeadRef {
            leadgen_id: "901".into(),
            page_id: "111".into(),
            form_id: Some("77".into()),
            ad_id: None,
            adgroup_id: None,
            created_time: Some("1700000000".into()),
        };
        let graph = graph_lead(serde_json::json!({
            "id": "901",
            "created_time": "2024-05-01T10:20:30+0000",
            "form_id": "77",
            "field_data": [
                {"name": "full_name", "values": ["Jonas Weber"]},
                {"name": "email", "values": ["jonas.weber@example.de"]},
                {"name": "你想要什么产品", "values": ["茶叶"]},
            ]
        }));
        let inbound = inbound(&lead, &graph, &source.mapping);
        let names: Vec<&str> = inbound.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "full_name",
                "email",
                "你想要什么产品",
                "leadgen_id",
                "created_time"
            ]
        );
        assert_eq!(
            inbound.get("created_time").unwrap(),
            ["2024-05-01 10:20:30"]
        );
        let (payload, work, repaired) = to_deliver(&source, &lead, &graph);
        assert_eq!(
            (payload.first_name.as_str(), payload.last_name.as_str()),
            ("Jonas", "Weber")
        );
        assert_eq!(payload.email[0].address, "jonas.weber@example.de");
        assert!(repaired.is_empty());
        assert!(matches!(work, Work::Deliver { .. }));
    }

    #[test]
    fn the_default_mapping_gives_way_to_the_sources_tables() {
        let text = r#"
[[source]]
id = "fb"
kind = "facebook"
app_secret = "x"
verify_token = "y"
[source.fields]
phone_number = "Phone.work"
[source.extra]
city = "9"
"#;
        let sources = Sources::parse("t.toml", text, |_| None).unwrap();
        let fields = &sources.get("fb").unwrap().mapping.fields;
        assert_eq!(
            fields[0],
            ("phone_number".to_owned(), Target::Phone(PhoneType::Work))
        );
        assert_eq!(
            fields.iter().filter(|(n, _)| n == "phone_number").count(),
            1
        );
        assert!(!fields.iter().any(|(n, _)| n == "city"));
        assert!(
            fields
                .iter()
                .any(|(n, t)| n == "full_name" && *t == Target::FullName)
        );
    }
}
