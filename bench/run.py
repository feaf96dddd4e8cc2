"""pop-bench's run: time to first token of POP against the full model, decode speed,
and the same figures for peers, in one run.  The command's flags are in pop.cli.bench.

    pop-bench artifacts/gemma3-270m-onnx-pop --prompt-lens 128,1024 --batch 1 --json out.json --plot out.png
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pop.runtime.errors import PopError
from pop.runtime.manifest import Manifest, np_dtype

from . import cost, machine, measure, peers, report, runtime_peers


def _check(args, max_seq_len):
    if args.new_tokens < 2:
        raise PopError("--new-tokens must be at least 2, so that decode can be timed")
    if args.runs < 1 or args.warmup < 0:
        raise PopError("--runs must be at least 1 and --warmup at least 0")
    if args.threads is not None and args.threads < 1:
        raise PopError("--threads must be at least 1")
    args.prompt_text = _read(args.prompt_file) if args.prompt_file else None  # before anything loads
    too_long = [] if args.image_sizes or args.prompt_file else [n for n in args.prompt_lens
                                                                if n + args.new_tokens > max_seq_len]
    if too_long:
        raise PopError(f"prompt length {too_long[0]} + {args.new_tokens} new tokens exceeds these artifacts' "
                       f"max_seq_len {max_seq_len}")
    if any(n < 2 for n in args.prompt_lens):
        raise PopError("prompt lengths must be at least 2: POP prefills tokens 1..N-1 and runs the last in full")
    chosen = [] if args.peers.strip() in ("", "none") else [p.strip() for p in args.peers.split(",")]
    unknown = [p for p in chosen if p not in peers.PEERS + runtime_peers.PEERS]
    if unknown:
        raise PopError(f"unknown peer {unknown[0]!r}; use {', '.join(peers.PEERS + runtime_peers.PEERS)} or none")
    for out, suffix in ((args.json_out, ".json"), (args.plot, ".png")):
        if out and not Path(out).resolve().parent.is_dir():
            raise PopError(f"cannot write {out}: its folder does not exist")
    if args.plot and not args.plot.endswith(".png"):
        raise PopError("--plot writes a PNG: give a path ending in .png")
    return chosen


def bench(args):
    from pop.runtime.session import PopSession

    manifest = Manifest.load(args.artifacts)  # fails fast, before anything is timed
    chosen = _check(args, int(manifest.max_seq_len))
    # ort-cuda, trt, and AOTInductor packages compiled for CUDA
    on_gpu = args.backend in ("ort-cuda", "trt") or any(g.device == "cuda" for g in manifest.graphs.values())
    if chosen and on_gpu:
        print("pop-bench: the peers run on the CPU, so they are not compared with a GPU backend; not run",
              file=sys.stderr)
        chosen = []
    if args.image_sizes:
        if manifest.vision is None:
            raise PopError(f"--image-sizes needs vision-language artifacts; {manifest.model.name} is text-only")
        if chosen:
            print("pop-bench: peers time text prompts only; with --image-sizes they are not run", file=sys.stderr)
        chosen = []
    shapes = cost.Shapes.from_manifest(manifest)
    threads = args.threads or len(os.sched_getaffinity(0))
    # the hardware's rates, measured now, before any model is in memory
    args.machine_rates = None if on_gpu else machine.measure(threads)
    session = PopSession.load(args.artifacts, args.backend, threads=threads, prepack=args.prepack_weights,
                              tf32=args.tf32, prompt_chunk=args.prompt_chunk)
    args.prompt_chunk = session.prompt_chunk  # what the backend chose, for the report
    args.device = session.backend.device
    args.backend = args.backend or session.backend.name
    tok = manifest.tokenizer
    if args.image_sizes:
        return _bench_images(args, manifest, session, shapes, threads)
    if args.prompt_file:  # the user's own prompt, one row per batch entry
        row = session.encode(args.prompt_text).rows[0]
        if len(row) + args.new_tokens > session.max_seq_len:
            raise PopError(f"{args.prompt_file} has {len(row)} tokens; with {args.new_tokens} new tokens that exceeds "
                           f"these artifacts' {session.max_seq_len} (re-export with a larger --max-seq-len)")
        args.prompt_lens = [len(row)]
        configs = [(b, len(row), np.array([row] * b, np.int64)) for b in args.batch]
    else:
        bos = tok.bos_id if tok.add_bos else None
        configs = [(b, n, measure.prompt_ids(session.vocab_size, tok.eos_ids, b, n, bos))
                   for b in args.batch for n in args.prompt_lens]

    rows = []
    in_rotation = [c for c in chosen if c.startswith("genai")]
    total = len(configs) * (args.warmup + args.runs) * (2 + ("hf" in chosen) + len(in_rotation))
    with tqdm(total=total, desc="pop-bench", unit="run", file=sys.stderr) as bar:
        rotation, failed = _start_rotation(args, in_rotation, manifest, threads, bar)
        try:
            for b, n, ids in configs:
                bar.set_postfix_str(f"batch {b}, prompt {n}")

                def turns(i, counted, b=b, n=n, ids=ids):
                    for peer in rotation.values():
                        measure.settle()
                        peer.turn(b, n, ids, counted, first_of_config=i == 0)
                        bar.update()

                r = measure.measure_runtime(session, ids, args.new_tokens, args.runs, args.warmup, bar.update,
                                            between=turns if rotation else None)
                expected = cost.expected_speedup(shapes, n)
                rows.append({"batch": b, "prompt_len": n, "pop_ttft_ms": r["pop_ttft"], "full_ttft_ms": r["full_ttft"],
                             "speedup": r["speedup"], "expected_speedup": expected,
                             "measured_over_expected": r["speedup"]["median"] / expected,
                             "decode_ms_per_token": r["decode_per_token"],
                             "graphs_ms": {"prefill": r["prefill"], "boundary": r["boundary"],
                                           "decode_step": r["decode_step"], "full_prefill": r["full_prefill"]},
                             **({"gpu_ms": r["gpu"]} if r["gpu"] else {}),
                             "flops": {"pop_ttft": cost.ttft(shapes, n, "pop", b),
                                       "full_ttft": cost.ttft(shapes, n, "full", b)},
                             "of_machine": _fractions(args.machine_rates, manifest, shapes, b, n, r),
                             "peak_rss_bytes": r["peak_rss_bytes"], "first_tokens": r["first_tokens"]})
                bar.write(f"batch {b} prompt {n}: POP {r['pop_ttft']['median']:.1f} ms, full "
                          f"{r['full_ttft']['median']:.1f} ms, speedup {r['speedup']['median']:.2f} "
                          f"(expected {expected:.2f})")
        finally:
            for peer in rotation.values():
                peer.close()
        del session  # the peers measured after us get the memory and the cores to themselves
        after = [c for c in chosen if c not in in_rotation]
        peer_reports = failed + _run_peers(args, after, manifest, threads, configs, rows, bar)
        peer_reports += [_compare(rows, {"name": p.name, "available": True, "versions": p.versions,
                                         "build": str(p.dir.resolve()), "precision": p.precision,
                                         "measured": "in pop-bench's rotation, a turn after each POP/full pair"},
                                  p.measured()) for p in rotation.values()]

    _write(args, manifest, threads, shapes, rows, peer_reports)
    return 0


def _read(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PopError(f"cannot read --prompt-file {path}: {e}") from None
    if not text.strip():
        raise PopError(f"--prompt-file {path} is empty")
    return text


def _fractions(rates, manifest, shapes, batch, n, r):
    """Full-mode prefill as a fraction of the measured fp32 matrix-product rate (the cost model's FLOPs over
    the full-mode TTFT), and a decode step at context n as a fraction of the measured read bandwidth (every
    stored weight plus the rows' cached K/V read once)."""
    if not rates or "gemm_fp32_gflops" not in rates or not r["decode_per_token"]:
        return None
    layer = manifest.kv_cache.layers[0]
    kv_bytes = 2 * shapes.layers * batch * layer.kv_heads * layer.head_dim * n * np_dtype(manifest.kv_cache.dtype).itemsize
    step_s = r["decode_per_token"]["median"] / 1e3
    return {"full_prefill_of_gemm_rate": cost.ttft(shapes, n, "full", batch) / (r["full_ttft"]["median"] / 1e3)
            / (rates["gemm_fp32_gflops"] * 1e9),
            "decode_of_read_bandwidth": (manifest.weights.stored_bytes + kv_bytes) / step_s / (rates["read_gbs"] * 1e9),
            "decode_bytes_per_step": manifest.weights.stored_bytes + kv_bytes}


def _gpu_name(device):
    if device == "cpu":
        return None
    try:
        from pop.runtime.backends.cuda import device_info
        return device_info()
    except PopError:  # AOTInductor packages need torch, not cuda-python
        import torch
        return {"name": torch.cuda.get_device_name(0),
                "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}


def _write(args, manifest, threads, shapes, rows, peer_reports):
    result = {
        "schema": "pop-bench/1", "model": manifest.model.name, "artifacts": str(Path(args.artifacts).resolve()),
        "backend": args.backend, "device": args.device, "gpu": _gpu_name(args.device), "threads": threads,
        "machine": {"cpu": _cpu_name(), "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "rates": getattr(args, "machine_rates", None)},
        "settings": {"prompt_lens": None if args.image_sizes else args.prompt_lens, "batch": args.batch,
                     "image_sizes": args.image_sizes, "new_tokens": args.new_tokens, "runs": args.runs,
                     "warmup": args.warmup, "prepack_weights": args.prepack_weights,
                     "prompt_chunk": args.prompt_chunk,
                     "prompts": "chat prompt with one seeded random image per row" if args.image_sizes
                     else "seeded random token ids (BOS first where the model wants it)"},
        "pop": {k: getattr(manifest.pop, k) for k in ("num_layers", "prefill_layers", "prune_ratio")},
        "cost_model": {"shapes": vars(shapes), "limit": cost.limit(shapes), "doc": cost.__doc__.strip()},
        "versions": manifest.provenance.versions,
        "command": args.command,
        "created_unix": int(time.time()),
        "results": rows, "peers": peer_reports,
    }
    print(report.table(result))
    if args.json_out:
        _atomic(Path(args.json_out), lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    if args.plot:
        _atomic(Path(args.plot), lambda p: report.plot(result, p))


IMAGE_QUESTION = "Describe this image in detail."


def _bench_images(args, manifest, session, shapes, threads):
    """Rows per batch and image size: a chat prompt with one image per row."""
    import numpy as np
    from PIL import Image
    encoder = manifest.vision.encoder
    text = session.chat_prompt(IMAGE_QUESTION, 1)
    rows = []
    total = len(args.batch) * len(args.image_sizes) * (args.warmup + args.runs) * 2
    with tqdm(total=total, desc="pop-bench", unit="run", file=sys.stderr) as bar:
        for b in args.batch:
            for w, h in args.image_sizes:
                bar.set_postfix_str(f"batch {b}, image {w}x{h}")
                rng = np.random.default_rng([b, w, h])
                images = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))] for _ in range(b)]
                patches = [session.mm.images.encoder_patches(images[0][0])]
                r = measure.measure_runtime(session, [text] * b, args.new_tokens, args.runs, args.warmup,
                                            bar.update, images)
                n = r["prompt_tokens"]
                if n + args.new_tokens > session.max_seq_len:
                    raise PopError(f"an image of {w}x{h} makes a {n}-token prompt; these artifacts hold "
                                   f"{session.max_seq_len} tokens (re-export with a larger --max-seq-len)")
                vision = cost.vision(encoder, patches)
                expected = cost.expected_speedup_with_images(shapes, n, vision)
                rows.append({"batch": b, "image_size": [w, h], "prompt_len": n, "image_patches": patches[0],
                             "pop_ttft_ms": r["pop_ttft"], "full_ttft_ms": r["full_ttft"], "speedup": r["speedup"],
                             "expected_speedup": expected,
                             "expected_speedup_without_vision": cost.expected_speedup(shapes, n),
                             "measured_over_expected": r["speedup"]["median"] / expected,
                             "vision_ms": r["vision"], "prepare_ms": r["prepare"],
                             "decode_ms_per_token": r["decode_per_token"],
                             "graphs_ms": {"prefill": r["prefill"], "boundary": r["boundary"],
                                           "decode_step": r["decode_step"], "full_prefill": r["full_prefill"]},
                             "flops": {"vision": vision, "pop_ttft": b * vision + cost.ttft(shapes, n, "pop", b),
                                       "full_ttft": b * vision + cost.ttft(shapes, n, "full", b)},
                             "peak_rss_bytes": r["peak_rss_bytes"], "first_tokens": r["first_tokens"]})
                bar.write(f"batch {b} image {w}x{h} ({n} tokens): preprocessing {r['prepare']['median']:.1f} ms, "
                          f"vision {r['vision']['median']:.1f} ms, "
                          f"POP {r['pop_ttft']['median']:.1f} ms, full {r['full_ttft']['median']:.1f} ms, "
                          f"speedup {r['speedup']['median']:.2f} (expected {expected:.2f})")
    _write(args, manifest, threads, shapes, rows, [])
    return 0


def _run_peers(args, chosen, manifest, threads, configs, rows, bar):
    """The peers measured after our runs, one at a time, each with the machine to itself."""
    out = []
    for name in chosen:
        try:
            if name == "hf":
                peer = peers.HFEager(manifest, threads, bar.write)
                measured = {}
                for b, n, ids in configs:
                    bar.set_postfix_str(f"hf-eager, batch {b}, prompt {n}")
                    measured[(b, n)] = peer.measure(ids, args.new_tokens, args.runs, args.warmup, bar.update)
                entry = {"name": peers.HFEager.name, "available": True, "versions": peer.versions}
                del peer
            elif name in runtime_peers.PEERS:  # pop's C++ runtime, or the other backend's export
                cls = runtime_peers.CppRuntime if name == "cpp" else runtime_peers.OtherBackend
                peer = cls(args.artifacts if name == "cpp" else args.other_artifacts, manifest, threads)
                measured = {}
                for b, n, ids in configs:
                    if name == "cpp" and b != 1:
                        continue  # one request per C++ session
                    bar.set_postfix_str(f"{cls.name}, batch {b}, prompt {n}")
                    measured[(b, n)] = m = peer.measure(ids, args.new_tokens, args.runs, args.warmup, bar.update)
                    if "overhead_per_decode_step_ms" in m:
                        o = m["overhead_per_decode_step_ms"]
                        bar.write(f"prompt {n}: runtime overhead per decode step, C++ {o['cpp']['median']:.4f} ms "
                                  f"({100 * o['cpp_share_of_backend']:.2f}% of the backend's run), Python "
                                  f"{o['python']['median']:.4f} ms ({100 * o['python_share_of_backend']:.2f}%)")
                entry = {"name": cls.name, "available": True, "versions": peer.versions}
                del peer
            else:
                python = peers.optimum_python(args.optimum_python)
                export_dir = args.optimum_dir or Path("artifacts") / "optimum" / manifest.model.name
                bar.set_postfix_str("optimum-onnx")
                peer = peers.OptimumOnnx(manifest, threads, python, export_dir, bar.write)
                measured = peer.measure_all(configs, args.new_tokens, args.runs, args.warmup)
                entry = {"name": peers.OptimumOnnx.name, "available": True, "versions": peer.versions,
                         "export": str(Path(export_dir).resolve()), "logits_all_positions": peer.logits_all_positions}
        except PopError as e:
            bar.write(f"{name}: not run: {e}")
            names = {"hf": peers.HFEager.name, "optimum": peers.OptimumOnnx.name, **runtime_peers.NAMES}
            out.append({"name": names[name], "available": False, "why": str(e)})
            continue
        out.append(_compare(rows, entry, measured))
    return out


def _start_rotation(args, names, manifest, threads, bar):
    """({name: a started peer that takes turns in our rotation}, [reports of those that could not start])."""
    started, failed = {}, []
    for name in names:
        precision = "int4" if name == "genai-int4" else "fp32"
        try:
            python = peers.genai_python(args.genai_python)
            build = (Path(args.genai_dir) if args.genai_dir else Path("artifacts") / "genai") / \
                f"{manifest.model.name}-{precision}"
            bar.set_postfix_str(f"onnxruntime-genai {precision}: loading")
            started[name] = peers.Genai(manifest, threads, python, build, precision, bar.write).start(args.new_tokens)
        except PopError as e:
            bar.write(f"{name}: not run: {e}")
            failed.append({"name": f"onnxruntime-genai {precision}", "available": False, "why": str(e)})
    return started, failed


def _compare(rows, entry, measured):
    """entry with its results: the peer's figures beside ours for each configuration."""
    ours = {(r["batch"], r["prompt_len"]): r for r in rows}
    results = []
    for key, m in measured.items():
        mine = ours[key]
        results.append({"batch": key[0], "prompt_len": key[1], "ttft_ms": m["ttft"],
                        "decode_ms_per_token": m["decode_per_token"], "peak_rss_bytes": m.get("peak_rss_bytes"),
                        "pop_full_ttft_vs_peer": mine["full_ttft_ms"]["median"] / m["ttft"]["median"],
                        "pop_ttft_vs_peer": mine["pop_ttft_ms"]["median"] / m["ttft"]["median"],
                        "pop_decode_vs_peer": (mine["decode_ms_per_token"]["median"] / m["decode_per_token"]["median"]
                                               if m["decode_per_token"] else None),
                        "first_token_agreement": peers.first_token_agreement(mine["first_tokens"].get("full"),
                                                                             m.get("first_tokens")),
                        **({"overhead_per_decode_step_ms": m["overhead_per_decode_step_ms"]}
                           if "overhead_per_decode_step_ms" in m else {})})
    return {**entry, "results": results}


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

