"""Prints the README's speed table from the pop-bench JSON files in bench/.

Each model, depth and kind of head was timed in rounds (bench/NAME.json, then
bench/repeats/NAME-round1.json, -round2.json, ...), original and fitted back to
back within a round, so a round's pair shares the machine's state.

    python benchmarks/fitted-heads/speed_table.py
"""
import json
import statistics
from pathlib import Path

BENCH = Path(__file__).with_name("bench")
MODELS = ("smollm2-135m", "gemma3-270m")
RATIOS = {"0.25": "1/4", "0.33": "1/3", "0.5": "1/2"}


def rounds(name):
    files = [BENCH / f"{name}.json"] + sorted((BENCH / "repeats").glob(f"{name}-round*.json"))
    out = []
    for f in files:
        doc = json.loads(f.read_text())
        r = doc["results"][0]
        out.append({"k": doc["pop"]["prefill_layers"], "layers": doc["pop"]["num_layers"],
                    "expected": r["expected_speedup"], "speedup": r["speedup"]["median"],
                    "prefill": r["graphs_ms"]["prefill"]["median"], "full": r["full_ttft_ms"]["median"]})
    return out


def main():
    print("| model | K (pruned) | expected (FLOPs) | speedup, original (each round) | speedup, fitted (each round) "
          "| prefill ms, original / fitted (medians) | fitted vs original, per round: prefill "
          "| the same for full-mode TTFT (identical graphs: drift) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for ratio, frac in RATIOS.items():
            o, f = rounds(f"{model}-r{ratio}"), rounds(f"{model}-r{ratio}-fitted")
            k, layers = o[0]["k"], o[0]["layers"]
            med = lambda rows, key: statistics.median(x[key] for x in rows)
            speeds = lambda rows: " ".join(f"{x['speedup']:.2f}" for x in rows) + f" (**{med(rows, 'speedup'):.2f}**)"
            delta = lambda key: " ".join(f"{100 * (b[key] / a[key] - 1):+.1f}%" for a, b in zip(o, f))
            print(f"| {model} | {k} ({layers - k}/{layers}, {frac}) | {o[0]['expected']:.2f} | {speeds(o)} | {speeds(f)} "
                  f"| {med(o, 'prefill'):.0f} / {med(f, 'prefill'):.0f} | {delta('prefill')} | {delta('full')} |")


if __name__ == "__main__":
    main()
