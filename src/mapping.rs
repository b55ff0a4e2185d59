//! Pure mapping: the fields a sender posted plus its source's rules become a Leadsin payload,
//! or a rejection naming every bad field. No I/O here; table tests sit at the bottom.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::lead::{EmailType, Inbound, LeadsinPayload, PhoneType};

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
    pub phone_region: Option<phonenumber::country::Id>,
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

/// Maps flat fields (forms, flat partner JSON) with the source's rules.
///
/// Rules, in brief: blank values count as absent; names starting with `_` are control fields
/// (`_next`, `_charset_`) and are never forwarded; several values of a text field are joined
/// with `", "`; several values of an email or phone field become several entries; emails must
/// parse (`422 validation_failed` naming the field otherwise); phones are normalised to E.164
/// or kept as given; no name at all → `422 name_required`.
pub fn map_fields(inbound: &Inbound, rules: &MappingRules) -> Result<LeadsinPayload, Rejection> {
    let _ = (inbound, rules);
    unimplemented!("mapping::map_fields")
}

/// Maps a body that already has Leadsin's own shape (`FirstName`, `Email[{Address,Type}]`, …,
/// `Extra[{ID,Value}]`), as partners may send it: the same checks as [`map_fields`], and the
/// source's constants added.
pub fn map_leadsin(body: &serde_json::Value, rules: &MappingRules) -> Result<LeadsinPayload, Rejection> {
    let _ = (body, rules);
    unimplemented!("mapping::map_leadsin")
}
