#!/bin/sh
# Builds {{name}}.wasm: C bindings from wit/ with `wit-bindgen c`, compiled
# by zig's clang for wasm32-wasi (a reactor), wrapped as a component with
# the WASI preview1 reactor adapter by `jco new`.
set -eu
cd "$(dirname "$0")"
mkdir -p gen
wit-bindgen c wit --world plugin --out-dir gen >/dev/null
${PYTHON:-python3} -m ziglang cc -target wasm32-wasi -mexec-model=reactor -O2 -Wall \
  -Igen -o gen/core.wasm plugin.c gen/plugin.c gen/plugin_component_type.o
jco new gen/core.wasm --wasi-reactor -o {{name}}.wasm
