#!/usr/bin/env bash
# buf lint (STANDARD) on protos/. The googleapis imports come from the
# googleapis-common-protos wheel, so buf reads a descriptor image built by
# protoc instead of fetching dependencies from a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The protoc plugins (protoc-gen-mypy, ...) live next to the interpreter.
PATH="$($PY -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
googleapis=$($PY -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')
mkdir -p build
mapfile -t files < <(cd protos && find cyclone -name '*.proto' | sort)
$PY -m grpc_tools.protoc -I protos -I "$googleapis" --include_imports --include_source_info \
  --descriptor_set_out=build/protos.binpb "${files[@]}"
BUF=${BUF:-}
if [ -z "$BUF" ]; then
  prefix="${XDG_CACHE_HOME:-$HOME/.cache}/cyclone-buf"
  [ -x "$prefix/node_modules/.bin/buf" ] || npm install --silent --prefix "$prefix" @bufbuild/buf@1 >/dev/null
  BUF="$prefix/node_modules/.bin/buf"
fi
"$BUF" lint build/protos.binpb --config protos/buf.yaml
echo "buf lint: ok"
