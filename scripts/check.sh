#!/usr/bin/env bash
# The one check command: the same locally and in CI (.ci/run calls exactly this).
#
#   scripts/check.sh            formatting, lints, manifest validation, every test
#
# Environment:
#   CARGO_TEST_ARGS   extra arguments for `cargo test` (e.g. "-- --nocapture")
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo clippy with the benchmark's etcd target (--features etcd)"
# etcd-client's build script needs protoc, which a fresh machine lacks (bench/compare.sh
# installs it); without it this step is skipped, saying so.
if command -v protoc >/dev/null 2>&1; then
    cargo clippy -p kvset -p kvset-bench --features etcd --all-targets -- -D warnings
else
    echo "  no protoc here: skipped (bench/compare.sh installs it)"
fi

step "Kubernetes manifests: kubectl kustomize | kubernetes-validate --strict"
for tool in kubectl kubernetes-validate; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "missing $tool (kubernetes-validate: pip install kubernetes-validate; .ci/run installs both checks' needs)" >&2
        exit 1
    }
done
for dir in deploy/k8s deploy/k8s/overlays/*/; do
    echo "  $dir"
    kubectl kustomize "$dir" | kubernetes-validate --strict --quiet -
done

step "container image for the chaos suite: deploy/docker/build.sh"
if docker info >/dev/null 2>&1; then
    deploy/docker/build.sh
else
    echo "  no Docker engine here: the chaos suite will report itself skipped (with the reason)"
fi

step "cargo test --workspace"
# shellcheck disable=SC2086
cargo test --workspace ${CARGO_TEST_ARGS:-}

step "all checks passed"
