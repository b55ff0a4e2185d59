//! Form tools' webhooks (`kind = "webhook"`, `preset = …`): one file per tool, each only
//! `parse` (and `verify` for the tools that sign their requests).
//!
//! How a request is checked is the source's `auth`:
//!
//! * `signature` (the default for Typeform and Webflow): the tool's own HMAC-SHA256 over the
//!   raw body bytes as received — never over re-serialised JSON — keyed with `secret`, compared
//!   in constant time (`Mac::verify_slice`).
//! * `key` (the default for Unbounce, Elementor and Jotform, which do not sign): `secret` is a
//!   shared key the tool sends as `?key=…` in the webhook URL or in an `X-Leadgate-Key` header.
//!   Also usable with Typeform or Webflow webhooks created without a signing secret.
//! * `none`: no check; must be chosen explicitly, because anyone who learns the URL can then
//!   post leads.

pub mod elementor;
pub mod jotform;
pub mod typeform;
pub mod unbounce;
pub mod webflow;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{Content, Item, Submission, Unverified, Verified, body};
use crate::config::Source;
use crate::config::sources::{Preset, Webhook, WebhookAuth};
use crate::error::IngestError;
use crate::lead::Inbound;

/// Checks the sender as the source's `auth` says. `now` is a parameter so the timestamp
/// window of signed requests (Webflow) is testable.
pub fn verify(
    hook: &Webhook,
    submission: &Submission<Unverified>,
    now: DateTime<Utc>,
) -> Result<(), IngestError> {
    match &hook.auth {
        WebhookAuth::Signature(secret) => match hook.preset {
            Preset::Typeform => typeform::verify(secret, submission),
            Preset::Webflow => webflow::verify(secret, submission, now),
            // The sources file refuses `auth = "signature"` for these; refuse here too.
            Preset::Unbounce | Preset::Elementor | Preset::Jotform => Err(IngestError::Forbidden(
                "this tool has no signature scheme".to_owned(),
            )),
        },
        WebhookAuth::Key(key) => verify_key(key, submission),
        WebhookAuth::None => Ok(()),
    }
}

/// Reads the request with the preset's format. A request that is not a submission (another
/// event type) gives no lead and is still answered `200`.
pub async fn parse(
    source: &Source,
    hook: &Webhook,
    submission: Submission<Verified>,
) -> Result<Vec<Item>, IngestError> {
    match hook.preset {
        Preset::Typeform => typeform::parse(source, &submission),
        Preset::Unbounce => unbounce::parse(source, fingerprint_key(hook), submission).await,
        Preset::Elementor => elementor::parse(source, fingerprint_key(hook), submission).await,
        Preset::Webflow => webflow::parse(source, &submission),
        Preset::Jotform => jotform::parse(source, submission).await,
    }
}

/// The shared key from the `X-Leadgate-Key` header or the URL's `key` parameter, compared in
/// constant time.
fn verify_key(key: &SecretString, submission: &Submission<Unverified>) -> Result<(), IngestError> {
    let presented = match submission.header("x-leadgate-key") {
        Some(header) => header.trim().to_owned(),
        None => query_value(&submission.query, "key").unwrap_or_default(),
    };
    if presented.is_empty() {
        return Err(IngestError::Forbidden(
            "a key is required: add ?key=… to the webhook URL or send an X-Leadgate-Key header"
                .to_owned(),
        ));
    }
    if bool::from(key.expose_secret().as_bytes().ct_eq(presented.as_bytes())) {
        Ok(())
    } else {
        Err(IngestError::Forbidden(
            "the key does not match the key configured for this source".to_owned(),
        ))
    }
}

/// One parameter of a query string, decoded as a form field.
fn query_value(query: &str, name: &str) -> Option<String> {
    let fields =
        body::decode_urlencoded(query.as_bytes(), None, &body::BodyLimits::default()).ok()?;
    fields.get(name)?.first().cloned()
}

/// Whether HMAC-SHA256 of `parts` (concatenated) keyed with `secret` equals `presented`,
/// compared in constant time.
fn hmac_matches(secret: &SecretString, parts: &[&[u8]], presented: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) else {
        return false;
    };
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(presented).is_ok()
}

/// A decoded body as fields, whatever the tool sent: form fields as they are, a flat JSON
/// object's scalars and lists of scalars.
fn fields_of(decoded: body::Decoded) -> Inbound {
    match decoded {
        body::Decoded::Fields(fields) => fields,
        body::Decoded::Json(value) => {
            let mut fields = Inbound::new();
            if let Value::Object(object) = value {
                for (name, value) in &object {
                    push_json(&mut fields, name, value);
                }
            }
            fields
        }
    }
}

/// A JSON value as field values: a scalar as one value, a list as one value each; objects
/// and `null` give nothing.
fn push_json(fields: &mut Inbound, name: &str, value: &Value) {
    match value {
        Value::Array(items) => {
            for item in items {
                if let Some(text) = super::json_text(item) {
                    fields.push(name, text);
                }
            }
        }
        other => {
            if let Some(text) = super::json_text(other) {
                fields.push(name, text);
            }
        }
    }
}

/// A submission's fingerprint, for tools that send no submission id (Unbounce, Elementor):
/// an HMAC-SHA256 of `parts` keyed with the source's shared key when it has one (`auth =
/// "key"`, the default), else a plain SHA-256 (`auth = "none"`); each part length-prefixed so
/// no two different lists of parts share one. A redelivery carries the same content, so it gets
/// the same fingerprint — the dedupe key. The fingerprint of personal data ends up in a queue
/// key's name: keyed, it cannot be confirmed by hashing a guessed email without the secret.
fn fingerprint<'a>(key: Option<&SecretString>, parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut mac =
        key.and_then(|key| Hmac::<Sha256>::new_from_slice(key.expose_secret().as_bytes()).ok());
    let mut hash = <Sha256 as sha2::Digest>::new();
    for part in parts {
        let len = (part.len() as u64).to_be_bytes();
        match &mut mac {
            Some(mac) => {
                mac.update(&len);
                mac.update(part.as_bytes());
            }
            None => {
                sha2::Digest::update(&mut hash, len);
                sha2::Digest::update(&mut hash, part.as_bytes());
            }
        }
    }
    match mac {
        Some(mac) => hex::encode(mac.finalize().into_bytes()),
        None => hex::encode(sha2::Digest::finalize(hash)),
    }
}

/// The secret a source's fingerprints are keyed with: its shared key, when it has one.
fn fingerprint_key(hook: &Webhook) -> Option<&SecretString> {
    match &hook.auth {
        WebhookAuth::Key(key) => Some(key),
        WebhookAuth::Signature(_) | WebhookAuth::None => None,
    }
}

/// Whether a submission's date and time are both known and not blank: only then is a
/// fingerprint a dedupe key. Without them, the same person sending the same form twice on
/// purpose would have the second lead dropped as a redelivery.
fn has_timestamp(date: Option<&str>, time: Option<&str>) -> bool {
    let known = |v: Option<&str>| v.is_some_and(|v| !v.trim().is_empty());
    known(date) && known(time)
}

/// The parts of flat fields for a [`fingerprint`], in the order they were sent: each name, its
/// number of values, then the values.
fn field_parts(fields: &Inbound) -> Vec<String> {
    let mut parts = Vec::new();
    for (name, values) in fields.iter() {
        parts.push(name.to_owned());
        parts.push(values.len().to_string());
        parts.extend(values.iter().cloned());
    }
    parts
}

/// One lead of flat fields with an optional platform id.
fn one_lead(fields: Inbound, platform_id: Option<String>) -> Vec<Item> {
    vec![Item {
        content: Content::Fields(fields),
        platform_id: platform_id.filter(|id| !id.trim().is_empty()),
        test: false,
    }]
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
    use bytes::Bytes;

    use super::*;

    pub fn source(preset: &str, rest: &str) -> Arc<Source> {
        let text =
            format!("[[source]]\nid = \"h\"\nkind = \"webhook\"\npreset = \"{preset}\"\n{rest}");
        let sources = crate::config::Sources::parse("t.toml", &text, |_| None).unwrap();
        sources.get("h").unwrap().clone()
    }

    pub fn submission(headers: &[(&str, &str)], body: &[u8]) -> Submission<Unverified> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Submission::new(map, Bytes::copy_from_slice(body), None)
    }

    pub fn hook(source: &Source) -> &Webhook {
        match &source.kind {
            crate::config::SourceKind::Webhook(hook) => hook,
            other => panic!("not a webhook: {other:?}"),
        }
    }

    /// Verifies (with `auth = "none"` sources) and parses.
    pub async fn parse_one(source: &Source, headers: &[(&str, &str)], body: &[u8]) -> Item {
        let verified = crate::sources::verify(source, submission(headers, body)).unwrap();
        let mut items = parse(source, hook(source), verified).await.unwrap();
        assert_eq!(items.len(), 1);
        items.pop().unwrap()
    }

    /// `application/x-www-form-urlencoded`, as PHP's `http_build_query` writes it.
    pub fn urlencode(pairs: &[(&str, &str)]) -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    fn escape(text: &str) -> String {
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    pub fn fields(item: &Item) -> &Inbound {
        match &item.content {
            Content::Fields(fields) => fields,
            _ => panic!("fields expected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn the_shared_key_is_read_from_the_header_or_the_url() {
        let source = source("jotform", "secret = \"shared-key-0123456789\"\n");
        let hook = hook(&source);
        let now = Utc::now();
        let by_header = submission(&[("x-leadgate-key", "shared-key-0123456789")], b"");
        assert!(verify(hook, &by_header, now).is_ok());
        let by_url = submission(&[], b"").with_query("a=1&key=shared-key-0123456789&b=%20");
        assert!(verify(hook, &by_url, now).is_ok());
        for bad in [
            submission(&[], b""),
            submission(&[], b"").with_query("key="),
            submission(&[], b"").with_query("key=shared-key-012345678"),
            submission(&[("x-leadgate-key", "nope")], b"").with_query("key=shared-key-0123456789"),
        ] {
            assert_eq!(verify(hook, &bad, now).unwrap_err().code(), "forbidden");
        }
    }

    #[test]
    fn an_unauthenticated_preset_must_be_chosen_explicitly() {
        let err = crate::config::Sources::parse(
            "t.toml",
            "[[source]]\nid = \"h\"\nkind = \"webhook\"\npreset = \"unbounce\"\n",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("auth = \"none\""), "{err}");
        let open = source("unbounce", "auth = \"none\"\n");
        assert!(matches!(hook(&open).auth, WebhookAuth::None));
        let err = crate::config::Sources::parse(
            "t.toml",
            "[[source]]\nid = \"h\"\nkind = \"webhook\"\npreset = \"elementor\"\nauth = \"signature\"\nsecret = \"x\"\n",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not sign"), "{err}");
    }
}
