#!/usr/bin/env bash
# End-to-end test of Colony on a real Kubernetes cluster (kind). Needs Docker, kind, kubectl,
# helm and curl; kubectl and helm are taken from target/tools/bin when scripts/install-k8s-tools
# installed them there. It cannot run without Docker.
#
#   e2e/run.sh            create the cluster, run everything, delete the cluster
#   KEEP=1 e2e/run.sh     leave the cluster running afterwards (for debugging)
#
# Steps: kind cluster → build and load the node and operator images → helm install the chart →
# in-cluster S3-compatible store → apply samples/ → wait for Ready → the admin API needs the
# token → write objects through a port-forward → delete the pod that owns the most slots → check
# they are still served → scale the colo down (the departing pod leaves the placement before it
# goes) → delete the colo (drained, its Leases deleted) → uninstall → tear down.
#
# The operator renders the nodes' configuration (`cluster.control: kubernetes`, the lease), makes
# the admin token Secret (colony-admin-token) and the nodes' Role (their own Leases, the
# placement ConfigMap): nothing here sets them up by hand, the script checks they exist.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${COLONY_E2E_CLUSTER:-colony-e2e}"
ns=colony
operator_ns=colony-system
tag="${COLONY_E2E_TAG:-e2e}"
port="${COLONY_E2E_PORT:-18787}"
objects="${COLONY_E2E_OBJECTS:-20}"
tools="${COLONY_TOOLS_DIR:-$repo/target/tools}/bin"
if [[ -d "$tools" ]]; then
  PATH="$tools:$PATH"
fi
pf_pid=""

log() { printf '\n== %s\n' "$*"; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }

for cmd in docker kind kubectl helm curl python3; do
  command -v "$cmd" >/dev/null || fail "$cmd is required (kubectl and helm: scripts/install-k8s-tools)"
done
docker info >/dev/null 2>&1 || fail "no Docker engine: this script needs one"

cleanup() {
  local rc=$?
  if [[ -n "$pf_pid" ]]; then
    kill "$pf_pid" 2>/dev/null || true
  fi
  if [[ $rc -ne 0 ]]; then
    log "diagnostics"
    kubectl get colos,jurisdictions,objectnamespaces,statefulsets,pods,leases,configmaps -n "$ns" -o wide --show-labels || true
    kubectl describe colos -n "$ns" || true
    kubectl get events -n "$ns" --sort-by=.lastTimestamp | tail -n 50 || true
    kubectl logs -n "$ns" -l app.kubernetes.io/name=colony-node --tail=50 --prefix || true
    kubectl logs -n "$operator_ns" -l app.kubernetes.io/name=colony-operator --tail=200 || true
  fi
  if [[ "${KEEP:-0}" != 1 ]]; then
    log "deleting kind cluster $cluster"
    kind delete cluster --name "$cluster" || true
  fi
  exit "$rc"
}
trap cleanup EXIT

log "creating kind cluster $cluster"
kind create cluster --name "$cluster" --wait 120s

log "building images"
docker build -f "$repo/docker/node.Dockerfile" -t "colony-node:$tag" "$repo"
docker build -f "$repo/docker/operator.Dockerfile" -t "colony-operator:$tag" "$repo"
kind load docker-image --name "$cluster" "colony-node:$tag" "colony-operator:$tag"

log "installing the chart"
helm install colony "$repo/charts/colony" --namespace "$operator_ns" --create-namespace \
  --set image.repository=colony-operator --set image.tag="$tag" --set image.pullPolicy=Never \
  --set nodeImage.repository=colony-node --set nodeImage.tag="$tag" --set nodeImage.pullPolicy=Never \
  --wait --timeout 5m
kubectl wait --for=condition=Established --timeout=60s \
  crd/colos.colony.dev crd/jurisdictions.colony.dev crd/objectnamespaces.colony.dev

log "installing the S3-compatible store"
kubectl create namespace "$ns"
kubectl apply -f "$repo/e2e/s3.yaml"
kubectl rollout status -n "$ns" deployment/colony-s3 --timeout=180s
kubectl wait -n "$ns" --for=condition=Complete job/colony-s3-bucket --timeout=180s

log "invalid resources are refused at admission"
for f in "$repo"/samples/invalid/*.yaml; do
  if kubectl apply -f "$f" 2>/dev/null; then
    fail "$f was accepted"
  fi
done

log "applying the samples"
kubectl apply -f "$repo/samples/jurisdiction.yaml" -f "$repo/samples/objectnamespace.yaml" -f "$repo/samples/colo.yaml"
kubectl wait -n "$ns" --for=condition=Ready --timeout=600s colo/ams
kubectl wait -n "$ns" --for=condition=Ready --timeout=120s objectnamespace/chat jurisdiction/eu
kubectl get colos,jurisdictions,objectnamespaces -n "$ns"

# Reads the region's placement map and prints what the Python snippet $1 computes from it (`m`).
placement() {
  kubectl get configmap -n "$ns" colony-placement-eu -o jsonpath='{.data.placement\.json}' \
    | python3 -c "import json, sys, collections; m = json.load(sys.stdin); $1"
}

log "the operator made the nodes' admin token, Role and configuration"
kubectl get secret -n "$ns" colony-admin-token >/dev/null || fail "no admin token Secret"
kubectl get role -n "$ns" colony-node-ams -o jsonpath='{.rules[*].resourceNames}' | grep -q colony-placement-eu \
  || fail "the nodes' Role does not name the placement ConfigMap"
kubectl get configmap -n "$ns" colony-node-ams -o jsonpath='{.data.node\.yaml}' | grep -q 'control: kubernetes' \
  || fail "the node configuration does not use the Kubernetes control plane"
leases="$(kubectl get leases -n "$ns" -l app.kubernetes.io/name=colony-node,colony.dev/region=eu -o name | wc -l)"
[[ "$leases" -eq 3 ]] || fail "expected 3 node Leases, found $leases"

start_port_forward() {
  local pod="$1"
  if [[ -n "$pf_pid" ]]; then
    kill "$pf_pid" 2>/dev/null || true
  fi
  kubectl port-forward -n "$ns" "pod/$pod" "$port:8787" >/dev/null 2>&1 &
  pf_pid=$!
  for _ in $(seq 1 50); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  fail "port-forward to $pod did not come up"
}

# Every node accepts every request and forwards it to the object's owner.
object_url() { printf 'http://127.0.0.1:%s/v1/ns/chat/names/room-%s/kv/greeting' "$port" "$1"; }

# Every object must still be served (reads go to the owners, wherever they are now).
check_objects() {
  local why="$1" deadline=$((SECONDS + 120))
  for i in $(seq 1 "$objects"); do
    until got="$(curl -fsS "$(object_url "$i")" 2>/dev/null)" && [[ "$got" == *"hello $i"* ]]; do
      (( SECONDS < deadline )) || fail "room-$i not served within 120s of $why"
      sleep 1
    done
  done
}

log "the admin API needs the token"
start_port_forward ams-0
token="$(kubectl get secret -n "$ns" colony-admin-token -o jsonpath='{.data.token}' | base64 -d)"
code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/admin/status")"
[[ "$code" == 401 ]] || fail "the admin API answered $code without the token"
curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/admin/status" >/dev/null \
  || fail "the admin API refused the token"

log "writing $objects objects through ams-0"
for i in $(seq 1 "$objects"); do
  curl -fsS -X PUT -H 'content-type: application/json' --data "\"hello $i\"" "$(object_url "$i")" >/dev/null \
    || fail "write of room-$i failed"
done
for i in $(seq 1 "$objects"); do
  got="$(curl -fsS "$(object_url "$i")")"
  [[ "$got" == *"hello $i"* ]] || fail "room-$i read back $got"
done

log "deleting the pod that owns the most slots"
victim="$(placement 'owners = collections.Counter(row[1] for rows in m["colos"].values() for row in rows); print(m["nodes"][owners.most_common(1)[0][0]]["name"])')"
[[ -n "$victim" ]] || fail "cannot read the placement map"
survivor=ams-0
if [[ "$victim" == ams-0 ]]; then survivor=ams-1; fi
version_before="$(placement 'print(m["version"])')"
kubectl delete pod -n "$ns" "$victim" --wait=false
echo "deleted $victim (placement version $version_before); reading through $survivor"

log "objects keep serving"
start_port_forward "$survivor"
check_objects "losing $victim"
kubectl get events -n "$ns" --field-selector reason=FailingOver
kubectl wait -n "$ns" --for=condition=Ready --timeout=300s colo/ams

log "scaling down: ams-2 hands its slots over and leaves every replica set before it goes"
start_port_forward ams-0
kubectl patch colo -n "$ns" ams --type merge -p '{"spec":{"nodes":2}}'
deadline=$((SECONDS + 300))
until [[ "$(placement 'print("ams-2" in [n["name"] for n in m["nodes"]])')" == False ]]; do
  (( SECONDS < deadline )) || fail "ams-2 is still in the placement after 300s"
  # The StatefulSet keeps the pod while the placement names it (read in this order: the map
  # drops ams-2 before the StatefulSet shrinks, and never takes it back).
  replicas="$(kubectl get statefulset -n "$ns" ams -o jsonpath='{.spec.replicas}')"
  if [[ "$replicas" != 3 && "$(placement 'print("ams-2" in [n["name"] for n in m["nodes"]])')" == True ]]; then
    fail "the StatefulSet shrank to $replicas while the placement still names ams-2"
  fi
  sleep 2
done
kubectl wait -n "$ns" --for=jsonpath='{.spec.replicas}'=2 statefulset/ams --timeout=120s
kubectl wait -n "$ns" --for=delete pod/ams-2 --timeout=120s
check_objects "scaling down"
kubectl wait -n "$ns" --for=condition=Ready --timeout=300s colo/ams

log "deleting the Colo drains it, stops its pods, deletes their Leases, then what it owned"
kill "$pf_pid" 2>/dev/null || true
pf_pid=""
kubectl delete colo -n "$ns" ams --wait=true --timeout=300s
for kind in statefulset/ams service/ams poddisruptionbudget/ams configmap/colony-node-ams configmap/colony-placement-eu; do
  kubectl wait -n "$ns" --for=delete "$kind" --timeout=120s || fail "$kind was left behind"
done
left="$(kubectl get leases -n "$ns" -l app.kubernetes.io/name=colony-node -o name | wc -l)"
[[ "$left" -eq 0 ]] || fail "$left node Leases were left behind"

log "helm uninstall keeps the CRDs and the users' resources"
helm uninstall colony --namespace "$operator_ns" --wait
kubectl get crd colos.colony.dev >/dev/null || fail "the CRDs were removed"
kubectl get objectnamespace -n "$ns" chat >/dev/null || fail "an ObjectNamespace was removed"

log "e2e passed"
