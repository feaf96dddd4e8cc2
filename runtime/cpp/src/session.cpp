// Session: one request at a time over one KV buffer, as runtime/session.py does for batch 1.
//
//   POP mode   prompt[:-1] -> prefill graph -> slots 0..N-2 of every layer
//              prompt[-1]  -> decode graph over that past (the boundary) -> first token
//   full mode  prompt      -> decode graph with an empty past -> first token
//   then       each token  -> decode graph, one slot -> next token
//
// The KV buffer is [layer, k|v, row=1, kv_heads, slot, head_dim] (docs/MANIFEST.md): a
// graph reads a layer's whole block and tells apart the slots in use from seqlens_k and
// total_sequence_length.  New entries land in their slots either written in place by
// the graph (an output aliased to its past input) or copied there by the backend from
// the graph's output (a strided view of the block), so a step binds pointers and
// allocates nothing.
#include <chrono>
#include <cstring>

#include "backend.hpp"
#include "manifest.hpp"
#include "pop/pop.hpp"
#include "sampler.hpp"

namespace pop {

class Model {
 public:
  Manifest manifest;
  std::unique_ptr<Backend> backend;
};

std::shared_ptr<Model> load(const std::string& directory, const std::string& backend, int threads) {
  auto model = std::make_shared<Model>();
  model->manifest = read_manifest(directory);
  model->backend = open_backend(backend, model->manifest, threads);
  return model;
}

int64_t max_seq_len(const Model& model) { return model.manifest.max_seq_len; }
int64_t vocab_size(const Model& model) { return model.manifest.vocab_size; }
std::string backend_name(const Model& model) { return model.backend->name(); }

struct Session::Buffers {
  Backend* backend = nullptr;
  void* kv = nullptr;
  int64_t slots = 0, heads = 0, dim = 0;
  size_t element = 0;
  std::vector<int64_t> ids, cache_slots;  // host, [slot]; cache_slots holds 0..slots-1
  int32_t seqlens = 0, total = 0;  // the one row's last slot in use after a step, and its length
  std::vector<char> logits;
  std::vector<float> logits_f32;
  std::vector<View> inputs, outputs;  // reused: a step only rewrites them

  ~Buffers() {
    if (kv) backend->release(kv);
  }
  char* block(int layer, int kind) const {  // [1, kv_heads, slots, head_dim]
    return static_cast<char*>(kv) + (int64_t(layer) * 2 + kind) * heads * slots * dim * int64_t(element);
  }
};

Session::Session(std::shared_ptr<Model> model) : model_(std::move(model)), buffers_(new Buffers) {
  if (!model_) throw Error(Status::invalid_argument, "no model");
  const Manifest& m = model_->manifest;
  Buffers& b = *buffers_;
  b.backend = model_->backend.get();
  b.slots = m.max_seq_len;
  b.heads = m.kv_heads;
  b.dim = m.head_dim;
  b.element = dtype_size(m.kv_dtype);
  b.kv = b.backend->alloc(size_t(m.num_layers) * 2 * b.heads * b.slots * b.dim * b.element);
  b.ids.assign(b.slots, 0);
  b.cache_slots.resize(b.slots);
  for (int64_t i = 0; i < b.slots; ++i) b.cache_slots[i] = i;
  b.logits.assign(m.vocab_size * dtype_size(m.logits_dtype), 0);
  b.logits_f32.assign(m.vocab_size, 0.0f);
}

Session::~Session() = default;

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// Bindings of one graph run over new tokens in slots [start, start + length) of the one row.
void bind(const Manifest& m, Session::Buffers& b, const std::string& graph, int64_t start, int64_t length) {
  const bool dev = b.backend->device_memory();
  const GraphSpec& g = m.graphs.at(graph);
  b.seqlens = int32_t(start + length - 1);
  b.total = int32_t(start + length);
  b.inputs.clear();
  b.outputs.clear();
  const char* kv_dtype = m.kv_dtype.c_str();
  const std::vector<int64_t> whole{1, b.heads, b.slots, b.dim};
  for (const auto& name : g.inputs) {
    if (name == "input_ids") b.inputs.push_back({"input_ids", b.ids.data() + start, "int64", {1, length}});
    else if (name == "seqlens_k") b.inputs.push_back({"seqlens_k", &b.seqlens, "int32", {1}});
    else if (name == "total_sequence_length") b.inputs.push_back({"total_sequence_length", &b.total, "int32", {}});
    // a sliding layer's past bound where it lies, as every layer's is here: its lengths are the others'
    else if (name == "window_seqlens_k") b.inputs.push_back({"window_seqlens_k", &b.seqlens, "int32", {1}});
    else if (name == "window_total_sequence_length")
      b.inputs.push_back({"window_total_sequence_length", &b.total, "int32", {}});
    else if (name == "cache_slots") b.inputs.push_back({"cache_slots", b.cache_slots.data(), "int64", {start + length}});
    else {
      const auto [layer, kind] = m.kv_entry(name);
      if (layer < 0) throw Error(Status::bad_artifacts, "the " + graph + " graph takes " + name + ", which this runtime does not know");
      b.inputs.push_back({name.c_str(), b.block(layer, kind), kv_dtype, whole, dev});
    }
  }
  for (size_t i = 0; i < g.outputs.size(); ++i) {
    const std::string& name = g.outputs[i];
    if (name == "logits") {
      b.outputs.push_back({"logits", b.logits.data(), m.logits_dtype.c_str(), {1, m.vocab_size}});
      continue;
    }
    const auto [layer, kind] = m.kv_entry(name);
    if (layer < 0) throw Error(Status::bad_artifacts, "the " + graph + " graph returns " + name + ", which this runtime does not know");
    if (!g.aliases[i].empty())  // written in place: the same block the graph reads as its past
      b.outputs.push_back({name.c_str(), b.block(layer, kind), kv_dtype, whole, dev});
    else  // the new tokens' entries: a strided view of their slots in each head's block
      b.outputs.push_back({name.c_str(), b.block(layer, kind) + start * b.dim * int64_t(b.element), kv_dtype,
                           {1, b.heads, length, b.dim}, dev, {b.heads * b.slots * b.dim, b.slots * b.dim, b.dim, 1}});
  }
}

}  // namespace

std::vector<int64_t> Session::generate(const std::vector<int64_t>& prompt, const GenerateOptions& options,
                                       const TokenCallback& on_token, Stats* stats) {
  std::lock_guard<std::mutex> guard(lock_);
  const Manifest& m = model_->manifest;
  Buffers& b = *buffers_;
  Backend& backend = *model_->backend;
  Stats local;
  Stats& st = stats ? *stats : local;
  st = Stats{};

  const int64_t n = int64_t(prompt.size());
  if (n == 0) throw Error(Status::invalid_argument, "empty prompt");
  if (n > m.max_seq_len)
    throw Error(Status::invalid_argument, "prompt has " + std::to_string(n) + " tokens; these artifacts hold at most " +
                                              std::to_string(m.max_seq_len) + " (re-export with a larger --max-seq-len)");
  for (int64_t t : prompt)
    if (t < 0 || t >= m.vocab_size)
      throw Error(Status::invalid_argument, "token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                                                std::to_string(m.vocab_size - 1) + ")");
  if (options.max_new_tokens < 1) throw Error(Status::invalid_argument, "max_new_tokens must be at least 1");
  Sampler sample(options);

  const auto t0 = Clock::now();
  for (int64_t i = 0; i < n; ++i) b.ids[i] = prompt[i];

  auto next = [&]() {
    to_float(b.logits.data(), m.logits_dtype, m.vocab_size, b.logits_f32.data());
    return sample(b.logits_f32.data(), m.vocab_size);
  };
  if (!options.full && n > 1) {
    bind(m, b, "prefill", 0, n - 1);
    backend.run("prefill", b.inputs, b.outputs);
    st.prefill_ms = ms_since(t0);
    const auto t1 = Clock::now();
    bind(m, b, "decode", n - 1, 1);
    backend.run("decode", b.inputs, b.outputs);
    st.boundary_ms = ms_since(t1);
  } else {
    // full mode's prompt: the decode graph, or its copy with integer GEMMs where the artifacts have one.  A
    // char pointer, as the other calls pass: a std::string argument would let argument-dependent lookup pick
    // std::bind over this file's bind.
    const char* graph = m.graphs.count("prompt") ? "prompt" : "decode";
    bind(m, b, graph, 0, n);
    backend.run(graph, b.inputs, b.outputs);
    st.prefill_ms = ms_since(t0);
  }
  int64_t token = next();
  st.ttft_ms = ms_since(t0);

  std::vector<int64_t> out;
  out.reserve(options.max_new_tokens);
  const auto is_eos = [&](int64_t t) { return std::find(m.eos_ids.begin(), m.eos_ids.end(), t) != m.eos_ids.end(); };
  for (int64_t slot = n;; ++slot) {
    out.push_back(token);
    if (on_token && !on_token(token)) {
      st.finish_reason = "stopped";
      break;
    }
    if (options.stop_at_eos && is_eos(token)) {
      st.finish_reason = "eos";
      break;
    }
    if (int(out.size()) == options.max_new_tokens) {
      st.finish_reason = "length";
      break;
    }
    if (slot >= m.max_seq_len) {
      st.finish_reason = "max_seq_len";
      break;
    }
    const auto t = Clock::now();
    b.ids[slot] = token;
    bind(m, b, "decode", slot, 1);
    const auto r = Clock::now();
    backend.run("decode", b.inputs, b.outputs);
    st.decode_backend_ms += ms_since(r);
    token = next();
    st.decode_ms += ms_since(t);
    ++st.decode_steps;
  }
  return out;
}

}  // namespace pop
