#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests run against: kube-apiserver,
# kube-controller-manager and kubectl from k8s.io/kubernetes, and etcd from
# go.etcd.io/etcd/server/v3, at the versions pinned in this folder's go.mod
# (with go.sum). Like controller-runtime's envtest, no kubelet and no scheduler.
#
# The binaries go to a cache folder keyed by those versions and by the hash of
# go.mod, go.sum and this script, so a second run does nothing:
#   ${MODELCACHE_K8S_CACHE:-~/.cache/modelcache/k8s}/kubernetes-<v>-etcd-<v>-<hash>/bin
#
#   bash tests/k8s/control-plane.sh            build if needed, print the bin folder
#   bash tests/k8s/control-plane.sh --bin-dir  print the bin folder if built (exit 1 if not)
#
# Exit 3 when there is no Go toolchain (the tests then print SKIPPED).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

k8s=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' go.mod)
etcd=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' go.mod)
key=$(cat go.mod go.sum control-plane.sh | sha256sum | cut -c1-12)
cache=${MODELCACHE_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelcache/k8s}
dir="$cache/kubernetes-$k8s-etcd-$etcd-$key"

if [ -f "$dir/complete" ]; then
  echo "$dir/bin"
  exit 0
fi
if [ "${1:-}" = --bin-dir ]; then
  exit 1
fi
if ! command -v go >/dev/null; then
  echo "no Go toolchain: the real control plane cannot be built" >&2
  exit 3
fi

# kubectl and the servers report the version they were built from, as a
# release build does (kubectl warns about skew against "v0.0.0-master").
minor=${k8s#v1.}
minor=${minor%%.*}
vpkg() {
  printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean' \
    "$1" "$k8s" "$1" "$1" "$minor" "$1"
}
ldflags="-s -w $(vpkg k8s.io/component-base/version) $(vpkg k8s.io/client-go/pkg/version)"

start=$(date +%s)
echo "building Kubernetes $k8s and etcd $etcd into $dir (about 15 minutes on 2 cores the first time)" >&2
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp/bin"
export CGO_ENABLED=0 GOFLAGS=-mod=readonly
for cmd in kube-apiserver kube-controller-manager kubectl; do
  go build -trimpath -ldflags "$ldflags" -o "$dir.tmp/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
go build -trimpath -ldflags "-s -w" -o "$dir.tmp/bin/etcd" go.etcd.io/etcd/server/v3
"$dir.tmp/bin/kube-apiserver" --version >&2
"$dir.tmp/bin/etcd" --version | head -1 >&2
echo "built in $(($(date +%s) - start)) s; $(du -sh "$dir.tmp" | cut -f1) of binaries" >&2
touch "$dir.tmp/complete"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir/bin"
