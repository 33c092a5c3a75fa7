//! The Helm chart: lint, render with default and non-default values, validate every rendered
//! manifest against the Kubernetes 1.37 schemas (offline), and check the values schema refuses
//! bad values. Needs helm and kubernetes-validate: `scripts/install-k8s-tools` puts them in
//! target/tools/bin (or $COLONY_TOOLS_DIR/bin).

mod support;

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use support::{repo_root, tool};

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn helm(args: &[&str]) -> Output {
    run(Command::new(tool("helm"))
        .args(args)
        .current_dir(repo_root()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

const NON_DEFAULT: &str = r#"
image: {repository: registry.example/colony-operator, tag: "9.9.9", pullPolicy: Always}
nodeImage: {repository: registry.example/colony-node, tag: "9.9.9", pullPolicy: IfNotPresent}
replicaCount: 2
nodeLeaseDuration: 10s
observeInterval: 2s
serviceAccount: {create: false, name: colony-operator-sa}
imagePullSecrets: [{name: regcred}]
podAnnotations: {prometheus.io/scrape: "true"}
priorityClassName: system-cluster-critical
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Exists, effect: NoSchedule}]
metricsPort: 9090
logLevel: colony_operator=debug
"#;

fn render(name: &str, values: Option<&str>) -> (PathBuf, Vec<Value>) {
    let mut args = vec![
        "template",
        "colony",
        "charts/colony",
        "--namespace",
        "colony-system",
    ];
    let vpath = tmp(&format!("{name}-values.yaml"));
    if let Some(v) = values {
        std::fs::write(&vpath, v).expect("values written");
        args.push("--values");
        args.push(vpath.to_str().expect("utf-8 path"));
    }
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template failed: {}",
        text(&out.stderr)
    );
    let path = tmp(&format!("{name}-rendered.yaml"));
    std::fs::write(&path, &out.stdout).expect("rendered written");
    let docs = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect();
    (path, docs)
}

fn validate(path: &PathBuf) {
    let out = run(Command::new(tool("kubernetes-validate"))
        .args(["-k", "1.37", "--strict"])
        .arg(path));
    assert!(
        out.status.success(),
        "kubernetes-validate refused {}:\n{}{}",
        path.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    k.sort();
    k
}

#[test]
fn chart_lints_with_default_and_non_default_values() {
    let out = helm(&["lint", "--strict", "charts/colony"]);
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v = tmp("lint-values.yaml");
    std::fs::write(&v, NON_DEFAULT).expect("values");
    let out = helm(&[
        "lint",
        "--strict",
        "charts/colony",
        "--values",
        v.to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "helm lint (non-default): {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn default_render_is_valid_and_installs_only_crds_and_the_operator() {
    let (path, docs) = render("default", None);
    validate(&path);
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
    );
    // The chart's CRDs are the generated ones, kept on uninstall.
    let generated: Vec<Value> =
        serde_yaml::Deserializer::from_str(&colony_operator::crd::crds_yaml().expect("crds"))
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .collect();
    let rendered: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(rendered.len(), generated.len());
    for (r, g) in rendered.iter().zip(&generated) {
        assert_eq!(*r, g);
        assert_eq!(
            r["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
    }
    let dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("deployment");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/colony-dev/colony-operator:0.1.0");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Least privilege.
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("role");
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    for rule in role["rules"].as_array().expect("rules") {
        let verbs = strs(&rule["verbs"]);
        let resources = strs(&rule["resources"]);
        let names = strs(&rule["resourceNames"]);
        assert!(
            !verbs.iter().any(|v| v == "*") && !resources.iter().any(|r| r == "*"),
            "{rule}"
        );
        if resources.iter().any(|r| r == "secrets") {
            match verbs.as_slice() {
                [v] if v == "create" => assert!(names.is_empty()),
                [v] if v == "get" => assert_eq!(
                    names,
                    ["colony-admin-token"],
                    "only the admin token is ever read"
                ),
                _ => panic!("secrets are only created, and the admin token read: {rule}"),
            }
        }
        if resources.iter().any(|r| r == "leases") {
            assert!(
                !verbs.iter().any(|v| v == "update"),
                "no cluster-wide Lease update: {rule}"
            );
        }
        if verbs.iter().any(|v| v == "delete") {
            assert_eq!(resources, ["leases"], "{rule}");
        }
    }
    // The leader Lease is updated in the release namespace, by name.
    let leader = docs
        .iter()
        .find(|d| d["kind"] == "Role")
        .expect("leader role");
    assert_eq!(leader["metadata"]["namespace"], "colony-system");
    assert_eq!(
        leader["rules"],
        serde_json::json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["colony-operator"], "verbs": ["get", "update"]}])
    );
    let env: Vec<String> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str().map(String::from))
        .collect();
    assert!(
        env.contains(&"POD_NAME".to_string()),
        "a distinct identity per replica"
    );
}

#[test]
fn non_default_render_is_valid_and_uses_the_values() {
    let (path, docs) = render("custom", Some(NON_DEFAULT));
    validate(&path);
    assert!(
        !kinds(&docs).contains(&"ServiceAccount".to_string()),
        "serviceAccount.create=false"
    );
    let dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("deployment");
    assert_eq!(dep["spec"]["replicas"], 2);
    let spec = &dep["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "colony-operator-sa");
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "registry.example/colony-operator:9.9.9");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert!(
        env.contains(&(
            "COLONY_NODE_IMAGE".into(),
            "registry.example/colony-node:9.9.9".into()
        )),
        "{env:?}"
    );
    assert!(env.contains(&("COLONY_NODE_LEASE_DURATION".into(), "10s".into())));
    assert!(env.contains(&(
        "COLONY_NODE_IMAGE_PULL_POLICY".into(),
        "IfNotPresent".into()
    )));
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("binding");
    assert_eq!(binding["subjects"][0]["name"], "colony-operator-sa");
    assert_eq!(binding["subjects"][0]["namespace"], "colony-system");
}

#[test]
fn the_values_schema_refuses_bad_values_naming_the_field() {
    for (set, field) in [
        ("replicaCount=0", "replicaCount"),
        ("nodeLeaseDuration=fifteen", "nodeLeaseDuration"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("image.pullPolicy=", "pullPolicy"),
        ("nodeImage.pullPolicy=Sometimes", "pullPolicy"),
        ("nodeLeaseDuration=0s", "nodeLeaseDuration"),
        ("nodeLeaseDuration=1s", "nodeLeaseDuration"),
        ("nodeLeaseDuration=1500ms", "nodeLeaseDuration"),
        ("leaderLeaseDuration=0s", "leaderLeaseDuration"),
        ("observeInterval=0s", "observeInterval"),
        ("observeInterval=10ms", "observeInterval"),
        ("adminTimeout=0s", "adminTimeout"),
        ("maxConcurrentHandoffs=0", "maxConcurrentHandoffs"),
        ("metricsPort=80", "metricsPort"),
        ("bogus=1", "bogus"),
    ] {
        let out = helm(&["template", "colony", "charts/colony", "--set", set]);
        assert!(!out.status.success(), "--set {set} should be refused");
        let err = text(&out.stderr);
        assert!(
            err.contains("values don't meet the specifications of the schema")
                || err.contains("schema"),
            "{set}: {err}"
        );
        assert!(
            err.contains(field),
            "{set}: the message should name {field}: {err}"
        );
    }
}

#[test]
fn a_node_lease_shorter_than_three_observations_is_refused() {
    let out = helm(&[
        "template",
        "colony",
        "charts/colony",
        "--set",
        "nodeLeaseDuration=10s",
        "--set",
        "observeInterval=5s",
    ]);
    assert!(!out.status.success(), "10s lease with 5s observations");
    let err = text(&out.stderr);
    assert!(
        err.contains("nodeLeaseDuration (10s) must be at least three observeIntervals (5s)"),
        "{err}"
    );
    for (lease, observe) in [("15s", "5s"), ("2s", "500ms"), ("1m", "20s")] {
        let out = helm(&[
            "template",
            "colony",
            "charts/colony",
            "--set",
            &format!("nodeLeaseDuration={lease}"),
            "--set",
            &format!("observeInterval={observe}"),
        ]);
        assert!(
            out.status.success(),
            "{lease}/{observe}: {}",
            text(&out.stderr)
        );
    }
}
