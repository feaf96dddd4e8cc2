#!/usr/bin/env bash
# The leak check: generate_loop (sessions made, used and freed through the C ABI, bad
# requests included) under AddressSanitizer with LeakSanitizer on.  libtorch is not
# built with ASan, so its one-time allocations (op registries, thread pools) are
# suppressed by library (leakcheck.supp); anything leaked from libpop's own frames fails.
set -euo pipefail
BUILD="$1"; ARTIFACTS="$2"; ROUNDS="${3:-4}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASAN_LIB="$(g++ -print-file-name=libasan.so)"
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:detect_odr_violation=0:alloc_dealloc_mismatch=0"
export LSAN_OPTIONS="suppressions=$HERE/leakcheck.supp:print_suppressions=0"
# libasan must come first when the executable's dependencies (libtorch) are not instrumented
LD_PRELOAD="$ASAN_LIB" "$BUILD/pop_generate_loop" "$ARTIFACTS" "$ROUNDS"
