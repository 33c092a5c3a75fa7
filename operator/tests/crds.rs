//! The generated CRDs: no drift between the Rust types, `crds/` and the chart, and every sample
//! validated against the generated schema (structure and CEL rules) the way the API server would.

mod support;

use kube::core::cel::Validator;
use serde_json::Value;
use std::path::Path;
use support::repo_root;

const REGENERATE: &str = "regenerate with: cargo run -p colony-operator -- crds > crds/colony.dev.yaml && cp crds/colony.dev.yaml charts/colony/templates/crds.yaml";

#[test]
fn crds_in_the_repository_and_the_chart_match_the_rust_types() {
    let generated = colony_operator::crd::crds_yaml().expect("renders");
    for file in ["crds/colony.dev.yaml", "charts/colony/templates/crds.yaml"] {
        let text = std::fs::read_to_string(repo_root().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}; {REGENERATE}"));
        assert!(
            text == generated,
            "{file} drifted from the Rust types; {REGENERATE}"
        );
    }
    assert!(
        generated
            .matches("\n    helm.sh/resource-policy: keep\n")
            .count()
            == 3,
        "helm uninstall must keep every CRD"
    );
}

/// The openAPIV3Schema of `kind`'s served version.
fn schema(kind: &str) -> Value {
    let crd = colony_operator::crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("kind exists");
    let v = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(v).expect("schema serializes")
}

/// Structural checks as the API server does them in strict mode: types, required fields,
/// unknown fields, enums, bounds.
fn structural(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if v.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{path}: must not be null"));
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            errors.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{path}: must be of type {ty}, got {v}"));
        return;
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < min
    {
        errors.push(format!("{path}: {n} is below the minimum {min}"));
    }
    if let (Some(max), Some(n)) = (schema.get("maximum").and_then(Value::as_f64), v.as_f64())
        && n > max
    {
        errors.push(format!("{path}: {n} is above the maximum {max}"));
    }
    if let (Some(max), Some(s)) = (schema.get("maxLength").and_then(Value::as_u64), v.as_str())
        && s.chars().count() as u64 > max
    {
        errors.push(format!("{path}: longer than {max} characters"));
    }
    if let (Some(min), Some(s)) = (schema.get("minLength").and_then(Value::as_u64), v.as_str())
        && (s.chars().count() as u64) < min
    {
        errors.push(format!("{path}: shorter than {min} characters"));
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errors.push(format!("{path}: {v} is not one of {allowed:?}"));
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = req.as_str()
                && !obj.contains_key(r)
            {
                errors.push(format!("{path}.{r}: required"));
            }
        }
        for (k, child) in obj {
            let p = format!("{path}.{k}");
            match (
                props.and_then(|p| p.get(k)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => structural(s, child, &p, errors),
                (None, Some(Value::Object(s))) => {
                    structural(&Value::Object(s.clone()), child, &p, errors)
                }
                _ if schema.get("x-kubernetes-preserve-unknown-fields")
                    == Some(&Value::Bool(true)) => {}
                _ if path.is_empty()
                    && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") => {}
                _ => errors.push(format!("{p}: unknown field")),
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, child) in arr.iter().enumerate() {
            structural(items, child, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Every error the API server would give for `obj` (optionally as an update of `old`).
fn admission_errors(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("kind");
    assert_eq!(obj["apiVersion"], "colony.dev/v1alpha1");
    let schema = schema(kind);
    let mut errors = Vec::new();
    structural(&schema, obj, "", &mut errors);
    if let Err(e) = Validator::new().validate(&schema, obj, old) {
        errors.extend(
            e.into_vec()
                .into_iter()
                .map(|e| format!("{}: {}", e.field_path, e.message)),
        );
    }
    errors
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_sample_is_accepted_and_deserializes_into_the_rust_types() {
    let dir = repo_root().join("samples");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("samples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let obj = load(&path);
        let errors = admission_errors(&obj, None);
        assert!(
            errors.is_empty(),
            "{} is refused: {errors:?}",
            path.display()
        );
        let kind = obj["kind"].as_str().expect("kind").to_string();
        match kind.as_str() {
            "Colo" => {
                drop(serde_json::from_value::<colony_operator::crd::Colo>(obj).expect("Colo"))
            }
            "Jurisdiction" => drop(
                serde_json::from_value::<colony_operator::crd::Jurisdiction>(obj)
                    .expect("Jurisdiction"),
            ),
            "ObjectNamespace" => drop(
                serde_json::from_value::<colony_operator::crd::ObjectNamespace>(obj)
                    .expect("ObjectNamespace"),
            ),
            other => panic!("unexpected sample kind {other}"),
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["Colo", "Jurisdiction", "ObjectNamespace"],
        "one sample of each kind"
    );
}

#[test]
fn invalid_samples_are_refused_with_a_clear_message() {
    let expect = [
        (
            "quorum-too-large.yaml",
            "writeQuorum must not exceed replicas",
        ),
        ("quorum-not-majority.yaml", "writeQuorum must be a majority"),
        ("bad-retention.yaml", "must be a duration like \"30d\""),
        ("empty-jurisdiction.yaml", "at least one region or colo"),
        ("bad-region.yaml", "must be a DNS label"),
        (
            "bad-namespace-name.yaml",
            "an ObjectNamespace name must be a DNS label",
        ),
        ("bad-colo-name.yaml", "a Colo name must be at most 52"),
    ];
    let dir = repo_root().join("samples/invalid");
    let count = std::fs::read_dir(&dir).expect("samples/invalid").count();
    assert_eq!(
        count,
        expect.len(),
        "every invalid sample has an expectation here"
    );
    for (file, message) in expect {
        let errors = admission_errors(&load(&dir.join(file)), None);
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "{file}: expected {message:?}, got {errors:?}"
        );
    }
}

#[test]
fn defaults_are_the_documented_ones() {
    let on: colony_operator::crd::ObjectNamespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "colony.dev/v1alpha1", "kind": "ObjectNamespace", "metadata": {"name": "x"}, "spec": {}
    })).expect("deserializes");
    assert_eq!((on.spec.replicas, on.spec.write_quorum), (5, 3));
    assert_eq!(on.spec.archive.retention, "30d");
    assert_eq!(on.spec.archive.batch_bytes, "16MiB");
    assert_eq!(on.spec.archive.batch_interval, "10s");
    let s = schema("ObjectNamespace");
    assert_eq!(
        s["properties"]["spec"]["properties"]["replicas"]["default"],
        5
    );
    assert_eq!(
        s["properties"]["spec"]["properties"]["writeQuorum"]["default"],
        3
    );
    assert!(admission_errors(&serde_json::json!({"apiVersion": "colony.dev/v1alpha1", "kind": "ObjectNamespace", "metadata": {"name": "x"}, "spec": {}}), None).is_empty());
}

#[test]
fn fixed_fields_cannot_change_but_nodes_can() {
    let old = load(&repo_root().join("samples/colo.yaml"));
    let mut scaled = old.clone();
    scaled["spec"]["nodes"] = 5.into();
    assert!(
        admission_errors(&scaled, Some(&old)).is_empty(),
        "scaling is allowed"
    );
    let mut moved = old.clone();
    moved["spec"]["region"] = "us".into();
    let errors = admission_errors(&moved, Some(&old));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("region cannot be changed")),
        "{errors:?}"
    );
    let mut grown = old.clone();
    grown["spec"]["storage"]["size"] = "2Gi".into();
    let errors = admission_errors(&grown, Some(&old));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("storage cannot be changed")),
        "{errors:?}"
    );
    let mut typo = old;
    typo["spec"]["node"] = 3.into();
    let errors = admission_errors(&typo, None);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(".spec.node: unknown field")),
        "{errors:?}"
    );
}

#[test]
fn replication_of_an_object_namespace_is_fixed_once_set() {
    let old = load(&repo_root().join("samples/objectnamespace.yaml"));
    assert!(admission_errors(&old, Some(&old)).is_empty());
    let mut more = old.clone();
    more["spec"]["replicas"] = 5.into();
    more["spec"]["writeQuorum"] = 3.into();
    let errors = admission_errors(&more, Some(&old));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("replicas cannot be changed")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("writeQuorum cannot be changed")),
        "{errors:?}"
    );
    let mut limits = old.clone();
    limits["spec"]["limits"]["maxBatchKeys"] = 64.into();
    assert!(
        admission_errors(&limits, Some(&old)).is_empty(),
        "limits may change"
    );
}

#[test]
fn names_are_what_the_node_and_kubernetes_accept() {
    let named = |kind: &str, name: &str| {
        let file = match kind {
            "Colo" => "samples/colo.yaml",
            _ => "samples/objectnamespace.yaml",
        };
        let mut obj = load(&repo_root().join(file));
        obj["metadata"]["name"] = name.into();
        admission_errors(&obj, None)
    };
    let long_label = "a".repeat(63);
    for ok in ["chat", "a", "0day", long_label.as_str()] {
        assert!(named("ObjectNamespace", ok).is_empty(), "{ok}");
        assert!(colony_node::config::valid_name(ok), "{ok}");
    }
    let too_long = "a".repeat(64);
    for bad in ["chat.rooms", "-chat", "chat-", too_long.as_str()] {
        assert!(!named("ObjectNamespace", bad).is_empty(), "{bad}");
        assert!(!colony_node::config::valid_name(bad), "{bad}");
    }
    let longest = "a".repeat(colony_operator::crd::MAX_COLO_NAME);
    assert!(named("Colo", "ams").is_empty());
    assert!(named("Colo", &longest).is_empty());
    let too_long = "a".repeat(colony_operator::crd::MAX_COLO_NAME + 1);
    for bad in ["1ams", "ams.x", "ams-", too_long.as_str()] {
        assert!(!named("Colo", bad).is_empty(), "{bad}");
    }
}

#[test]
fn print_columns_and_conditions_are_declared() {
    for kind in ["Colo", "Jurisdiction", "ObjectNamespace"] {
        let crd = colony_operator::crd::crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .expect("kind");
        let v = &crd.spec.versions[0];
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            cols.contains(&"Ready") && cols.contains(&"Age"),
            "{kind}: {cols:?}"
        );
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind} has a status subresource"
        );
        let s = schema(kind);
        let conds = &s["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conds["x-kubernetes-list-type"], "map",
            "{kind}: conditions keyed by type"
        );
        assert_eq!(
            conds["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }
}
