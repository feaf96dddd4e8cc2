// The int8 matrices of integer-GEMM graphs (--weights-compute int8-gemm), derived at load from the
// MatMulNBits weights stored in weights.bin: the same arithmetic as runtime/backends/derived.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace pop {

struct DerivedMatrix {
  std::vector<int8_t> weight;  // [k, n], row-major
  std::vector<float> scale;    // [n]
};

// Reads the entry's codes, scales and zero points from the weights file; throws Error(bad_artifacts) with one
// line where they lie outside it.
DerivedMatrix derive_int8(const std::string& weights_path, const DerivedEntry& entry, int bits, int block);

}  // namespace pop
