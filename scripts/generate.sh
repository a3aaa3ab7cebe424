#!/usr/bin/env bash
# Regenerates every Python stub from protos/. The stubs are committed; CI runs
# this and fails when `git diff` shows they were stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The protoc plugins (protoc-gen-mypy, ...) live next to the interpreter.
PATH="$($PY -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
googleapis=$($PY -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')
mapfile -t files < <(cd protos && find cyclone -name '*.proto' | sort)
$PY -m grpc_tools.protoc -I protos -I "$googleapis" \
  --python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. \
  "${files[@]}"
# Every generated directory must be an importable package.
for f in "${files[@]}"; do
  d=$(dirname "$f")
  while [ "$d" != "." ] && [ "$d" != "cyclone" ]; do
    [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
    d=$(dirname "$d")
  done
done
# Envoy's JSON transcoder reads every service from one descriptor set (imports included;
# google.rpc.Status so gRPC errors become JSON bodies). No source info: byte-stable output.
$PY -m grpc_tools.protoc -I protos -I "$googleapis" --include_imports \
  --descriptor_set_out=cyclone/envoy/cyclone.binpb \
  "${files[@]}" google/rpc/status.proto google/rpc/error_details.proto
