#!/bin/sh
# Builds the C chat plugin into a component: bindings from the WIT with
# `wit-bindgen c`, compiled with zig's clang for wasm32-wasi (a reactor),
# then wrapped as a component with the WASI preview1 reactor adapter by
# `jco new` (the same as `wasm-tools component new --adapt`).
#
# Needs on PATH: wit-bindgen (`cargo install wit-bindgen-cli --version 0.46.0`),
# python3 with ziglang (`pip install ziglang==0.17.1`), and jco from
# examples/node_modules (`npm install` in examples/).
#
# usage: sh chat-c/build.sh OUT.wasm   (from examples/)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
wit-bindgen c "$here/../../wit/0.1.0" --world plugin --out-dir "$gen" >/dev/null
${PYTHON:-python3} -m ziglang cc -target wasm32-wasi -mexec-model=reactor -O2 -Wall -Werror \
  -I"$gen" -o "$gen/core.wasm" "$here/chat.c" "$gen/plugin.c" "$gen/plugin_component_type.o"
"$here/../node_modules/.bin/jco" new "$gen/core.wasm" --wasi-reactor -o "$out"
