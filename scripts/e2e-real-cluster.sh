#!/usr/bin/env bash
# The end-to-end scenarios of tests/tests/e2e.rs against a real Kubernetes
# cluster made with kind, installed with the Helm chart. See docs/real-cluster.md.
#
#   bash scripts/e2e-real-cluster.sh            # creates kind cluster "modelcache-e2e", runs, deletes it
#   KEEP=1 bash scripts/e2e-real-cluster.sh     # keeps the cluster for a look around
#
# Needs docker, kind, kubectl, helm and curl. It has NOT been run on the
# machines this project is developed on: they cannot run Docker or a
# kube-apiserver (see docs/real-cluster.md). The in-repo suite runs the same
# scenarios against an emulated API server.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in docker kind kubectl helm curl python3; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
CLUSTER=modelcache-e2e
NS=modelcache
IMAGE=ghcr.io/modelcache/modelcache:e2e
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*" >&2; kubectl -n "$NS" logs deploy/modelcache-operator --tail=50 >&2 || true; exit 1; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  fail "timed out waiting for $what"
}
jsonpath() { kubectl get mdep "$1" -o "jsonpath=$2"; }

# 1. A three-node cluster (one control plane, three workers) with the models on each worker.
cat > /tmp/kind-modelcache.yaml <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
  - role: worker
YAML
kind create cluster --name "$CLUSTER" --config /tmp/kind-modelcache.yaml --wait 120s
[ -n "${KEEP:-}" ] || trap 'kind delete cluster --name "$CLUSTER"' EXIT
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"
mapfile -t WORKERS < <(kubectl get nodes -o name --selector '!node-role.kubernetes.io/control-plane' | sed 's|node/||' | sort)
declare -A MODELS=( ["${WORKERS[0]}"]="alpha beta" ["${WORKERS[1]}"]="beta" ["${WORKERS[2]}"]="beta gamma" )
for w in "${WORKERS[@]}"; do
  kubectl label node "$w" nvidia.com/gpu.present=true --overwrite
  for m in ${MODELS[$w]}; do
    docker exec "$w" mkdir -p /var/lib/modelcache/models
    docker cp tests/fixtures/tiny-sd1 "$w:/var/lib/modelcache/models/$m"
  done
done
kubectl label node "${WORKERS[2]}" pool=small --overwrite

# 2. The chart, with leases shortened as in the in-repo test (kind nodes have no GPUs).
helm install modelcache charts/modelcache --namespace "$NS" --create-namespace --wait \
  --set image.repository="${IMAGE%:*}",image.tag=e2e,image.pullPolicy=Never \
  --set agent.gpu.count=0,agent.cache.ramBytes=64Mi,agent.cache.vramBytes=20Mi \
  --set agent.resources.requests.memory=256Mi,agent.resources.requests.cpu=100m,agent.resources.limits.memory=1Gi \
  --set operator.nodeLeaseExpirySeconds=15
wait_for 120 "three ModelNodes" bash -c '[ "$(kubectl get mnode -o name | wc -l)" = 3 ]'

mdep() { # mdep NAME JSON-SPEC
  kubectl apply -f - <<YAML
apiVersion: modelcache.io/v1alpha1
kind: ModelDeployment
metadata: {name: $1, namespace: default}
spec: $2
YAML
}
ready() { [ "$(jsonpath "$1" '{.status.ready}')" = "$2" ]; }
nodes_of() { jsonpath "$1" '{.status.placements[*].node}'; }

# Scenario 1: placed where the model is, Ready, routed; one generation through the Service.
mdep alpha '{model: {path: alpha}, replicas: 1}'
wait_for 120 "alpha ready" ready alpha 1/1
[ "$(nodes_of alpha)" = "${WORKERS[0]}" ] || fail "alpha on $(nodes_of alpha)"
kubectl run gen --rm -i --restart=Never --image="$IMAGE" --image-pull-policy=Never --command -- \
  modelcache-agent request --url http://alpha.default.svc:8080 --model alpha --size 64x64 --steps 2 \
  || fail "generation through the alpha Service"
pass "1 placement, routing and generation"

# Scenario 2: residency preference.
mdep beta-warmup '{model: {path: beta}, replicas: 1, warmTier: Ram, placement: {nodeSelector: {pool: small}}}'
wait_for 120 "beta-warmup ready" ready beta-warmup 1/1
kubectl delete mdep beta-warmup --wait
mdep beta '{model: {path: beta}, replicas: 1}'
wait_for 120 "beta ready" ready beta 1/1
[ "$(nodes_of beta)" = "${WORKERS[2]}" ] || fail "beta on $(nodes_of beta), not where it was resident"
pass "2 residency preference"

# Scenario 3: an agent dies (its pod is kept off the node), placements move; it returns, nothing moves.
victim=$(nodes_of beta)
kubectl label node "$victim" nvidia.com/gpu.present- >/dev/null
wait_for 120 "beta to leave $victim" bash -c "[ \"\$(kubectl get mdep beta -o jsonpath='{.status.placements[*].node}')\" != '$victim' ]"
wait_for 120 "beta ready again" ready beta 1/1
moved=$(nodes_of beta)
kubectl label node "$victim" nvidia.com/gpu.present=true >/dev/null
sleep 30
[ "$(nodes_of beta)" = "$moved" ] || fail "churn when $victim returned"
pass "3 agent loss and return"

# Scenario 4: operator restart moves nothing.
before="$(nodes_of alpha) $(nodes_of beta)"
kubectl -n "$NS" rollout restart deploy/modelcache-operator
kubectl -n "$NS" rollout status deploy/modelcache-operator --timeout=120s
sleep 20
[ "$(nodes_of alpha) $(nodes_of beta)" = "$before" ] || fail "operator restart moved placements"
pass "4 operator restart"

# Scenario 5: scale to zero keeps a warm copy, unrouted; scale up is Ready again.
mdep gamma '{model: {path: gamma}, replicas: 1, warmTier: Ram}'
wait_for 120 "gamma ready" ready gamma 1/1
kubectl scale mdep gamma --replicas=0
wait_for 60 "gamma scaled to zero" ready gamma 0/0
[ "$(jsonpath gamma '{.status.placements[0].role}')" = Warm ] || fail "no warm copy"
[ -z "$(kubectl get endpointslice gamma -o jsonpath='{.endpoints}')" ] || fail "gamma still routed"
kubectl scale mdep gamma --replicas=1
wait_for 60 "gamma ready again" ready gamma 1/1
pass "5 scale to zero and back"

# Scenario 6: preemption with reasons on both sides.
mdep low '{model: {path: beta}, replicas: 1, warmTier: Vram, precision: F32, priority: -10, placement: {nodeSelector: {pool: small}}}'
wait_for 120 "low ready" ready low 1/1
mdep high '{model: {path: gamma}, replicas: 1, warmTier: Vram, precision: F32, priority: 100, placement: {nodeSelector: {pool: small}}}'
wait_for 120 "high ready" ready high 1/1
wait_for 60 "low preempted" bash -c "kubectl get mdep low -o jsonpath='{.status.conditions[?(@.type==\"Scheduled\")].reason}' | grep -q Preempted"
kubectl get mdep high -o jsonpath='{.status.conditions[?(@.type=="Scheduled")].message}' | grep -q 'preempted warm reservations of default/low' || fail "high does not say it preempted low"
pass "6 preemption"

# Scenario 7: refused at apply time; a missing model says where it looked.
if out=$(mdep evil '{model: {path: ../etc/passwd}}' 2>&1); then fail "an invalid ModelDeployment was accepted"; fi
echo "$out" | grep -q 'is invalid' || fail "unexpected refusal: $out"
mdep missing '{model: {path: sdxl/missing.safetensors}}'
wait_for 60 "missing unresolved" bash -c "kubectl get mdep missing -o jsonpath='{.status.conditions[?(@.type==\"Resolved\")].reason}' | grep -q ModelNotFound"
pass "7 invalid and missing models"

helm upgrade modelcache charts/modelcache -n "$NS" --reuse-values --set test.modelDeployment=alpha,test.namespace=default
helm test modelcache -n "$NS" --logs --timeout 5m || fail "helm test"
pass "helm test"
echo "all scenarios passed"
