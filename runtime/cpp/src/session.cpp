// Session: one request at a time over one KV buffer, as runtime/session.py does for batch 1.
//
//   POP mode   prompt[:-1] -> prefill graph -> slots 0..N-2 of every layer
//              prompt[-1]  -> decode graph over that past (the boundary) -> first token
//   full mode  prompt      -> decode graph with an empty past -> first token
//   then       each token  -> decode graph, one slot -> next token
//
// The KV buffer is [layer, k|v, slot, batch=1, kv_heads, head_dim]: the past of a layer
// is a prefix of its block and new entries are written straight into their slots, so a
// step binds pointers and allocates nothing.
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
  size_t slot_bytes = 0;  // one slot of one layer's keys: kv_heads * head_dim * element
  int64_t slots = 0;
  std::vector<int64_t> ids, positions, mask;  // host, [slot] (batch 1)
  std::vector<char> logits;
  std::vector<float> logits_f32;
  std::vector<View> inputs, outputs;  // reused: a step only rewrites them

  ~Buffers() {
    if (kv) backend->release(kv);
  }
  char* block(int layer, int kind, int64_t start) const {
    return static_cast<char*>(kv) + ((int64_t(layer) * 2 + kind) * slots + start) * slot_bytes;
  }
};

Session::Session(std::shared_ptr<Model> model) : model_(std::move(model)), buffers_(new Buffers) {
  if (!model_) throw Error(Status::invalid_argument, "no model");
  const Manifest& m = model_->manifest;
  Buffers& b = *buffers_;
  b.backend = model_->backend.get();
  b.slots = m.max_seq_len;
  b.slot_bytes = size_t(m.kv_heads) * m.head_dim * dtype_size(m.kv_dtype);
  b.kv = b.backend->alloc(size_t(m.num_layers) * 2 * b.slots * b.slot_bytes);
  b.ids.assign(b.slots, 0);
  b.positions.assign(b.slots, 0);
  b.mask.assign(b.slots, 0);
  b.logits.assign(m.vocab_size * dtype_size(m.logits_dtype), 0);
  b.logits_f32.assign(m.vocab_size, 0.0f);
}

Session::~Session() = default;

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// Bindings of one graph run over new tokens in slots [past, past + length).
void bind(const Manifest& m, Session::Buffers& b, bool decode, int64_t past, int64_t length) {
  const bool dev = b.backend->device_memory();
  const int64_t total = past + length;
  b.inputs.clear();
  b.outputs.clear();
  b.inputs.push_back({"input_ids", b.ids.data() + past, "int64", {1, length}});
  b.inputs.push_back({"position_ids", b.positions.data() + past, "int64", {1, length}});
  b.inputs.push_back({"attention_mask", b.mask.data(), "int64", {total, 1}});
  if (decode) b.outputs.push_back({"logits", b.logits.data(), m.logits_dtype.c_str(), {1, m.vocab_size}});
  for (int l = 0; l < m.num_layers; ++l) {
    const auto& n = m.layer_names[l];
    if (decode) {
      b.inputs.push_back({n[0].c_str(), b.block(l, 0, 0), m.kv_dtype.c_str(), {past, 1, m.kv_heads, m.head_dim}, dev});
      b.inputs.push_back({n[1].c_str(), b.block(l, 1, 0), m.kv_dtype.c_str(), {past, 1, m.kv_heads, m.head_dim}, dev});
    }
    b.outputs.push_back({n[2].c_str(), b.block(l, 0, past), m.kv_dtype.c_str(), {length, 1, m.kv_heads, m.head_dim}, dev});
    b.outputs.push_back({n[3].c_str(), b.block(l, 1, past), m.kv_dtype.c_str(), {length, 1, m.kv_heads, m.head_dim}, dev});
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
  std::fill(b.mask.begin(), b.mask.end(), 0);
  for (int64_t i = 0; i < n; ++i) b.ids[i] = prompt[i], b.positions[i] = i, b.mask[i] = 1;

  auto next = [&]() {
    to_float(b.logits.data(), m.logits_dtype, m.vocab_size, b.logits_f32.data());
    return sample(b.logits_f32.data(), m.vocab_size);
  };
  if (!options.full && n > 1) {
    bind(m, b, false, 0, n - 1);
    backend.run("prefill", b.inputs, b.outputs);
    st.prefill_ms = ms_since(t0);
    const auto t1 = Clock::now();
    bind(m, b, true, n - 1, 1);
    backend.run("decode", b.inputs, b.outputs);
    st.boundary_ms = ms_since(t1);
  } else {
    bind(m, b, true, 0, n);
    backend.run("decode", b.inputs, b.outputs);
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
    b.positions[slot] = slot;
    b.mask[slot] = 1;
    bind(m, b, true, slot, 1);
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
