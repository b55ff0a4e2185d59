//! Pure mapping: the fields a sender posted plus its source's rules become a Leadsin payload,
//! or a rejection naming every bad field. No I/O here; table tests sit at the bottom.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::lead::{
    EmailAddress, EmailEntry, EmailType, ExtraEntry, Inbound, LeadsinPayload, PhoneEntry,
    PhoneNumber, PhoneType, is_line_break,
};

/// A standard Leadsin field an incoming field can be mapped to, as written in `[source.fields]`:
/// `FirstName`, `LastName`, `FullName` (split: first word → FirstName, the rest → LastName),
/// `Email` / `Email.work|home|other`, `Phone` / `Phone.work|home|mobile|other`, `OrgName`,
/// `AddressLine1`, `AddressLine2`, `Postcode`, `City`, `Region`, `Country`.
/// A bare `Email` or `Phone` means type `work`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    FirstName,
    LastName,
    FullName,
    Email(EmailType),
    Phone(PhoneType),
    OrgName,
    AddressLine1,
    AddressLine2,
    Postcode,
    City,
    Region,
    Country,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (field, kind) = match s.split_once('.') {
            Some((field, kind)) => (field, Some(kind)),
            None => (s, None),
        };
        let target = match (field, kind) {
            ("Email", None) => Target::Email(EmailType::Work),
            ("Email", Some(kind)) => Target::Email(kind.parse()?),
            ("Phone", None) => Target::Phone(PhoneType::Work),
            ("Phone", Some(kind)) => Target::Phone(kind.parse()?),
            (_, Some(_)) => return Err(format!("only Email and Phone take a type, not {s:?}")),
            ("FirstName", None) => Target::FirstName,
            ("LastName", None) => Target::LastName,
            ("FullName", None) => Target::FullName,
            ("OrgName", None) => Target::OrgName,
            ("AddressLine1", None) => Target::AddressLine1,
            ("AddressLine2", None) => Target::AddressLine2,
            ("Postcode", None) => Target::Postcode,
            ("City", None) => Target::City,
            ("Region", None) => Target::Region,
            ("Country", None) => Target::Country,
            _ => {
                return Err(format!(
                    "unknown Leadsin field {s:?}; expected one of FirstName, LastName, FullName, \
                     Email[.work|.home|.other], Phone[.work|.home|.mobile|.other], OrgName, \
                     AddressLine1, AddressLine2, Postcode, City, Region, Country"
                ));
            }
        };
        Ok(target)
    }
}

/// The ID of an Onpipeline custom field (`Extra[].ID`): non-empty ASCII letters and digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtraId(String);

impl ExtraId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ExtraId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "custom field ID {s:?} must be non-empty letters and digits, as Onpipeline shows it"
            ))
        }
    }
}

impl fmt::Debug for ExtraId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExtraId({})", self.0)
    }
}

impl fmt::Display for ExtraId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How one source's fields become a Leadsin payload (built from the sources file).
#[derive(Clone, Debug, Default)]
pub struct MappingRules {
    /// Incoming field name → standard Leadsin field, in file order.
    pub fields: Vec<(String, Target)>,
    /// Incoming field name → custom field ID, in file order.
    pub extra: Vec<(String, ExtraId)>,
    /// Custom field ID → fixed value sent with every lead of the source.
    pub constants: Vec<(ExtraId, String)>,
    /// When set, fields that are neither in `fields` nor in `extra` go to this custom field as
    /// `key: value` lines; when unset they are dropped.
    pub unmapped_extra: Option<ExtraId>,
    /// Region used to read national-format phone numbers.
    pub phone_region: Option<crate::lead::PhoneRegion>,
    /// Used for whichever of first and last name is missing when only one is known;
    /// empty means such a lead is rejected with `last_name_required` / `first_name_required`.
    pub last_name_fallback: String,
}

/// Why a lead was refused: a stable machine-readable code, a sentence, and messages per field
/// (keyed by the name the sender used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
    pub fields: BTreeMap<String, Vec<String>>,
}

impl Rejection {
    /// One or more fields are invalid (bad email, bad type, unknown Leadsin key, …).
    pub const VALIDATION_FAILED: &'static str = "validation_failed";
    /// Neither a first nor a last name arrived.
    pub const NAME_REQUIRED: &'static str = "name_required";
    /// Only a last name arrived and the source has no fallback.
    pub const FIRST_NAME_REQUIRED: &'static str = "first_name_required";
    /// Only a first name arrived and the source has no fallback.
    pub const LAST_NAME_REQUIRED: &'static str = "last_name_required";
}

/// Maps flat fields (forms, flat partner JSON) with the source's rules.
///
/// Rules, in brief: values are trimmed and blank values count as absent; names starting with
/// `_` are control fields (`_next`, `_charset_`) and are never forwarded; several values of a
/// text field, or several fields mapped to one text field, are joined with `", "` (name parts
/// with a space); several values of an email or phone field become several entries, and an
/// address or number already sent is not sent twice; emails must parse (`validation_failed`
/// naming the field otherwise); phones are normalised to E.164 or kept as given; a missing first
/// or last name takes `last_name_fallback`, and without one the lead is refused
/// (`first_name_required` / `last_name_required`); no name at all → `name_required`.
///
/// Custom fields (`Extra`) come out in a fixed order: mapped fields in file order, then the
/// constants, then the unmapped-fields note. An ID is sent once: a constant wins over a value
/// the sender supplied for the same ID (the operator fixed it; a sender must not override it),
/// and a mapped value wins over the unmapped-fields note. Config validation should refuse such
/// overlaps; this order only makes the outcome predictable if one slips through.
///
/// Every problem is reported at once. The code is the name problem when there is one
/// (`name_required`, then `first_name_required` / `last_name_required`), else
/// `validation_failed`; the field messages always include every bad field.
pub fn map_fields(inbound: &Inbound, rules: &MappingRules) -> Result<LeadsinPayload, Rejection> {
    let mut payload = LeadsinPayload::default();
    let mut errors = FieldErrors::default();
    let mut names = NameParts::default();
    let mut name_fields = NameFields::default();

    for (field, target) in &rules.fields {
        let field = field_name(field);
        if is_control(field) {
            continue;
        }
        match target {
            Target::FirstName => name_fields.first.push(field),
            Target::LastName => name_fields.last.push(field),
            Target::FullName => name_fields.full.push(field),
            _ => {}
        }
        for value in present(inbound.get(field).unwrap_or_default(), Lines::Join) {
            let value = &*value;
            match *target {
                Target::FirstName => names.first.push(value.to_owned()),
                Target::LastName => names.last.push(value.to_owned()),
                Target::FullName => names.full.push(value.to_owned()),
                Target::Email(kind) => match EmailAddress::parse(value) {
                    Ok(address) => add_email(&mut payload.email, &address, kind),
                    Err(message) => errors.add(field, message),
                },
                Target::Phone(kind) => {
                    if let Some(number) = PhoneNumber::parse(value, rules.phone_region) {
                        add_phone(&mut payload.phone, &number, kind);
                    }
                }
                Target::OrgName => append_text(&mut payload.org_name, value),
                Target::AddressLine1 => append_text(&mut payload.address_line1, value),
                Target::AddressLine2 => append_text(&mut payload.address_line2, value),
                Target::Postcode => append_text(&mut payload.postcode, value),
                Target::City => append_text(&mut payload.city, value),
                Target::Region => append_text(&mut payload.region, value),
                Target::Country => append_text(&mut payload.country, value),
            }
        }
    }

    let mut mapped = ExtraValues::default();
    for (field, id) in &rules.extra {
        let field = field_name(field);
        if is_control(field) {
            continue;
        }
        for value in present(inbound.get(field).unwrap_or_default(), Lines::Keep) {
            mapped.add(id, value.into_owned());
        }
    }
    let unmapped = rules
        .unmapped_extra
        .as_ref()
        .and_then(|id| unmapped_note(inbound, rules).map(|note| (id, note)));
    payload.extra = assemble_extra(mapped, &rules.constants, unmapped);

    finish(
        payload,
        names,
        &name_fields,
        &rules.last_name_fallback,
        errors,
    )
}

/// What [`map_fields_lenient`] had to repair in a platform lead.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Repairs {
    /// The names of the repaired fields (`name` for a lead that had no name at all).
    pub fields: Vec<String>,
    /// Invalid values that had nowhere to go, as `(field, value)`: Leadsin has no free-text
    /// field of its own, so without `unmapped_extra` they are not forwarded. Personal data:
    /// log them masked only.
    pub dropped: Vec<(String, String)>,
}

impl Repairs {
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.dropped.is_empty()
    }
}

impl fmt::Debug for Repairs {
    /// Field names, and dropped values masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repairs")
            .field("fields", &self.fields)
            .field(
                "dropped",
                &self
                    .dropped
                    .iter()
                    .map(|(field, value)| (field, crate::telemetry::mask_email(value)))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Maps fields from a platform sender, which cannot fix its data and must never be refused
/// for it (Meta, Google, form tools). Where [`map_fields`] would refuse:
///
/// * an invalid value of an email field is not sent as an email; it goes into the
///   unmapped-fields note as `<field> (invalid): value` when the source has `unmapped_extra`,
///   and is dropped (and listed in [`Repairs::dropped`]) when it has not;
/// * a missing first or last name takes the source's `last_name_fallback`, or `"-"` when that
///   is empty; with no name at all both do.
///
/// Returns the payload and what it had to repair (for counting and for a log line).
pub fn map_fields_lenient(inbound: &Inbound, rules: &MappingRules) -> (LeadsinPayload, Repairs) {
    let rejection = match map_fields(inbound, rules) {
        Ok(payload) => return (payload, Repairs::default()),
        Err(rejection) => rejection,
    };
    let fallback = if rules.last_name_fallback.is_empty() {
        "-".to_owned()
    } else {
        rules.last_name_fallback.clone()
    };
    let mut repaired: Vec<String> = rejection.fields.keys().cloned().collect();
    let mut dropped = Vec::new();

    // Invalid emails become a note instead of an error.
    let email_fields: HashSet<&str> = rules
        .fields
        .iter()
        .filter(|(_, target)| matches!(target, Target::Email(_)))
        .map(|(field, _)| field_name(field))
        .collect();
    let mut cleaned = Inbound::new();
    for (name, values) in inbound.iter() {
        for value in values {
            // The same text the strict mapping read, so a value it accepted is never moved aside.
            let invalid = email_fields.contains(name)
                && field_text(value, Lines::Join)
                    .is_some_and(|text| EmailAddress::parse(&text).is_err());
            if invalid {
                if rules.unmapped_extra.is_none() {
                    dropped.push((name.to_owned(), value.trim().to_owned()));
                }
                cleaned.push(format!("{name} (invalid)"), value.clone());
            } else {
                cleaned.push(name, value.clone());
            }
        }
    }
    let mut relaxed = rules.clone();
    relaxed.last_name_fallback = fallback.clone();
    match map_fields(&cleaned, &relaxed) {
        Ok(payload) => (
            payload,
            Repairs {
                fields: repaired,
                dropped,
            },
        ),
        Err(_) => {
            // No name at all: give the first name the fallback too.
            const FALLBACK_FIELD: &str = "leadgate fallback name";
            relaxed
                .fields
                .push((FALLBACK_FIELD.to_owned(), Target::FirstName));
            cleaned.push(FALLBACK_FIELD, fallback.clone());
            if !repaired.iter().any(|r| r == "name") {
                repaired.push("name".to_owned());
            }
            let payload = map_fields(&cleaned, &relaxed).unwrap_or_else(|_| LeadsinPayload {
                first_name: fallback.clone(),
                last_name: fallback,
                ..LeadsinPayload::default()
            });
            (
                payload,
                Repairs {
                    fields: repaired,
                    dropped,
                },
            )
        }
    }
}

/// The standard keys of a Leadsin body, as Onpipeline spells them.
const LEADSIN_KEYS: [&str; 12] = [
    "FirstName",
    "LastName",
    "Email",
    "Phone",
    "OrgName",
    "AddressLine1",
    "AddressLine2",
    "Postcode",
    "City",
    "Region",
    "Country",
    "Extra",
];

/// Whether a JSON body is in Leadsin's own shape rather than flat fields: an object with
/// `FirstName` or `LastName`, or whose `Email`, `Phone` or `Extra` is a list of objects (exact
/// PascalCase), not counting keys the source's `rules` map as flat field names. So
/// `{"FirstName": …, "Email": "a@b.example"}` is a Leadsin body whose `Email` has the wrong
/// shape (and [`map_leadsin`] says so), not a flat body without a mapped name; a flat body that
/// only happens to carry an `OrgName` or a string `Email` stays on the flat-fields road, and so
/// does a partner whose `[source.fields]` maps the PascalCase names itself.
pub fn looks_like_leadsin(value: &Value, rules: &MappingRules) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    let maps_itself = |key: &str| {
        rules.fields.iter().any(|(name, _)| field_name(name) == key)
            || rules.extra.iter().any(|(name, _)| field_name(name) == key)
    };
    let present = |key: &&str| object.contains_key(*key) && !maps_itself(key);
    let names_a_person = ["FirstName", "LastName"].iter().any(present);
    let has_an_entry_list = ["Email", "Phone", "Extra"]
        .iter()
        .filter(|key| present(key))
        .any(|key| {
            matches!(object.get(*key), Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(Value::is_object))
        });
    names_a_person || has_an_entry_list
}

/// Maps a body that already has Leadsin's own shape (`FirstName`, `Email[{Address,Type}]`, …,
/// `Extra[{ID,Value}]`), as partners may send it: the same checks as [`map_fields`], and the
/// source's constants added.
///
/// Details: a missing or blank `Type` means `work` (matched case-insensitively); an entry with
/// a blank `Address` / `Number` / `Value` is absent; `Extra` IDs must be letters and digits
/// (numbers are accepted as IDs); text fields accept strings and numbers; unknown keys, at the
/// top or inside an entry, are `validation_failed` so a partner learns of its typos. Field keys
/// in messages are paths such as `Email[0].Address`.
pub fn map_leadsin(body: &Value, rules: &MappingRules) -> Result<LeadsinPayload, Rejection> {
    let Some(object) = body.as_object() else {
        return Err(Rejection {
            code: Rejection::VALIDATION_FAILED,
            message: "a Leadsin body must be a JSON object with FirstName, LastName, Email, …"
                .to_owned(),
            fields: BTreeMap::new(),
        });
    };
    let mut payload = LeadsinPayload::default();
    let mut errors = FieldErrors::default();
    let mut names = NameParts::default();
    let mut extra = ExtraValues::default();

    for (key, value) in object {
        let text = |errors: &mut FieldErrors| scalar_text(key, value, false, errors);
        match key.as_str() {
            "FirstName" => names.first.extend(text(&mut errors)),
            "LastName" => names.last.extend(text(&mut errors)),
            "OrgName" => payload.org_name = text(&mut errors),
            "AddressLine1" => payload.address_line1 = text(&mut errors),
            "AddressLine2" => payload.address_line2 = text(&mut errors),
            "Postcode" => payload.postcode = text(&mut errors),
            "City" => payload.city = text(&mut errors),
            "Region" => payload.region = text(&mut errors),
            "Country" => payload.country = text(&mut errors),
            "Email" => {
                for (path, entry) in entries(key, value, &["Address", "Type"], &mut errors) {
                    let kind = entry_kind(&path, entry, EmailType::Work, &mut errors);
                    let address_path = format!("{path}.Address");
                    let address = entry
                        .get("Address")
                        .and_then(|v| scalar_text(&address_path, v, false, &mut errors));
                    match (address.as_deref().map(EmailAddress::parse), kind) {
                        (Some(Ok(address)), Some(kind)) => {
                            add_email(&mut payload.email, &address, kind)
                        }
                        (Some(Err(message)), _) => errors.add(&address_path, message),
                        _ => {}
                    }
                }
            }
            "Phone" => {
                for (path, entry) in entries(key, value, &["Number", "Type"], &mut errors) {
                    let kind = entry_kind(&path, entry, PhoneType::Work, &mut errors);
                    let number = entry
                        .get("Number")
                        .and_then(|v| scalar_text(&format!("{path}.Number"), v, false, &mut errors))
                        .and_then(|raw| PhoneNumber::parse(&raw, rules.phone_region));
                    if let (Some(number), Some(kind)) = (number, kind) {
                        add_phone(&mut payload.phone, &number, kind);
                    }
                }
            }
            "Extra" => {
                for (path, entry) in entries(key, value, &["ID", "Value"], &mut errors) {
                    let id_path = format!("{path}.ID");
                    let id = match entry.get("ID") {
                        None | Some(Value::Null) => {
                            errors.add(&id_path, "is required");
                            None
                        }
                        Some(raw) => match scalar_text(&id_path, raw, false, &mut errors) {
                            Some(text) => match text.parse::<ExtraId>() {
                                Ok(id) => Some(id),
                                Err(message) => {
                                    errors.add(&id_path, message);
                                    None
                                }
                            },
                            // A blank ID names no field, as a missing one does: say so rather
                            // than drop the value unseen. (Other shapes were reported above.)
                            None => {
                                if raw.is_string() {
                                    errors.add(&id_path, "is required");
                                }
                                None
                            }
                        },
                    };
                    let value = entry
                        .get("Value")
                        .and_then(|v| scalar_text(&format!("{path}.Value"), v, true, &mut errors));
                    if let (Some(id), Some(value)) = (id, value) {
                        extra.add(&id, value);
                    }
                }
            }
            unknown => errors.add(unknown, unknown_key_message(unknown)),
        }
    }
    payload.extra = assemble_extra(extra, &rules.constants, None);

    let name_fields = NameFields {
        first: vec!["FirstName"],
        last: vec!["LastName"],
        full: Vec::new(),
    };
    finish(
        payload,
        names,
        &name_fields,
        &rules.last_name_fallback,
        errors,
    )
}

/// Field messages gathered while mapping, keyed by the name the sender used; every problem is
/// kept so the sender can fix them all at once.
#[derive(Default)]
struct FieldErrors(BTreeMap<String, Vec<String>>);

impl FieldErrors {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        let message = message.into();
        let messages = self.0.entry(field.to_owned()).or_default();
        // Two bad values in one field would otherwise repeat the same sentence.
        if !messages.contains(&message) {
            messages.push(message);
        }
    }

    fn keys(&self) -> String {
        self.0
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Name values as they arrived, before the name rules decide.
#[derive(Default)]
struct NameParts {
    first: Vec<String>,
    last: Vec<String>,
    full: Vec<String>,
}

/// The sender's fields that could supply each part of a name, for messages.
#[derive(Default)]
struct NameFields<'a> {
    first: Vec<&'a str>,
    last: Vec<&'a str>,
    full: Vec<&'a str>,
}

struct NameProblem {
    code: &'static str,
    message: String,
    /// The fields to flag, and the message for each.
    fields: Vec<String>,
    field_message: String,
}

/// Applies the name rules: explicit first/last names, then `FullName` split (first word → first
/// name, the rest → last name) for whatever is still empty, then the fallback.
fn resolve_names(
    parts: NameParts,
    fields: &NameFields<'_>,
    fallback: &str,
) -> Result<(String, String), NameProblem> {
    let join = |values: &[String]| (!values.is_empty()).then(|| values.join(" "));
    let mut first = join(&parts.first);
    let mut last = join(&parts.last);
    if let Some(full) = join(&parts.full) {
        let mut words = full.split_whitespace();
        let head = words.next().map(str::to_owned);
        let rest = words.collect::<Vec<_>>().join(" ");
        if first.is_none() {
            first = head;
        }
        if last.is_none() && !rest.is_empty() {
            last = Some(rest);
        }
    }
    let fallback = fallback.trim();
    let fallback = (!fallback.is_empty()).then(|| fallback.to_owned());
    // Which part is missing, and the sender's fields that could have supplied it.
    let (code, what, named) = match (first, last, fallback) {
        (Some(first), Some(last), _) => return Ok((first, last)),
        (Some(first), None, Some(fallback)) => return Ok((first, fallback)),
        (None, Some(last), Some(fallback)) => return Ok((fallback, last)),
        (Some(_), None, None) => (
            Rejection::LAST_NAME_REQUIRED,
            "a last name",
            fields.last.clone(),
        ),
        (None, Some(_), None) => (
            Rejection::FIRST_NAME_REQUIRED,
            "a first name",
            fields.first.clone(),
        ),
        (None, None, _) => (
            Rejection::NAME_REQUIRED,
            "a name",
            [&fields.first[..], &fields.last[..]].concat(),
        ),
    };
    let candidates = dedupe(
        named
            .into_iter()
            .chain(fields.full.iter().copied())
            .collect(),
    );
    let message = if candidates.is_empty() {
        format!("{what} is required, and this source maps no field to supply it")
    } else {
        format!("{what} is required: send {}", or_list(&candidates))
    };
    Err(NameProblem {
        code,
        message,
        fields: candidates.into_iter().map(str::to_owned).collect(),
        field_message: format!("{what} is required"),
    })
}

/// Settles names and errors into the payload or one rejection naming every problem.
fn finish(
    mut payload: LeadsinPayload,
    names: NameParts,
    name_fields: &NameFields<'_>,
    fallback: &str,
    mut errors: FieldErrors,
) -> Result<LeadsinPayload, Rejection> {
    let problem = match resolve_names(names, name_fields, fallback) {
        Ok((first, last)) => {
            payload.first_name = first;
            payload.last_name = last;
            None
        }
        Err(problem) => Some(problem),
    };
    match problem {
        None if errors.0.is_empty() => Ok(payload),
        None => Err(Rejection {
            code: Rejection::VALIDATION_FAILED,
            message: format!("these fields are invalid: {}", errors.keys()),
            fields: errors.0,
        }),
        Some(problem) => {
            let mut message = problem.message;
            if !errors.0.is_empty() {
                message.push_str(&format!(
                    "; these fields are invalid too: {}",
                    errors.keys()
                ));
            }
            for field in &problem.fields {
                errors.add(field, problem.field_message.as_str());
            }
            Err(Rejection {
                code: problem.code,
                message,
                fields: errors.0,
            })
        }
    }
}

/// Custom field values by ID, IDs in order of first appearance.
#[derive(Default)]
struct ExtraValues(Vec<(ExtraId, Vec<String>)>);

impl ExtraValues {
    fn add(&mut self, id: &ExtraId, value: String) {
        match self.0.iter_mut().find(|(known, _)| known == id) {
            Some((_, values)) => values.push(value),
            None => self.0.push((id.clone(), vec![value])),
        }
    }
}

/// Mapped values (joined with `", "`), then constants, then the unmapped-fields note; each ID
/// once, a constant winning over a mapped value and a mapped value over the note.
fn assemble_extra(
    mapped: ExtraValues,
    constants: &[(ExtraId, String)],
    unmapped: Option<(&ExtraId, String)>,
) -> Vec<ExtraEntry> {
    let mut entries: Vec<ExtraEntry> = Vec::new();
    let is_constant = |id: &ExtraId| constants.iter().any(|(constant, _)| constant == id);
    for (id, values) in mapped.0 {
        if !is_constant(&id) {
            entries.push(ExtraEntry {
                id: id.as_str().to_owned(),
                value: values.join(", "),
            });
        }
    }
    let mut push_new = |id: &ExtraId, value: String| {
        if !entries.iter().any(|entry| entry.id == id.as_str()) {
            entries.push(ExtraEntry {
                id: id.as_str().to_owned(),
                value,
            });
        }
    };
    for (id, value) in constants {
        push_new(id, value.clone());
    }
    if let Some((id, note)) = unmapped {
        push_new(id, note);
    }
    entries
}

/// The fields in neither table (control fields aside) as `name: value` lines, in arrival order.
fn unmapped_note(inbound: &Inbound, rules: &MappingRules) -> Option<String> {
    let known: HashSet<&str> = rules
        .fields
        .iter()
        .map(|(field, _)| field_name(field))
        .chain(rules.extra.iter().map(|(field, _)| field_name(field)))
        .collect();
    let lines: Vec<String> = inbound
        .iter()
        .filter(|(name, _)| !is_control(name) && !known.contains(name))
        .filter_map(|(name, values)| {
            // One field, one line: neither its name nor a value may start another.
            let values = present(values, Lines::Join);
            let name = with_lines(name, Lines::Join);
            (!values.is_empty()).then(|| format!("{}: {}", name.trim(), values.join(", ")))
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// A field name as `Inbound` stores it: `interest[]` in the sources file finds `interest`.
fn field_name(configured: &str) -> &str {
    configured.strip_suffix("[]").unwrap_or(configured)
}

/// `_next`, `_charset_`, `_gotcha`, …: instructions to the gateway, never lead data.
fn is_control(name: &str) -> bool {
    name.starts_with('_')
}

/// The values as text for their target ([`field_text`]), blank ones left out.
fn present(values: &[String], lines: Lines) -> Vec<Cow<'_, str>> {
    values
        .iter()
        .filter_map(|value| field_text(value, lines))
        .collect()
}

/// One value as it reaches a field: its line breaks written as `lines` says, trimmed; `None`
/// when blank. Control characters were removed where the value entered
/// ([`crate::lead::clean_text`]), so this is the same text for every reader of the value.
fn field_text(value: &str, lines: Lines) -> Option<Cow<'_, str>> {
    let text = match with_lines(value, lines) {
        Cow::Borrowed(text) => Cow::Borrowed(text.trim()),
        Cow::Owned(text) => Cow::Owned(text.trim().to_owned()),
    };
    (!text.is_empty()).then_some(text)
}

/// How line breaks are written in a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lines {
    /// Single-line fields (names, emails, phones, address parts, the unmapped note's lines):
    /// a line break or a tab becomes a space.
    Join,
    /// Custom field values, which may hold a message: line breaks become `\n`, tabs stay.
    Keep,
}

/// Writes the line breaks of `text` (`\r\n`, `\r`, `\n`, vertical tab, form feed, NEL, U+2028,
/// U+2029) and its tabs as `lines` says, so a value can never forge a `key: value` line in the
/// unmapped-fields note.
fn with_lines(text: &str, lines: Lines) -> Cow<'_, str> {
    let special = |c: char| is_line_break(c) || (c == '\t' && lines == Lines::Join);
    if !text.chars().any(special) {
        return Cow::Borrowed(text);
    }
    let mut written = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' && chars.peek() == Some(&'\n') {
            continue; // the `\n` that follows stands for the pair
        }
        match (c, lines) {
            (c, Lines::Join) if special(c) => written.push(' '),
            (c, Lines::Keep) if is_line_break(c) => written.push('\n'),
            (c, _) => written.push(c),
        }
    }
    Cow::Owned(written)
}

fn append_text(slot: &mut Option<String>, value: &str) {
    match slot {
        Some(text) => {
            text.push_str(", ");
            text.push_str(value);
        }
        None => *slot = Some(value.to_owned()),
    }
}

/// Adds an address unless it was already sent (compared case-insensitively); the first
/// occurrence keeps its type.
fn add_email(list: &mut Vec<EmailEntry>, address: &EmailAddress, kind: EmailType) {
    let lower = address.as_str().to_lowercase();
    if !list
        .iter()
        .any(|entry| entry.address.to_lowercase() == lower)
    {
        list.push(EmailEntry {
            address: address.as_str().to_owned(),
            kind,
        });
    }
}

/// Adds a number unless the same (normalised) number was already sent.
fn add_phone(list: &mut Vec<PhoneEntry>, number: &PhoneNumber, kind: PhoneType) {
    if !list.iter().any(|entry| entry.number == number.as_str()) {
        list.push(PhoneEntry {
            number: number.as_str().to_owned(),
            kind,
        });
    }
}

fn dedupe(items: Vec<&str>) -> Vec<&str> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(*item))
        .collect()
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// A Leadsin scalar as trimmed text (see [`field_text`]): strings and numbers, and for
/// an `Extra` entry's `Value` (`extra_value`) booleans too, with line breaks kept; `null` and
/// blank text are absent; anything else is an error at `path`.
fn scalar_text(
    path: &str,
    value: &Value,
    extra_value: bool,
    errors: &mut FieldErrors,
) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => {
            let lines = if extra_value {
                Lines::Keep
            } else {
                Lines::Join
            };
            field_text(text, lines).map(Cow::into_owned)
        }
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) if extra_value => Some(flag.to_string()),
        _ => {
            errors.add(path, "must be a string");
            None
        }
    }
}

/// The entries of a Leadsin list (`Email`, `Phone`, `Extra`) with their paths (`Email[0]`);
/// unknown keys inside an entry are reported.
fn entries<'v>(
    key: &str,
    value: &'v Value,
    allowed: &[&str],
    errors: &mut FieldErrors,
) -> Vec<(String, &'v Map<String, Value>)> {
    let example = match key {
        "Email" => r#"[{"Address": "ana@example.com", "Type": "work"}]"#,
        "Phone" => r#"[{"Number": "+34600111222", "Type": "mobile"}]"#,
        _ => r#"[{"ID": "1111111", "Value": "…"}]"#,
    };
    let shape = format!(
        "must be a list of {{{}}} objects, such as {example}",
        allowed.join(", ")
    );
    let items = match value {
        Value::Null => return Vec::new(),
        Value::Array(items) => items,
        _ => {
            errors.add(key, shape);
            return Vec::new();
        }
    };
    let mut found = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let path = format!("{key}[{index}]");
        match item {
            Value::Null => {}
            Value::Object(entry) => {
                for name in entry.keys() {
                    if !allowed.contains(&name.as_str()) {
                        errors.add(
                            &format!("{path}.{name}"),
                            format!("is not a field of {key}; use {}", allowed.join(" and ")),
                        );
                    }
                }
                found.push((path, entry));
            }
            _ => errors.add(&path, shape.clone()),
        }
    }
    found
}

/// The `Type` of an email or phone entry: missing or blank means `default`, matched
/// case-insensitively; `None` (with an error recorded) when it is not a known type.
fn entry_kind<K>(
    path: &str,
    entry: &Map<String, Value>,
    default: K,
    errors: &mut FieldErrors,
) -> Option<K>
where
    K: FromStr<Err = String>,
{
    let path = format!("{path}.Type");
    match entry.get("Type") {
        None | Some(Value::Null) => Some(default),
        Some(Value::String(kind)) if kind.trim().is_empty() => Some(default),
        Some(Value::String(kind)) => match kind.trim().to_ascii_lowercase().parse() {
            Ok(kind) => Some(kind),
            Err(message) => {
                errors.add(&path, message);
                None
            }
        },
        Some(_) => {
            errors.add(&path, "must be a string");
            None
        }
    }
}

fn unknown_key_message(key: &str) -> String {
    match LEADSIN_KEYS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(key))
    {
        Some(known) => format!("is not a Leadsin field; did you mean {known}?"),
        None => format!(
            "is not a Leadsin field; the fields are {}",
            LEADSIN_KEYS.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Inbound {
        pairs.iter().copied().collect()
    }

    fn id(raw: &str) -> ExtraId {
        raw.parse().unwrap()
    }

    fn rules(fields: &[(&str, &str)]) -> MappingRules {
        MappingRules {
            fields: fields
                .iter()
                .map(|(field, target)| ((*field).to_owned(), target.parse().unwrap()))
                .collect(),
            ..MappingRules::default()
        }
    }

    /// A typical website form.
    fn website() -> MappingRules {
        rules(&[
            ("first_name", "FirstName"),
            ("last_name", "LastName"),
            ("full_name", "FullName"),
            ("email", "Email"),
            ("phone", "Phone.mobile"),
            ("company", "OrgName"),
        ])
    }

    fn with_fallback(mut rules: MappingRules, fallback: &str) -> MappingRules {
        rules.last_name_fallback = fallback.to_owned();
        rules
    }

    fn names(payload: &LeadsinPayload) -> (&str, &str) {
        (&payload.first_name, &payload.last_name)
    }

    fn extras(payload: &LeadsinPayload) -> Vec<(&str, &str)> {
        payload
            .extra
            .iter()
            .map(|e| (e.id.as_str(), e.value.as_str()))
            .collect()
    }

    fn emails(payload: &LeadsinPayload) -> Vec<(&str, EmailType)> {
        payload
            .email
            .iter()
            .map(|e| (e.address.as_str(), e.kind))
            .collect()
    }

    fn phones(payload: &LeadsinPayload) -> Vec<(&str, PhoneType)> {
        payload
            .phone
            .iter()
            .map(|p| (p.number.as_str(), p.kind))
            .collect()
    }

    fn field_keys(rejection: &Rejection) -> Vec<&str> {
        rejection.fields.keys().map(String::as_str).collect()
    }

    // ---- names ----

    #[test]
    fn first_and_last_name_fields_fill_the_payload() {
        let payload = map_fields(
            &form(&[("first_name", "Ana"), ("last_name", "López")]),
            &website(),
        )
        .unwrap();
        assert_eq!(names(&payload), ("Ana", "López"));
    }

    #[test]
    fn values_are_trimmed_before_mapping() {
        let inbound = form(&[
            ("first_name", "  Ana\t"),
            ("last_name", "\nLópez "),
            ("company", " Acme "),
        ]);
        let payload = map_fields(&inbound, &website()).unwrap();
        assert_eq!(names(&payload), ("Ana", "López"));
        assert_eq!(payload.org_name.as_deref(), Some("Acme"));
    }

    #[test]
    fn whitespace_only_values_count_as_absent() {
        let inbound = form(&[
            ("first_name", "   "),
            ("last_name", "López"),
            ("company", " "),
        ]);
        let rejection = map_fields(&inbound, &website()).unwrap_err();
        assert_eq!(rejection.code, Rejection::FIRST_NAME_REQUIRED);
        let payload = map_fields(&inbound, &with_fallback(website(), "Unknown")).unwrap();
        assert_eq!(names(&payload), ("Unknown", "López"));
        assert_eq!(payload.org_name, None);
    }

    #[test]
    fn full_name_splits_into_first_word_and_the_rest() {
        let payload =
            map_fields(&form(&[("full_name", "  Ana  María   López ")]), &website()).unwrap();
        assert_eq!(names(&payload), ("Ana", "María López"));
    }

    #[test]
    fn full_name_only_fills_what_explicit_name_fields_left_empty() {
        let cases = [
            (
                vec![("first_name", "Anita"), ("full_name", "Ana López")],
                ("Anita", "López"),
            ),
            (
                vec![("last_name", "Pérez"), ("full_name", "Ana López")],
                ("Ana", "Pérez"),
            ),
            (
                vec![
                    ("first_name", "Bo"),
                    ("last_name", "Li"),
                    ("full_name", "Ana López"),
                ],
                ("Bo", "Li"),
            ),
        ];
        for (fields, expected) in cases {
            let payload = map_fields(&form(&fields), &website()).unwrap();
            assert_eq!(names(&payload), expected, "{fields:?}");
        }
    }

    #[test]
    fn single_word_name_gets_placeholder_last_name() {
        let rules = with_fallback(website(), "(not given)");
        let payload = map_fields(&form(&[("full_name", "Cher")]), &rules).unwrap();
        assert_eq!(names(&payload), ("Cher", "(not given)"));
        let payload = map_fields(&form(&[("first_name", "Cher")]), &rules).unwrap();
        assert_eq!(names(&payload), ("Cher", "(not given)"));
    }

    #[test]
    fn single_word_name_without_fallback_is_rejected_with_last_name_required() {
        let rejection = map_fields(&form(&[("full_name", "Cher")]), &website()).unwrap_err();
        assert_eq!(rejection.code, Rejection::LAST_NAME_REQUIRED);
        assert_eq!(field_keys(&rejection), ["full_name", "last_name"]);
        assert!(
            rejection.message.contains("last_name or full_name"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn last_name_alone_takes_the_fallback_as_first_name() {
        let rules = with_fallback(website(), "Unknown");
        let payload = map_fields(&form(&[("last_name", "López")]), &rules).unwrap();
        assert_eq!(names(&payload), ("Unknown", "López"));
    }

    #[test]
    fn last_name_alone_without_fallback_is_rejected_with_first_name_required() {
        let rejection = map_fields(&form(&[("last_name", "López")]), &website()).unwrap_err();
        assert_eq!(rejection.code, Rejection::FIRST_NAME_REQUIRED);
        assert_eq!(field_keys(&rejection), ["first_name", "full_name"]);
    }

    #[test]
    fn no_name_at_all_is_rejected_with_name_required_listing_the_name_fields() {
        let rules = with_fallback(website(), "Unknown");
        let rejection = map_fields(&form(&[("email", "ana@example.com")]), &rules).unwrap_err();
        assert_eq!(rejection.code, Rejection::NAME_REQUIRED);
        assert!(
            rejection
                .message
                .contains("first_name, last_name or full_name"),
            "{}",
            rejection.message
        );
        assert_eq!(
            field_keys(&rejection),
            ["first_name", "full_name", "last_name"]
        );
    }

    #[test]
    fn no_name_when_the_source_maps_no_name_field_says_so() {
        let rejection = map_fields(
            &form(&[("email", "ana@example.com")]),
            &rules(&[("email", "Email")]),
        )
        .unwrap_err();
        assert_eq!(rejection.code, Rejection::NAME_REQUIRED);
        assert!(
            rejection.message.contains("maps no field"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn several_first_name_fields_join_with_a_space() {
        let rules = rules(&[
            ("first", "FirstName"),
            ("middle", "FirstName"),
            ("last", "LastName"),
        ]);
        let inbound = form(&[("middle", "María"), ("first", "Ana"), ("last", "López")]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(names(&payload), ("Ana María", "López"));
    }

    // ---- emails ----

    #[test]
    fn invalid_email_is_rejected_naming_the_incoming_field_without_echoing_it() {
        let inbound = form(&[
            ("first_name", "Ana"),
            ("last_name", "López"),
            ("email", "ana.lopez@"),
        ]);
        let rejection = map_fields(&inbound, &website()).unwrap_err();
        assert_eq!(rejection.code, Rejection::VALIDATION_FAILED);
        assert_eq!(field_keys(&rejection), ["email"]);
        assert!(
            !format!("{rejection:?}").contains("ana.lopez"),
            "{rejection:?}"
        );
    }

    #[test]
    fn bare_email_target_means_work_and_typed_targets_keep_their_type() {
        let rules = rules(&[
            ("n", "FullName"),
            ("email", "Email"),
            ("private", "Email.home"),
        ]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("private", "ana@home.example"),
            ("email", "ana@acme.example"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(
            emails(&payload),
            [
                ("ana@acme.example", EmailType::Work),
                ("ana@home.example", EmailType::Home)
            ]
        );
    }

    #[test]
    fn several_email_values_become_several_entries_with_the_target_type() {
        let rules = rules(&[("n", "FullName"), ("emails", "Email.other")]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("emails[]", "a@x.example"),
            ("emails[]", " "),
            ("emails[]", "b@x.example"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(
            emails(&payload),
            [
                ("a@x.example", EmailType::Other),
                ("b@x.example", EmailType::Other)
            ]
        );
    }

    #[test]
    fn duplicate_addresses_differing_only_in_case_are_sent_once() {
        let rules = rules(&[
            ("n", "FullName"),
            ("email", "Email"),
            ("confirm", "Email.home"),
        ]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("email", "Ana@Example.com"),
            ("confirm", "ana@example.COM"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(emails(&payload), [("Ana@Example.com", EmailType::Work)]);
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let rules = rules(&[
            ("n", "FullName"),
            ("email", "Email"),
            ("work_email", "Email"),
            ("ok", "Email"),
        ]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("email", "nope"),
            ("email", "also nope"),
            ("work_email", "@x"),
            ("ok", "ana@example.com"),
        ]);
        let rejection = map_fields(&inbound, &rules).unwrap_err();
        assert_eq!(rejection.code, Rejection::VALIDATION_FAILED);
        assert_eq!(field_keys(&rejection), ["email", "work_email"]);
        assert_eq!(
            rejection.fields["email"].len(),
            1,
            "one sentence per field, not per value"
        );
        assert!(
            rejection.message.contains("email, work_email"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn missing_name_takes_precedence_over_invalid_fields_but_keeps_their_messages() {
        let inbound = form(&[("email", "not-an-email")]);
        let rejection = map_fields(&inbound, &website()).unwrap_err();
        assert_eq!(rejection.code, Rejection::NAME_REQUIRED);
        assert_eq!(rejection.fields["email"], ["is not a valid email address"]);
        assert!(rejection.fields.contains_key("first_name"));
        assert!(
            rejection.message.contains("invalid too: email"),
            "{}",
            rejection.message
        );
    }

    // ---- phones ----

    #[test]
    fn phones_are_normalised_with_the_source_region_and_keep_their_type() {
        let mut rules = website();
        rules.phone_region = Some("GB".parse().unwrap());
        let inbound = form(&[
            ("full_name", "Ana López"),
            ("phone", "020 7946 0018"),
            ("phone", "+34 912 345 678"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(
            phones(&payload),
            [
                ("+442079460018", PhoneType::Mobile),
                ("+34912345678", PhoneType::Mobile)
            ]
        );
    }

    #[test]
    fn unparseable_phone_is_kept_as_given_and_never_rejected() {
        let inbound = form(&[
            ("full_name", "Ana López"),
            ("phone", " after 6pm: ext. 12 "),
        ]);
        let payload = map_fields(&inbound, &website()).unwrap();
        assert_eq!(
            phones(&payload),
            [("after 6pm: ext. 12", PhoneType::Mobile)]
        );
    }

    #[test]
    fn the_same_number_written_twice_is_sent_once() {
        let rules = rules(&[
            ("n", "FullName"),
            ("phone", "Phone"),
            ("mobile", "Phone.mobile"),
        ]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("phone", "+44 20 7946 0018"),
            ("mobile", "+442079460018"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(phones(&payload), [("+442079460018", PhoneType::Work)]);
    }

    // ---- text fields ----

    #[test]
    fn several_values_of_a_text_field_are_joined_with_commas() {
        let rules = rules(&[("n", "FullName"), ("street", "AddressLine1")]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("street[]", "Calle Mayor 1"),
            ("street[]", ""),
            ("street[]", "3º B"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(
            payload.address_line1.as_deref(),
            Some("Calle Mayor 1, 3º B")
        );
    }

    #[test]
    fn two_fields_mapped_to_one_text_target_join_in_file_order() {
        let rules = rules(&[
            ("n", "FullName"),
            ("dept", "OrgName"),
            ("company", "OrgName"),
        ]);
        let inbound = form(&[("n", "Ana López"), ("company", "Acme"), ("dept", "Sales")]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(payload.org_name.as_deref(), Some("Sales, Acme"));
    }

    #[test]
    fn every_address_target_reaches_its_own_field() {
        let rules = rules(&[
            ("n", "FullName"),
            ("a1", "AddressLine1"),
            ("a2", "AddressLine2"),
            ("zip", "Postcode"),
            ("city", "City"),
            ("state", "Region"),
            ("country", "Country"),
        ]);
        let inbound = form(&[
            ("n", "Ana López"),
            ("a1", "1 Main St"),
            ("a2", "Apt 2"),
            ("zip", "02134"),
            ("city", "Boston"),
            ("state", "MA"),
            ("country", "US"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        let got = [
            &payload.address_line1,
            &payload.address_line2,
            &payload.postcode,
            &payload.city,
            &payload.region,
            &payload.country,
        ]
        .map(|v| v.as_deref());
        assert_eq!(
            got,
            ["1 Main St", "Apt 2", "02134", "Boston", "MA", "US"].map(Some)
        );
    }

    // ---- control fields ----

    #[test]
    fn control_fields_are_never_forwarded_even_when_mapped() {
        let mut rules = rules(&[("n", "FullName"), ("_city", "City")]);
        rules.extra = vec![("_next".into(), id("7"))];
        rules.unmapped_extra = Some(id("99"));
        let inbound = form(&[
            ("n", "Ana López"),
            ("_city", "Paris"),
            ("_next", "https://example.com/thanks"),
            ("_charset_", "UTF-8"),
            ("message", "hi"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(payload.city, None);
        assert_eq!(extras(&payload), [("99", "message: hi")]);
    }

    // ---- custom fields ----

    #[test]
    fn mapped_extra_values_join_with_commas_and_blank_ones_are_absent() {
        let mut rules = rules(&[("n", "FullName")]);
        rules.extra = vec![("interest".into(), id("101")), ("budget".into(), id("102"))];
        let inbound = form(&[
            ("n", "Ana López"),
            ("interest[]", "CRM"),
            ("interest[]", " "),
            ("interest[]", "ERP"),
            ("budget", "  "),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(extras(&payload), [("101", "CRM, ERP")]);
    }

    #[test]
    fn two_fields_to_one_extra_id_join_in_file_order() {
        let mut rules = rules(&[("n", "FullName")]);
        rules.extra = vec![
            ("utm_source".into(), id("5")),
            ("utm_medium".into(), id("5")),
        ];
        let inbound = form(&[
            ("n", "Ana López"),
            ("utm_medium", "cpc"),
            ("utm_source", "google"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(extras(&payload), [("5", "google, cpc")]);
    }

    #[test]
    fn constants_are_sent_with_every_lead() {
        let mut rules = rules(&[("n", "FullName")]);
        rules.constants = vec![(id("300"), "Website".into()), (id("301"), "EN".into())];
        let payload = map_fields(&form(&[("n", "Ana López")]), &rules).unwrap();
        assert_eq!(extras(&payload), [("300", "Website"), ("301", "EN")]);
    }

    #[test]
    fn constant_wins_over_a_mapped_value_for_the_same_id() {
        let mut rules = rules(&[("n", "FullName")]);
        rules.extra = vec![("lead_source".into(), id("300"))];
        rules.constants = vec![(id("300"), "Website".into())];
        let inbound = form(&[("n", "Ana López"), ("lead_source", "spoofed")]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(extras(&payload), [("300", "Website")]);
    }

    #[test]
    fn unmapped_fields_become_name_value_lines_in_arrival_order() {
        let mut rules = website();
        rules.unmapped_extra = Some(id("900"));
        let inbound = form(&[
            ("message", "Call me"),
            ("full_name", "Ana López"),
            ("colour[]", "red"),
            ("budget", "  "),
            ("colour[]", "blue"),
            ("agree", "yes"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(
            extras(&payload),
            [("900", "message: Call me\ncolour: red, blue\nagree: yes")]
        );
    }

    #[test]
    fn unmapped_fields_are_dropped_when_no_unmapped_id_is_set() {
        let inbound = form(&[("full_name", "Ana López"), ("message", "Call me")]);
        let payload = map_fields(&inbound, &website()).unwrap();
        assert!(payload.extra.is_empty());
    }

    #[test]
    fn no_note_is_sent_when_every_unmapped_field_is_blank() {
        let mut rules = website();
        rules.unmapped_extra = Some(id("900"));
        let inbound = form(&[
            ("full_name", "Ana López"),
            ("message", " "),
            ("_next", "/thanks"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert!(payload.extra.is_empty());
    }

    #[test]
    fn extra_entries_come_out_mapped_then_constants_then_unmapped() {
        let mut rules = rules(&[("n", "FullName")]);
        rules.extra = vec![("b".into(), id("2")), ("a".into(), id("1"))];
        rules.constants = vec![(id("9"), "Website".into())];
        rules.unmapped_extra = Some(id("0"));
        let inbound = form(&[("other", "x"), ("a", "A"), ("n", "Ana López"), ("b", "B")]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(
            extras(&payload),
            [("2", "B"), ("1", "A"), ("9", "Website"), ("0", "other: x")]
        );
    }

    #[test]
    fn bracketed_name_in_the_rules_finds_the_collected_values() {
        let mut rules = rules(&[("n", "FullName")]);
        rules.extra = vec![("interest[]".into(), id("101"))];
        let inbound = form(&[
            ("n", "Ana López"),
            ("interest[]", "CRM"),
            ("interest[]", "ERP"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(extras(&payload), [("101", "CRM, ERP")]);
    }

    #[test]
    fn accents_emoji_and_non_latin_text_pass_through_unchanged() {
        let mut rules = website();
        rules.extra = vec![("note".into(), id("1"))];
        rules.unmapped_extra = Some(id("2"));
        let inbound = form(&[
            ("full_name", "Zoë Ørsted-Łukasiewicz"),
            ("company", "Ωmega 😀 株式会社"),
            ("note", "Привет, мир 🌍"),
            ("question", "こんにちは"),
            ("email", "zoe@bücher.example"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(names(&payload), ("Zoë", "Ørsted-Łukasiewicz"));
        assert_eq!(payload.org_name.as_deref(), Some("Ωmega 😀 株式会社"));
        assert_eq!(emails(&payload), [("zoe@bücher.example", EmailType::Work)]);
        assert_eq!(
            extras(&payload),
            [("1", "Привет, мир 🌍"), ("2", "question: こんにちは")]
        );
    }

    // ---- Leadsin's own shape ----

    #[test]
    fn leadsin_body_maps_every_standard_field() {
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith", "OrgName": "Company Inc.",
            "Email": [{"Address": "mike@company.com", "Type": "work"}],
            "Phone": [{"Number": "+1 202 555 0143", "Type": "mobile"}],
            "AddressLine1": "1 Main St", "AddressLine2": "Floor 2", "Postcode": 12345,
            "City": "Springfield", "Region": "IL", "Country": "US",
            "Extra": [{"ID": "1111111", "Value": "Managing Director"}]
        });
        let payload = map_leadsin(&body, &MappingRules::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&payload).unwrap(),
            json!({
                "FirstName": "Mike", "LastName": "Smith", "OrgName": "Company Inc.",
                "Email": [{"Address": "mike@company.com", "Type": "work"}],
                "Phone": [{"Number": "+12025550143", "Type": "mobile"}],
                "AddressLine1": "1 Main St", "AddressLine2": "Floor 2", "Postcode": "12345",
                "City": "Springfield", "Region": "IL", "Country": "US",
                "Extra": [{"ID": "1111111", "Value": "Managing Director"}]
            })
        );
    }

    #[test]
    fn leadsin_missing_or_blank_type_means_work_and_types_ignore_case() {
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith",
            "Email": [{"Address": "a@x.example"}, {"Address": "b@x.example", "Type": "HOME"}, {"Address": "c@x.example", "Type": " "}],
            "Phone": [{"Number": "12345"}, {"Number": "67890", "Type": "Other"}]
        });
        let payload = map_leadsin(&body, &MappingRules::default()).unwrap();
        assert_eq!(
            emails(&payload),
            [
                ("a@x.example", EmailType::Work),
                ("b@x.example", EmailType::Home),
                ("c@x.example", EmailType::Work)
            ]
        );
        assert_eq!(
            phones(&payload),
            [("12345", PhoneType::Work), ("67890", PhoneType::Other)]
        );
    }

    #[test]
    fn leadsin_errors_are_keyed_by_their_path_and_all_reported() {
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith",
            "Email": [{"Address": "ok@x.example"}, {"Address": "broken@"}, {"Address": "c@x.example", "Type": "mobile"}],
            "Phone": [{"Number": "1", "Type": "fax"}],
            "Extra": [{"ID": "12-34", "Value": "x"}, {"Value": "no id"}]
        });
        let rejection = map_leadsin(&body, &MappingRules::default()).unwrap_err();
        assert_eq!(rejection.code, Rejection::VALIDATION_FAILED);
        assert_eq!(
            field_keys(&rejection),
            [
                "Email[1].Address",
                "Email[2].Type",
                "Extra[0].ID",
                "Extra[1].ID",
                "Phone[0].Type"
            ]
        );
        assert!(
            !format!("{rejection:?}").contains("broken"),
            "{rejection:?}"
        );
    }

    #[test]
    fn a_blank_extra_id_is_required_like_a_missing_one() {
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith",
            "Extra": [{"ID": "", "Value": "x"}, {"ID": "  ", "Value": "y"}, {"Value": "z"}]
        });
        let rejection = map_leadsin(&body, &MappingRules::default()).unwrap_err();
        assert_eq!(rejection.code, Rejection::VALIDATION_FAILED);
        assert_eq!(
            field_keys(&rejection),
            ["Extra[0].ID", "Extra[1].ID", "Extra[2].ID"]
        );
        for messages in rejection.fields.values() {
            assert_eq!(messages, &["is required"]);
        }
    }

    #[test]
    fn leadsin_numeric_phone_and_extra_id_are_accepted() {
        let rules = MappingRules {
            phone_region: Some("IT".parse().unwrap()),
            ..MappingRules::default()
        };
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith",
            "Phone": [{"Number": 3123456789u64, "Type": "mobile"}],
            "Extra": [{"ID": 1111111, "Value": true}, {"ID": "2", "Value": 3.5}]
        });
        let payload = map_leadsin(&body, &rules).unwrap();
        assert_eq!(phones(&payload), [("+393123456789", PhoneType::Mobile)]);
        assert_eq!(extras(&payload), [("1111111", "true"), ("2", "3.5")]);
    }

    #[test]
    fn leadsin_unknown_top_level_keys_are_rejected_naming_them() {
        let body = json!({"FirstName": "Mike", "LastName": "Smith", "email": [], "Notes": "x"});
        let rejection = map_leadsin(&body, &MappingRules::default()).unwrap_err();
        assert_eq!(rejection.code, Rejection::VALIDATION_FAILED);
        assert_eq!(field_keys(&rejection), ["Notes", "email"]);
        assert!(rejection.fields["email"][0].contains("did you mean Email?"));
        assert!(rejection.fields["Notes"][0].contains("FirstName"));
    }

    #[test]
    fn leadsin_unknown_key_inside_an_entry_is_rejected() {
        let body = json!({"FirstName": "Mike", "LastName": "Smith", "Email": [{"address": "a@x.example"}]});
        let rejection = map_leadsin(&body, &MappingRules::default()).unwrap_err();
        assert_eq!(field_keys(&rejection), ["Email[0].address"]);
    }

    #[test]
    fn leadsin_lists_and_texts_of_the_wrong_shape_are_rejected() {
        let body = json!({
            "FirstName": ["Mike"], "LastName": "Smith",
            "Email": "mike@company.com", "Phone": [["1"]], "City": {"name": "Rome"}
        });
        let rejection = map_leadsin(&body, &MappingRules::default()).unwrap_err();
        assert_eq!(
            field_keys(&rejection),
            ["City", "Email", "FirstName", "Phone[0]"]
        );
    }

    #[test]
    fn leadsin_blank_entries_are_absent_and_duplicates_sent_once() {
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith", "OrgName": "  ",
            "Email": [{"Address": " "}, null, {"Address": "M@x.example"}, {"Address": "m@X.example", "Type": "home"}],
            "Phone": [{"Number": ""}],
            "Extra": [{"ID": "5", "Value": ""}, {"ID": "6", "Value": null}]
        });
        let payload = map_leadsin(&body, &MappingRules::default()).unwrap();
        assert_eq!(payload.org_name, None);
        assert_eq!(emails(&payload), [("M@x.example", EmailType::Work)]);
        assert!(payload.phone.is_empty());
        assert!(payload.extra.is_empty());
    }

    #[test]
    fn leadsin_constants_are_added_and_win_over_the_partners_value() {
        let rules = MappingRules {
            constants: vec![(id("300"), "Partner Acme".into())],
            ..MappingRules::default()
        };
        let body = json!({
            "FirstName": "Mike", "LastName": "Smith",
            "Extra": [{"ID": "300", "Value": "other"}, {"ID": "7", "Value": "a"}, {"ID": "7", "Value": "b"}]
        });
        let payload = map_leadsin(&body, &rules).unwrap();
        assert_eq!(extras(&payload), [("7", "a, b"), ("300", "Partner Acme")]);
    }

    #[test]
    fn leadsin_name_rules_match_the_form_rules() {
        let only_first = json!({"FirstName": "Cher", "Email": [{"Address": "cher@x.example"}]});
        let rejection = map_leadsin(&only_first, &MappingRules::default()).unwrap_err();
        assert_eq!(rejection.code, Rejection::LAST_NAME_REQUIRED);
        assert_eq!(field_keys(&rejection), ["LastName"]);

        let fallback = MappingRules {
            last_name_fallback: "(not given)".into(),
            ..MappingRules::default()
        };
        let payload = map_leadsin(&only_first, &fallback).unwrap();
        assert_eq!(names(&payload), ("Cher", "(not given)"));

        let nameless = json!({"FirstName": " ", "Email": [{"Address": "bad"}]});
        let rejection = map_leadsin(&nameless, &fallback).unwrap_err();
        assert_eq!(rejection.code, Rejection::NAME_REQUIRED);
        assert!(
            rejection.message.contains("FirstName or LastName"),
            "{}",
            rejection.message
        );
        assert_eq!(
            field_keys(&rejection),
            ["Email[0].Address", "FirstName", "LastName"]
        );
    }

    #[test]
    fn leadsin_body_that_is_not_an_object_is_rejected() {
        for body in [json!([]), json!("Mike"), json!(null)] {
            let rejection = map_leadsin(&body, &MappingRules::default()).unwrap_err();
            assert_eq!(rejection.code, Rejection::VALIDATION_FAILED, "{body}");
        }
    }

    #[test]
    fn leadsin_text_passes_unicode_through_unchanged() {
        let body = json!({"FirstName": "Zoë 😀", "LastName": "李", "City": "Москва", "Extra": [{"ID": "1", "Value": "こんにちは"}]});
        let payload = map_leadsin(&body, &MappingRules::default()).unwrap();
        assert_eq!(names(&payload), ("Zoë 😀", "李"));
        assert_eq!(payload.city.as_deref(), Some("Москва"));
        assert_eq!(extras(&payload), [("1", "こんにちは")]);
    }

    #[test]
    fn looks_like_leadsin_tells_leadsin_bodies_from_flat_fields() {
        let cases = [
            (json!({"FirstName": "Mike"}), true),
            (
                json!({"OrgName": "Acme", "Extra": [{"ID": "1", "Value": "x"}]}),
                true,
            ),
            (
                json!({"Email": [{"Address": "a@x.example"}], "Phone": null}),
                true,
            ),
            (json!({"first_name": "Mike", "email": "a@x.example"}), false),
            (json!({"FirstName": "Mike", "Email": "a@x.example"}), true),
            (json!({"first_name": "Mike", "Email": "a@x.example"}), false),
            (json!({"Email": ["a@x.example"]}), false),
            (json!({"firstname": "Mike"}), false),
            (json!([{"FirstName": "Mike"}]), false),
            // A flat partner body that only calls its company `OrgName`.
            (
                json!({"name": "Ana Lopez", "email": "ana@example.com", "OrgName": "Acme"}),
                false,
            ),
            (
                json!({"name": "Ana Lopez", "Phone": "+34 600", "OrgName": "Acme"}),
                false,
            ),
            (json!({"name": "Ana Lopez", "Extra": []}), false),
            (
                json!({"OrgName": "Acme", "Email": "a@x.example", "Phone": [{"Number": "1"}]}),
                true,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                looks_like_leadsin(&body, &MappingRules::default()),
                expected,
                "{body}"
            );
        }
        // A partner that maps the PascalCase names as flat fields keeps its flat road.
        let flat = rules(&[("FirstName", "FirstName"), ("Email", "Email")]);
        let body = json!({"FirstName": "Mike", "Email": "a@x.example"});
        assert!(!looks_like_leadsin(&body, &flat));
    }
    #[test]
    fn lenient_mapping_keeps_an_invalid_email_in_the_note_instead_of_refusing() {
        let mut rules = lenient_rules();
        rules.unmapped_extra = Some("4444444".parse().unwrap());
        let inbound: Inbound = [("name", "Ana Ruiz"), ("email", "ana.example.com")]
            .into_iter()
            .collect();
        let (payload, repaired) = map_fields_lenient(&inbound, &rules);
        assert_eq!(payload.first_name, "Ana");
        assert!(payload.email.is_empty());
        assert_eq!(payload.extra[0].value, "email (invalid): ana.example.com");
        assert_eq!(repaired.fields, ["email"]);
        assert!(repaired.dropped.is_empty());
    }

    #[test]
    fn lenient_mapping_without_a_note_lists_the_invalid_email_it_drops_and_debug_masks_it() {
        let rules = lenient_rules();
        let inbound: Inbound = [("name", "Ana Ruiz"), ("email", " ana@exa mple.com ")]
            .into_iter()
            .collect();
        let (payload, repaired) = map_fields_lenient(&inbound, &rules);
        assert!(payload.email.is_empty() && payload.extra.is_empty());
        assert_eq!(repaired.fields, ["email"]);
        assert_eq!(
            repaired.dropped,
            [("email".to_owned(), "ana@exa mple.com".to_owned())]
        );
        let debug = format!("{repaired:?}");
        assert!(!debug.contains("ana@"), "{debug}");
        assert!(debug.contains("a***@exa mple.com"), "{debug}");
    }

    #[test]
    fn lenient_mapping_fills_a_missing_name_with_the_fallback() {
        let mut rules = lenient_rules();
        rules.last_name_fallback = String::new();
        let single: Inbound = [("name", "Cher")].into_iter().collect();
        let (payload, _) = map_fields_lenient(&single, &rules);
        assert_eq!(
            (payload.first_name.as_str(), payload.last_name.as_str()),
            ("Cher", "-")
        );
        let none: Inbound = [("email", "x@example.com")].into_iter().collect();
        let (payload, repaired) = map_fields_lenient(&none, &rules);
        assert_eq!(
            (payload.first_name.as_str(), payload.last_name.as_str()),
            ("-", "-")
        );
        assert_eq!(payload.email[0].address, "x@example.com");
        assert!(repaired.fields.contains(&"name".to_owned()), "{repaired:?}");
    }

    #[test]
    fn lenient_mapping_reads_an_email_as_the_strict_mapping_does_when_repairing_a_name() {
        let mut rules = lenient_rules();
        rules.last_name_fallback = String::new();
        rules.unmapped_extra = Some("4444444".parse().unwrap());
        let inbound: Inbound = [("name", "Cher"), ("email", "cher@exa\u{7}mple.com\u{0}")]
            .into_iter()
            .collect();
        let (payload, repaired) = map_fields_lenient(&inbound, &rules);
        assert_eq!(
            emails(&payload),
            [("cher@example.com", EmailType::Work)],
            "a valid email is not moved into the note: {:?}",
            payload.extra
        );
        assert!(payload.extra.is_empty(), "{:?}", payload.extra);
        assert_eq!(payload.last_name, "-");
        assert!(repaired.dropped.is_empty(), "{repaired:?}");
    }

    #[test]
    fn lenient_mapping_changes_nothing_when_the_data_is_valid() {
        let rules = lenient_rules();
        let inbound: Inbound = [("name", "Ana Ruiz"), ("email", "ana@example.com")]
            .into_iter()
            .collect();
        assert_eq!(
            map_fields_lenient(&inbound, &rules),
            (map_fields(&inbound, &rules).unwrap(), Repairs::default())
        );
    }

    fn lenient_rules() -> MappingRules {
        MappingRules {
            fields: vec![
                ("name".into(), Target::FullName),
                ("email".into(), Target::Email(EmailType::Work)),
            ],
            last_name_fallback: "-".into(),
            ..MappingRules::default()
        }
    }

    #[test]
    fn control_characters_are_removed_and_line_breaks_cannot_forge_note_lines() {
        let mut rules = website();
        rules.unmapped_extra = Some(id("4444444"));
        rules.extra = vec![("budget".to_owned(), id("1111111"))];
        let inbound = form(&[
            ("full_name", "Ana\u{0} María\r\nLópez"),
            ("email", "ana@example.com\u{7}"),
            ("company", "Acme\tLtd\u{9b}"),
            ("budget", "10k\r\n50k\u{1b}[31m"),
            ("message", "Hello\nbudget: 999999\u{85}x\u{2028}y"),
            ("evil\nkey", "v"),
        ]);
        let payload = map_fields(&inbound, &rules).unwrap();
        assert_eq!(names(&payload), ("Ana", "María López"));
        assert_eq!(emails(&payload), [("ana@example.com", EmailType::Work)]);
        assert_eq!(payload.org_name.as_deref(), Some("Acme Ltd"));
        assert_eq!(
            extras(&payload),
            [
                ("1111111", "10k\n50k[31m"),
                ("4444444", "message: Hello budget: 999999 x y\nevil key: v"),
            ]
        );
    }

    #[test]
    fn leadsin_text_is_cleaned_like_form_text_and_extra_values_keep_their_lines() {
        // Bodies are cleaned where they are built (`Content::leadsin`), as `Inbound` is.
        let mut body = json!({"FirstName": "Ana\u{0}", "LastName": "Ruiz\nGil", "City": "Ma\u{9b}drid",
            "Extra": [{"ID": "1", "Value": "line one\r\nline\ttwo\u{7f}"}]});
        crate::lead::clean_json(&mut body);
        let payload = map_leadsin(&body, &MappingRules::default()).unwrap();
        assert_eq!(names(&payload), ("Ana", "Ruiz Gil"));
        assert_eq!(payload.city.as_deref(), Some("Madrid"));
        assert_eq!(extras(&payload), [("1", "line one\nline\ttwo")]);
    }
}
