#include "sampler.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace pop {

Sampler::Sampler(const GenerateOptions& o)
    : temperature_(o.temperature), top_p_(o.top_p), top_k_(o.top_k), rng_(o.seed) {
  if (!(o.temperature >= 0) || o.top_k < 0 || !(o.top_p > 0 && o.top_p <= 1))
    throw Error(Status::invalid_argument, "need temperature >= 0, top_k >= 0 and 0 < top_p <= 1");
}

int64_t Sampler::operator()(const float* logits, int64_t vocab) {
  if (temperature_ == 0) return std::max_element(logits, logits + vocab) - logits;  // the first maximum, as argmax
  order_.resize(vocab);
  std::iota(order_.begin(), order_.end(), 0);
  int64_t keep = top_k_ > 0 ? std::min<int64_t>(top_k_, vocab) : vocab;
  auto larger = [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), larger);
  probs_.resize(keep);
  const double top = logits[order_[0]] / double(temperature_);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += probs_[i] = std::exp(logits[order_[i]] / double(temperature_) - top);
  for (auto& p : probs_) p /= sum;
  if (top_p_ < 1) {
    double mass = 0;
    int64_t i = 0;
    while (i < keep - 1 && (mass += probs_[i]) < top_p_) ++i;
    keep = i + 1;
    sum = std::accumulate(probs_.begin(), probs_.begin() + keep, 0.0);
  }
  double u = std::uniform_real_distribution<double>(0.0, sum)(rng_);
  for (int64_t i = 0; i < keep; ++i)
    if ((u -= probs_[i]) < 0) return order_[i];
  return order_[keep - 1];
}

static float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) mant <<= 1, --exp;
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void to_float(const void* logits, const std::string& dtype, int64_t vocab, float* out) {
  if (dtype == "float32") {
    std::memcpy(out, logits, vocab * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(logits);
  for (int64_t i = 0; i < vocab; ++i) {
    if (dtype == "float16") {
      out[i] = half_to_float(h[i]);
    } else {  // bfloat16: the high half of a float32
      uint32_t bits = uint32_t(h[i]) << 16;
      std::memcpy(out + i, &bits, 4);
    }
  }
}

}  // namespace pop
