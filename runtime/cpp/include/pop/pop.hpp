// libpop: runs pop-export's artifacts (prefill + decode graphs over one KV buffer) from C++.
//
// A Model is the manifest plus the backend that holds the graphs and their weights;
// it is loaded once and shared.  A Session owns one KV buffer and its token and length
// buffers, and runs one request at a time (generate() takes its lock), so
// several sessions over one Model serve requests in parallel on one copy of the weights.
//
// The runtime takes token ids, not text: tokenizing stays with the caller (Python's
// `tokenizers`, or the server's client), so libpop needs no tokenizer library.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace pop {

// What went wrong, in the C ABI's codes (pop_c.h): the caller can tell its own mistake
// from broken artifacts from a failing backend.
enum class Status : int { ok = 0, invalid_argument = 1, bad_artifacts = 2, backend = 3 };

struct Error : std::runtime_error {
  Status status;
  Error(Status s, const std::string& what) : std::runtime_error(what), status(s) {}
};

struct GenerateOptions {
  int max_new_tokens = 64;
  bool full = false;  // prefill with the decode graph over the whole prompt (the unpruned model)
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool stop_at_eos = true;
};

struct Stats {
  double ttft_ms = 0, prefill_ms = 0, boundary_ms = 0;
  double decode_ms = 0;          // wall time of all decode steps after the first token
  double decode_backend_ms = 0;  // of which inside Backend::run: the rest is the runtime's own overhead
  int decode_steps = 0;
  std::string finish_reason;  // eos | length | max_seq_len | stopped
};

// Called with each new token as soon as it is chosen; return false to stop.
using TokenCallback = std::function<bool(int64_t)>;

class Model;

// Loads the artifacts in `directory`.  backend: "aoti" (AOTInductor packages) or "ort"
// (ONNX graphs, where libpop was built with ONNX Runtime); empty: the artifacts' own.
// threads <= 0: the backend's default.
std::shared_ptr<Model> load(const std::string& directory, const std::string& backend = "", int threads = 0);

int64_t max_seq_len(const Model& model);
int64_t vocab_size(const Model& model);
std::string backend_name(const Model& model);

class Session {
 public:
  explicit Session(std::shared_ptr<Model> model);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Generated ids (an eos that stopped generation included).  Thread-safe: one request at a time.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, const GenerateOptions& options,
                                const TokenCallback& on_token = {}, Stats* stats = nullptr);

  const std::shared_ptr<Model>& model() const { return model_; }

  struct Buffers;  // the KV buffer and the per-step buffers (session.cpp)

 private:
  std::shared_ptr<Model> model_;
  std::unique_ptr<Buffers> buffers_;
  std::mutex lock_;
};

}  // namespace pop
