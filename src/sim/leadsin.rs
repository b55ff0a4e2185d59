//! What Onpipeline's reference says a `Leadsin` body must look like, as pure checks on the parsed
//! JSON. The sim checks the JSON itself rather than reusing our `LeadsinPayload` type, so a bug in
//! how leadgate builds payloads is caught here instead of being mirrored.

use serde_json::Value;

/// The optional text fields of a lead listed in the reference.
const TEXT_FIELDS: [&str; 7] = [
    "OrgName",
    "AddressLine1",
    "AddressLine2",
    "Postcode",
    "City",
    "Region",
    "Country",
];

const EMAIL_TYPES: [&str; 3] = ["work", "home", "other"];
const PHONE_TYPES: [&str; 4] = ["work", "home", "mobile", "other"];

/// Checks a parsed `Leadsin` body. The error is the Error object's message for a 406; it names
/// fields and positions only, never a submitted value, so it is safe to log.
pub(crate) fn validate(payload: &Value) -> Result<(), String> {
    let Some(lead) = payload.as_object() else {
        return Err("Not acceptable - Invalid JSON: a JSON object is expected".to_owned());
    };
    for field in ["FirstName", "LastName"] {
        match lead.get(field) {
            None | Some(Value::Null) => {
                return Err(format!("Not acceptable - {field} is mandatory"));
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(format!("Not acceptable - {field} is mandatory"));
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(format!("Not acceptable - {field} must be a string")),
        }
    }
    for field in TEXT_FIELDS {
        match lead.get(field) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(_) => return Err(format!("Not acceptable - {field} must be a string")),
        }
    }
    check_array(lead.get("Email"), "Email", "Address", "Type", |ty| {
        EMAIL_TYPES
            .contains(&ty)
            .then_some(())
            .ok_or("work, home or other")
    })?;
    check_array(lead.get("Phone"), "Phone", "Number", "Type", |ty| {
        PHONE_TYPES
            .contains(&ty)
            .then_some(())
            .ok_or("work, home, mobile or other")
    })?;
    check_array(lead.get("Extra"), "Extra", "ID", "Value", |_| Ok(()))?;
    Ok(())
}

/// Checks an optional array of `{key: non-blank string, second: string}` objects; `second_ok`
/// judges the second member (the allowed `Type`s) and returns what would have been allowed.
fn check_array(
    value: Option<&Value>,
    name: &str,
    key: &str,
    second: &str,
    second_ok: impl Fn(&str) -> Result<(), &'static str>,
) -> Result<(), String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(format!(
                "Not acceptable - {name} must be an array of {{{key}, {second}}}"
            ));
        }
    };
    for (i, item) in items.iter().enumerate() {
        let Some(item) = item.as_object() else {
            return Err(format!(
                "Not acceptable - {name}[{i}] must be an object {{{key}, {second}}}"
            ));
        };
        match item.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            _ => return Err(format!("Not acceptable - {name}[{i}].{key} is mandatory")),
        }
        match item.get(second) {
            Some(Value::String(s)) => {
                if let Err(allowed) = second_ok(s) {
                    return Err(format!(
                        "Not acceptable - {name}[{i}].{second} must be {allowed}"
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "Not acceptable - {name}[{i}].{second} must be a string"
                ));
            }
        }
    }
    Ok(())
}

/// The payload with object keys sorted at every level, so two bodies that differ only in key
/// order or whitespace are the same lead for duplicate detection.
pub(crate) fn canonical(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// The addresses and numbers of a lead, for masked logging.
pub(crate) fn contact_values<'a>(payload: &'a Value, array: &str, key: &str) -> Vec<&'a str> {
    payload
        .get(array)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.get(key).and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// Refuses `Extra` entries naming a custom field the account does not have.
pub(crate) fn check_custom_fields(payload: &Value, known: &[String]) -> Result<(), String> {
    let extras = payload.get("Extra").and_then(Value::as_array);
    for (i, extra) in extras.into_iter().flatten().enumerate() {
        let id = match extra.get("ID") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => continue,
        };
        if !known.contains(&id) {
            return Err(format!(
                "Not acceptable - Extra[{i}].ID {id} is not a custom field of this account"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mike() -> Value {
        json!({
            "FirstName": "Mike", "LastName": "Smith", "OrgName": "Company Inc.",
            "Email": [{"Address": "mike@company.com", "Type": "work"}],
            "Phone": [{"Number": "111111111111", "Type": "mobile"}],
            "Extra": [{"ID": "1111111", "Value": "Managing Director"}]
        })
    }

    #[test]
    fn the_reference_sample_is_accepted() {
        assert_eq!(validate(&mike()), Ok(()));
        assert_eq!(
            validate(&json!({"FirstName": "A", "LastName": "B"})),
            Ok(())
        );
    }

    #[test]
    fn blank_or_missing_names_are_named_in_the_message() {
        let mut lead = mike();
        lead["LastName"] = json!("  ");
        assert_eq!(
            validate(&lead),
            Err("Not acceptable - LastName is mandatory".into())
        );
        lead.as_object_mut().unwrap().remove("FirstName");
        assert_eq!(
            validate(&lead),
            Err("Not acceptable - FirstName is mandatory".into())
        );
    }

    #[test]
    fn unknown_types_and_wrong_shapes_are_rejected() {
        let mut lead = mike();
        lead["Email"][0]["Type"] = json!("mobile");
        assert!(validate(&lead).unwrap_err().contains("Email[0].Type"));
        let mut lead = mike();
        lead["Phone"][0]["Type"] = json!("fax");
        assert!(validate(&lead).unwrap_err().contains("Phone[0].Type"));
        let mut lead = mike();
        lead["Email"] = json!("mike@company.com");
        assert!(
            validate(&lead)
                .unwrap_err()
                .contains("Email must be an array")
        );
        let mut lead = mike();
        lead["Extra"] = json!([{"Value": "x"}]);
        assert!(validate(&lead).unwrap_err().contains("Extra[0].ID"));
        assert!(validate(&json!([1, 2])).is_err());
    }

    #[test]
    fn canonical_form_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":[{"q":1,"p":2}]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":[{"p":2,"q":1}],"y":2},"b":1}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_ne!(canonical(&a), canonical(&json!({"b": 2})));
    }
}
