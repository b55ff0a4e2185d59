//! Domain types of a lead. Raw strings from senders become these types through constructors
//! that can fail, so the rest of the code never handles an unchecked email or phone number.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::telemetry::{mask_email, mask_phone};

/// Our identifier of one accepted lead: a ULID, so ids sort by arrival time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeadId(Ulid);

impl LeadId {
    pub fn new() -> Self {
        Self(Ulid::new())
    }
}

impl Default for LeadId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for LeadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for LeadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeadId({})", self.0)
    }
}

impl FromStr for LeadId {
    type Err = ulid::DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s).map(Self)
    }
}

/// The `Type` Onpipeline accepts on an email address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailType {
    Work,
    Home,
    Other,
}

impl FromStr for EmailType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "work" => Ok(Self::Work),
            "home" => Ok(Self::Home),
            "other" => Ok(Self::Other),
            _ => Err(format!("email type must be work, home or other, not {s:?}")),
        }
    }
}

/// The `Type` Onpipeline accepts on a phone number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhoneType {
    Work,
    Home,
    Mobile,
    Other,
}

impl FromStr for PhoneType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "work" => Ok(Self::Work),
            "home" => Ok(Self::Home),
            "mobile" => Ok(Self::Mobile),
            "other" => Ok(Self::Other),
            _ => Err(format!(
                "phone type must be work, home, mobile or other, not {s:?}"
            )),
        }
    }
}

/// A syntactically valid email address (checked with the `validator` crate), trimmed.
#[derive(Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<Self, String> {
        use validator::ValidateEmail;
        let trimmed = raw.trim();
        // Invisible characters the cleaning keeps (a joiner, a soft hyphen) make an address
        // that looks right and is not the one typed.
        if trimmed.validate_email() && !trimmed.chars().any(is_format_char) {
            Ok(Self(trimmed.to_owned()))
        } else {
            Err("is not a valid email address".to_owned())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EmailAddress({})", mask_email(&self.0))
    }
}

/// A phone number: E.164 when it parses as a valid number (national numbers read with the
/// source's region), otherwise the sender's text, trimmed. A phone number is never dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct PhoneNumber(String);

/// A region (ISO 3166 alpha-2, e.g. `GB`) for reading national-format phone numbers.
pub type PhoneRegion = rlibphonenumber::Region;

impl PhoneNumber {
    /// Fails only on blank input.
    pub fn parse(raw: &str, region: Option<PhoneRegion>) -> Option<Self> {
        use rlibphonenumber::{PHONE_NUMBER_UTIL, PhoneNumberFormat};
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return None;
        }
        match PHONE_NUMBER_UTIL.parse(trimmed, region) {
            Ok(number) if number.is_valid() => {
                Some(Self(number.format_as(PhoneNumberFormat::E164).to_string()))
            }
            _ => Some(Self(trimmed.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", mask_phone(&self.0))
    }
}

/// Whether `c` ends a line: `\n`, `\r`, vertical tab, form feed, NEL, U+2028, U+2029.
pub fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// Whether `c` is an invisible character that only hides or reorders text: the bidirectional
/// embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069: "Trojan Source"), the
/// zero-width space and the byte order mark / zero-width no-break space (U+200B, U+FEFF). The
/// zero-width joiner and non-joiner (U+200D, U+200C) are not among them: emoji sequences and
/// several scripts' names need them.
fn is_hiding(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200b}' | '\u{feff}')
}

/// Whether `c` is a format character (Unicode general category Cf, as of Unicode 16): invisible,
/// and never part of an email address.
pub fn is_format_char(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

/// A sender's text with its control characters (C0, DEL, C1) removed, line breaks and tabs
/// excepted, and the characters that hide or reorder text ([`is_hiding`]): so no invisible
/// byte reaches a field. This is the one cleaning of sender text,
/// applied where it enters ([`Inbound::push`], [`clean_json`]), so every reader — the strict
/// and the lenient mapping alike — sees the same text. How the remaining line breaks are
/// written is the target field's business (the mapping joins them for one-line fields).
pub fn clean_text(text: &str) -> Cow<'_, str> {
    let is_noise = |c: char| (c.is_control() && !is_line_break(c) && c != '\t') || is_hiding(c);
    if !text.chars().any(is_noise) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.chars().filter(|c| !is_noise(*c)).collect())
}

/// Cleans every string in a JSON body (see [`clean_text`]); keys are left as sent, as they
/// only select fields.
pub fn clean_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(text) => {
            if let Cow::Owned(clean) = clean_text(text) {
                *text = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(clean_json),
        Value::Object(object) => object.values_mut().for_each(clean_json),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The fields a sender submitted, in the order they first appeared. A name submitted several
/// times (repeated keys, `name[]`) keeps every value in order. Names and values are cleaned of
/// control characters as they are added ([`clean_text`]). Blank values are kept here and
/// treated as absent by the mapping.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Inbound {
    fields: Vec<(String, Vec<String>)>,
    /// Position of each name in `fields`, kept once there are [`Self::INDEXED_FROM`] names: a
    /// platform body may carry thousands of fields, and a scan per name would make reading
    /// it quadratic. Small forms, the common case, do without it.
    index: Option<HashMap<String, usize>>,
}

impl Inbound {
    const INDEXED_FROM: usize = 32;

    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one value, name and value cleaned ([`clean_text`]); a trailing `[]` on the name is
    /// dropped (`interest[]` → `interest`).
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let mut name = cleaned(name.into());
        if let Some(stripped) = name.strip_suffix("[]") {
            name = stripped.to_owned();
        }
        let value = cleaned(value.into());
        match self.position(&name) {
            Some(at) => self.fields[at].1.push(value),
            None => {
                if let Some(index) = &mut self.index {
                    index.insert(name.clone(), self.fields.len());
                }
                self.fields.push((name, vec![value]));
                if self.index.is_none() && self.fields.len() >= Self::INDEXED_FROM {
                    let index = self
                        .fields
                        .iter()
                        .enumerate()
                        .map(|(at, (n, _))| (n.clone(), at))
                        .collect();
                    self.index = Some(index);
                }
            }
        }
    }

    fn position(&self, name: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(name).copied(),
            None => self.fields.iter().position(|(n, _)| n == name),
        }
    }

    /// All values of one field, blank ones included.
    pub fn get(&self, name: &str) -> Option<&[String]> {
        self.position(name).map(|at| self.fields[at].1.as_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.fields.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// `text` through [`clean_text`], reusing its buffer when nothing had to go.
fn cleaned(text: String) -> String {
    match clean_text(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(clean) => clean,
    }
}

impl fmt::Debug for Inbound {
    /// Field names only: values are personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.fields.iter().map(|(n, _)| n))
            .finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Inbound {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        let mut inbound = Inbound::new();
        for (k, v) in iter {
            inbound.push(k, v);
        }
        inbound
    }
}

/// One email entry of a Leadsin payload.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailEntry {
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Type")]
    pub kind: EmailType,
}

/// One phone entry of a Leadsin payload.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneEntry {
    #[serde(rename = "Number")]
    pub number: String,
    #[serde(rename = "Type")]
    pub kind: PhoneType,
}

/// One custom field of a Leadsin payload, addressed by its Onpipeline ID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraEntry {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Value")]
    pub value: String,
}

/// The JSON body of `POST /Leadsin`, field names as Onpipeline spells them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadsinPayload {
    #[serde(rename = "FirstName")]
    pub first_name: String,
    #[serde(rename = "LastName")]
    pub last_name: String,
    #[serde(rename = "Phone", default, skip_serializing_if = "Vec::is_empty")]
    pub phone: Vec<PhoneEntry>,
    #[serde(rename = "Email", default, skip_serializing_if = "Vec::is_empty")]
    pub email: Vec<EmailEntry>,
    #[serde(rename = "OrgName", default, skip_serializing_if = "Option::is_none")]
    pub org_name: Option<String>,
    #[serde(
        rename = "AddressLine1",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub address_line1: Option<String>,
    #[serde(
        rename = "AddressLine2",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub address_line2: Option<String>,
    #[serde(rename = "Postcode", default, skip_serializing_if = "Option::is_none")]
    pub postcode: Option<String>,
    #[serde(rename = "City", default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(rename = "Region", default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(rename = "Country", default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(rename = "Extra", default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<ExtraEntry>,
}

impl fmt::Debug for LeadsinPayload {
    /// Names and custom values are left out and emails and phones masked: this may reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeadsinPayload")
            .field(
                "email",
                &self
                    .email
                    .iter()
                    .map(|e| mask_email(&e.address))
                    .collect::<Vec<_>>(),
            )
            .field(
                "phone",
                &self
                    .phone
                    .iter()
                    .map(|p| mask_phone(&p.number))
                    .collect::<Vec<_>>(),
            )
            .field(
                "extra_ids",
                &self.extra.iter().map(|e| &e.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What the sender gave us, kept with a queued lead so a dead-lettered lead can be mapped
/// again after its source's mapping is fixed, then replayed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// Flat fields (forms, flat partner JSON, platform fields), in arrival order.
    Fields { fields: Vec<(String, Vec<String>)> },
    /// A body already in Leadsin's shape (partners).
    Leadsin { body: serde_json::Value },
}

impl Input {
    pub fn from_inbound(inbound: &Inbound) -> Self {
        Input::Fields {
            fields: inbound
                .iter()
                .map(|(name, values)| (name.to_owned(), values.to_vec()))
                .collect(),
        }
    }
}

impl fmt::Debug for Input {
    /// Field names only: values are personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Fields { fields } => f
                .debug_tuple("Input::Fields")
                .field(&fields.iter().map(|(n, _)| n).collect::<Vec<_>>())
                .finish(),
            Input::Leadsin { .. } => f.write_str("Input::Leadsin(..)"),
        }
    }
}

/// A Meta (Facebook/Instagram) lead known only by the ids of its webhook notification; the
/// forwarder reads it from the Graph API before mapping and delivering it. Ids are strings:
/// they can exceed 2^53.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaLeadRef {
    pub leadgen_id: String,
    pub page_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adgroup_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_time: Option<String>,
}

/// What the forwarder has to do with a queued lead.
#[allow(
    clippy::large_enum_variant,
    reason = "one per lead, moved rather than copied"
)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    /// Send this payload to Leadsin. `input` is what it was mapped from.
    Deliver {
        payload: LeadsinPayload,
        input: Input,
    },
    /// Read the lead from Meta's Graph API, map it with the source's rules, then deliver it.
    FetchMeta { lead: MetaLeadRef },
}

/// A lead as it sits in the queue: everything the forwarder needs to deliver it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedLead {
    pub id: LeadId,
    /// The source id from the sources file (`website`, `acme`, …).
    pub source: String,
    pub received_at: DateTime<Utc>,
    pub work: Work,
    /// When an operator last replayed it from the dead letters: its delivery schedule (and
    /// `LEADGATE_RETRY_MAX_AGE`) starts again from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_with_surrounding_spaces_is_trimmed_and_accepted() {
        let email = EmailAddress::parse("  ana@example.com ").unwrap();
        assert_eq!(email.as_str(), "ana@example.com");
    }

    #[test]
    fn email_without_at_sign_is_rejected() {
        assert!(EmailAddress::parse("ana.example.com").is_err());
        assert!(EmailAddress::parse("ana@").is_err());
    }

    #[test]
    fn national_phone_is_normalised_with_the_region() {
        let gb = "GB".parse().unwrap();
        let phone = PhoneNumber::parse("020 7946 0018", Some(gb)).unwrap();
        assert_eq!(phone.as_str(), "+442079460018");
    }

    #[test]
    fn international_phone_is_normalised_without_a_region() {
        let phone = PhoneNumber::parse("+34 912 345 678", None).unwrap();
        assert_eq!(phone.as_str(), "+34912345678");
    }

    #[test]
    fn unparseable_phone_is_kept_as_given() {
        let phone = PhoneNumber::parse(" call me after 6 ", None).unwrap();
        assert_eq!(phone.as_str(), "call me after 6");
    }

    #[test]
    fn blank_phone_is_absent() {
        assert!(PhoneNumber::parse("   ", None).is_none());
    }

    #[test]
    fn many_fields_keep_their_order_and_every_repeated_value() {
        let mut inbound = Inbound::new();
        for round in 0..2 {
            for n in 0..100 {
                inbound.push(format!("f{n}"), format!("{round}"));
            }
        }
        inbound.push("f3[]", "2");
        assert_eq!(inbound.len(), 100);
        assert_eq!(inbound.get("f3").unwrap(), ["0", "1", "2"]);
        assert_eq!(inbound.get("f99").unwrap(), ["0", "1"]);
        assert!(inbound.get("f100").is_none());
        let names: Vec<String> = (0..100).map(|n| format!("f{n}")).collect();
        assert_eq!(inbound.iter().map(|(n, _)| n).collect::<Vec<_>>(), names);
    }

    #[test]
    fn bracketed_names_collect_every_value_in_order() {
        let inbound: Inbound = [("interest[]", "a"), ("name", "x"), ("interest[]", "b")]
            .into_iter()
            .collect();
        assert_eq!(inbound.get("interest").unwrap(), ["a", "b"]);
        assert_eq!(
            inbound.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["interest", "name"]
        );
    }

    #[test]
    fn inbound_names_and_values_lose_control_characters_but_keep_line_breaks_and_tabs() {
        let inbound: Inbound = [
            ("e\u{0}mail", "ana@exa\u{7}mple.com\u{9b}"),
            ("message", "one\r\ntwo\u{85}three\u{2028}four\tfive\u{7f}"),
        ]
        .into_iter()
        .collect();
        assert_eq!(inbound.get("email").unwrap(), ["ana@example.com"]);
        assert_eq!(
            inbound.get("message").unwrap(),
            ["one\r\ntwo\u{85}three\u{2028}four\tfive"]
        );
    }

    #[test]
    fn hiding_characters_are_removed_and_joiners_kept() {
        let family = "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}";
        let inbound: Inbound = [
            ("email", "x@example.com\u{200b}"),
            (
                "name",
                "Ana \u{202e}zepoL\u{202c} \u{2066}R\u{2069}\u{feff}",
            ),
            ("message", family),
            (
                "persian",
                "\u{645}\u{6cc}\u{200c}\u{62e}\u{648}\u{627}\u{647}\u{645}",
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(inbound.get("email").unwrap(), ["x@example.com"]);
        assert_eq!(inbound.get("name").unwrap(), ["Ana zepoL R"]);
        assert_eq!(inbound.get("message").unwrap(), [family]);
        assert_eq!(
            inbound.get("persian").unwrap(),
            ["\u{645}\u{6cc}\u{200c}\u{62e}\u{648}\u{627}\u{647}\u{645}"]
        );
        let mut body = serde_json::json!({"FirstName": "\u{202d}Ana\u{200b}", "LastName": family});
        clean_json(&mut body);
        assert_eq!(
            body,
            serde_json::json!({"FirstName": "Ana", "LastName": family})
        );
    }

    #[test]
    fn an_email_with_a_format_character_is_invalid() {
        for raw in [
            "x@example.com\u{200b}",
            "x\u{200d}@example.com",
            "x@exa\u{ad}mple.com",
            "x@example.com\u{202e}",
            "\u{2060}x@example.com",
        ] {
            assert!(EmailAddress::parse(raw).is_err(), "{raw:?}");
        }
        assert!(EmailAddress::parse("x@example.com").is_ok());
    }

    #[test]
    fn every_string_of_a_json_body_is_cleaned_and_its_keys_and_numbers_are_not() {
        let mut body = serde_json::json!({"FirstName": "A\u{0}na", "Email": [{"Address": "a\u{1b}@b.example"}],
            "Extra": [{"ID": 7, "Value": "x\ny\u{9b}"}], "k\u{7}": true});
        clean_json(&mut body);
        assert_eq!(
            body,
            serde_json::json!({"FirstName": "Ana", "Email": [{"Address": "a@b.example"}],
                "Extra": [{"ID": 7, "Value": "x\ny"}], "k\u{7}": true})
        );
    }

    #[test]
    fn debug_output_masks_personal_data() {
        let payload = LeadsinPayload {
            first_name: "Ana".into(),
            last_name: "Lopez".into(),
            email: vec![EmailEntry {
                address: "ana.lopez@example.com".into(),
                kind: EmailType::Work,
            }],
            phone: vec![PhoneEntry {
                number: "+442079460018".into(),
                kind: PhoneType::Mobile,
            }],
            ..Default::default()
        };
        let debug = format!("{payload:?}");
        assert!(!debug.contains("ana.lopez@example.com"), "{debug}");
        assert!(!debug.contains("2079460018"), "{debug}");
        assert!(!debug.contains("Lopez"), "{debug}");
    }
}
