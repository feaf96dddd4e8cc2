// Next-token choice from the last position's logits, as runtime/sampling.py does:
// greedy, or temperature, then top-k, then top-p (the smallest prefix whose mass
// reaches top_p).  Sampled draws come from std::mt19937_64, so a seed repeats
// within libpop but does not reproduce numpy's draws.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "pop/pop.hpp"

namespace pop {

class Sampler {
 public:
  explicit Sampler(const GenerateOptions& o);
  int64_t operator()(const float* logits, int64_t vocab);

 private:
  float temperature_, top_p_;
  int top_k_;
  std::mt19937_64 rng_;
  std::vector<int64_t> order_;  // reused between steps
  std::vector<double> probs_;
};

// logits of any manifest dtype as float32 (into `out`, sized vocab)
void to_float(const void* logits, const std::string& dtype, int64_t vocab, float* out);

}  // namespace pop
