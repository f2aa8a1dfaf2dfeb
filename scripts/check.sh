#!/usr/bin/env bash
# The one check command: the same locally and in CI (.ci/run calls exactly this).
#
#   scripts/check.sh            formatting, lints, every test
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

step "cargo test --workspace"
# shellcheck disable=SC2086
cargo test --workspace ${CARGO_TEST_ARGS:-}

step "all checks passed"
