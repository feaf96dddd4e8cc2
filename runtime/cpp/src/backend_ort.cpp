// ONNX Runtime (ONNX exports), through its C++ API (onnxruntime_cxx_api.h).
//
// Compiled only with -DPOP_ONNXRUNTIME_ROOT=<SDK>: no ONNX Runtime SDK can be had where
// libpop is built and tested, so this file is written against ONNX Runtime's documented
// API and has not been compiled in CI (runtime/cpp/README.md).  CPU only.
//
// Every input and output is bound in place with IoBinding over the session's memory, so
// the graphs read the past from and write new K/V into the one KV buffer, as the Python
// backend (runtime/backends/ort.py) does.  Unlike it, each graph here lets ONNX Runtime
// read weights.bin itself (external data): the weights are not yet shared between the
// prefill and decode sessions in memory.  The int8 matrices of an int8-gemm prefill graph are in no file:
// they are derived at load (derived.cpp) and given to its session with AddExternalInitializers.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <map>
#include <cstring>
#include <unordered_map>

#include "backend.hpp"
#include "derived.hpp"
#include "pop/pop.hpp"

namespace pop {

static ONNXTensorElementDataType element_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "float16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (dtype == "bfloat16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dtype == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (dtype == "bool") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  throw Error(Status::bad_artifacts, "unsupported dtype " + dtype);
}

class OrtBackend : public Backend {
 public:
  OrtBackend(const Manifest& m, int threads)
      : env_(ORT_LOGGING_LEVEL_WARNING, "pop"), memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    if (m.kv_dtype == "bfloat16") throw Error(Status::invalid_argument, "ONNX Runtime's CPU provider has no bf16 kernels");
    for (const auto& [name, g] : m.graphs) {
      Ort::SessionOptions options;
      options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      options.SetIntraOpNumThreads(threads > 0 ? threads : 0);
      options.SetInterOpNumThreads(1);
      options.AddConfigEntry("session.disable_prepacking", "1");  // no private re-laid-out copy per session
      // Each session's threads would spin on after a run and take cores from the other graph's next call
      // (runtime/backends/ort.py, benchmarks/README.md "Threads"): decode spins between its ops only,
      // the prompt-sized graphs never.
      options.AddConfigEntry("session.force_spinning_stop", "1");
      if (name != "decode") options.AddConfigEntry("session.intra_op.allow_spinning", "0");
      if (std::find(m.integer_graphs.begin(), m.integer_graphs.end(), name) != m.integer_graphs.end()) {
        if (derived_.empty()) {
          // a weight two graphs read (the prefill graph's layers are the prompt graph's too) is derived once
          std::map<std::array<int64_t, 5>, size_t> made;
          for (const auto& e : m.derived) {
            const std::array<int64_t, 5> key{e.codes_offset, e.scales_offset, e.zero_points_offset, e.k, e.n};
            if (!made.count(key)) {
              made[key] = matrices_.size();
              matrices_.push_back(derive_int8(m.path(m.weights_file), e, m.quant_bits, m.quant_block));
            }
            derived_.push_back({e, made[key]});
          }
        }
        std::vector<std::string> names;
        std::vector<Ort::Value> values;
        for (auto& [e, index] : derived_) {
          if (e.graph != name) continue;  // ONNX Runtime refuses an initializer the graph does not have
          DerivedMatrix& d = matrices_[index];
          const int64_t weight_shape[2] = {e.k, e.n}, scale_shape[1] = {e.n};
          names.push_back(e.weight);
          values.push_back(
              Ort::Value::CreateTensor<int8_t>(memory_, d.weight.data(), d.weight.size(), weight_shape, 2));
          names.push_back(e.scale);
          values.push_back(Ort::Value::CreateTensor<float>(memory_, d.scale.data(), d.scale.size(), scale_shape, 1));
        }
        options.AddExternalInitializers(names, values);
      }
      try {
        auto session = std::make_unique<Ort::Session>(env_, m.path(g.file).c_str(), options);
        auto binding = std::make_unique<Ort::IoBinding>(*session);
        graphs_.emplace(name, Graph{std::move(session), std::move(binding)});
      } catch (const Ort::Exception& e) {
        throw Error(Status::bad_artifacts, g.file + " cannot be loaded by ONNX Runtime: " + e.what());
      }
    }
  }

  std::string name() const override { return "ort"; }

  void* alloc(size_t bytes) override {
    void* p = std::calloc(bytes ? bytes : 1, 1);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void release(void* data) override { std::free(data); }

  void run(const std::string& name, const std::vector<View>& inputs, const std::vector<View>& outputs) override {
    Graph& g = graphs_.at(name);
    g.binding->ClearBoundInputs();
    g.binding->ClearBoundOutputs();
    std::vector<std::pair<const View*, std::vector<char>>> staged;  // strided outputs: ONNX Runtime binds dense ones
    staged.reserve(outputs.size());
    try {
      for (const auto& v : inputs) g.binding->BindInput(v.name, value(v, v.data));
      for (const auto& v : outputs) {
        if (v.strides.empty()) {
          g.binding->BindOutput(v.name, value(v, v.data));
          continue;
        }
        staged.emplace_back(&v, std::vector<char>(bytes(v)));
        g.binding->BindOutput(v.name, value(v, staged.back().second.data()));
      }
      g.session->Run(Ort::RunOptions{nullptr}, *g.binding);
    } catch (const Ort::Exception& e) {
      throw Error(Status::backend, "the " + name + " graph failed: " + e.what());
    }
    for (const auto& [view, dense] : staged) scatter(*view, dense.data());
  }

 private:
  struct Graph {
    std::unique_ptr<Ort::Session> session;
    std::unique_ptr<Ort::IoBinding> binding;
  };

  static size_t bytes(const View& v) {
    int64_t count = 1;
    for (int64_t d : v.shape) count *= d;
    return size_t(count) * dtype_size(v.dtype);
  }

  Ort::Value value(const View& v, void* data) {
    return Ort::Value::CreateTensor(memory_, data, bytes(v), v.shape.data(), v.shape.size(), element_type(v.dtype));
  }

  // A dense [1, heads, T, dim] result into its strided place: one run of T * dim elements per head.
  static void scatter(const View& v, const char* dense) {
    const size_t element = dtype_size(v.dtype), run = size_t(v.shape[2] * v.shape[3]) * element;
    for (int64_t h = 0; h < v.shape[1]; ++h)
      std::memcpy(static_cast<char*>(v.data) + h * v.strides[1] * int64_t(element), dense + h * run, run);
  }

  Ort::Env env_;
  Ort::MemoryInfo memory_;
  std::vector<DerivedMatrix> matrices_;  // the sessions read these: they live as long (never resized after)
  std::vector<std::pair<DerivedEntry, size_t>> derived_;  // each entry and its matrix in matrices_
  std::unordered_map<std::string, Graph> graphs_;
};

std::unique_ptr<Backend> open_ort(const Manifest& manifest, int threads) {
  return std::make_unique<OrtBackend>(manifest, threads);
}

}  // namespace pop
