"""The GPU check, one command (scripts/gpu_check.sh): does the GPU path give the model's answers, and what
does POP buy at the paper's shapes?

    parity   tiny-llama, tiny-gemma3 and gemma3-270m-shape: pop's POP graphs, run eagerly on the GPU in
             fp32 with TF32 off, against HF's own forward on the same GPU (full mode: the unpruned model)
             and against the HF-based POP reference (POP mode): logits within 1e-4 x scale, greedy tokens
             equal.  Then the same three exported by pop-export as AOTInductor packages for CUDA (which
             verifies them at export) and run by the runtime, against the same references; and through
             ONNX Runtime CUDA and TensorRT where those are importable.
    speed    llama-3.1-8b-shape in bf16 (random weights, the real shapes): POP's TTFT (prefill graph, then
             the boundary step) against full mode (the decode graph over the whole prompt) at 512, 2048 and
             8192 tokens, batch 1 and 4: the graph modules run eagerly (CUDA events, median of 3 after a
             warm-up), then pop-bench over every backend present (AOTInductor for CUDA; ONNX Runtime CUDA,
             TensorRT), beside the FLOP cost model's speedup and the paper's (1.36x, Llama-3.1-8B, 31%
             pruned, 2048 tokens).

Writes gpu_check.json (after every step, so a check cut short keeps what it measured) and gpu_check.png
into --out; exits 1 on any parity failure.  --dry-run runs every step on the CPU at tiny sizes, for CI:
the exported parity and pop-bench steps through ONNX Runtime on the CPU instead of AOTInductor for CUDA.
Every step runs inside a time budget and is recorded as skipped, with the reason, when it does not fit.
"""
import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PAPER = {"model": "Llama-3.1-8B", "pruned": "31% (10 of 32 layers)", "prompt": 2048, "speedup": 1.36}
TOLERANCE = 1e-4


def _env(device):
    out = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    for name in ("transformers", "onnxruntime", "tensorrt"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[name] = f"absent ({type(e).__name__})"
    try:
        import onnxruntime as ort
        out["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    return out


class Budget:
    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    def left(self):
        return self.end - time.perf_counter()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _model(name, dtype, device):
    from pop.exporter import shapes, tiny
    if name in shapes.NAMES:
        return shapes.build(name, dtype, device)[0]
    return tiny.build(name)[0].to(device=device, dtype=dtype)


class Eager:
    """pop's graph modules (plain form) run eagerly over one KV buffer, the way the runtime drives them."""

    def __init__(self, model, prefill_layers, max_len, batch, device):
        from pop.exporter.families import adapter_for
        from pop.exporter.pop import PopDecode, PopPrefill
        ad = adapter_for(model)
        self.ad, self.device, self.max_len = ad, device, max_len
        self.prefill = PopPrefill(ad, prefill_layers, None, "plain", max_len).eval()
        self.decode = PopDecode(ad, "plain", max_len).eval()
        dtype = next(model.parameters()).dtype
        self.kv = torch.zeros(ad.num_layers, 2, batch, ad.num_kv_heads, max_len, ad.head_dim, dtype=dtype,
                              device=device)
        self.slots = torch.arange(max_len, device=device)

    def _call(self, graph, ids, seqlens, total):
        b, t = ids.shape
        args = [ids, torch.tensor(seqlens, dtype=torch.int32, device=self.device),
                torch.tensor(total, dtype=torch.int32, device=self.device)]
        if graph is self.decode:
            args.append(self.slots[:total])
            args += [self.kv[l, k, :b] for l in range(self.ad.num_layers) for k in (0, 1)]
        out = graph(*args)
        logits, presents = (out[0], out[1:]) if graph is self.decode else (None, out)
        start = [0] * b if total == t else [s + 1 - t for s in seqlens]
        for i, new in enumerate(presents):  # the runtime's placement (runtime/kv.py, place)
            l, k = divmod(i, 2)
            for r in range(b):
                self.kv[l, k, r, :, start[r]:start[r] + t] = new[r]
        return logits

    @torch.no_grad()
    def first(self, ids, mode):
        """First-token logits [B, V] of equal-length prompts ids [B, N], in "pop" or "full" mode."""
        b, n = ids.shape
        if mode == "pop" and n > 1:
            self._call(self.prefill, ids[:, :-1], [n - 2] * b, n - 1)
            return self._call(self.decode, ids[:, -1:], [n - 1] * b, n)
        return self._call(self.decode, ids, [n - 1] * b, n)

    @torch.no_grad()
    def greedy(self, ids, mode, new):
        b, n = ids.shape
        token = self.first(ids, mode).argmax(-1)
        out = [token]
        for i in range(new - 1):
            token = self._call(self.decode, token[:, None], [n + i] * b, n + i + 1).argmax(-1)
            out.append(token)
        return torch.stack(out, 1)


def _compare(ours, ref):
    diff = float((ours.double() - ref.double()).abs().max())
    scale = max(1.0, float(ref.double().abs().max()))
    return {"max_abs": diff, "scale": scale, "passed": diff <= TOLERANCE * scale}


def parity_eager(name, device, new=8):
    """Our eager graphs against HF's forward (full) and the HF-based POP reference (pop), on `device`."""
    from pop.exporter import reference
    from pop.exporter.options import prefill_layers_for
    model = _model(name, torch.float32, device)
    k = prefill_layers_for(model.config.num_hidden_layers)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, min(model.config.vocab_size, 30000), (2, 40), generator=g).to(device)
    eager = Eager(model, k, 64, 2, device)
    with torch.no_grad():
        hf_logits = model(ids).logits[:, -1].float()
    full = _compare(eager.first(ids, "full").float(), hf_logits)
    pop_first = eager.first(ids, "pop").float()
    mask = torch.ones_like(ids)
    cache = reference.prefill(model, ids[:, :-1], mask[:, :-1], k)
    pop = _compare(pop_first, reference.step(model, ids[:, -1:], mask, cache))
    ours = eager.greedy(ids, "pop", new).tolist()
    theirs = reference.generate(model, ids, mask, keep=k, max_new_tokens=new).tolist()
    return {"model": name, "what": "eager graphs vs HF on the same device", "prefill_layers": k,
            "full_logits": full, "pop_logits": pop, "greedy_equal": ours == theirs,
            "passed": full["passed"] and pop["passed"] and ours == theirs}


def parity_exported(name, device, fmt, backend, out_dir, progress, new=8):
    """pop-export's artifacts (format fmt, verified at export) run by the runtime (backend), against HF on
    `device`: first-token logits of both modes within 1e-4 x scale, greedy tokens equal."""
    from pop.exporter import reference
    from pop.exporter.export import export
    from pop.exporter.options import ExportOptions
    from pop.runtime.session import PopSession
    # fp32 through ONNX Runtime CUDA: the plain form (its GroupQueryAttention has no fp32 kernel)
    form = "plain" if backend == "ort-cuda" else None
    folder, manifest = export(ExportOptions(name, Path(out_dir) / f"{name}-{fmt}", format=fmt, graph_form=form,
                                            max_seq_len=64), progress)
    session = PopSession.load(folder, backend)
    model = _model(name, torch.float32, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    rows = torch.randint(3, min(model.config.vocab_size, 30000), (2, 30), generator=g)
    ids = rows.to(device)
    mask = torch.ones_like(ids)
    k = manifest.pop.prefill_layers
    with torch.no_grad():
        references = {"full": model(ids).logits[:, -1].float(),
                      "pop": reference.step(model, ids[:, -1:], mask,
                                            reference.prefill(model, ids[:, :-1], mask[:, :-1], k)).float()}
    result = {"model": name, "what": f"pop-export --format {fmt}, run by --backend {backend}",
              "device": getattr(session.backend, "device", None), "prefill_layers": k,
              "verified_at_export": not manifest.verification.skipped}
    ok = True
    for mode, phase in (("pop", "boundary"), ("full", "full")):
        seen = {}
        request = session.encode(rows.tolist())
        keep = lambda phase, logits: seen.setdefault(phase, None if logits is None else logits.copy())  # noqa: E731
        first = next(session.run(request, 1, mode, observe=keep))
        result[f"{mode}_logits"] = c = _compare(torch.from_numpy(seen[phase]).to(device), references[mode])
        got = session.generate(rows.tolist(), new, mode, stop_at_eos=False).output_ids
        expected = reference.generate(model, ids, mask, keep=k if mode == "pop" else None,
                                      max_new_tokens=new).tolist()
        result[f"{mode}_greedy_equal"] = got == expected and [r[0] for r in got] == [int(t) for t in first]
        ok = ok and c["passed"] and result[f"{mode}_greedy_equal"]
    result["passed"] = ok
    return result


def diagnose_aoti(device, out_dir):
    """Where AOTInductor's outputs part from eager PyTorch, on tiny-llama's decode graph: torch.export's
    program, then packages compiled with the weights outside (loaded as pop loads them: user-managed,
    and copied) and inside the package.  Run after AOTI parity fails; its first run on an H200 (torch
    2.11) gave wrong outputs at export verification, and this is the experiment that says which part."""
    import warnings
    from torch._C._aoti import AOTIModelPackageLoader
    from pop.exporter.families import adapter_for
    from pop.exporter.formats import aoti
    from pop.exporter.formats.plan import plans
    model = _model("tiny-llama", torch.float32, device)
    decode = plans(adapter_for(model), 4, 64, torch.float32, None, device, "plain")[-1]
    state = dict([*decode.module.named_parameters(remove_duplicate=False),
                  *decode.module.named_buffers(remove_duplicate=False)])
    out = {}
    with torch.no_grad():
        ref = decode.module(*decode.args)
        ep = aoti.export_program(decode.module, decode.args, decode.dynamic_shapes)
        out["exported_program"] = _compare(ep.module()(*decode.args)[0], ref[0])
    for inside in (False, True) if device == "cuda" else (False,):  # the CPU (dry run): one compile, not two
        path = str(Path(out_dir) / f"diagnose-{inside}.pt2")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(
                ep, package_path=path,
                inductor_configs={**aoti.INDUCTOR_CONFIGS, "aot_inductor.package_constants_in_so": inside})
        for label, user_managed in ([("in_package", None)] if inside else [("user_managed", True), ("copied", False)]):
            loader = AOTIModelPackageLoader(path, "model", False, 1, -1)
            names = loader.get_constant_fqns()
            out[f"{label}_unknown_constants"] = [n for n in names if n not in state]
            if user_managed is not None:
                loader.load_constants({n: state[n].detach().contiguous() for n in names if n in state}, False, True,
                                      user_managed)
            with torch.no_grad():
                got = loader.run(list(decode.args))
            out[label] = {"logits": _compare(got[0], ref[0]), "present_0": _compare(got[1], ref[1])}
    out["passed"] = all(v["logits"]["passed"] for k, v in out.items() if isinstance(v, dict) and "logits" in v)
    return out


def bench_backend(name, device, fmt, backend, dtype, lengths, batches, out_dir, out, progress):
    """pop-export, then pop-bench POP against full through `backend`: its JSON and plot go to `out`."""
    import subprocess
    from pop.exporter.export import export
    from pop.exporter.options import ExportOptions
    folder, _ = export(ExportOptions(name, Path(out_dir) / f"{name}-{fmt}-bench", format=fmt, dtype=dtype,
                                     max_seq_len=max(lengths) + 8, max_batch=max(batches), skip_verify=True),
                       progress)
    stem = out / f"pop-bench-{name}-{backend}"
    argv = [str(folder), "--backend", backend, "--prompt-lens", ",".join(map(str, lengths)),
            "--batch", ",".join(map(str, batches)), "--new-tokens", "4", "--runs", "3", "--warmup", "1",
            "--peers", "none", "--json", f"{stem}.json", "--plot", f"{stem}.png"]
    progress(f"pop-bench {' '.join(argv)}")
    run = subprocess.run([sys.executable, "-m", "pop.cli.bench", *argv], stdout=subprocess.PIPE, text=True)
    if run.returncode != 0:  # its own error line went to stderr, which this process shares
        raise RuntimeError(f"pop-bench exited {run.returncode}")
    report = json.loads(Path(f"{stem}.json").read_text())
    rows = [{"batch": r["batch"], "prompt_len": r["prompt_len"], "pop_ttft_ms": r["pop_ttft_ms"]["median"],
             "full_ttft_ms": r["full_ttft_ms"]["median"], "speedup": r["speedup"]["median"],
             "expected_speedup": r["expected_speedup"]} for r in report["results"]]
    for r in rows:
        progress(f"pop-bench {name} {backend} batch {r['batch']} prompt {r['prompt_len']}: POP {r['pop_ttft_ms']:.1f} "
                 f"ms, full {r['full_ttft_ms']:.1f} ms, {r['speedup']:.2f}x (cost model {r['expected_speedup']:.2f}x)")
    return {"model": name, "dtype": dtype, "backend": backend, "json": f"{stem.name}.json", "rows": rows}


def time_mode(eager, ids, mode, device, runs=3):
    """TTFT in ms: median of `runs` after one warm-up, timed with CUDA events (wall clock on the CPU)."""
    times = []
    for i in range(runs + 1):
        _sync(device)
        t = time.perf_counter()
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        eager.first(ids, mode)
        if device == "cuda":
            stop.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(stop)
        else:
            ms = (time.perf_counter() - t) * 1e3
        if i:
            times.append(ms)
    return sorted(times)[len(times) // 2]


def speed(name, device, dtype, lengths, batches, budget, progress):
    from pop.bench import cost
    from pop.exporter.options import prefill_layers_for
    model = _model(name, dtype, device)
    cfg = model.config
    k = prefill_layers_for(cfg.num_hidden_layers)
    shapes = cost.Shapes(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                         cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers, k)
    rows = []
    for b in batches:
        eager = Eager(model, k, max(lengths) + 8, b, device)
        for n in lengths:
            if budget.left() < 30:
                rows.append({"batch": b, "prompt_len": n, "skipped": "out of the time budget"})
                continue
            ids = torch.randint(3, cfg.vocab_size, (b, n), generator=torch.Generator().manual_seed(n)).to(device)
            try:
                pop_ms, full_ms = time_mode(eager, ids, "pop", device), time_mode(eager, ids, "full", device)
            except torch.OutOfMemoryError as e:
                rows.append({"batch": b, "prompt_len": n, "skipped": f"out of GPU memory: {str(e).splitlines()[0]}"})
                torch.cuda.empty_cache()
                continue
            row = {"batch": b, "prompt_len": n, "pop_ttft_ms": pop_ms, "full_ttft_ms": full_ms,
                   "speedup": full_ms / pop_ms, "expected_speedup": cost.expected_speedup(shapes, n)}
            progress(f"speed {name} batch {b} prompt {n}: POP {pop_ms:.1f} ms, full {full_ms:.1f} ms, "
                     f"{row['speedup']:.2f}x (cost model {row['expected_speedup']:.2f}x)")
            rows.append(row)
        del eager
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "prefill_layers": k,
            "num_layers": cfg.num_hidden_layers, "backend": "eager PyTorch (plain-form graph modules)",
            "paper": PAPER, "rows": rows}


def plot(path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sp = report.get("speed") or {}
    series = [("eager", sp)] + [(r["backend"], r) for r in report.get("speed_backends", [])]
    model_line = False
    for label, data in series:
        for b, style in ((1, "o-"), (4, "s--")):
            rows = [r for r in data.get("rows", []) if r["batch"] == b and "speedup" in r]
            if not rows:
                continue
            ax.plot([r["prompt_len"] for r in rows], [r["speedup"] for r in rows], style,
                    label=f"{label}, batch {b}")
            if not model_line:
                ax.plot([r["prompt_len"] for r in rows], [r["expected_speedup"] for r in rows], ":", color="grey",
                        label="FLOP cost model")
                model_line = True
    ax.scatter([PAPER["prompt"]], [PAPER["speedup"]], marker="*", s=120, color="tab:red",
               label=f"paper: {PAPER['model']}, {PAPER['speedup']}x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT speedup of POP over full")
    ax.set_title(f"{sp.get('model', '')} {sp.get('dtype', '')} on {report['env'].get('gpu', report['env']['device'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (for CI)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here (use --dry-run on a machine without one)", file=sys.stderr)
        return 2
    # parity is judged in true fp32: TF32 would round matrix inputs to 10 mantissa bits (torch's default is off;
    # said here so that nothing inherited turns it on)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    budget = Budget(args.budget)
    t0 = time.perf_counter()

    def progress(msg):
        print(f"gpu_check [{time.perf_counter() - t0:6.1f}s]: {msg}", file=sys.stderr, flush=True)
    report = {"created_unix": int(time.time()), "dry_run": args.dry_run, "budget_s": args.budget,
              "env": _env(device), "parity": [], "speed": None, "speed_backends": [], "skipped": []}
    progress(f"environment: {report['env']}")

    def save():
        report["seconds"] = time.perf_counter() - t0
        report["passed"] = all(r.get("passed") for r in report["parity"])
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    def step(what, fn, need):
        if budget.left() < need:
            report["skipped"].append({"step": what, "why": f"needs about {need:.0f} s, {budget.left():.0f} s left"})
            progress(f"{what}: skipped (time budget)")
            return None
        progress(f"{what} ...")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing step must not hide the others
            report["parity"].append({"what": what, "passed": False, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]})
            progress(f"{what}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        finally:
            save()

    def parity(what, fn, need):
        r = step(what, fn, need)
        if r:
            report["parity"].append(r)
            progress(f"{what}: {'ok' if r['passed'] else 'FAILED'} {json.dumps(r, default=str)}")
            save()

    gpu = device == "cuda"
    # the exported steps: AOTInductor for CUDA on a GPU; on the CPU (dry run) the same steps through ONNX Runtime
    exported = [("aoti", "aoti")] if gpu else [("onnx", "ort")]
    for backend, fmt, module in (("ort-cuda", "onnx", "onnxruntime"), ("trt", "trt", "tensorrt")):
        if not gpu:
            report["skipped"].append({"step": f"{backend} parity and speed", "why": "--dry-run: no CUDA"})
        elif _present(backend, module):
            exported.append((fmt, backend))
        else:
            report["skipped"].append({"step": f"{backend} parity and speed", "why": f"{backend} is not usable here"})
    with tempfile.TemporaryDirectory() as tmp:
        parity_models = ("tiny-llama", "tiny-gemma3", "gemma3-270m-shape")
        for name in parity_models:
            parity(f"eager parity {name}", lambda name=name: parity_eager(name, device), 20)
        if gpu:
            report["speed"] = step("speed llama-3.1-8b-shape bf16, eager",
                                   lambda: speed("llama-3.1-8b-shape", device, torch.bfloat16, (512, 2048, 8192),
                                                 (1, 4), budget, progress), 60)
        else:
            report["speed"] = step("speed tiny-llama fp32, eager (dry run)",
                                   lambda: speed("tiny-llama", device, torch.float32, (16, 32), (1, 2), budget,
                                                 progress), 10)
        for fmt, backend in exported:
            for name in parity_models[:2] if not gpu else parity_models:
                parity(f"{backend} parity {name}",
                       lambda fmt=fmt, backend=backend, name=name: parity_exported(name, device, fmt, backend, tmp,
                                                                                   progress),
                       150 if gpu else 30)
        failed_aoti = any(not r.get("passed") for r in report["parity"] if "aoti" in r.get("what", ""))
        if failed_aoti or not gpu:  # on the CPU (dry run) it runs too, so that it does not rot
            report["aoti_diagnosis"] = step("AOTInductor diagnosis, tiny-llama decode",
                                            lambda: diagnose_aoti(device, tmp), 120 if gpu else 60)
        for fmt, backend in exported:
            if gpu:
                r = step(f"pop-bench llama-3.1-8b-shape bf16, {backend}",
                         lambda fmt=fmt, backend=backend: bench_backend(
                             "llama-3.1-8b-shape", device, fmt, backend, "bf16", (512, 2048, 8192), (1, 4), tmp, out,
                             progress), 420)
            else:
                r = step(f"pop-bench tiny-llama fp32, {backend} (dry run)",
                         lambda fmt=fmt, backend=backend: bench_backend(
                             "tiny-llama", device, fmt, backend, "fp32", (16, 32), (1, 2), tmp, out, progress), 30)
            if r:
                report["speed_backends"].append(r)
    save()
    plot(out / "gpu_check.png", report)
    progress(f"wrote {out}/gpu_check.json and gpu_check.png; parity {'passed' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


def _present(backend, module):
    if not _importable(module):
        return False
    if backend == "ort-cuda":
        return "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
    return True


def _importable(module):
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    sys.exit(main())
