// The one interface every backend implements: the C++ twin of runtime/backends/__init__.py.
//
// The session owns every buffer; a backend allocates the KV buffer where its graphs
// want it (alloc) and runs a graph over named views of the session's memory (run),
// writing the outputs in place.  It never hands the session memory of its own.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace pop {

struct View {  // a tensor where it lies: host memory, or device memory from alloc()
  const char* name;
  void* data;
  const char* dtype;  // a manifest dtype name
  std::vector<int64_t> shape;
  bool on_device = false;
  std::vector<int64_t> strides;  // in elements; empty: C-contiguous.  Only outputs the runtime places are strided:
                                 // the new tokens' slots inside each head's block of the KV buffer
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual bool device_memory() const { return false; }  // whether alloc() returns GPU memory
  virtual void* alloc(size_t bytes) = 0;  // zeroed
  virtual void release(void* data) = 0;
  virtual void run(const std::string& graph, const std::vector<View>& inputs, const std::vector<View>& outputs) = 0;
};

std::unique_ptr<Backend> open_backend(const std::string& name, const Manifest& manifest, int threads);
std::unique_ptr<Backend> open_aoti(const Manifest& manifest, int threads);
#ifdef POP_WITH_ONNXRUNTIME
std::unique_ptr<Backend> open_ort(const Manifest& manifest, int threads);
#endif

}  // namespace pop
