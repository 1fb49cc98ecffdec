//! Contract tests: specs/ are valid and agree with the code.
//!
//! - every JSON Schema in `specs/events/` is valid under the 2020-12 meta-schema, closes every
//!   object and has no property that could carry a secret;
//! - every example in `specs/events/examples/valid/` passes its schema and is exactly what the
//!   Rust types serialise; every one in `invalid/` fails;
//! - events built with `oneprotect_identity::events` validate, so code and schema cannot drift;
//! - `specs/asyncapi.yaml` references every event schema and nothing else, on the Redis names
//!   that `KeySchema` derives;
//! - `specs/openapi.yaml` is OpenAPI 3.1, has every endpoint of
//!   `docs/architecture/api-outline.md` with its auth and success answer, its schemas are valid,
//!   every example validates, and every problem code exists in `identity::problem::ALL`.
//!
//! Examples are named `<event-type>[.<what>].json`; the longest event type that prefixes the
//! name picks the schema.
//!
//! Run: `make validate-contracts` (= `cargo test -p oneprotect-tests --test suite contracts::`).

// The helpers below run only inside tests, where a panic with its message is the failure report
// (clippy's allow-unwrap-in-tests covers `#[test]` functions but not their helpers).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jsonschema::{Registry, Validator};
use oneprotect_identity::events::{
    Actor, AgentOperation, EnrollmentFailure, Event, Payload, SupersedeReason, EVENT_TYPES, VERSION,
};
use oneprotect_identity::problem::{self, Problem, ProblemKind};
use oneprotect_identity::revocation::{
    AgentStatus, Announcement, CertStatus, Change, KeySchema, SupersededUse, DEFAULT_PREFIX,
};
use oneprotect_identity::{AgentId, AgentUri, SerialNumber, TenantId, TokenId};
use oneprotect_tests::workspace_root;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The base URI of everything under `specs/`: event schemas have `$id`s below it, and
/// `openapi.yaml` is registered at `{SPEC_BASE}openapi.yaml` so its relative `$ref`s to
/// `events/…` resolve to the same resources.
const SPEC_BASE: &str = "https://oneprotect.dev/specs/";
const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";
const ENVELOPE: &str = "envelope.v1.schema.json";
const OPENAPI_URI: &str = "https://oneprotect.dev/specs/openapi.yaml";

/// Problem codes the enroll-api never answers with: they belong to the gateway's edge, or
/// (conflict) are reserved and not used by any endpoint of the outline. Every other code of
/// the catalogue must be documented in openapi.yaml.
const NOT_ENROLL_API: [&str; 8] = [
    "bad_gateway",
    "bad_request",
    "upgrade_not_allowed",
    "request_header_timeout",
    "request_header_too_large",
    "revocation_unavailable",
    "upstream_unavailable",
    "gateway_timeout",
];

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

fn specs_dir() -> PathBuf {
    workspace_root().join("specs")
}

fn events_dir() -> PathBuf {
    specs_dir().join("events")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// The `.json` files in `dir`, sorted by name.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_str().unwrap().to_owned()
}

fn schema_file(event_type: &str) -> String {
    format!("{event_type}.v1.schema.json")
}

/// Every schema file in `specs/events/`, by file name.
fn event_schemas() -> &'static BTreeMap<String, Value> {
    static SCHEMAS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        json_files(&events_dir())
            .into_iter()
            .filter(|p| file_name(p).ends_with(".schema.json"))
            .map(|p| (file_name(&p), read_json(&p)))
            .collect()
    })
}

fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| read_yaml(&specs_dir().join("openapi.yaml")))
}

fn asyncapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| read_yaml(&specs_dir().join("asyncapi.yaml")))
}

/// One registry holding every event schema under its `$id` and openapi.yaml's component
/// schemas under [`OPENAPI_URI`] (wrapped so `#/components/schemas/X` resolves as in the
/// OpenAPI document). No reference is ever fetched from the network.
fn registry() -> &'static Registry<'static> {
    static REGISTRY: OnceLock<Registry<'static>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut resources: Vec<(String, Value)> = event_schemas()
            .values()
            .map(|s| (s["$id"].as_str().expect("$id").to_owned(), s.clone()))
            .collect();
        let components = json!({
            "$schema": DIALECT,
            "components": { "schemas": openapi()["components"]["schemas"].clone() },
        });
        resources.push((OPENAPI_URI.to_owned(), components));
        Registry::new()
            .extend(resources)
            .expect("resource URIs parse")
            .prepare()
            .expect("registry of spec schemas")
    })
}

/// A validator (formats asserted) for `schema`, resolving references through [`registry`].
fn validator(schema: &Value) -> Validator {
    jsonschema::options()
        .with_registry(registry())
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema:#}"))
}

fn event_validator(event_type: &str) -> Validator {
    validator(&json!({ "$ref": format!("{SPEC_BASE}events/{}", schema_file(event_type)) }))
}

fn component_validator(name: &str) -> Validator {
    validator(&json!({ "$ref": format!("{OPENAPI_URI}#/components/schemas/{name}") }))
}

/// All error messages of `instance` under `v`, one per line ("" when valid).
fn errors(v: &Validator, instance: &Value) -> String {
    v.iter_errors(instance)
        .map(|e| format!("  {}: {e}", e.instance_path()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_valid(v: &Validator, instance: &Value, what: &str) {
    let errs = errors(v, instance);
    assert!(
        errs.is_empty(),
        "{what} does not validate:\n{errs}\n{instance:#}"
    );
}

/// The event type an example file is for: the longest type that is its name or a prefix of it
/// followed by `.`.
fn event_type_of(example: &Path) -> &'static str {
    let name = file_name(example);
    let stem = name.strip_suffix(".json").unwrap();
    EVENT_TYPES
        .iter()
        .filter(|t| stem == **t || stem.starts_with(&format!("{t}.")))
        .max_by_key(|t| t.len())
        .copied()
        .unwrap_or_else(|| panic!("{name} does not start with an event type"))
}

/// Follows a local `$ref` (`#/a/b`) inside `doc` until a non-reference object.
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    v
}

/// Every (JSON pointer, value) in `v`, depth first.
fn walk<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a Value)>) {
    out.push((at.clone(), v));
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let key = k.replace('~', "~0").replace('/', "~1");
                walk(child, format!("{at}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn nodes(v: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out
}

fn kind(code: &str) -> Option<&'static ProblemKind> {
    problem::ALL.iter().find(|k| k.code == code)
}

// ---------------------------------------------------------------------------------------------
// Event schemas
// ---------------------------------------------------------------------------------------------

#[test]
fn every_event_type_has_its_schema_file_and_nothing_else_is_there() {
    let found: BTreeSet<&str> = event_schemas().keys().map(String::as_str).collect();
    let mut expected: BTreeSet<String> = EVENT_TYPES.iter().map(|t| schema_file(t)).collect();
    expected.insert(ENVELOPE.to_owned());
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(found, expected, "specs/events/*.schema.json vs EVENT_TYPES");
}

#[test]
fn event_schemas_are_valid_2020_12_schemas_with_their_own_ids() {
    for (name, schema) in event_schemas() {
        assert_eq!(schema["$schema"], DIALECT, "{name}: $schema");
        assert_eq!(
            schema["$id"],
            format!("{SPEC_BASE}events/{name}"),
            "{name}: $id must be the file's URI"
        );
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("{name} is not a valid JSON Schema: {e}");
        }
        // Compiling resolves every $ref; a dangling one fails here.
        let _ = validator(schema);
    }
}

#[test]
fn event_schemas_pin_type_and_version_and_share_the_envelope() {
    let envelope = &event_schemas()[ENVELOPE];
    assert_eq!(envelope["properties"]["version"]["const"], json!(VERSION));
    let listed: Vec<&str> = envelope["properties"]["type"]["enum"]
        .as_array()
        .expect("envelope lists the types")
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(listed, EVENT_TYPES, "envelope type enum vs EVENT_TYPES");
    for t in EVENT_TYPES {
        let schema = &event_schemas()[&schema_file(t)];
        assert_eq!(schema["$ref"], ENVELOPE, "{t} must build on the envelope");
        assert_eq!(schema["properties"]["type"]["const"], t, "{t}: type const");
        assert_eq!(schema["unevaluatedProperties"], false, "{t}: closed");
    }
}

#[test]
fn event_schemas_close_every_object_and_have_no_secret_property() {
    fn is_secretish(name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        n == "token"
            || n == "key"
            || n.contains("secret")
            || n.contains("password")
            || n.contains("private")
            || n.ends_with("_key")
            || n.ends_with("_token")
    }
    for (name, schema) in event_schemas() {
        for (at, node) in nodes(schema) {
            let Some(obj) = node.as_object() else {
                continue;
            };
            if at.ends_with("/properties") {
                for prop in obj.keys() {
                    assert!(!is_secretish(prop), "{name}{at}: property {prop:?}");
                }
            }
            let is_object_schema = obj.get("type") == Some(&json!("object"));
            if is_object_schema {
                let closed = obj.get("additionalProperties") == Some(&json!(false))
                    || obj.get("unevaluatedProperties") == Some(&json!(false));
                // A string-to-string map (labels) is closed by its value schema.
                let string_map = obj
                    .get("additionalProperties")
                    .is_some_and(|a| a.get("type") == Some(&json!("string")));
                // The envelope's payload is a placeholder that each event schema narrows and
                // closes (checked when walking that schema).
                let placeholder = name == ENVELOPE && at == "/properties/payload";
                assert!(
                    closed || string_map || placeholder,
                    "{name}{at}: object left open"
                );
            }
        }
    }
}

#[test]
fn valid_event_examples_pass_their_schema() {
    let files = json_files(&events_dir().join("examples/valid"));
    let covered: BTreeSet<&str> = files.iter().map(|f| event_type_of(f)).collect();
    assert_eq!(
        covered,
        EVENT_TYPES.into_iter().collect(),
        "every event type needs a valid example"
    );
    for file in files {
        let v = event_validator(event_type_of(&file));
        assert_valid(&v, &read_json(&file), &file.display().to_string());
    }
}

#[test]
fn valid_event_examples_are_exactly_what_the_rust_types_serialise() {
    for file in json_files(&events_dir().join("examples/valid")) {
        let example = read_json(&file);
        let event: Event = serde_json::from_value(example.clone())
            .unwrap_or_else(|e| panic!("{}: not an Event: {e}", file.display()));
        assert_eq!(
            event.payload.event_type(),
            event_type_of(&file),
            "{}",
            file.display()
        );
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            example,
            "{}: serde output differs from the example",
            file.display()
        );
    }
}

#[test]
fn invalid_event_examples_fail_their_schema() {
    let files = json_files(&events_dir().join("examples/invalid"));
    assert!(files.len() >= 8, "want at least 8 invalid examples");
    for file in files {
        let v = event_validator(event_type_of(&file));
        let example = read_json(&file);
        assert!(
            !v.is_valid(&example),
            "{} is accepted by its schema but must be refused",
            file.display()
        );
    }
}

#[test]
fn event_examples_hold_no_secret() {
    for dir in ["examples/valid", "examples/invalid"] {
        for file in json_files(&events_dir().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            for marker in ["opet_", "opak_"] {
                assert!(
                    !text.contains(marker),
                    "{}: contains {marker}",
                    file.display()
                );
            }
        }
    }
}

fn at(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &Rfc3339).unwrap()
}

fn serial(s: &str) -> SerialNumber {
    s.parse().unwrap()
}

/// One event per payload variant (and per enrollment failure reason), with every actor kind,
/// whole and fractional timestamps, present and absent options.
fn rust_events() -> Vec<Event> {
    let tenant: TenantId = "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10".parse().unwrap();
    let agent: AgentId = "0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b".parse().unwrap();
    let token: TokenId = "3c9d2f7e-8b41-4a6e-9f0d-5e2a7c1b8d34".parse().unwrap();
    let admin = uuid::Uuid::parse_str("a4f8e2d1-6c3b-4e9a-8d7f-2b1c0e9f3a56").unwrap();
    let uri: AgentUri = format!("spiffe://oneprotect.local/tenant/{tenant}/agent/{agent}")
        .parse()
        .unwrap();
    let labels = [("site", "berlin"), ("rollout", "2026-q4")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let s1 = serial("5f3a9c2e7b1d4086a2e4c6b8d0f1a3e5");
    let s2 = serial("01");

    let mut events = vec![
        Event::new(
            tenant,
            Actor::AdminKey(admin),
            at("2026-11-28T09:41:12Z"),
            Payload::TokenIssued {
                token_id: token,
                expires_at: at("2026-11-29T09:41:12Z"),
                max_uses: 25,
                description: Some("Berlin office rollout".to_owned()),
                labels,
            },
        ),
        Event::new(
            tenant,
            Actor::AdminKey(admin),
            at("2026-11-28T09:41:12.123456789Z"),
            Payload::TokenIssued {
                token_id: TokenId::random(),
                expires_at: at("2026-11-28T10:41:12.5Z"),
                max_uses: 1,
                description: None,
                labels: BTreeMap::new(),
            },
        ),
        Event::new(
            tenant,
            Actor::System,
            at("2026-11-29T09:41:13Z"),
            Payload::TokenRevoked {
                token_id: token,
                uses: 0,
            },
        ),
        Event::new(
            tenant,
            Actor::EnrollmentToken(token),
            at("2026-11-28T10:00:00Z"),
            Payload::Enrolled {
                agent_id: agent,
                token_id: token,
                spiffe_id: uri,
                serial: s1,
                not_after: at("2026-12-28T10:00:00Z"),
                hostname: "ws-0142.corp.example.com".to_owned(),
                os: "windows-11-23h2".to_owned(),
                agent_version: "4.2.1".to_owned(),
            },
        ),
        Event::new(
            tenant,
            Actor::Agent(agent),
            at("2026-12-18T10:00:00Z"),
            Payload::CertificateRotated {
                agent_id: agent,
                previous_serial: s1,
                serial: s2,
                not_after: at("2027-01-17T10:00:00Z"),
            },
        ),
        Event::new(
            tenant,
            Actor::Agent(agent),
            at("2026-12-18T10:00:05Z"),
            Payload::CertificateSuperseded {
                agent_id: agent,
                serial: s1,
                superseded_by: s2,
                reason: SupersedeReason::SuccessorSeen,
            },
        ),
        Event::new(
            tenant,
            Actor::System,
            at("2026-12-18T11:00:00Z"),
            Payload::CertificateSuperseded {
                agent_id: agent,
                serial: s1,
                superseded_by: s2,
                reason: SupersedeReason::GraceExpired,
            },
        ),
        Event::new(
            tenant,
            Actor::Agent(agent),
            at("2026-12-18T10:00:01Z"),
            Payload::CertificateSuperseded {
                agent_id: agent,
                serial: s2,
                superseded_by: s1,
                reason: SupersedeReason::ReplacedUnused,
            },
        ),
        Event::new(
            tenant,
            Actor::Agent(agent),
            at("2026-12-19T10:00:00Z"),
            Payload::CertificateReuseDetected {
                agent_id: agent,
                serial: s1,
                current_serial: s2,
                operation: AgentOperation::Rotate,
                route: None,
                source_ip: None,
            },
        ),
        Event::new(
            tenant,
            Actor::Agent(agent),
            at("2026-12-19T10:00:01Z"),
            Payload::CertificateReuseDetected {
                agent_id: agent,
                serial: s1,
                current_serial: s2,
                operation: AgentOperation::Confirm,
                route: None,
                source_ip: None,
            },
        ),
        Event::new(
            tenant,
            Actor::Agent(agent),
            at("2026-12-19T10:00:02Z"),
            Payload::CertificateReuseDetected {
                agent_id: agent,
                serial: s1,
                current_serial: s2,
                operation: AgentOperation::Request,
                route: Some("/api".into()),
                source_ip: Some("2001:db8::7".parse().unwrap()),
            },
        ),
        Event::new(
            tenant,
            Actor::AdminKey(admin),
            at("2027-01-04T14:21:07Z"),
            Payload::Revoked {
                agent_id: agent,
                reason: "Device reported stolen".to_owned(),
                revoked_serials: vec![s2, s1],
            },
        ),
        Event::new(
            tenant,
            Actor::AdminKey(admin),
            at("2027-01-04T14:21:08Z"),
            Payload::Revoked {
                agent_id: AgentId::random(),
                reason: "x".to_owned(),
                revoked_serials: vec![],
            },
        ),
    ];
    for reason_code in [
        EnrollmentFailure::TokenExpired,
        EnrollmentFailure::TokenUsedUp,
        EnrollmentFailure::TokenRevoked,
        EnrollmentFailure::CsrInvalid,
        EnrollmentFailure::CsrSignatureInvalid,
        EnrollmentFailure::KeyRejected,
    ] {
        // A new reason must be added to the list above (and to the schema's enum).
        match reason_code {
            EnrollmentFailure::TokenExpired
            | EnrollmentFailure::TokenUsedUp
            | EnrollmentFailure::TokenRevoked
            | EnrollmentFailure::CsrInvalid
            | EnrollmentFailure::CsrSignatureInvalid
            | EnrollmentFailure::KeyRejected => {}
        }
        events.push(Event::new(
            tenant,
            Actor::EnrollmentToken(token),
            at("2026-11-28T09:58:03Z"),
            Payload::EnrollmentFailed {
                token_id: token,
                reason_code,
            },
        ));
    }
    events
}

#[test]
fn events_built_with_the_rust_types_validate_against_their_schema_only() {
    let validators: Vec<(&str, Validator)> = EVENT_TYPES
        .iter()
        .map(|t| (*t, event_validator(t)))
        .collect();
    let mut payloads_seen = BTreeSet::new();
    let mut actors_seen = BTreeSet::new();
    for event in rust_events() {
        // Exhaustive on purpose: a new variant does not compile until it is covered here.
        payloads_seen.insert(match &event.payload {
            Payload::TokenIssued { .. } => "TokenIssued",
            Payload::TokenRevoked { .. } => "TokenRevoked",
            Payload::EnrollmentFailed { .. } => "EnrollmentFailed",
            Payload::Enrolled { .. } => "Enrolled",
            Payload::CertificateRotated { .. } => "CertificateRotated",
            Payload::CertificateSuperseded { .. } => "CertificateSuperseded",
            Payload::CertificateReuseDetected { .. } => "CertificateReuseDetected",
            Payload::Revoked { .. } => "Revoked",
        });
        actors_seen.insert(match &event.actor {
            Actor::AdminKey(_) => "AdminKey",
            Actor::Agent(_) => "Agent",
            Actor::EnrollmentToken(_) => "EnrollmentToken",
            Actor::System => "System",
        });
        let value = serde_json::to_value(&event).unwrap();
        let t = event.payload.event_type();
        assert_eq!(value["type"], t);
        for (schema_type, v) in &validators {
            if *schema_type == t {
                assert_valid(v, &value, &format!("Rust-built {t}"));
            } else {
                assert!(!v.is_valid(&value), "{t} is accepted by {schema_type}");
            }
        }
    }
    assert_eq!(payloads_seen.len(), 8, "one event per payload variant");
    assert_eq!(actors_seen.len(), 4, "one event per actor variant");
}

#[test]
fn event_schemas_refuse_what_the_rust_types_never_produce() {
    // The schemas pin UTC: an offset timestamp (which `time` would happily serialise) is refused,
    // so producers must use `OffsetDateTime::now_utc()`.
    let mut value = serde_json::to_value(&rust_events()[0]).unwrap();
    value["occurred_at"] = json!("2026-11-28T10:41:12+01:00");
    assert!(!event_validator(EVENT_TYPES[0]).is_valid(&value));
}

// ---------------------------------------------------------------------------------------------
// AsyncAPI
// ---------------------------------------------------------------------------------------------

#[test]
fn asyncapi_channels_use_the_key_schema_names() {
    let doc = asyncapi();
    assert!(
        doc["asyncapi"].as_str().unwrap().starts_with("3.0."),
        "AsyncAPI 3.0"
    );
    let placeholder = KeySchema::new("{prefix}");
    assert_eq!(
        doc["channels"]["events"]["address"],
        placeholder.events_stream()
    );
    assert_eq!(
        doc["channels"]["revocation"]["address"],
        placeholder.revocation_channel()
    );
    assert_eq!(
        doc["channels"]["reports"]["address"],
        placeholder.reports_stream()
    );
    // Sharded (ADR-0024): `{prefix}{shardTag}revocation`, the tag a
    // brace-enclosed `s<shard>-<n>`, shared by the shard's counter.
    let address = doc["channels"]["revocationSharded"]["address"]
        .as_str()
        .unwrap();
    let (head, tail) = address
        .split_once("{shardTag}")
        .expect("a shardTag parameter");
    let sharded = KeySchema::sharded("{prefix}", 12);
    for shard in 0..sharded.shards() {
        let channel = sharded.revocation_channel_of(shard);
        let tag = channel
            .strip_prefix(head)
            .and_then(|c| c.strip_suffix(tail))
            .unwrap_or_else(|| panic!("{channel} does not fit {address}"));
        let inner = tag
            .strip_prefix(&format!("{{s{shard}-"))
            .and_then(|t| t.strip_suffix('}'));
        assert!(
            inner.is_some_and(|n| n.parse::<u32>().is_ok()),
            "shard {shard}: tag {tag}"
        );
        assert_eq!(
            sharded.revocation_seq_of(shard),
            format!("{head}{tag}revocation:seq")
        );
    }
    let examples = deref(
        doc,
        &doc["channels"]["revocationSharded"]["parameters"]["shardTag"],
    );
    for e in examples["examples"].as_array().unwrap() {
        let e = e.as_str().unwrap();
        assert!(
            (0..sharded.shards())
                .any(|k| sharded.revocation_channel_of(k) == format!("{head}{e}{tail}")),
            "example {e} is not one of the 12-shard tags"
        );
    }
    for channel in ["events", "revocation", "revocationSharded", "reports"] {
        let param = deref(doc, &doc["channels"][channel]["parameters"]["prefix"]);
        assert_eq!(
            param["default"], DEFAULT_PREFIX,
            "{channel}: prefix default"
        );
    }
    // Every operation is a send by the enroll-api and names messages of its own channel.
    let operations = doc["operations"].as_object().unwrap();
    assert!(!operations.is_empty());
    for (name, op) in operations {
        assert_eq!(op["action"], "send", "{name}");
        let channel = op["channel"]["$ref"].as_str().unwrap();
        for m in op["messages"].as_array().unwrap() {
            let r = m["$ref"].as_str().unwrap();
            assert!(
                r.starts_with(&format!("{channel}/messages/")),
                "{name}: {r}"
            );
            let _ = deref(doc, m);
        }
    }
}

#[test]
fn every_asyncapi_event_message_resolves_to_a_schema_file_and_every_file_is_used() {
    let doc = asyncapi();
    let mut referenced = BTreeSet::new();
    let messages = doc["channels"]["events"]["messages"].as_object().unwrap();
    let mut names = BTreeSet::new();
    let entry_fields = validator(&doc["components"]["schemas"]["StreamEntryFields"]);
    for (id, m) in messages {
        let message = deref(doc, m);
        let payload = &message["payload"];
        assert!(
            payload["schemaFormat"]
                .as_str()
                .unwrap()
                .starts_with("application/schema+json;version=2020-12"),
            "{id}: schemaFormat"
        );
        let r = payload["schema"]["$ref"].as_str().expect("payload $ref");
        let rel = r.strip_prefix("./").unwrap_or(r);
        let path = specs_dir().join(rel);
        assert!(path.is_file(), "{id}: {r} does not exist");
        let schema = read_json(&path);
        let name = message["name"].as_str().unwrap();
        assert_eq!(
            schema["properties"]["type"]["const"], name,
            "{id}: name vs schema"
        );
        names.insert(name.to_owned());
        referenced.insert(file_name(&path));
        // The message's examples validate too.
        let v = event_validator(name);
        for ex in message["examples"].as_array().into_iter().flatten() {
            assert_valid(&v, &ex["payload"], &format!("asyncapi example of {id}"));
            assert_valid(
                &entry_fields,
                &ex["headers"],
                &format!("asyncapi headers of {id}"),
            );
            assert_eq!(ex["headers"]["type"], name);
            assert_eq!(ex["headers"]["event_id"], ex["payload"]["event_id"]);
        }
    }
    assert_eq!(
        names,
        EVENT_TYPES.iter().map(|t| t.to_string()).collect(),
        "one message per event type"
    );
    // The envelope is used through every event schema's $ref.
    for t in EVENT_TYPES {
        assert_eq!(event_schemas()[&schema_file(t)]["$ref"], ENVELOPE);
    }
    referenced.insert(ENVELOPE.to_owned());
    let all: BTreeSet<String> = event_schemas().keys().cloned().collect();
    assert_eq!(
        referenced, all,
        "schema files not referenced by asyncapi.yaml"
    );
}

#[test]
fn revocation_announcements_match_the_rust_type() {
    let doc = asyncapi();
    let message = deref(
        doc,
        &doc["channels"]["revocation"]["messages"]["revocationAnnouncement"],
    );
    let schema = &message["payload"]["schema"];
    if let Err(e) = jsonschema::meta::validate(schema) {
        panic!("announcement schema is not valid: {e}");
    }
    let v = validator(schema);
    let examples = message["examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    for ex in examples {
        assert_valid(&v, &ex["payload"], "announcement example");
        let a: Announcement = serde_json::from_value(ex["payload"].clone()).unwrap();
        assert_eq!(serde_json::to_value(&a).unwrap(), ex["payload"]);
    }
    let changes = [
        Change::Cert {
            serial: serial("ff"),
            status: CertStatus::Active,
        },
        Change::Cert {
            serial: serial("5f3a9c2e7b1d4086a2e4c6b8d0f1a3e5"),
            status: CertStatus::Revoked,
        },
        Change::Cert {
            serial: serial("0a"),
            status: CertStatus::Superseded,
        },
        Change::Agent {
            tenant_id: TenantId::random(),
            agent_id: AgentId::random(),
            status: AgentStatus::Active,
        },
        Change::Agent {
            tenant_id: TenantId::random(),
            agent_id: AgentId::random(),
            status: AgentStatus::Revoked,
        },
        Change::Resync,
    ];
    for (seq, change) in changes.into_iter().enumerate() {
        let a = Announcement {
            seq: u64::try_from(seq).unwrap() + u64::from(u32::MAX),
            change,
        };
        assert_valid(
            &v,
            &serde_json::to_value(&a).unwrap(),
            "Rust-built announcement",
        );
    }
    assert!(!v.is_valid(&json!({"seq": 1, "kind": "cert", "serial": "ff", "status": "revoked"})));
    assert!(!v.is_valid(&json!({"seq": 1, "kind": "resync", "extra": true})));
}

#[test]
fn superseded_use_reports_match_the_rust_type() {
    let doc = asyncapi();
    let message = deref(
        doc,
        &doc["channels"]["reports"]["messages"]["supersededUse"],
    );
    assert_eq!(message["name"], oneprotect_gateway::reports::ENTRY_TYPE);
    let schema = &message["payload"]["schema"];
    if let Err(e) = jsonschema::meta::validate(schema) {
        panic!("report schema is not valid: {e}");
    }
    let v = validator(schema);
    let examples = message["examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    for ex in examples {
        assert_valid(&v, &ex["payload"], "report example");
        let r: SupersededUse = serde_json::from_value(ex["payload"].clone()).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), ex["payload"]);
    }
    for source_ip in [None, Some("2001:db8::7".parse().unwrap())] {
        let r = SupersededUse {
            tenant_id: TenantId::random(),
            agent_id: AgentId::random(),
            serial: serial("7fffffffffffffffffffffffffffffffffffffff"),
            first_seen_ms: 1_797_592_803_000,
            uses: u32::MAX,
            route: "none".into(),
            source_ip,
        };
        assert_valid(&v, &serde_json::to_value(&r).unwrap(), "Rust-built report");
    }
    let mut extra = examples[0]["payload"].clone();
    extra["secret"] = json!("x");
    assert!(!v.is_valid(&extra), "closed object");
    let mut zero = examples[0]["payload"].clone();
    zero["uses"] = json!(0);
    assert!(!v.is_valid(&zero), "at least one use");
}

// ---------------------------------------------------------------------------------------------
// OpenAPI
// ---------------------------------------------------------------------------------------------

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// One row of the endpoint table in api-outline.md.
#[derive(Debug)]
struct OutlineRow {
    method: String,
    path: String,
    auth: String,
    status: String,
    schema: Option<String>,
    media_types: Vec<String>,
}

/// The cells of a Markdown table row, not splitting at a `|` inside backticks.
fn table_cells(line: &str) -> Vec<&str> {
    let mut cells = Vec::new();
    let (mut start, mut in_code) = (0, false);
    for (i, c) in line.char_indices() {
        match c {
            '`' => in_code = !in_code,
            '|' if !in_code => {
                cells.push(line[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    cells.push(line[start..].trim());
    cells
}

fn outline_rows() -> Vec<OutlineRow> {
    let path = workspace_root().join("docs/architecture/api-outline.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rows = Vec::new();
    for line in text.lines() {
        let cells = table_cells(line);
        // "| GET | `/healthz` | none | 200 `{...}` |" -> ["", GET, `/healthz`, none, 200 ..., ""]
        if cells.len() < 6 || !METHODS.contains(&cells[1].to_ascii_lowercase().as_str()) {
            continue;
        }
        let success = cells[4];
        let ticked: Vec<&str> = success.split('`').skip(1).step_by(2).collect();
        rows.push(OutlineRow {
            method: cells[1].to_ascii_lowercase(),
            path: cells[2].trim_matches('`').to_owned(),
            auth: cells[3].to_owned(),
            status: success.split_whitespace().next().unwrap().to_owned(),
            schema: ticked
                .iter()
                .find(|t| {
                    t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                        && t.chars().all(|c| c.is_ascii_alphanumeric())
                })
                .map(|t| t.to_string()),
            media_types: ticked
                .iter()
                .filter(|t| t.starts_with("application/"))
                .map(|t| t.to_string())
                .collect(),
        });
    }
    assert!(
        rows.len() >= 15,
        "outline table not found (got {})",
        rows.len()
    );
    rows
}

/// Every (path, method, operation) in openapi.yaml.
fn operations() -> Vec<(String, String, &'static Value)> {
    let mut out = Vec::new();
    for (path, item) in openapi()["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                out.push((path.clone(), method.clone(), op));
            }
        }
    }
    out
}

#[test]
fn openapi_is_3_1_with_the_2020_12_dialect_and_both_security_schemes() {
    let doc = openapi();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "OpenAPI 3.1.x"
    );
    assert_eq!(doc["jsonSchemaDialect"], DIALECT);
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["adminKey"]["type"], "http");
    assert_eq!(schemes["adminKey"]["scheme"], "bearer");
    assert_eq!(schemes["gatewayAssertion"]["type"], "apiKey");
    assert_eq!(schemes["gatewayAssertion"]["in"], "header");
    assert_eq!(
        schemes["gatewayAssertion"]["name"],
        oneprotect_identity::headers::IDENTITY_ASSERTION
    );
    let mut ids = BTreeSet::new();
    for (path, method, op) in operations() {
        let id = op["operationId"].as_str().expect("operationId");
        assert!(
            ids.insert(id),
            "{method} {path}: duplicate operationId {id}"
        );
    }
}

#[test]
fn openapi_has_every_outline_endpoint_with_its_auth_and_success_answer() {
    let doc = openapi();
    let rows = outline_rows();
    for row in &rows {
        let what = format!("{} {}", row.method, row.path);
        let op = doc["paths"][&row.path][&row.method]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: missing from openapi.yaml"));
        let security = op
            .get("security")
            .unwrap_or_else(|| panic!("{what}: no explicit security"));
        let expected = match row.auth.as_str() {
            "none" => json!([]),
            scheme => json!([{ scheme: [] }]),
        };
        assert_eq!(security, &expected, "{what}: security");
        let response = deref(doc, &op["responses"][&row.status]);
        assert!(response.is_object(), "{what}: no {} response", row.status);
        if let Some(schema) = &row.schema {
            let r = &response["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(
                r,
                &json!(format!("#/components/schemas/{schema}")),
                "{what}: success schema"
            );
        }
        for media_type in &row.media_types {
            if media_type == "application/problem+json" {
                continue;
            }
            assert!(
                response["content"].get(media_type).is_some(),
                "{what}: no {media_type} content"
            );
        }
    }
    // And nothing the outline does not plan.
    let planned: BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| (r.path.clone(), r.method.clone()))
        .collect();
    for (path, method, _) in operations() {
        assert!(
            planned.contains(&(path.clone(), method.clone())),
            "{method} {path} is not in api-outline.md"
        );
    }
}

#[test]
fn openapi_path_parameters_match_the_path_templates() {
    let doc = openapi();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let in_template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let declared: BTreeSet<&str> = item["parameters"]
                .as_array()
                .into_iter()
                .chain(op["parameters"].as_array())
                .flatten()
                .map(|p| deref(doc, p))
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{method} {path}: path parameter");
                    p["name"].as_str().unwrap()
                })
                .collect();
            assert_eq!(declared, in_template, "{method} {path}: path parameters");
        }
    }
}

#[test]
fn openapi_schemas_from_the_outline_exist() {
    let schemas = openapi()["components"]["schemas"].as_object().unwrap();
    for name in [
        "TokenCreateRequest",
        "Token",
        "TokenCreated",
        "TokenList",
        "ExchangeRequest",
        "EnrollmentResult",
        "RotateRequest",
        "Agent",
        "AgentList",
        "RevokeAgentRequest",
        "CaBundle",
        "EventList",
        "Problem",
    ] {
        assert!(
            schemas.contains_key(name),
            "components/schemas/{name} missing"
        );
    }
}

#[test]
fn openapi_component_schemas_are_valid_2020_12_schemas() {
    for (name, schema) in openapi()["components"]["schemas"].as_object().unwrap() {
        if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
            panic!("components/schemas/{name} is not a valid 2020-12 schema: {e}");
        }
        // Compiles with every reference resolved.
        let _ = component_validator(name);
    }
}

#[test]
fn openapi_request_bodies_are_closed_json() {
    let doc = openapi();
    for (path, method, op) in operations() {
        let Some(body) = op.get("requestBody") else {
            continue;
        };
        let body = deref(doc, body);
        let content = body["content"].as_object().unwrap();
        assert_eq!(
            content.keys().collect::<Vec<_>>(),
            ["application/json"],
            "{method} {path}"
        );
        let schema = deref(doc, &content["application/json"]["schema"]);
        assert_closed(doc, schema, &format!("{method} {path} request body"));
    }
}

/// Every object schema in `schema` (following references) refuses unknown properties; a
/// string-to-string map (labels) is closed by its value schema.
fn assert_closed(doc: &Value, schema: &Value, what: &str) {
    let schema = deref(doc, schema);
    if schema.get("type") == Some(&json!("object")) {
        let additional = &schema["additionalProperties"];
        let string_map = additional.get("type") == Some(&json!("string"));
        assert!(
            *additional == json!(false) || string_map,
            "{what}: must refuse unknown fields"
        );
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        assert_closed(doc, property, &format!("{what}.{name}"));
    }
    if let Some(items) = schema.get("items") {
        assert_closed(doc, items, &format!("{what}[]"));
    }
}

/// Every (where, schema, example value) of the bodies, parameters and headers of every
/// operation, and of every component schema's `examples`.
fn openapi_examples() -> Vec<(String, Value, Value)> {
    let doc = openapi();
    let mut out = Vec::new();
    let schema_for = |s: &Value| -> Value {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => json!({ "$ref": format!("{OPENAPI_URI}{r}") }),
            None => s.clone(),
        }
    };
    let media = |what: String, content: &Value, out: &mut Vec<(String, Value, Value)>| {
        for (mt, m) in content.as_object().unwrap() {
            let examples = m["examples"].as_object();
            assert!(
                examples.is_some_and(|e| !e.is_empty()),
                "{what} {mt}: no examples"
            );
            for (name, ex) in examples.unwrap() {
                let ex = deref(doc, ex);
                if let Some(value) = ex.get("value") {
                    out.push((
                        format!("{what} {mt} {name}"),
                        schema_for(&m["schema"]),
                        value.clone(),
                    ));
                }
            }
        }
    };
    for (path, method, op) in operations() {
        let what = format!("{method} {path}");
        if let Some(body) = op.get("requestBody") {
            media(
                format!("{what} request"),
                &deref(doc, body)["content"],
                &mut out,
            );
        }
        for (status, response) in op["responses"].as_object().unwrap() {
            let response = deref(doc, response);
            if let Some(content) = response.get("content") {
                media(format!("{what} {status}"), content, &mut out);
            }
            for (name, header) in response["headers"].as_object().into_iter().flatten() {
                let header = deref(doc, header);
                for (ex_name, ex) in header["examples"].as_object().into_iter().flatten() {
                    out.push((
                        format!("{what} {status} header {name} {ex_name}"),
                        schema_for(&header["schema"]),
                        ex["value"].clone(),
                    ));
                }
            }
        }
        let path_params = doc["paths"][&path]["parameters"].as_array();
        let op_params = op["parameters"].as_array();
        for p in path_params.into_iter().chain(op_params).flatten() {
            let p = deref(doc, p);
            for (ex_name, ex) in p["examples"].as_object().into_iter().flatten() {
                out.push((
                    format!("{what} parameter {} {ex_name}", p["name"]),
                    schema_for(&p["schema"]),
                    ex["value"].clone(),
                ));
            }
        }
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        for (i, ex) in schema["examples"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            out.push((
                format!("components/schemas/{name} examples[{i}]"),
                json!({ "$ref": format!("{OPENAPI_URI}#/components/schemas/{name}") }),
                ex.clone(),
            ));
        }
    }
    out
}

#[test]
fn openapi_examples_validate_against_their_schemas() {
    let examples = openapi_examples();
    assert!(
        examples.len() > 50,
        "only {} examples found",
        examples.len()
    );
    for (what, schema, value) in examples {
        assert_valid(&validator(&schema), &value, &what);
    }
}

#[test]
fn openapi_event_list_examples_are_events_the_rust_types_read() {
    for (what, _, value) in openapi_examples() {
        if !what.contains("/events") || !what.contains(" 200 ") {
            continue;
        }
        for item in value["items"].as_array().unwrap() {
            let event: Event = serde_json::from_value(item.clone())
                .unwrap_or_else(|e| panic!("{what}: not an Event: {e}"));
            assert_eq!(&serde_json::to_value(&event).unwrap(), item, "{what}");
        }
    }
}

#[test]
fn token_secrets_appear_only_in_token_created_and_exchange_request() {
    for (what, schema, value) in openapi_examples() {
        let text = value.to_string();
        let allowed = what.starts_with("post /api/v1/agent-enrollment/tokens 201")
            || what.starts_with("post /api/v1/agent-enrollment/exchange request")
            || schema["$ref"]
                .as_str()
                .is_some_and(|r| r.ends_with("/TokenCreated") || r.ends_with("/ExchangeRequest"));
        if text.contains("opet_") || text.contains("opak_") {
            assert!(allowed, "{what}: example contains a secret");
        }
    }
    let created = component_validator("TokenCreated");
    let token_schema = &openapi()["components"]["schemas"]["Token"];
    for field in ["token", "secret", "token_hash"] {
        assert!(
            token_schema["properties"].get(field).is_none(),
            "Token has {field}"
        );
    }
    let mut bad = openapi()["components"]["schemas"]["TokenCreated"]["examples"][0].clone();
    bad["token"] = json!("opet_short");
    assert!(
        !created.is_valid(&bad),
        "TokenCreated must pin the secret's format"
    );
}

/// The problem codes of one response (resolved), with the response's name when it is shared.
fn problem_codes(response: &Value) -> Vec<String> {
    response["x-problem-codes"]
        .as_array()
        .map(|codes| {
            codes
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn openapi_error_responses_are_problems_with_known_codes_and_matching_statuses() {
    let doc = openapi();
    // Shared responses: every code exists, every example is that code's problem.
    for (name, response) in doc["components"]["responses"].as_object().unwrap() {
        let codes = problem_codes(response);
        assert!(!codes.is_empty(), "responses/{name}: no x-problem-codes");
        let content = &response["content"]["application/problem+json"];
        assert_eq!(
            content["schema"]["$ref"], "#/components/schemas/Problem",
            "responses/{name}"
        );
        let examples = content["examples"].as_object().unwrap();
        let mut exemplified = BTreeSet::new();
        for (ex_name, ex) in examples {
            let p = &ex["value"];
            let code = p["code"].as_str().unwrap();
            let k = kind(code).unwrap_or_else(|| panic!("responses/{name}: unknown code {code}"));
            assert!(
                codes.iter().any(|c| c == code),
                "responses/{name} {ex_name}"
            );
            assert_eq!(p["status"], k.status, "responses/{name} {ex_name}: status");
            assert_eq!(p["title"], k.title, "responses/{name} {ex_name}: title");
            assert_eq!(
                p["type"],
                format!("{}{code}", problem::TYPE_BASE),
                "responses/{name} {ex_name}: type"
            );
            exemplified.insert(code.to_owned());
        }
        for code in &codes {
            assert!(
                kind(code).is_some(),
                "responses/{name}: unknown code {code}"
            );
            assert!(
                exemplified.contains(code),
                "responses/{name}: no example of {code}"
            );
        }
        let statuses: BTreeSet<u16> = codes.iter().map(|c| kind(c).unwrap().status).collect();
        assert_eq!(
            statuses.len(),
            1,
            "responses/{name}: codes of different statuses"
        );
    }
    // Operations: every error answer is a problem whose codes have that status.
    for (path, method, op) in operations() {
        for (status, response) in op["responses"].as_object().unwrap() {
            let code_status: u16 = status.parse().unwrap();
            if code_status < 400 {
                continue;
            }
            let what = format!("{method} {path} {status}");
            assert!(
                response.get("$ref").is_some(),
                "{what}: use a shared response"
            );
            let response = deref(doc, response);
            let codes = problem_codes(response);
            assert!(!codes.is_empty(), "{what}: no x-problem-codes");
            for code in codes {
                assert_eq!(kind(&code).unwrap().status, code_status, "{what}: {code}");
            }
            let headers = &response["headers"];
            if code_status == 429 || code_status == 503 {
                assert!(headers.get("Retry-After").is_some(), "{what}: Retry-After");
            }
            if code_status == 401 && op["security"] == json!([{ "adminKey": [] }]) {
                assert!(
                    headers.get("WWW-Authenticate").is_some(),
                    "{what}: WWW-Authenticate"
                );
            }
        }
    }
}

#[test]
fn openapi_documents_every_code_the_enroll_api_uses() {
    let doc = openapi();
    let documented: BTreeSet<String> = doc["components"]["responses"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(problem_codes)
        .collect();
    for k in problem::ALL {
        let in_spec = documented.contains(k.code);
        let enroll_api = !NOT_ENROLL_API.contains(&k.code);
        assert_eq!(
            in_spec, enroll_api,
            "{}: documented in openapi.yaml = {in_spec}, used by the enroll-api = {enroll_api}",
            k.code
        );
    }
    // The table in info.description lists the same codes with the catalogue's status.
    let description = doc["info"]["description"].as_str().unwrap();
    for code in &documented {
        let k = kind(code).unwrap();
        let row = format!("| `{code}` | {} | {} |", k.status, k.title);
        assert!(description.contains(&row), "info.description lacks {row}");
    }
}

#[test]
fn problems_built_with_the_rust_type_validate() {
    let v = component_validator("Problem");
    for k in problem::ALL {
        for detail in [None, Some("something specific".to_owned())] {
            let p = Problem::new(*k, detail);
            let value: Value = serde_json::from_slice(&p.to_json()).unwrap();
            assert_valid(&v, &value, &format!("Problem {}", k.code));
        }
    }
}
