#!/usr/bin/env bash
# The one check command: the same locally and in CI (.ci/run calls exactly this).
#
#   scripts/check.sh            formatting, lints, docs, manifest validation, every test
#
# On a fresh machine it installs what the checks need, project-locally, and says so:
#   * Python tools from PyPI (kubernetes-validate) into target/tools/venv;
# nothing outside the checkout is changed. It needs the Rust toolchain of
# rust-toolchain.toml, python3 with venv, and kubectl (for `kubectl kustomize`).
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
venv="$PWD/target/tools/venv"
# Pinned so a run on a fresh machine checks against the same Kubernetes schemas as here.
python_tools=(kubernetes-validate==1.37.0)
if ! "$venv/bin/python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
    echo "  installing into $venv from PyPI: ${python_tools[*]}"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_tools[@]}"
else
    echo "  $venv: ${python_tools[*]} present"
fi
export PATH="$venv/bin:$PATH"

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

step "cargo doc --workspace --no-deps (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "Kubernetes manifests: kubectl kustomize | kubernetes-validate --strict"
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

step "cargo test --workspace"
# shellcheck disable=SC2086
cargo test --workspace ${CARGO_TEST_ARGS:-}

step "all checks passed"
