// pop_manifest.json, read with nlohmann::json: the one contract with the exporter
// (docs/MANIFEST.md).  Only what a text-model runtime needs is kept.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace pop {

struct GraphSpec {
  std::string file, format, form, device, torch;  // torch: the version an AOTI package was built with
  std::vector<std::string> inputs, outputs;  // names, in the graph's order
  std::vector<std::string> aliases;  // per output: the input whose buffer the graph writes it into, or ""
};

struct TensorEntry {  // one weight in weights.bin (AOTI exports)
  std::string name, dtype;
  int64_t offset = 0, bytes = 0;
  std::vector<int64_t> shape;
};

// An int8 matrix [k, n] and its per-column scale that an integer-GEMM graph reads (--weights-compute int8-gemm),
// derived at load from a MatMulNBits weight stored in weights.bin (derived.hpp).
struct DerivedEntry {
  std::string weight, scale;  // the graph's initializer names
  int64_t k = 0, n = 0, codes_offset = 0, scales_offset = 0, zero_points_offset = -1;  // -1: symmetric
  std::string graph = "prefill";  // the graph that reads it
};

struct Manifest {
  std::string directory;
  int schema_version = 0;
  int64_t max_seq_len = 0, vocab_size = 0;
  int num_layers = 0, prefill_layers = 0, kv_heads = 0, head_dim = 0;
  std::string kv_dtype, logits_dtype;
  std::vector<std::array<std::string, 4>> layer_names;  // past_key, past_value, present_key, present_value
  std::map<std::string, GraphSpec> graphs;
  std::string weights_file;
  int64_t weights_bytes = 0;
  std::vector<TensorEntry> tensors;
  int quant_bits = 0, quant_block = 0;  // weights.quantization, where the weights are quantized
  std::vector<std::string> integer_graphs;  // graphs whose products are integer GEMMs over `derived`
  std::vector<DerivedEntry> derived;
  std::vector<int64_t> eos_ids;

  std::string path(const std::string& relative) const { return directory + "/" + relative; }
  // (layer, 0 for keys | 1 for values) of a past_* or present_* name, or (-1, -1)
  std::pair<int, int> kv_entry(const std::string& name) const;
  std::string graph_format() const;  // "aoti" or "onnx"
};

// Throws pop::Error(bad_artifacts) with one line for a missing, corrupt or unreadable manifest.
Manifest read_manifest(const std::string& directory);

size_t dtype_size(const std::string& dtype);

}  // namespace pop
