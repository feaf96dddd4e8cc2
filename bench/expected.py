"""The cost model's expected POP speedup for a real VLM's shapes, where its
weights cannot be had: `python -m pop.bench.expected`.

Qwen3-VL-8B's shapes are those of its published config.json (text: Qwen3-8B's
36 layers; vision: 27 blocks of width 1152) and preprocessor (16 px patches,
2x2 merge, at most 16,777,216 pixels).  Default pruning, as pop-export: a
third of the layers, rounded down (K = 24 of 36).
"""
import sys

from pop.runtime.manifest import Encoder
from pop.runtime.vision.qwen3_vl import smart_resize

from . import cost

QWEN3_VL_8B = {
    "text": cost.Shapes(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936,
                        layers=36, keep=24),
    "vision": Encoder(layers=27, hidden=1152, intermediate=4304, patch_dim=2 * 3 * 16 * 16, merge=4,
                      mergers=4, out_hidden=4096),  # the merger and 3 DeepStack mergers
    "patch": 16, "merge": 2, "min_pixels": 65536, "max_pixels": 16777216,
}
SIZES = ((640, 480), (1280, 720), (1920, 1080), (2560, 1440))
TEXT_TOKENS = 24  # chat template and a one-line question around the image


def rows(model=QWEN3_VL_8B, sizes=SIZES, text_tokens=TEXT_TOKENS):
    out = []
    for w, h in sizes:
        rh, rw = smart_resize(h, w, model["patch"] * model["merge"], model["min_pixels"], model["max_pixels"])
        patches = (rh // model["patch"]) * (rw // model["patch"])
        n = text_tokens + patches // model["merge"] ** 2
        vision = cost.vision(model["vision"], [patches])
        out.append({"image": f"{w}x{h}", "resized": f"{rw}x{rh}", "image_tokens": patches // model["merge"] ** 2,
                    "prompt_tokens": n, "vision_share_of_full": vision / (vision + cost.ttft(model["text"], n, "full")),
                    "expected": cost.expected_speedup_with_images(model["text"], n, vision),
                    "expected_without_vision": cost.expected_speedup(model["text"], n)})
    return out


def main():
    print("Qwen3-VL-8B, K = 24 of 36, one image and a short question (FLOP cost model)")
    print(f"{'image':>10} {'resized':>10} {'img tokens':>10} {'prompt':>7} {'vision share':>12} "
          f"{'expected':>9} {'LLM only':>9}")
    for r in rows():
        print(f"{r['image']:>10} {r['resized']:>10} {r['image_tokens']:>10} {r['prompt_tokens']:>7} "
              f"{r['vision_share_of_full']:>12.1%} {r['expected']:>9.2f} {r['expected_without_vision']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
