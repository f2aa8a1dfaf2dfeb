#!/usr/bin/env bash
# The one check command: the same locally and in CI (.ci/run calls exactly this).
#
#   scripts/check.sh            formatting, lints, docs, manifest validation, every test
#
# On a fresh machine it installs what the checks need, and says so:
#   * Python tools from PyPI (kubernetes-validate, the python etcd clients) into
#     target/tools/venv (project-local);
#   * Debian's etcd-client, etcd-server, protobuf-compiler, prometheus (prometheus, promtool)
#     and chromium (the ops page's browser test) with apt-get, when missing and the user may
#     install packages (root or password-less sudo); otherwise it names them.
# It needs the Rust toolchain of rust-toolchain.toml, python3 with venv and kubectl (for
# `kubectl kustomize`).
#
# Environment:
#   CARGO_TEST_ARGS   extra arguments for `cargo test` (e.g. "-- --nocapture")
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
last=$started
# Each step says how long the one before took, so CI logs show where the time goes.
step() {
    local now
    now=$(date +%s)
    printf '\n=== [%ds, step %ds] %s\n' "$((now - started))" "$((now - last))" "$*"
    last=$now
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "test tools (project-local, installed once)"
# Debian packages: the real etcd tools the etcd-API tests run, protoc for the build script of
# the Rust etcd-client crate, Prometheus and promtool (the alerting rules' unit tests and the
# real-scrape test) and Chromium (the ops page's browser test). Installed with apt-get when
# missing and this user may (root, or password-less sudo), saying so; otherwise the step names
# what to install.
missing=()
for tool in etcdctl:etcd-client etcd:etcd-server protoc:protobuf-compiler promtool:prometheus chromium:chromium; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
# protoc needs the well-known types (google/protobuf/*.proto), which protobuf-compiler only
# recommends.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && $sudo true 2>/dev/null; then
        echo "  installing from Debian: ${missing[*]}"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        # etcd-server's package starts a system etcd on 127.0.0.1:2379: the tests start their
        # own on free ports, and `kvset cluster up` wants 2379.
        # prometheus's package may start a system Prometheus on :9090 likewise: the tests start
        # their own.
        if command -v systemctl >/dev/null 2>&1; then
            $sudo systemctl stop etcd 2>/dev/null || true
            $sudo systemctl stop prometheus 2>/dev/null || true
        fi
        $sudo pkill -x etcd 2>/dev/null || true
        $sudo pkill -x prometheus 2>/dev/null || true
    else
        echo "missing Debian packages: ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi
echo "  $(etcdctl version | head -1), $(etcd --version | head -1), $(protoc --version)"
echo "  $(prometheus --version 2>&1 | head -1), $(chromium --version 2>/dev/null | head -1)"
venv="$PWD/target/tools/venv"
# Pinned so a run on a fresh machine checks against the same schemas and clients as here:
# kubernetes-validate for the manifests; python-etcd3 0.12 (the last release) with the
# protobuf and tenacity it was built against, and grpcio-reflection 1.48 (reflection v1alpha)
# for the etcd-API tests; etcd3gw 2.0.0 (the release Debian packages as python3-etcd3gw) for the
# JSON gateway tests.
python_tools=(kubernetes-validate==1.37.0 etcd3==0.12.0 protobuf==3.20.3 tenacity==6.3.1 grpcio==1.85.3 grpcio-reflection==1.48.2 etcd3gw==2.0.0)
stamp="$venv/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "${python_tools[*]}" ]; then
    echo "  installing into $venv from PyPI: ${python_tools[*]}"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_tools[@]}"
    echo "${python_tools[*]}" >"$stamp"
else
    echo "  $venv: ${python_tools[*]} present"
fi
export PATH="$venv/bin:$PATH"

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo clippy with the benchmark's etcd target (--features etcd)"
cargo clippy -p kvset -p kvset-bench --features etcd --all-targets -- -D warnings

step "cargo doc --workspace --no-deps (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "Kubernetes manifests: kubectl kustomize | kubernetes-validate --strict"
# kubernetes-validate has no schemas for CRDs (cert-manager's Certificate and Issuer, the
# Prometheus Operator's ServiceMonitor and PrometheusRule): it warns and skips them, and
# validates everything else strictly. tests/tests/alerts.rs and manifests.rs check their shape.
command -v kubectl >/dev/null 2>&1 || {
    echo "missing kubectl: it renders deploy/k8s offline (Debian: kubernetes-client, or the kubectl binary)" >&2
    exit 1
}
for dir in deploy/k8s deploy/k8s/overlays/*/; do
    echo "  $dir"
    kubectl kustomize "$dir" | kubernetes-validate --strict --quiet -
done

step "cargo build --workspace --all-targets (the test build; the chaos image reuses its binary)"
cargo build --workspace --all-targets

step "container image for the chaos suite: deploy/docker/build.sh with the debug binary"
if docker info >/dev/null 2>&1; then
    KVSET_IMAGE_BINARY=target/debug/kvset deploy/docker/build.sh
else
    echo "  no Docker engine here: the chaos suite will report itself skipped (with the reason)"
fi

step "alerting rules: promtool check rules (unit tests: tests/tests/alerts.rs)"
promtool check rules deploy/prometheus/kvset-rules.yaml

step "cargo test --workspace"
# shellcheck disable=SC2086
cargo test --workspace ${CARGO_TEST_ARGS:-}

step "all checks passed"
