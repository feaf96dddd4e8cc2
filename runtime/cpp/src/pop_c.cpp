// The C ABI over pop::Session (pop_c.h): every exception becomes a status and a message.
#include "pop/pop_c.h"

#include <cstring>
#include <string>

#include "pop/pop.hpp"

struct pop_session {
  std::unique_ptr<pop::Session> session;
};

namespace {

thread_local std::string last_error;

int fail(int status, const std::string& message) {
  last_error = message;
  return status;
}

template <class F>
int guarded(F&& body) {
  try {
    body();
    last_error.clear();
    return POP_OK;
  } catch (const pop::Error& e) {
    return fail(static_cast<int>(e.status), e.what());
  } catch (const std::bad_alloc&) {
    return fail(POP_BACKEND_ERROR, "out of memory");
  } catch (const std::exception& e) {
    std::string what = e.what();
    return fail(POP_BACKEND_ERROR, what.substr(0, what.find('\n')));
  } catch (...) {
    return fail(POP_BACKEND_ERROR, "unknown error");
  }
}

pop::GenerateOptions options(const pop_params* p) {
  pop::GenerateOptions o;
  if (!p) return o;
  o.max_new_tokens = p->max_new_tokens;
  o.full = p->full != 0;
  o.temperature = p->temperature;
  o.top_k = p->top_k;
  o.top_p = p->top_p;
  o.seed = p->seed;
  o.stop_at_eos = p->stop_at_eos != 0;
  return o;
}

void fill(pop_stats* out, const pop::Stats& s) {
  if (!out) return;
  out->ttft_ms = s.ttft_ms;
  out->prefill_ms = s.prefill_ms;
  out->boundary_ms = s.boundary_ms;
  out->decode_ms = s.decode_ms;
  out->decode_backend_ms = s.decode_backend_ms;
  out->decode_steps = s.decode_steps;
  std::snprintf(out->finish_reason, sizeof(out->finish_reason), "%s", s.finish_reason.c_str());
}

void check(bool ok, const char* what) {
  if (!ok) throw pop::Error(pop::Status::invalid_argument, what);
}

}  // namespace

extern "C" {

int pop_abi_version(void) { return POP_ABI_VERSION; }
const char* pop_last_error(void) { return last_error.c_str(); }

void pop_params_default(pop_params* p) {
  if (!p) return;
  pop::GenerateOptions o;
  *p = pop_params{o.max_new_tokens, 0, o.temperature, o.top_k, o.top_p, o.seed, 1};
}

int pop_create(const char* artifacts_dir, const char* backend, int32_t threads, pop_session** out) {
  return guarded([&] {
    check(artifacts_dir && out, "pop_create: artifacts_dir and out must not be NULL");
    *out = nullptr;
    auto s = std::make_unique<pop_session>();
    s->session = std::make_unique<pop::Session>(pop::load(artifacts_dir, backend ? backend : "", threads));
    *out = s.release();
  });
}

int pop_create_sharing(pop_session* other, pop_session** out) {
  return guarded([&] {
    check(other && out, "pop_create_sharing: other and out must not be NULL");
    *out = nullptr;
    auto s = std::make_unique<pop_session>();
    s->session = std::make_unique<pop::Session>(other->session->model());
    *out = s.release();
  });
}

void pop_free(pop_session* session) { delete session; }

int64_t pop_max_seq_len(const pop_session* s) { return s ? pop::max_seq_len(*s->session->model()) : -1; }
int64_t pop_vocab_size(const pop_session* s) { return s ? pop::vocab_size(*s->session->model()) : -1; }

int pop_generate(pop_session* session, const int64_t* prompt, size_t prompt_len, const pop_params* params,
                 int64_t* out, size_t capacity, size_t* out_len, pop_stats* stats) {
  return guarded([&] {
    check(session && (prompt || prompt_len == 0) && out_len && (out || capacity == 0),
          "pop_generate: session, prompt, out and out_len must not be NULL");
    *out_len = 0;
    pop::Stats s;
    auto ids = session->session->generate(std::vector<int64_t>(prompt, prompt + prompt_len), options(params), {}, &s);
    fill(stats, s);
    *out_len = std::min(ids.size(), capacity);
    std::copy(ids.begin(), ids.begin() + *out_len, out);
  });
}

int pop_stream(pop_session* session, const int64_t* prompt, size_t prompt_len, const pop_params* params,
               pop_token_fn fn, void* user, pop_stats* stats) {
  return guarded([&] {
    check(session && (prompt || prompt_len == 0) && fn, "pop_stream: session, prompt and fn must not be NULL");
    pop::Stats s;
    session->session->generate(std::vector<int64_t>(prompt, prompt + prompt_len), options(params),
                               [&](int64_t t) { return fn(t, user) == 0; }, &s);
    fill(stats, s);
  });
}

}  // extern "C"
