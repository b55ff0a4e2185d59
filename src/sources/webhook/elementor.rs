//! Elementor Pro forms (`preset = "elementor"`): WordPress posts the form as
//! `application/x-www-form-urlencoded`, in one of two formats chosen in the form's webhook
//! action:
//!
//! * **simple** ("Advanced Data" off): keys are the field labels (`No Label <id>` for a field
//!   without one), then metadata rows by title — `Date`, `Time`, `Page URL`, `Page Title`,
//!   `User Agent`, `Remote IP`, `Powered by` — then `form_id` and `form_name`;
//! * **advanced**: `form[id]`, `form[name]`, `fields[<id>][id|type|title|value|raw_value|…]`
//!   and `meta[<key>][title|value]`.
//!
//! Fields arrive under their label (simple) or their field id (advanced; the label too when
//! the sources file maps the label). Metadata reaches the mapping, when mapped, under the same
//! names in both formats: `form_id`, `form_name`, `date`, `time`, `page_url`, `page_title`,
//! `user_agent`, `remote_ip`, `credit`. Elementor counts only an exact `200` as success (the
//! visitor sees "Webhook error" otherwise) and never retries. It sends no submission id, so
//! the dedupe key is the form id and an HMAC-SHA256 (keyed with the source's key; a SHA-256
//! with `auth = "none"`) of every posted field: the same post sent twice (a proxy's retry, a
//! double send) is one lead. Only when the form sends its `Date` and `Time` metadata rows,
//! though: without them nothing tells a resent post from the same person submitting again, so
//! there is no dedupe key. It does not sign: the source checks a shared key in the URL.

use std::collections::HashMap;

use secrecy::SecretString;

use super::{field_parts, fields_of, fingerprint, has_timestamp, one_lead};
use crate::config::Source;
use crate::error::IngestError;
use crate::lead::Inbound;
use crate::sources::{Item, Submission, Verified, body, body_limits, pick_name, push_metadata};

/// Metadata offered to `[source.extra]`, under the same names in both formats (the advanced
/// format's `form[id]`, `form[name]` and `meta[<key>][value]`).
pub const METADATA: [&str; 9] = [
    "form_id",
    "form_name",
    "date",
    "time",
    "page_url",
    "page_title",
    "user_agent",
    "remote_ip",
    "credit",
];

/// Simple-format metadata titles, and the name each is offered under.
const SIMPLE_METADATA: [(&str, &str); 9] = [
    ("Date", "date"),
    ("Time", "time"),
    ("Page URL", "page_url"),
    ("Page Title", "page_title"),
    ("User Agent", "user_agent"),
    ("Remote IP", "remote_ip"),
    ("Powered by", "credit"),
    ("form_id", "form_id"),
    ("form_name", "form_name"),
];

pub async fn parse(
    source: &Source,
    key: Option<&SecretString>,
    submission: Submission<Verified>,
) -> Result<Vec<Item>, IngestError> {
    let limits = body_limits(source);
    let decoded = body::decode(submission.content_type(), submission.body.clone(), &limits).await?;
    let posted = fields_of(decoded);
    let advanced = posted.iter().any(|(name, _)| name.starts_with("fields["));
    let fields = if advanced {
        read_advanced(source, &posted)
    } else {
        read_simple(source, &posted)
    };
    // No submission id: the form's id and a fingerprint of everything posted (values, date,
    // time, visitor's IP and browser when enabled) stand for one — but only when the date and
    // time rows are enabled, or the same content sent again on purpose would be dropped.
    let first = |name: &str| posted.get(name).and_then(|v| v.first()).map(String::as_str);
    let form_id = first(if advanced { "form[id]" } else { "form_id" }).unwrap_or("");
    let (date, time) = if advanced {
        (first("meta[date][value]"), first("meta[time][value]"))
    } else {
        (first("Date"), first("Time"))
    };
    let id = has_timestamp(date, time).then(|| {
        let digest = fingerprint(key, field_parts(&posted).iter().map(String::as_str));
        format!("elementor:{form_id}:{digest}")
    });
    Ok(one_lead(fields, id))
}

fn read_simple(source: &Source, posted: &Inbound) -> Inbound {
    let mut fields = Inbound::new();
    for (name, values) in posted.iter() {
        match SIMPLE_METADATA.iter().find(|(title, _)| *title == name) {
            Some((_, meta)) => {
                push_metadata(source, &mut fields, meta, values.first().cloned());
            }
            None => {
                for value in values {
                    fields.push(name, value.clone());
                }
            }
        }
    }
    fields
}

/// One field of the advanced format, in order of first appearance.
#[derive(Default)]
struct Field {
    id: String,
    title: Option<String>,
    value: Option<String>,
}

fn read_advanced(source: &Source, posted: &Inbound) -> Inbound {
    let mut found: Vec<Field> = Vec::new();
    // A large form sends hundreds of fields: find each by its id without a scan.
    let mut positions: HashMap<&str, usize> = HashMap::new();
    let mut fields = Inbound::new();
    for (name, values) in posted.iter() {
        let first = values.first().cloned();
        match brackets(name).as_deref() {
            Some(["fields", id, part]) => {
                let index = *positions.entry(id).or_insert_with(|| {
                    found.push(Field {
                        id: (*id).to_owned(),
                        ..Field::default()
                    });
                    found.len() - 1
                });
                match *part {
                    "title" => found[index].title = first,
                    "value" => found[index].value = first,
                    _ => {}
                }
            }
            Some(["form", "id"]) => push_metadata(source, &mut fields, "form_id", first),
            Some(["form", "name"]) => push_metadata(source, &mut fields, "form_name", first),
            Some(["meta", key, "value"]) => push_metadata(source, &mut fields, key, first),
            _ => {}
        }
    }
    for field in &found {
        let (Some(name), Some(value)) = (
            pick_name(source, &[Some(field.id.as_str()), field.title.as_deref()]),
            &field.value,
        ) else {
            continue;
        };
        fields.push(name, value.clone());
    }
    fields
}

/// `fields[email][value]` → `["fields", "email", "value"]`; names not in that shape → `None`.
fn brackets(name: &str) -> Option<Vec<&str>> {
    let (head, mut rest) = name.split_at(name.find('[')?);
    let mut parts = vec![head];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        parts.push(&inner[..end]);
        rest = &inner[end + 1..];
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fields, parse_one, source, urlencode};
    use super::*;

    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    #[test]
    fn both_formats_offer_the_same_metadata_names() {
        let mut simple: Vec<&str> = SIMPLE_METADATA.iter().map(|(_, name)| *name).collect();
        let mut documented = METADATA.to_vec();
        simple.sort_unstable();
        documented.sort_unstable();
        assert_eq!(simple, documented);
    }

    #[test]
    fn bracketed_names_split() {
        assert_eq!(
            brackets("fields[email][value]").unwrap(),
            ["fields", "email", "value"]
        );
        assert_eq!(brackets("form[id]").unwrap(), ["form", "id"]);
        assert!(brackets("Email").is_none());
        assert!(brackets("fields[email").is_none());
    }

    #[tokio::test]
    async fn the_simple_format_is_keyed_by_labels() {
        let source = source(
            "elementor",
            "auth = \"none\"\n[source.extra]\npage_url = \"1\"\n",
        );
        let body = urlencode(&[
            ("Name", "Ana López"),
            ("Email", "ana@example.com"),
            ("Message", "Hola"),
            ("Date", "May 1, 2024"),
            ("Page URL", "https://www.example.com/contact/"),
            ("Powered by", "Elementor"),
            ("form_id", "a1b2c3d"),
            ("form_name", "Contact"),
        ]);
        let item = parse_one(&source, &[FORM], body.as_bytes()).await;
        let f = fields(&item);
        let names: Vec<&str> = f.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["Name", "Email", "Message", "page_url"]);
    }

    #[tokio::test]
    async fn the_advanced_format_is_keyed_by_field_ids() {
        let source = source(
            "elementor",
            "auth = \"none\"\n[source.extra]\nform_name = \"1\"\n\"Your budget\" = \"2\"\n",
        );
        let body = urlencode(&[
            ("form[id]", "a1b2c3d"),
            ("form[name]", "Contact"),
            ("fields[name][id]", "name"),
            ("fields[name][title]", "Name"),
            ("fields[name][value]", "Ana López"),
            ("fields[field_4f2a][title]", "Your budget"),
            ("fields[field_4f2a][value]", "5k"),
            ("fields[email][value]", "ana@example.com"),
            ("meta[page_url][title]", "Page URL"),
            ("meta[page_url][value]", "https://www.example.com/"),
        ]);
        let item = parse_one(&source, &[FORM], body.as_bytes()).await;
        let f = fields(&item);
        assert_eq!(f.get("form_name").unwrap(), ["Contact"]);
        assert_eq!(f.get("name").unwrap(), ["Ana López"]);
        assert_eq!(f.get("Your budget").unwrap(), ["5k"]);
        assert_eq!(f.get("email").unwrap(), ["ana@example.com"]);
        assert!(f.get("page_url").is_none());
    }

    #[tokio::test]
    async fn the_same_post_twice_has_one_dedupe_key_and_another_post_another() {
        let source = source("elementor", "auth = \"none\"\n");
        let id = |pairs: Vec<(&'static str, &'static str)>| {
            let source = source.clone();
            async move {
                let body = urlencode(&pairs);
                parse_one(&source, &[FORM], body.as_bytes())
                    .await
                    .platform_id
            }
        };
        let post = vec![
            ("Name", "Ana López"),
            ("Email", "ana@example.com"),
            ("Date", "May 1, 2024"),
            ("Time", "10:57"),
            ("form_id", "a1b2c3d"),
        ];
        let first = id(post.clone()).await.unwrap();
        assert!(first.starts_with("elementor:a1b2c3d:"), "{first}");
        assert_eq!(id(post.clone()).await.unwrap(), first);
        let mut later = post.clone();
        later[3] = ("Time", "10:58");
        assert_ne!(id(later).await.unwrap(), first);
        // Values are framed: moving text from one field into the next is another post.
        let mut shifted = post;
        shifted[0] = ("Name", "Ana Lópe");
        shifted[1] = ("Email", "zana@example.com");
        assert_ne!(id(shifted).await.unwrap(), first);
        let advanced = id(vec![
            ("form[id]", "a1b2c3d"),
            ("fields[name][value]", "Ana López"),
            ("meta[date][value]", "May 1, 2024"),
            ("meta[time][value]", "10:57"),
        ])
        .await
        .unwrap();
        assert!(advanced.starts_with("elementor:a1b2c3d:"), "{advanced}");
    }

    #[tokio::test]
    async fn a_post_without_its_date_and_time_rows_has_no_dedupe_key() {
        let source = source("elementor", "auth = \"none\"\n");
        for pairs in [
            vec![
                ("Name", "Ana López"),
                ("Email", "ana@example.com"),
                ("form_id", "a1b2c3d"),
            ],
            vec![
                ("Name", "Ana López"),
                ("Time", "10:57"),
                ("form_id", "a1b2c3d"),
            ],
            vec![
                ("form[id]", "a1b2c3d"),
                ("fields[name][value]", "Ana López"),
                ("meta[date][value]", "May 1, 2024"),
            ],
        ] {
            let body = urlencode(&pairs);
            let item = parse_one(&source, &[FORM], body.as_bytes()).await;
            assert_eq!(item.platform_id, None, "{pairs:?}");
        }
    }
}
