//! `openapi.yaml` stays true to the code: the same routes, resolvable references, and exactly
//! the error codes the gateway can answer with.

use std::collections::{BTreeMap, BTreeSet};

use leadgate::config::Sources;
use leadgate::config::sources::{Preset, SourceKind};
use leadgate::error::ALL_CODES;
use leadgate::http::ROUTES;
use leadgate::mapping::Target;
use serde_json::Value;

const SPEC: &str = include_str!("../../openapi.yaml");

/// The keys of a path item that are operations; the rest (`parameters`, `summary`, …) are not.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn spec() -> Value {
    let yaml: serde_norway::Value = serde_norway::from_str(SPEC).expect("openapi.yaml is YAML");
    // Through serde_norway's own value so unquoted keys such as `202:` still read as strings.
    serde_json::to_value(yaml).expect("openapi.yaml maps to JSON")
}

/// Every `(METHOD, path, operation)` in the spec.
fn operations(spec: &Value) -> Vec<(String, String, &Value)> {
    let paths = spec["paths"].as_object().expect("the spec has paths");
    let mut found = Vec::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is a mapping");
        for (key, operation) in item {
            if METHODS.contains(&key.as_str()) {
                found.push((key.to_ascii_uppercase(), path.clone(), operation));
            }
        }
    }
    found
}

/// Calls `visit` with the JSON pointer and value of every node.
fn walk<'v>(value: &'v Value, at: &str, visit: &mut impl FnMut(&str, &'v Value)) {
    visit(at, value);
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let key = key.replace('~', "~0").replace('/', "~1");
                walk(child, &format!("{at}/{key}"), visit);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                walk(child, &format!("{at}/{index}"), visit);
            }
        }
        _ => {}
    }
}

#[test]
fn spec_declares_openapi_3_1() {
    let spec = spec();
    let version = spec["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1"), "openapi is {version:?}");
}

#[test]
fn spec_documents_exactly_the_routes_the_gateway_serves() {
    let spec = spec();
    let documented: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_ascii_uppercase(), (*path).to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from openapi.yaml: {undocumented:?}"
    );
    assert!(
        not_served.is_empty(),
        "openapi.yaml documents routes the gateway does not serve: {not_served:?}"
    );
}

#[test]
fn allow_source_lists_exactly_the_methods_sources_take() {
    let spec = spec();
    let documented: BTreeSet<&str> = spec
        .pointer("/components/headers/AllowSource/schema/enum")
        .and_then(Value::as_array)
        .expect("AllowSource lists its values")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let served = BTreeSet::from([
        leadgate::sources::METHODS,
        leadgate::sources::METHODS_WITH_HANDSHAKE,
    ]);
    assert_eq!(documented, served);
}

#[test]
fn every_operation_has_a_response() {
    let spec = spec();
    let operations = operations(&spec);
    assert!(!operations.is_empty(), "the spec has no operations");
    for (method, path, operation) in operations {
        let responses = operation["responses"].as_object();
        assert!(
            responses.is_some_and(|r| !r.is_empty()),
            "{method} {path} has no responses"
        );
    }
}

#[test]
fn every_reference_resolves_to_an_existing_component() {
    let spec = spec();
    let mut references = Vec::new();
    walk(&spec, "", &mut |at, value| {
        if let Some(Value::String(target)) = value.get("$ref") {
            references.push((at.to_owned(), target.clone()));
        }
        // A discriminator's mapping values are references too.
        if let Some(Value::Object(mapping)) = value.get("discriminator").map(|d| &d["mapping"]) {
            for target in mapping.values().filter_map(Value::as_str) {
                references.push((format!("{at}/discriminator"), target.to_owned()));
            }
        }
    });
    assert!(!references.is_empty(), "the spec has no references");
    for (at, target) in references {
        let pointer = target.strip_prefix('#').unwrap_or("");
        assert!(
            pointer.starts_with("/components/"),
            "{at}: {target:?} is not a local component reference"
        );
        assert!(
            spec.pointer(pointer).is_some(),
            "{at}: {target:?} does not resolve"
        );
    }
}

#[test]
fn error_code_enum_lists_exactly_the_codes_the_gateway_produces() {
    let spec = spec();
    let listed: Vec<&str> = spec
        .pointer("/components/schemas/ErrorCode/enum")
        .and_then(Value::as_array)
        .expect("components.schemas.ErrorCode.enum is a list")
        .iter()
        .map(|code| code.as_str().expect("error codes are strings"))
        .collect();
    let documented: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        documented.len(),
        listed.len(),
        "ErrorCode lists a code twice"
    );
    let produced: BTreeSet<&str> = ALL_CODES.iter().copied().collect();
    assert_eq!(documented, produced);
}

#[test]
fn error_examples_use_only_documented_codes() {
    let spec = spec();
    let mut seen = 0;
    walk(&spec, "", &mut |at, value| {
        if let Some(Value::String(code)) = value.get("error").and_then(|e| e.get("code")) {
            seen += 1;
            assert!(
                ALL_CODES.contains(&code.as_str()),
                "{at}: example code {code:?} is not one the gateway produces"
            );
        }
    });
    assert!(seen > 0, "the spec has no error examples");
}

/// One source of every kind and preset, named after it, with the least each needs to load.
fn one_source_of_each_kind() -> Sources {
    let mut text = String::from(
        r#"
[[source]]
id = "form"
kind = "form"

[[source]]
id = "partner"
kind = "partner"
api_keys = ["partner-key-0123456789"]

[[source]]
id = "facebook"
kind = "facebook"
app_secret = "meta-app-secret"
verify_token = "meta-verify-token"

[[source]]
id = "google"
kind = "google"
google_key = "google-key-0123456789"
"#,
    );
    for (name, _) in Preset::ALL {
        text.push_str(&format!(
            "\n[[source]]\nid = \"{name}\"\nkind = \"webhook\"\npreset = \"{name}\"\n\
             secret = \"webhook-secret-0123456789\"\n"
        ));
    }
    Sources::parse("kinds.toml", &text, |_| None).expect("the sources load")
}

fn name_and_preset(kind: &SourceKind) -> (String, Option<String>) {
    match kind {
        SourceKind::Webhook(hook) => ("webhook".to_owned(), Some(hook.preset.name().to_owned())),
        other => (other.name().to_owned(), None),
    }
}

fn targets(table: &Value, at: &str) -> BTreeMap<String, Target> {
    table
        .as_object()
        .unwrap_or_else(|| panic!("{at} is a mapping"))
        .iter()
        .map(|(name, target)| {
            let target = target.as_str().unwrap_or_else(|| panic!("{at}.{name}"));
            let target = target
                .parse()
                .unwrap_or_else(|e| panic!("{at}.{name}: {e}"));
            (name.clone(), target)
        })
        .collect()
}

#[test]
fn every_source_kind_is_described_with_its_url_setup_default_mappings_and_metadata_names() {
    let spec = spec();
    let kinds = spec
        .pointer("/x-source-kinds/kinds")
        .and_then(Value::as_object)
        .expect("x-source-kinds.kinds is a mapping");
    let common = targets(&spec["x-source-kinds"]["commonFields"], "commonFields");
    let sources = one_source_of_each_kind();
    let mut described = BTreeSet::new();
    for source in sources.iter() {
        let key = source.id.as_str();
        let entry = kinds
            .get(key)
            .unwrap_or_else(|| panic!("x-source-kinds does not describe {key}"));
        described.insert(key.to_owned());
        let (kind, preset) = name_and_preset(&source.kind);
        assert_eq!(entry["kind"], kind.as_str(), "{key}");
        assert_eq!(entry["preset"].as_str(), preset.as_deref(), "{key}");
        for text in ["url", "setup", "names", "dedupe"] {
            let value = entry[text].as_str().unwrap_or_default();
            assert!(!value.trim().is_empty(), "{key} has no {text}");
        }
        assert!(
            entry["url"].as_str().unwrap().contains("/in/<source id>"),
            "{key}"
        );

        let mut documented = targets(&entry["defaultFields"], key);
        if entry["commonFields"] == Value::Bool(true) {
            for (name, target) in &common {
                documented.entry(name.clone()).or_insert(*target);
            }
        }
        let effective: BTreeMap<String, Target> = source.mapping.fields.iter().cloned().collect();
        assert_eq!(documented, effective, "the default mappings of {key}");

        let metadata: Vec<&str> = entry["metadata"]
            .as_array()
            .unwrap_or_else(|| panic!("{key}.metadata is a list"))
            .iter()
            .map(|n| n.as_str().expect("metadata names are strings"))
            .collect();
        assert_eq!(
            metadata,
            leadgate::sources::metadata_names(&source.kind),
            "the metadata names of {key}"
        );
    }
    let listed: BTreeSet<String> = kinds.keys().cloned().collect();
    assert_eq!(
        listed, described,
        "x-source-kinds lists a kind the code does not have"
    );
}
