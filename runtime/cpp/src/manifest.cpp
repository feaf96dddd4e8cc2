#include "manifest.hpp"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pop/pop.hpp"

namespace pop {

namespace fs = std::filesystem;
using nlohmann::json;

// Versions this runtime reads (runtime/manifest.py, READABLE): 4, per-row cache lengths, to 6, derived weights.
static const int kReadable[] = {4, 5, 6};

static Error bad(const std::string& what) { return Error(Status::bad_artifacts, what); }

size_t dtype_size(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  if (dtype == "int64") return 8;
  if (dtype == "bool" || dtype == "uint8") return 1;
  throw bad("unsupported dtype in the manifest: " + dtype);
}

std::string Manifest::graph_format() const {
  for (const auto& [name, g] : graphs)
    if (g.format == "aoti") return "aoti";
  return "onnx";
}

std::pair<int, int> Manifest::kv_entry(const std::string& name) const {
  for (int l = 0; l < int(layer_names.size()); ++l)
    for (int i = 0; i < 4; ++i)
      if (layer_names[l][i] == name) return {l, i % 2};
  return {-1, -1};
}

static std::vector<std::string> names(const json& list) {
  std::vector<std::string> out;
  for (const auto& v : list) out.push_back(v.at("name").get<std::string>());
  return out;
}

Manifest read_manifest(const std::string& directory) {
  if (!fs::is_directory(directory)) throw bad(directory + " is not a folder of pop artifacts");
  const std::string file = directory + "/pop_manifest.json";
  std::ifstream in(file);
  if (!in) throw bad(file + " is missing: not a complete pop export (re-run pop-export)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw bad(file + " is corrupt: " + e.what());
  }
  if (!j.is_object() || j.value("format", "") != "pop-manifest") throw bad(file + " is not a pop manifest");
  Manifest m;
  m.directory = directory;
  m.schema_version = j.value("schema_version", -1);
  if (std::find(std::begin(kReadable), std::end(kReadable), m.schema_version) == std::end(kReadable))
    throw bad(file + " has manifest schema version " + std::to_string(m.schema_version) +
              "; this runtime reads versions 4, 5 and 6: re-export with this version of pop");
  try {
    if (j.contains("vision"))
      throw bad("these are vision-language artifacts; the C++ runtime runs text models only (use pop-generate)");
    if (j.contains("positions") && j["positions"].value("axes", 1) != 1)
      throw bad("these artifacts use multi-axis positions, which the C++ runtime does not support");
    m.max_seq_len = j.at("max_seq_len").get<int64_t>();
    m.num_layers = j.at("pop").at("num_layers").get<int>();
    m.prefill_layers = j.at("pop").at("prefill_layers").get<int>();
    const json& kv = j.at("kv_cache");
    m.kv_dtype = kv.at("dtype").get<std::string>();
    for (const auto& l : kv.at("layers")) {
      if (l.at("kv_heads") != kv.at("layers")[0].at("kv_heads") || l.at("head_dim") != kv.at("layers")[0].at("head_dim"))
        throw bad("layers with different KV shapes are not supported by the C++ runtime");
      m.layer_names.push_back({l.at("past_key").get<std::string>(), l.at("past_value").get<std::string>(),
                               l.at("present_key").get<std::string>(), l.at("present_value").get<std::string>()});
    }
    if (m.layer_names.empty() || int(m.layer_names.size()) != m.num_layers) throw bad(file + ": kv_cache.layers does not match pop.num_layers");
    m.kv_heads = kv.at("layers")[0].at("kv_heads").get<int>();
    m.head_dim = kv.at("layers")[0].at("head_dim").get<int>();
    for (const auto& [name, g] : j.at("graphs").items()) {
      GraphSpec s;
      s.file = g.at("file").get<std::string>();
      s.format = g.value("format", "onnx");
      s.form = g.value("form", "plain");
      s.device = g.value("device", "cpu");
      s.torch = g.value("torch", "");
      s.inputs = names(g.at("inputs"));
      s.outputs = names(g.at("outputs"));
      for (const auto& o : g.at("outputs")) s.aliases.push_back(o.value("alias", ""));
      if (!fs::is_regular_file(m.path(s.file))) throw bad(m.path(s.file) + " is missing: the artifact folder is incomplete");
      if (name == "decode")
        for (const auto& o : g.at("outputs"))
          if (o.at("name") == "logits") {
            m.vocab_size = o.at("shape").back().get<int64_t>();
            m.logits_dtype = o.at("dtype").get<std::string>();
          }
      m.graphs[name] = s;
    }
    if (!m.graphs.count("prefill") || !m.graphs.count("decode") || m.vocab_size <= 0)
      throw bad(file + " does not describe a prefill and a decode graph with logits");
    const json& w = j.at("weights");
    m.weights_file = w.at("file").get<std::string>();
    m.weights_bytes = w.at("bytes").get<int64_t>();
    if (!fs::is_regular_file(m.path(m.weights_file))) throw bad(m.path(m.weights_file) + " is missing: the artifact folder is incomplete");
    if (int64_t(fs::file_size(m.path(m.weights_file))) != m.weights_bytes)
      throw bad(m.weights_file + " has " + std::to_string(fs::file_size(m.path(m.weights_file))) +
                " bytes, the manifest says " + std::to_string(m.weights_bytes) + ": corrupt or mismatched artifacts");
    if (w.contains("tensors"))
      for (const auto& t : w["tensors"]) {
        TensorEntry e{t.at("name").get<std::string>(), t.at("dtype").get<std::string>(), t.at("offset").get<int64_t>(),
                      t.at("bytes").get<int64_t>(), t.at("shape").get<std::vector<int64_t>>()};
        if (e.offset < 0 || e.offset + e.bytes > m.weights_bytes) throw bad(m.weights_file + " is shorter than the manifest's index of " + e.name);
        m.tensors.push_back(e);
      }
    if (w.contains("quantization") && !w["quantization"].is_null()) {
      const json& q = w["quantization"];
      m.quant_bits = q.at("bits").get<int>();
      m.quant_block = q.at("block_size").get<int>();
      if (q.contains("integer_graphs") && !q["integer_graphs"].is_null())
        m.integer_graphs = q["integer_graphs"].get<std::vector<std::string>>();
      if (q.contains("derived") && !q["derived"].is_null())
        for (const auto& d : q["derived"]) {
          const json zero_points = d.value("zero_points_offset", json());  // null: symmetric
          m.derived.push_back({d.at("weight").get<std::string>(), d.at("scale").get<std::string>(),
                               d.at("k").get<int64_t>(), d.at("n").get<int64_t>(), d.at("codes_offset").get<int64_t>(),
                               d.at("scales_offset").get<int64_t>(),
                               zero_points.is_null() ? int64_t(-1) : zero_points.get<int64_t>(),
                               d.value("graph", std::string("prefill"))});
        }
    }
    for (const auto& id : j.at("tokenizer").at("eos_ids")) m.eos_ids.push_back(id.get<int64_t>());
    dtype_size(m.kv_dtype);
    dtype_size(m.logits_dtype);
  } catch (const json::exception& e) {
    throw bad(file + " lacks what the runtime needs: " + e.what());
  }
  return m;
}

}  // namespace pop
