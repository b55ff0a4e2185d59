//! Decoding of request bodies into fields: `application/x-www-form-urlencoded` (with charsets),
//! `multipart/form-data` (file parts read and discarded) and JSON. No HTTP framework types here:
//! the caller hands over the `Content-Type` header and the raw body it already holds for
//! signature checks.
//!
//! Text encodings: browsers post forms in the page's encoding without labelling it. The only
//! hints are a `charset=` parameter (some servers and proxies add one) and a hidden `_charset_`
//! field that browsers fill in. Labels are read as the WHATWG Encoding Standard reads them
//! (`encoding_rs`), so `iso-8859-1` means windows-1252, as it does in every browser.
//!
//! JSON numbers are kept exactly as written: a number arrives as a JSON *string* holding its
//! text (`18446744073709551616123`, `1e3`, `1.50`), so every reader turns it into the same text
//! the sender wrote, and ids beyond 2^53 or 2^64 keep every digit. `serde_json`'s
//! `arbitrary_precision` would do the same inside `Value`, but it is a crate-wide feature that
//! changes how numbers travel through `#[serde(untagged)]` and `flatten` in every crate that
//! uses `serde_json` (the test suite's CDP client among them), so [`parse_json`] keeps the
//! number text with `raw_value` instead, which only adds an API. JSON object keys keep their order (`serde_json`'s `preserve_order`), so
//! fields reach the mapping in the order they were sent.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use encoding_rs::{Encoding, UTF_8, WINDOWS_1252};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::lead::Inbound;

/// The media types [`decode`] accepts, as a sentence for error messages.
pub const ACCEPTED_TYPES: &str =
    "application/x-www-form-urlencoded, multipart/form-data or application/json";

/// The name of the hidden field through which browsers tell the form's encoding.
const CHARSET_FIELD: &str = "_charset_";

/// A decoded body: flat fields (forms), or JSON whose shape the caller judges (flat fields via
/// [`json_to_fields`], Leadsin's own shape, or a platform's envelope).
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Fields(Inbound),
    Json(Value),
}

/// Bounds on what one body may contain. The whole body is bounded by the caller before decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyLimits {
    /// Most name/value pairs (multipart: parts, files included; JSON: values) in one body.
    pub max_fields: usize,
    /// Most bytes in one field's name or value, after decoding.
    pub max_field_bytes: usize,
    /// Most bytes in one multipart file part. File contents are read and discarded.
    pub max_file_bytes: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_fields: 200,
            max_field_bytes: 64 * 1024,
            max_file_bytes: 10 * 1024 * 1024,
        }
    }
}

/// Why a body could not be decoded. Messages name fields but never echo values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("{}", unsupported_message(.given.as_deref()))]
    UnsupportedMediaType { given: Option<String> },
    #[error("{message}")]
    Malformed { message: String },
    /// `fields` names the culprits, when there are some, with a message for each.
    #[error("{message}")]
    TooLarge {
        message: String,
        fields: BTreeMap<String, Vec<String>>,
    },
}

impl BodyError {
    /// A stable machine-readable code for the answer to the sender.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::UnsupportedMediaType { .. } => "unsupported_media_type",
            BodyError::Malformed { .. } => "malformed_body",
            BodyError::TooLarge { .. } => "body_too_large",
        }
    }

    fn malformed(message: impl Into<String>) -> Self {
        BodyError::Malformed {
            message: message.into(),
        }
    }

    fn too_large(message: impl Into<String>) -> Self {
        BodyError::TooLarge {
            message: message.into(),
            fields: BTreeMap::new(),
        }
    }
}

fn unsupported_message(given: Option<&str>) -> String {
    match given {
        Some(given) => format!("Content-Type {given:?} is not accepted; send {ACCEPTED_TYPES}"),
        None => format!("the request has no Content-Type; send {ACCEPTED_TYPES}"),
    }
}

/// Decodes a body by its `Content-Type` (matched case-insensitively, parameters allowed).
pub async fn decode(
    content_type: Option<&str>,
    body: Bytes,
    limits: &BodyLimits,
) -> Result<Decoded, BodyError> {
    let unsupported = || BodyError::UnsupportedMediaType {
        // The header is the sender's text: bound what we echo back.
        given: content_type.map(|given| given.chars().take(100).collect()),
    };
    let media = content_type.map(MediaType::parse).ok_or_else(unsupported)?;
    match media.essence.as_str() {
        "application/x-www-form-urlencoded" => {
            decode_urlencoded(&body, media.param("charset"), limits).map(Decoded::Fields)
        }
        "multipart/form-data" => {
            let boundary = media
                .param("boundary")
                .filter(|b| !b.is_empty())
                .ok_or_else(|| {
                    BodyError::malformed(
                        "multipart/form-data needs a boundary parameter in Content-Type",
                    )
                })?;
            decode_multipart(body, boundary, limits)
                .await
                .map(Decoded::Fields)
        }
        "application/json" => parse_json(&body).map(Decoded::Json),
        essence if essence.starts_with("application/") && essence.ends_with("+json") => {
            parse_json(&body).map(Decoded::Json)
        }
        _ => Err(unsupported()),
    }
}

/// `Content-Type` split into its lower-cased essence and parameters. Hand-written rather than
/// `mime::Mime` because senders add things `mime` refuses (a trailing `;`, spaces around `=`),
/// and refusing a lead over header punctuation helps nobody.
struct MediaType {
    essence: String,
    params: Vec<(String, String)>,
}

impl MediaType {
    fn parse(raw: &str) -> Self {
        let mut pieces = split_unquoted(raw, ';').into_iter();
        let essence = pieces
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let params = pieces
            .filter_map(|piece| {
                let (name, value) = piece.split_once('=')?;
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .map(|v| v.replace("\\\"", "\"").replace("\\\\", "\\"))
                    .unwrap_or_else(|| value.to_owned());
                Some((name.trim().to_ascii_lowercase(), value))
            })
            .collect();
        Self { essence, params }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits on `separator` outside double quotes (a quoted parameter may hold a `;`).
fn split_unquoted(raw: &str, separator: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in raw.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                pieces.push(&raw[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&raw[start..]);
    pieces
}

/// Finds the encoding a label names. UTF-16 labels and the "replacement" encoding become UTF-8,
/// as the WHATWG URL Standard does for form bodies, which are never UTF-16 on the wire.
fn encoding_for(label: &str, origin: &str) -> Result<&'static Encoding, BodyError> {
    Encoding::for_label(label.trim().as_bytes())
        .map(Encoding::output_encoding)
        .ok_or_else(|| {
            let label: String = label.chars().take(40).collect();
            BodyError::malformed(format!(
                "the {origin} names an unknown character encoding {label:?}"
            ))
        })
}

/// Decodes each byte string with `encoding`. Bytes the encoding cannot read become U+FFFD:
/// a sender that labels its encoding wrongly loses a character, not the lead.
fn decode_text(encoding: &'static Encoding, bytes: &[u8]) -> String {
    encoding.decode_without_bom_handling(bytes).0.into_owned()
}

/// Picks the encoding of unlabelled text: UTF-8 when every piece is valid UTF-8, otherwise
/// windows-1252, because legacy pages post in their own (usually Western) page encoding without
/// saying so, and windows-1252 reads every byte, so nothing is lost or refused.
fn sniff_encoding<'a>(mut pieces: impl Iterator<Item = &'a [u8]>) -> &'static Encoding {
    if pieces.all(|piece| std::str::from_utf8(piece).is_ok()) {
        UTF_8
    } else {
        WINDOWS_1252
    }
}

/// Decodes an `application/x-www-form-urlencoded` body as the WHATWG URL Standard does: split on
/// `&`, then on the first `=`, `+` is a space, `%XX` a byte; the bytes are then read with the
/// `charset` parameter, else the `_charset_` field, else UTF-8 (windows-1252 if not valid UTF-8).
pub fn decode_urlencoded(
    body: &[u8],
    charset: Option<&str>,
    limits: &BodyLimits,
) -> Result<Inbound, BodyError> {
    let mut pairs = Vec::new();
    for piece in body.split(|b| *b == b'&').filter(|piece| !piece.is_empty()) {
        if pairs.len() == limits.max_fields {
            return Err(too_many_fields(limits));
        }
        let (name, value) = match piece.iter().position(|b| *b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        let (name, value) = (form_unescape(name), form_unescape(value));
        if name.len() > limits.max_field_bytes || value.len() > limits.max_field_bytes {
            let name = String::from_utf8_lossy(&name);
            return Err(field_too_large(&name, limits.max_field_bytes));
        }
        pairs.push((name, value));
    }

    let encoding = match charset {
        Some(label) => encoding_for(label, "charset parameter of Content-Type")?,
        None => match pairs
            .iter()
            .find(|(name, _)| **name == *CHARSET_FIELD.as_bytes())
        {
            Some((_, label)) => encoding_for(&String::from_utf8_lossy(label), "_charset_ field")?,
            None => sniff_encoding(pairs.iter().flat_map(|(n, v)| [&**n, &**v])),
        },
    };
    Ok(pairs
        .iter()
        .map(|(name, value)| (decode_text(encoding, name), decode_text(encoding, value)))
        .collect())
}

/// `+` → space, then percent-decoding to bytes (invalid `%` sequences stay as they are).
fn form_unescape(raw: &[u8]) -> Cow<'_, [u8]> {
    let raw: Cow<'_, [u8]> = if raw.contains(&b'+') {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    match raw {
        Cow::Borrowed(raw) => percent_encoding::percent_decode(raw).into(),
        Cow::Owned(raw) => Cow::Owned(percent_encoding::percent_decode(&raw).collect()),
    }
}

/// One text part of a multipart body, kept as bytes until the `_charset_` part has been seen.
struct TextPart {
    name: String,
    value: Vec<u8>,
    charset: Option<String>,
}

/// Decodes a `multipart/form-data` body. Text parts become fields; file parts (those with a
/// `filename`) are read up to `max_file_bytes` and dropped, never forwarded. A part's own
/// `charset` wins, then a `_charset_` part, then UTF-8 (windows-1252 if not valid UTF-8).
pub async fn decode_multipart(
    body: Bytes,
    boundary: &str,
    limits: &BodyLimits,
) -> Result<Inbound, BodyError> {
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    let mut count = 0;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        count += 1;
        if count > limits.max_fields {
            return Err(too_many_fields(limits));
        }
        let is_file = field.file_name().is_some();
        // A part without a name cannot be mapped; RFC 7578 requires one, so it is skipped.
        let name = field.name().map(str::to_owned);
        let charset = field
            .content_type()
            .and_then(|mime| mime.get_param(mime::CHARSET))
            .map(|charset| charset.as_str().to_owned());
        let limit = if is_file {
            limits.max_file_bytes
        } else {
            limits.max_field_bytes
        };
        let mut value = Vec::new();
        let mut size = 0;
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            size += chunk.len();
            if size > limit {
                let name = name.as_deref().unwrap_or("(unnamed)");
                return Err(if is_file {
                    BodyError::too_large(format!(
                        "the file in part {name:?} is larger than {limit} bytes"
                    ))
                } else {
                    field_too_large(name, limit)
                });
            }
            if !is_file {
                value.extend_from_slice(&chunk);
            }
        }
        if let (Some(name), false) = (name, is_file) {
            parts.push(TextPart {
                name,
                value,
                charset,
            });
        }
    }

    let default = match parts.iter().find(|p| p.name == CHARSET_FIELD) {
        Some(part) => encoding_for(&String::from_utf8_lossy(&part.value), "_charset_ part")?,
        None => sniff_encoding(
            parts
                .iter()
                .filter(|p| p.charset.is_none())
                .map(|p| p.value.as_slice()),
        ),
    };
    let mut inbound = Inbound::new();
    for part in &parts {
        let encoding = match &part.charset {
            Some(label) => encoding_for(label, "charset of a multipart part")?,
            None => default,
        };
        inbound.push(part.name.clone(), decode_text(encoding, &part.value));
    }
    Ok(inbound)
}

fn multipart_error(error: multer::Error) -> BodyError {
    BodyError::malformed(format!("the multipart body is not valid: {error}"))
}

fn too_many_fields(limits: &BodyLimits) -> BodyError {
    BodyError::too_large(format!(
        "the body has more than {} fields",
        limits.max_fields
    ))
}

fn field_too_large(name: &str, limit: usize) -> BodyError {
    let name = shown_name(name);
    let sentence = format!("is longer than {limit} bytes");
    BodyError::TooLarge {
        message: format!("field {name:?} {sentence}"),
        fields: BTreeMap::from([(name, vec![sentence])]),
    }
}

/// A sender's text (a field name, a header, a path segment) as errors show it: at most 60
/// characters, however long it was.
pub fn shown_name(name: &str) -> String {
    name.chars().take(60).collect()
}

/// The deepest nesting of objects and lists a JSON body may have. Lead bodies and platform
/// envelopes are a few levels deep; the bound keeps [`exact_value`]'s re-reading of each level
/// (see [`parse_json`]) to a small multiple of the body's size.
const MAX_JSON_DEPTH: usize = 32;

/// Parses a JSON body (RFC 8259: UTF-8; a leading byte order mark is tolerated). Numbers come
/// back as strings of their exact text (see the module notes).
///
/// serde_json reads the whole body first as a [`RawValue`] — checking the syntax, with errors
/// that name the line and column and never quote the input — and then each object or list is
/// read again from its own checked text, one level at a time, its members kept as raw text:
/// so a number's text is there to keep, as written.
pub fn parse_json(body: &[u8]) -> Result<Value, BodyError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let raw: &RawValue = serde_json::from_slice(body)
        .map_err(|error| BodyError::malformed(format!("the JSON body is not valid: {error}")))?;
    exact_value(raw, 0)
}

/// A `Value` from checked JSON text, numbers as strings of their text. A repeated key keeps
/// its first place and its last value, as serde_json does.
fn exact_value(raw: &RawValue, depth: usize) -> Result<Value, BodyError> {
    let text = raw.get();
    let nested = matches!(text.as_bytes().first(), Some(b'{' | b'['));
    if nested && depth == MAX_JSON_DEPTH {
        return Err(BodyError::malformed(format!(
            "the JSON body is nested more than {MAX_JSON_DEPTH} levels deep"
        )));
    }
    let value = match text.as_bytes().first() {
        Some(b'{') => {
            let Members(members) = serde_json::from_str(text).map_err(|_| broken_json())?;
            let mut object = serde_json::Map::with_capacity(members.len());
            for (key, member) in members {
                object.insert(key, exact_value(member, depth + 1)?);
            }
            Value::Object(object)
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| broken_json())?;
            items
                .into_iter()
                .map(|item| exact_value(item, depth + 1))
                .collect::<Result<_, _>>()
                .map(Value::Array)?
        }
        Some(b'-' | b'0'..=b'9') => Value::String(text.to_owned()),
        // Strings (unescaped), `true`, `false`, `null`.
        _ => serde_json::from_str(text).map_err(|_| broken_json())?,
    };
    Ok(value)
}

/// An object's members in the order written, repeated keys included, each value unread.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Text serde_json checked as a whole but could not read again in part: not expected, and
/// an error rather than a panic if it happens.
fn broken_json() -> BodyError {
    BodyError::malformed("the JSON body is not valid")
}

/// Reads a flat JSON object as fields: strings, numbers (as written, see the module notes),
/// booleans (`true`/`false`), `null` (absent), or arrays of those (one value per element).
/// Nested objects and arrays are refused, naming the field.
pub fn json_to_fields(value: &Value, limits: &BodyLimits) -> Result<Inbound, BodyError> {
    let Value::Object(object) = value else {
        return Err(BodyError::malformed(format!(
            "the JSON body must be an object of fields, not {}",
            kind_of(value)
        )));
    };
    let mut inbound = Inbound::new();
    let mut count = 0;
    let mut push = |name: &str, value: &Value| -> Result<(), BodyError> {
        let text = match value {
            Value::Null => return Ok(()),
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(_) | Value::Object(_) => {
                let name: String = name.chars().take(60).collect();
                return Err(BodyError::malformed(format!(
                    "field {name:?} holds {}; only strings, numbers, booleans, null or a list \
                     of those are accepted",
                    kind_of(value)
                )));
            }
        };
        count += 1;
        if count > limits.max_fields {
            return Err(too_many_fields(limits));
        }
        if name.len() > limits.max_field_bytes || text.len() > limits.max_field_bytes {
            return Err(field_too_large(name, limits.max_field_bytes));
        }
        inbound.push(name, text);
        Ok(())
    };
    for (name, value) in object {
        match value {
            Value::Array(items) => items.iter().try_for_each(|item| push(name, item))?,
            _ => push(name, value)?,
        }
    }
    Ok(inbound)
}

/// Applies the caps of [`json_to_fields`] to a body in Leadsin's own shape, so that shape is no
/// way around them: every top-level value and every entry of a list (`Email`, `Phone`, `Extra`)
/// counts as one field, and every key and every text inside (an `Extra` entry's `Value`, an
/// `Email` entry's `Address`, …) is bounded like a field's name or value. Culprits are named
/// by their path (`Extra[3].Value`); values are never echoed.
pub fn check_leadsin_limits(value: &Value, limits: &BodyLimits) -> Result<(), BodyError> {
    let Value::Object(object) = value else {
        return Ok(());
    };
    let count: usize = object
        .values()
        .map(|value| match value {
            Value::Null => 0,
            Value::Array(items) => items.len(),
            _ => 1,
        })
        .sum();
    if count > limits.max_fields {
        let fields = object
            .iter()
            .filter_map(|(key, value)| match value {
                Value::Array(items) if !items.is_empty() => Some((
                    shown_name(key),
                    vec![format!(
                        "has {} entries; a body carries at most {} fields in all",
                        items.len(),
                        limits.max_fields
                    )],
                )),
                _ => None,
            })
            .collect();
        return Err(BodyError::TooLarge {
            message: format!(
                "the body has {count} fields (values and list entries); at most {} are accepted",
                limits.max_fields
            ),
            fields,
        });
    }
    for (key, value) in object {
        check_texts(key, key, value, limits)?;
    }
    Ok(())
}

/// Bounds `key` and every key and text under `value`, which sits at `path`.
fn check_texts(path: &str, key: &str, value: &Value, limits: &BodyLimits) -> Result<(), BodyError> {
    if key.len() > limits.max_field_bytes {
        return Err(field_too_large(path, limits.max_field_bytes));
    }
    match value {
        Value::String(text) if text.len() > limits.max_field_bytes => {
            Err(field_too_large(path, limits.max_field_bytes))
        }
        Value::Array(items) => items.iter().enumerate().try_for_each(|(index, item)| {
            check_texts(&format!("{}[{index}]", shown_name(path)), "", item, limits)
        }),
        Value::Object(entry) => entry.iter().try_for_each(|(name, item)| {
            check_texts(
                &format!("{}.{}", shown_name(path), shown_name(name)),
                name,
                item,
                limits,
            )
        }),
        _ => Ok(()),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BodyLimits {
        BodyLimits::default()
    }

    fn urlencoded(body: &str, charset: Option<&str>) -> Inbound {
        decode_urlencoded(body.as_bytes(), charset, &limits()).unwrap()
    }

    fn values<'a>(inbound: &'a Inbound, name: &str) -> Vec<&'a str> {
        inbound
            .get(name)
            .unwrap_or_else(|| panic!("no field {name}"))
            .iter()
            .map(String::as_str)
            .collect()
    }

    async fn decode_ok(content_type: &str, body: impl Into<Bytes>) -> Decoded {
        decode(Some(content_type), body.into(), &limits())
            .await
            .unwrap()
    }

    fn fields(decoded: Decoded) -> Inbound {
        match decoded {
            Decoded::Fields(inbound) => inbound,
            Decoded::Json(value) => panic!("expected fields, got JSON {value}"),
        }
    }

    #[test]
    fn iso_8859_1_charset_parameter_decodes_latin_bytes() {
        let inbound = urlencoded("name=caf%E9", Some("ISO-8859-1"));
        assert_eq!(values(&inbound, "name"), ["café"]);
    }

    #[test]
    fn iso_8859_1_label_reads_0x80_as_euro_sign_like_browsers() {
        let inbound = urlencoded("price=%80", Some("iso-8859-1"));
        assert_eq!(values(&inbound, "price"), ["€"]);
    }

    #[test]
    fn charset_field_sets_the_encoding_when_the_header_has_none() {
        let inbound = urlencoded("_charset_=windows-1251&name=%C8%E2%E0%ED", None);
        assert_eq!(values(&inbound, "name"), ["Иван"]);
        assert_eq!(values(&inbound, "_charset_"), ["windows-1251"]);
    }

    #[test]
    fn charset_parameter_wins_over_the_charset_field() {
        let inbound = urlencoded("_charset_=windows-1251&name=caf%C3%A9", Some("utf-8"));
        assert_eq!(values(&inbound, "name"), ["café"]);
    }

    #[test]
    fn unlabelled_non_utf8_bytes_fall_back_to_windows_1252() {
        let inbound = urlencoded("city=M%FCnchen&note=ok", None);
        assert_eq!(values(&inbound, "city"), ["München"]);
    }

    #[test]
    fn utf8_emoji_cyrillic_and_cjk_arrive_intact() {
        let body = "a=%F0%9F%98%80&b=%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82&c=%E4%BD%A0%E5%A5%BD&d=ñ";
        let inbound = urlencoded(body, None);
        assert_eq!(values(&inbound, "a"), ["😀"]);
        assert_eq!(values(&inbound, "b"), ["Привет"]);
        assert_eq!(values(&inbound, "c"), ["你好"]);
        assert_eq!(values(&inbound, "d"), ["ñ"]);
    }

    #[test]
    fn plus_is_a_space_and_encoded_plus_is_a_plus() {
        let inbound = urlencoded("full+name=Ana+Lopez&phone=%2B34+912", None);
        assert_eq!(values(&inbound, "full name"), ["Ana Lopez"]);
        assert_eq!(values(&inbound, "phone"), ["+34 912"]);
    }

    #[test]
    fn repeated_keys_and_bracketed_names_keep_every_value_in_order() {
        let inbound = urlencoded("a=1&b[]=x&a=2&b[]=y&a=3", None);
        assert_eq!(values(&inbound, "a"), ["1", "2", "3"]);
        assert_eq!(values(&inbound, "b"), ["x", "y"]);
        let names: Vec<_> = inbound.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn piece_without_equals_is_a_name_with_an_empty_value() {
        let inbound = urlencoded("subscribe&&name=Ana&", None);
        assert_eq!(values(&inbound, "subscribe"), [""]);
        assert_eq!(values(&inbound, "name"), ["Ana"]);
        assert_eq!(inbound.len(), 2);
    }

    #[test]
    fn only_the_first_equals_splits_name_from_value() {
        let inbound = urlencoded("q=a=b;c", None);
        assert_eq!(values(&inbound, "q"), ["a=b;c"]);
    }

    #[test]
    fn invalid_percent_sequences_stay_as_written() {
        let inbound = urlencoded("rate=100%&x=%zz", None);
        assert_eq!(values(&inbound, "rate"), ["100%"]);
        assert_eq!(values(&inbound, "x"), ["%zz"]);
    }

    #[test]
    fn unknown_charset_label_is_malformed_and_names_the_label() {
        let error = decode_urlencoded(b"a=1", Some("klingon-8"), &limits()).unwrap_err();
        assert!(
            matches!(&error, BodyError::Malformed { message } if message.contains("klingon-8"))
        );
        let error = decode_urlencoded(b"_charset_=nope&a=1", None, &limits()).unwrap_err();
        assert!(
            matches!(&error, BodyError::Malformed { message } if message.contains("_charset_"))
        );
    }

    #[test]
    fn too_many_fields_is_too_large() {
        let small = BodyLimits {
            max_fields: 2,
            ..limits()
        };
        assert!(decode_urlencoded(b"a=1&b=2", None, &small).is_ok());
        let error = decode_urlencoded(b"a=1&b=2&c=3", None, &small).unwrap_err();
        assert_eq!(error.code(), "body_too_large");
    }

    #[test]
    fn oversize_field_value_is_too_large_and_names_the_field() {
        let small = BodyLimits {
            max_field_bytes: 4,
            ..limits()
        };
        let error = decode_urlencoded(b"note=12345", None, &small).unwrap_err();
        assert!(matches!(&error, BodyError::TooLarge { message, .. } if message.contains("note")));
    }

    #[tokio::test]
    async fn content_type_is_matched_case_insensitively_with_parameters() {
        for content_type in [
            "Application/X-WWW-Form-URLEncoded",
            "application/x-www-form-urlencoded; charset=UTF-8",
            "application/x-www-form-urlencoded;charset=\"utf-8\";",
        ] {
            let inbound = fields(decode_ok(content_type, "name=Ana").await);
            assert_eq!(values(&inbound, "name"), ["Ana"], "{content_type}");
        }
        let inbound = fields(
            decode_ok(
                "application/x-www-form-urlencoded; CHARSET = latin1",
                "n=caf%E9",
            )
            .await,
        );
        assert_eq!(values(&inbound, "n"), ["café"]);
    }

    const BOUNDARY: &str = "----leadgateBoundary7MA4YWxk";

    /// One test part: name, filename, Content-Type, contents.
    type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

    fn multipart_body(parts: &[Part<'_>]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, filename, content_type, data) in parts {
            body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
            let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
            if let Some(filename) = filename {
                disposition.push_str(&format!("; filename=\"{filename}\""));
            }
            body.extend_from_slice(disposition.as_bytes());
            body.extend_from_slice(b"\r\n");
            if let Some(content_type) = content_type {
                body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    fn multipart_type() -> String {
        format!("multipart/form-data; boundary={BOUNDARY}")
    }

    #[tokio::test]
    async fn multipart_text_parts_are_fields_and_file_parts_are_dropped() {
        let body = multipart_body(&[
            ("name", None, None, "Zoë 😀".as_bytes()),
            (
                "cv",
                Some("cv.pdf"),
                Some("application/pdf"),
                b"%PDF-1.4 \x00\xff binary",
            ),
            ("interest[]", None, None, b"a"),
            ("interest[]", None, None, b"b"),
            (
                "empty_file",
                Some(""),
                Some("application/octet-stream"),
                b"",
            ),
        ]);
        let inbound = fields(decode_ok(&multipart_type(), body).await);
        assert_eq!(values(&inbound, "name"), ["Zoë 😀"]);
        assert_eq!(values(&inbound, "interest"), ["a", "b"]);
        assert!(inbound.get("cv").is_none());
        assert!(inbound.get("empty_file").is_none());
        assert_eq!(inbound.len(), 2);
    }

    #[tokio::test]
    async fn multipart_part_charset_and_charset_part_are_honoured() {
        let body = multipart_body(&[
            ("_charset_", None, None, b"windows-1251"),
            ("name", None, None, b"\xC8\xE2\xE0\xED"),
            (
                "city",
                None,
                Some("text/plain; charset=iso-8859-1"),
                b"M\xFCnchen",
            ),
        ]);
        let inbound = fields(decode_ok(&multipart_type(), body).await);
        assert_eq!(values(&inbound, "name"), ["Иван"]);
        assert_eq!(values(&inbound, "city"), ["München"]);
    }

    #[tokio::test]
    async fn oversize_file_part_is_too_large() {
        let small = BodyLimits {
            max_file_bytes: 8,
            ..limits()
        };
        let body = multipart_body(&[
            ("name", None, None, b"Ana"),
            ("photo", Some("me.jpg"), Some("image/jpeg"), b"0123456789"),
        ]);
        let error = decode(Some(&multipart_type()), body.into(), &small)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, BodyError::TooLarge { message, .. } if message.contains("photo")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn file_part_within_its_cap_may_exceed_the_text_field_cap() {
        let small = BodyLimits {
            max_field_bytes: 4,
            max_file_bytes: 100,
            ..limits()
        };
        let body = multipart_body(&[
            ("n", None, None, b"Ana"),
            ("photo", Some("me.jpg"), Some("image/jpeg"), b"0123456789"),
        ]);
        let inbound = fields(
            decode(Some(&multipart_type()), body.into(), &small)
                .await
                .unwrap(),
        );
        assert_eq!(values(&inbound, "n"), ["Ana"]);
    }

    #[tokio::test]
    async fn multipart_without_boundary_is_malformed() {
        let error = decode(
            Some("multipart/form-data"),
            Bytes::from_static(b"x"),
            &limits(),
        )
        .await
        .unwrap_err();
        assert!(matches!(&error, BodyError::Malformed { message } if message.contains("boundary")));
    }

    #[tokio::test]
    async fn multipart_with_a_boundary_the_body_does_not_use_is_malformed() {
        let body = multipart_body(&[("name", None, None, b"Ana")]);
        let error = decode(
            Some("multipart/form-data; boundary=somethingElse"),
            body.into(),
            &limits(),
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), "malformed_body", "{error}");
    }

    #[tokio::test]
    async fn truncated_multipart_body_is_malformed() {
        let mut body = multipart_body(&[("name", None, None, b"Ana")]);
        body.truncate(body.len() - 10);
        let error = decode(Some(&multipart_type()), body.into(), &limits())
            .await
            .unwrap_err();
        assert_eq!(error.code(), "malformed_body", "{error}");
    }

    #[tokio::test]
    async fn json_body_is_returned_for_the_caller_to_judge() {
        for content_type in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.partner+json",
        ] {
            let decoded = decode_ok(content_type, r#"{"FirstName":"Ana"}"#).await;
            assert_eq!(
                decoded,
                Decoded::Json(serde_json::json!({"FirstName": "Ana"})),
                "{content_type}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_json_is_rejected_with_line_and_column() {
        let error = decode(
            Some("application/json"),
            Bytes::from_static(b"{\n  \"name\": \"Ana\",\n  oops\n}"),
            &limits(),
        )
        .await
        .unwrap_err();
        let BodyError::Malformed { message } = &error else {
            panic!("expected malformed, got {error:?}");
        };
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("column"), "{message}");
    }

    #[test]
    fn json_with_a_byte_order_mark_is_accepted() {
        let value = parse_json(b"\xEF\xBB\xBF{\"a\":\"1\"}").unwrap();
        assert_eq!(value, serde_json::json!({"a": "1"}));
    }

    #[tokio::test]
    async fn unsupported_or_missing_media_type_lists_the_accepted_types() {
        for content_type in [Some("text/plain"), Some("application/xml"), Some(""), None] {
            let error = decode(content_type, Bytes::from_static(b"a=1"), &limits())
                .await
                .unwrap_err();
            assert!(
                matches!(error, BodyError::UnsupportedMediaType { .. }),
                "{content_type:?}"
            );
            assert!(error.to_string().contains("multipart/form-data"), "{error}");
            assert_eq!(error.code(), "unsupported_media_type");
        }
    }

    #[test]
    fn flat_json_numbers_booleans_nulls_and_lists_become_fields() {
        let value = parse_json(
            r#"{"name":"Zoë","age":42,"big":9007199254740993,"id":18446744073709551615,
                "neg":-7,"ratio":1.5,"ok":true,"gone":null,"tags":["a",2,false,null],"none":[],
                "huge":18446744073709551616123,"exp":1e3,"cents":1.50,"tiny":-2.5E-7}"#
                .as_bytes(),
        )
        .unwrap();
        let inbound = json_to_fields(&value, &limits()).unwrap();
        assert_eq!(values(&inbound, "name"), ["Zoë"]);
        assert_eq!(values(&inbound, "age"), ["42"]);
        assert_eq!(values(&inbound, "big"), ["9007199254740993"]);
        assert_eq!(values(&inbound, "id"), ["18446744073709551615"]);
        assert_eq!(values(&inbound, "neg"), ["-7"]);
        assert_eq!(values(&inbound, "ratio"), ["1.5"]);
        assert_eq!(values(&inbound, "ok"), ["true"]);
        assert_eq!(values(&inbound, "tags"), ["a", "2", "false"]);
        assert_eq!(values(&inbound, "huge"), ["18446744073709551616123"]);
        assert_eq!(values(&inbound, "exp"), ["1e3"]);
        assert_eq!(values(&inbound, "cents"), ["1.50"]);
        assert_eq!(values(&inbound, "tiny"), ["-2.5E-7"]);
        assert!(inbound.get("gone").is_none());
        assert!(inbound.get("none").is_none());
    }

    #[test]
    fn flat_json_keeps_the_order_fields_were_sent_in() {
        let value = parse_json(br#"{"zeta":"1","alpha":"2","mid":"3"}"#).unwrap();
        let inbound = json_to_fields(&value, &limits()).unwrap();
        let names: Vec<_> = inbound.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
    }

    #[test]
    fn nested_object_in_flat_json_is_malformed_and_names_the_field() {
        for body in [
            &br#"{"name":"Ana","address":{"city":"Rome"}}"#[..],
            br#"{"name":"Ana","address":[["Rome"]]}"#,
        ] {
            let value = parse_json(body).unwrap();
            let error = json_to_fields(&value, &limits()).unwrap_err();
            assert!(
                matches!(&error, BodyError::Malformed { message } if message.contains("\"address\"")),
                "{error}"
            );
            assert!(!error.to_string().contains("Rome"), "{error}");
        }
    }

    #[test]
    fn non_object_json_is_not_flat_fields() {
        for body in [&b"[1,2]"[..], b"\"Ana\"", b"null"] {
            let value = parse_json(body).unwrap();
            let error = json_to_fields(&value, &limits()).unwrap_err();
            assert_eq!(error.code(), "malformed_body");
        }
    }

    #[test]
    fn flat_json_beyond_the_field_count_is_too_large() {
        let small = BodyLimits {
            max_fields: 3,
            ..limits()
        };
        let value = serde_json::json!({"a": ["1", "2"], "b": "3", "c": "4"});
        let error = json_to_fields(&value, &small).unwrap_err();
        assert_eq!(error.code(), "body_too_large");
    }

    #[test]
    fn leadsin_shaped_json_has_the_same_caps_as_flat_fields() {
        let small = BodyLimits {
            max_fields: 4,
            max_field_bytes: 10,
            ..limits()
        };
        let fits = serde_json::json!({"FirstName": "Ana", "LastName": "Ruiz",
            "Extra": [{"ID": "1", "Value": "1234567890"}, {"ID": "2", "Value": "x"}]});
        assert_eq!(check_leadsin_limits(&fits, &small), Ok(()));

        let long_value = serde_json::json!({"FirstName": "Ana",
            "Extra": [{"ID": "1", "Value": "x"}, {"ID": "2", "Value": "12345678901"}]});
        let BodyError::TooLarge { message, fields } =
            check_leadsin_limits(&long_value, &small).unwrap_err()
        else {
            panic!("expected too large");
        };
        assert!(message.contains("Extra[1].Value"), "{message}");
        assert_eq!(
            fields,
            BTreeMap::from([(
                "Extra[1].Value".to_owned(),
                vec!["is longer than 10 bytes".to_owned()]
            )])
        );
        assert!(
            !message.contains("12345678901"),
            "values are not echoed: {message}"
        );

        let long_key = serde_json::json!({"FirstName": "Ana", "Email": [{"Address1234": "a"}]});
        let error = check_leadsin_limits(&long_key, &small).unwrap_err();
        assert!(
            error.to_string().contains("Email[0].Address1234"),
            "{error}"
        );

        let many = serde_json::json!({"FirstName": "Ana", "LastName": "Ruiz",
            "Extra": [{"ID": "1"}, {"ID": "2"}, {"ID": "3"}]});
        let BodyError::TooLarge { fields, .. } = check_leadsin_limits(&many, &small).unwrap_err()
        else {
            panic!("expected too large");
        };
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["Extra"]);
        assert!(fields["Extra"][0].contains("3 entries"), "{fields:?}");
    }

    #[test]
    fn json_is_read_exactly_with_escapes_nesting_whitespace_and_repeated_keys() {
        let text = "{ \"a\" : [ 1 , { \"b\":\"caf\\u00e9 \\\"q\\\" \\\\\" } , [ ] , { } , true , false , null ] ,\n\t\"k\":\"x\", \"k\":2 , \"é\": -0.0 }";
        let value = parse_json(text.as_bytes()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a": ["1", {"b": "café \"q\" \\"}, [], {}, true, false, null],
                "k": "2", "é": "-0.0"})
        );
        let keys: Vec<_> = value.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "k", "é"]);
        for scalar in ["42", "\"text\"", "true", "null", " [ ] "] {
            assert!(parse_json(scalar.as_bytes()).is_ok(), "{scalar}");
        }
    }

    #[test]
    fn json_nested_beyond_the_bound_is_malformed_and_within_it_is_read() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let deepest = parse_json(nested(MAX_JSON_DEPTH).as_bytes()).unwrap();
        let mut inner = &deepest;
        for _ in 0..MAX_JSON_DEPTH {
            inner = &inner[0];
        }
        assert_eq!(inner, "1");
        let objects = format!(
            "{}\"1\"{}",
            "{\"a\":".repeat(MAX_JSON_DEPTH + 1),
            "}".repeat(MAX_JSON_DEPTH + 1)
        );
        for text in [nested(MAX_JSON_DEPTH + 1), objects, nested(100_000)] {
            let error = parse_json(text.as_bytes()).unwrap_err();
            assert_eq!(error.code(), "malformed_body");
        }
    }

    #[test]
    fn invalid_json_is_refused_before_the_exact_reading() {
        for text in ["{\"a\":1,}", "[1 2]", "{\"a\":01}", "\"\\x\"", "1 2", ""] {
            let error = parse_json(text.as_bytes()).unwrap_err();
            assert_eq!(error.code(), "malformed_body", "{text:?}");
        }
        let error = parse_json(b"{\"a\":\"\xff\"}").unwrap_err();
        assert_eq!(error.code(), "malformed_body");
    }
}
