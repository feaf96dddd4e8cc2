"""Flags that several commands share, declared once."""
import argparse


def add_fitted_heads(p, several=False, calib_flag=True):
    """--kv-heads (one kind, or several to compare), --calib, --calib-tokens, --ridge.
    calib_flag=False: the command's own --data is the calibration text (pop-analyze)."""
    if several:
        p.add_argument("--kv-heads", nargs="+", default=["original"], choices=("original", "fitted"),
                       help="POP's KV heads to compare: the layers' own (original, the paper) and/or heads refitted "
                            "on --calib text (fitted); default original")
    else:
        p.add_argument("--kv-heads", default="original", choices=("original", "fitted"),
                       help="the pruned layers' KV projections: their own matrices (the paper, default) or matrices "
                            "refitted by ridge regression on calibration text, used by the prefill graph only")
    if calib_flag:
        p.add_argument("--calib", metavar="FILE", help="UTF-8 calibration text for --kv-heads fitted")
    p.add_argument("--calib-tokens", type=int, metavar="N",
                   help="calibration tokens for --kv-heads fitted (default 65536, or all the text has)")
    p.add_argument("--ridge", default="auto", metavar="auto|VALUE",
                   help="ridge strength relative to the mean eigenvalue of the inputs' Gram matrix; auto "
                        "(default) chooses per layer on held-out calibration tokens; inf = the original heads")
    p.add_argument("--guard", default="samples", metavar="samples|off|FILE",
                   help="text unlike the calibration that the fit must not hurt: the model's own samples "
                        "(default), a FILE of other domains, or off (the fit is chosen on the calibration text "
                        "alone; the samples still check it).  The report gives the heads' gain in and out of the "
                        "calibration domain and warns when they lose outside it")


def add_runtime(p, backends):
    """--backend (an execution backend: what runs the graphs), --threads, --prepack-weights, --tf32,
    --prompt-chunk."""
    p.add_argument("--backend", default=None, choices=backends,
                   help="ort: ONNX Runtime on the CPU; ort-cuda: its CUDA provider; trt: the TensorRT engines "
                        "(both GPU backends keep the KV cache in device memory); aoti: AOTInductor packages. "
                        "Default: the artifacts' own (aoti for pop-export --format aoti, else ort)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (CPU)")
    p.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="ONNX Runtime on the CPU re-lays the weights for its kernels, one copy per graph (default); "
                        "--no-prepack-weights holds them once, as the mapped file, and decodes slower")
    p.add_argument("--prompt-chunk", type=int, default=None, metavar="N",
                   help="tokens per graph call while reading a prompt; 0: the whole prompt in one call. Default: "
                        "the backend's choice (ONNX Runtime on the CPU: 512, measured faster than one call; "
                        "the GPU backends: one call)")
    p.add_argument("--tf32", action="store_true",
                   help="GPU backends, fp32 artifacts: matrix products in TF32 (faster, about 1e-3 relative error). "
                        "Default: true fp32 (TensorRT engines keep what pop-export --tf32 chose)")
