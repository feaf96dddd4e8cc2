// pop_server: JSON-lines requests on stdin, tokens streamed to stdout as they come.
//
//   pop_server ARTIFACTS [--threads N] [--backend aoti|ort]
//   in:  {"id": 1, "prompt_ids": [1, 2, 3], "max_new_tokens": 16, "mode": "pop",
//         "temperature": 0, "top_k": 0, "top_p": 1, "seed": 0, "stop_at_eos": true}
//   out: {"id": 1, "token": 42}                       one line per token, flushed
//        {"id": 1, "done": true, "output_ids": [...], "finish_reason": "length", "ttft_ms": ..., ...}
//        {"id": 1, "error": "..."}                     a bad request; the server goes on
//
// Token ids in and out: the client tokenizes (for example with the artifacts'
// tokenizer/tokenizer.json and HF `tokenizers`).
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "pop/pop.hpp"

using nlohmann::json;

int main(int argc, char** argv) {
  std::string dir, backend;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--backend" && i + 1 < argc) {
      backend = argv[++i];
    } else if (dir.empty() && a[0] != '-') {
      dir = a;
    } else {
      std::cerr << "usage: pop_server ARTIFACTS [--threads N] [--backend aoti|ort]\n";
      return 2;
    }
  }
  if (dir.empty()) {
    std::cerr << "usage: pop_server ARTIFACTS [--threads N] [--backend aoti|ort]\n";
    return 2;
  }
  std::unique_ptr<pop::Session> session;
  try {
    session = std::make_unique<pop::Session>(pop::load(dir, backend, threads));
  } catch (const std::exception& e) {
    std::cerr << "pop_server: error: " << e.what() << "\n";
    return 2;
  }
  std::cout << json{{"ready", true}, {"backend", pop::backend_name(*session->model())},
                    {"max_seq_len", pop::max_seq_len(*session->model())}}.dump()
            << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json id = nullptr;
    try {
      json req = json::parse(line);
      id = req.value("id", json(nullptr));
      pop::GenerateOptions o;
      o.max_new_tokens = req.value("max_new_tokens", o.max_new_tokens);
      o.full = req.value("mode", std::string("pop")) == "full";
      o.temperature = req.value("temperature", o.temperature);
      o.top_k = req.value("top_k", o.top_k);
      o.top_p = req.value("top_p", o.top_p);
      o.seed = req.value("seed", o.seed);
      o.stop_at_eos = req.value("stop_at_eos", o.stop_at_eos);
      auto prompt = req.at("prompt_ids").get<std::vector<int64_t>>();
      pop::Stats st;
      auto ids = session->generate(
          prompt, o, [&](int64_t t) { std::cout << json{{"id", id}, {"token", t}}.dump() << std::endl; return true; },
          &st);
      std::cout << json{{"id", id}, {"done", true}, {"output_ids", ids}, {"finish_reason", st.finish_reason},
                        {"ttft_ms", st.ttft_ms}, {"prefill_ms", st.prefill_ms}, {"boundary_ms", st.boundary_ms},
                        {"decode_ms", st.decode_ms}, {"decode_backend_ms", st.decode_backend_ms},
                        {"decode_steps", st.decode_steps}}.dump()
                << std::endl;
    } catch (const std::exception& e) {
      std::cout << json{{"id", id}, {"error", e.what()}}.dump() << std::endl;
    }
  }
  return 0;
}
