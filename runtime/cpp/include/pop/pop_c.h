/* libpop's C ABI: for servers in other languages and for Python's ctypes.
 *
 * Every function returns a status (POP_OK = 0) and never aborts or throws; on an
 * error, pop_last_error() holds one line saying what went wrong (per thread).
 * Prompts and outputs are token ids: the caller tokenizes.
 */
#ifndef POP_C_H
#define POP_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define POP_ABI_VERSION 1

enum {
  POP_OK = 0,
  POP_INVALID_ARGUMENT = 1, /* the caller's request: a null pointer, an empty or too-long prompt, ... */
  POP_BAD_ARTIFACTS = 2,    /* a missing or corrupt file, a manifest of another schema version */
  POP_BACKEND_ERROR = 3     /* the graphs failed to run */
};

typedef struct pop_session pop_session;

typedef struct {
  int32_t max_new_tokens;
  int32_t full; /* 1: prefill with the full model over the whole prompt (no pruning) */
  float temperature; /* 0: greedy */
  int32_t top_k;
  float top_p;
  uint64_t seed;
  int32_t stop_at_eos;
} pop_params;

typedef struct {
  double ttft_ms, prefill_ms, boundary_ms;
  double decode_ms;         /* all decode steps after the first token */
  double decode_backend_ms; /* of which inside the backend's run */
  int32_t decode_steps;
  char finish_reason[16];   /* eos | length | max_seq_len | stopped */
} pop_stats;

/* Return nonzero to stop generation after this token. */
typedef int (*pop_token_fn)(int64_t token, void* user);

int pop_abi_version(void);
const char* pop_last_error(void);
void pop_params_default(pop_params* params);

/* backend: "aoti", "ort", or NULL/"" for the artifacts' own; threads <= 0: the backend's default. */
int pop_create(const char* artifacts_dir, const char* backend, int32_t threads, pop_session** out);
/* A second session over the same loaded graphs and weights, with its own KV buffer. */
int pop_create_sharing(pop_session* other, pop_session** out);
void pop_free(pop_session* session);

int64_t pop_max_seq_len(const pop_session* session);
int64_t pop_vocab_size(const pop_session* session);

/* Writes at most `capacity` generated ids to `out` and their count to `out_len`. */
int pop_generate(pop_session* session, const int64_t* prompt, size_t prompt_len, const pop_params* params,
                 int64_t* out, size_t capacity, size_t* out_len, pop_stats* stats);
/* Calls `fn` with each token as it is generated. */
int pop_stream(pop_session* session, const int64_t* prompt, size_t prompt_len, const pop_params* params,
               pop_token_fn fn, void* user, pop_stats* stats);

#ifdef __cplusplus
}
#endif
#endif
