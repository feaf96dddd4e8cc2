// The leak check's workload (make cpp-leakcheck): sessions created, used and freed in a
// loop through the C ABI, bad requests included, under AddressSanitizer's leak checker.
//
//   generate_loop ARTIFACTS [ROUNDS]
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "pop/pop_c.h"

static int fail(const char* what) {
  std::fprintf(stderr, "generate_loop: %s: %s\n", what, pop_last_error());
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: generate_loop ARTIFACTS [ROUNDS]\n"), 2;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 3;
  pop_params p;
  pop_params_default(&p);
  p.max_new_tokens = 8;
  p.stop_at_eos = 0;
  for (int r = 0; r < rounds; ++r) {
    pop_session *s = nullptr, *t = nullptr;
    if (pop_create(argv[1], nullptr, 1, &s) != POP_OK) return fail("create");
    if (pop_create_sharing(s, &t) != POP_OK) return fail("create_sharing");
    std::vector<int64_t> prompt = {1, 5, 9, 13, 17, 21}, out(8);
    size_t n = 0;
    pop_stats st;
    for (int full = 0; full < 2; ++full) {
      p.full = full;
      if (pop_generate(r % 2 ? t : s, prompt.data(), prompt.size(), &p, out.data(), out.size(), &n, &st) != POP_OK)
        return fail("generate");
    }
    std::vector<int64_t> too_long(pop_max_seq_len(s) + 1, 5);
    if (pop_generate(s, too_long.data(), too_long.size(), &p, out.data(), out.size(), &n, nullptr) == POP_OK)
      return fail("a too-long prompt was accepted");
    pop_free(t);
    pop_free(s);
  }
  pop_session* s = nullptr;
  if (pop_create("/nonexistent/pop-artifacts", nullptr, 1, &s) == POP_OK) return fail("a missing folder was accepted");
  std::printf("generate_loop: %d rounds ok\n", rounds);
  return 0;
}
