#include "derived.hpp"

#include <cmath>
#include <fstream>

#include "pop/pop.hpp"

namespace pop {

// Unpacks `count` codes of `bits` bits from one row's bytes: 4 bits two to a byte, low nibble first.
static uint8_t code(const uint8_t* row, int bits, int64_t i) {
  if (bits == 8) return row[i];
  return (i % 2) ? row[i / 2] >> 4 : row[i / 2] & 15;
}

DerivedMatrix derive_int8(const std::string& weights_path, const DerivedEntry& e, int bits, int block) {
  if (bits != 4 && bits != 8)
    throw Error(Status::bad_artifacts, "derived weights need 4- or 8-bit blocks, not " + std::to_string(bits));
  const int64_t blocks = (e.k + block - 1) / block, row_bytes = blocks * block * bits / 8;
  const int64_t zero_row_bytes = (blocks * bits + 7) / 8;
  std::ifstream in(weights_path, std::ios::binary | std::ios::ate);
  const int64_t file_bytes = in ? int64_t(in.tellg()) : -1;
  auto read = [&](int64_t offset, int64_t bytes) {
    if (offset < 0 || offset + bytes > file_bytes)
      throw Error(Status::bad_artifacts, e.weight + " derives from bytes " + std::to_string(offset) + ".." +
                                             std::to_string(offset + bytes) + " of a " + std::to_string(file_bytes) +
                                             "-byte weights file: corrupt artifacts");
    std::vector<uint8_t> out(bytes);
    in.seekg(offset);
    in.read(reinterpret_cast<char*>(out.data()), bytes);
    return out;
  };
  const auto codes = read(e.codes_offset, e.n * row_bytes);
  const auto scale_bytes = read(e.scales_offset, e.n * blocks * 4);
  const auto zeros =
      e.zero_points_offset < 0 ? std::vector<uint8_t>() : read(e.zero_points_offset, e.n * zero_row_bytes);
  const float* scales = reinterpret_cast<const float*>(scale_bytes.data());

  DerivedMatrix out{std::vector<int8_t>(size_t(e.k * e.n)), std::vector<float>(size_t(e.n))};
  std::vector<float> w(size_t(e.k));
  for (int64_t c = 0; c < e.n; ++c) {  // one output column (one stored row) at a time
    const uint8_t* row = codes.data() + c * row_bytes;
    float amax = 0.f;
    for (int64_t i = 0; i < e.k; ++i) {
      const int64_t b = i / block;
      const float zero =
          zeros.empty() ? float(1 << (bits - 1)) : float(code(zeros.data() + c * zero_row_bytes, bits, b));
      w[i] = (float(code(row, bits, i)) - zero) * scales[c * blocks + b];
      amax = std::max(amax, std::fabs(w[i]));
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    out.scale[c] = scale;
    for (int64_t i = 0; i < e.k; ++i) out.weight[i * e.n + c] = int8_t(std::nearbyint(w[i] / scale));  // half to even
  }
  return out;
}

}  // namespace pop
