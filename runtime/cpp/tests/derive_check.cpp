// Writes the int8 matrix and scales that derived.cpp derives for one entry, for tests/test_cpp_runtime.py to
// compare with runtime/backends/derived.py byte for byte:
//   pop_derive_check WEIGHTS K N CODES_OFFSET SCALES_OFFSET ZERO_POINTS_OFFSET|-1 BITS BLOCK > out
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "../src/derived.hpp"
#include "pop/pop.hpp"

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: pop_derive_check WEIGHTS K N CODES_OFFSET SCALES_OFFSET ZERO_POINTS_OFFSET BITS BLOCK\n";
    return 2;
  }
  pop::DerivedEntry e{"w.int8", "w.int8_scale", std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]),
                      std::atoll(argv[5]), std::atoll(argv[6]), "prefill"};
  try {
    const auto d = pop::derive_int8(argv[1], e, std::atoi(argv[7]), std::atoi(argv[8]));
    std::fwrite(d.weight.data(), 1, d.weight.size(), stdout);
    std::fwrite(d.scale.data(), sizeof(float), d.scale.size(), stdout);
  } catch (const pop::Error& err) {
    std::cerr << err.what() << "\n";
    return 1;
  }
  return 0;
}
