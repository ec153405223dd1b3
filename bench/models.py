"""The bare encoder in the configurations worth trying on a CPU, compared on the same input."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from bench.timing import with_threads


def bench_model_configs(model: str = "pretrained", *, batch_size: int = 32, batches: int = 4,
                        device: str = "cpu", threads: Sequence[int] = (), jit: bool = True,
                        rounds: int = 3) -> dict[str, Any]:
    """The bare encoder in the configurations worth trying on a CPU, on random float32
    [batch_size, 3, H, W] input of the encoder's size, best of ``rounds``, interleaved: ``embed``
    as shipped (BatchNorm folded, channels-last, inference mode) at each torch thread count; the
    unfolded model channels-last (``embed`` before folding) and in the default memory layout; and,
    with ``jit``, a ``torch.jit.trace`` + ``freeze`` graph (deprecated in torch 2.x, measured for
    comparison).
    Returns {"images_per_s": {name: images/s}, "max_abs_diff": {name: vs embed}, "fastest": name}.
    (``torch.compile`` is left out: about two minutes of compilation on two cores for the same
    speed as the folded model.)"""
    import warnings

    import torch

    from engine.encoder import load_encoder, resolve_device

    encoder = load_encoder(model, resolve_device(device))
    size = tuple(encoder.data_config["input_size"])
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn((batch_size, *size), generator=gen) for _ in range(batches)]
    reference = encoder.embed(inputs[0])
    variants: dict[str, Callable[[Any], np.ndarray]] = {}
    for t in sorted({torch.get_num_threads(), *threads}):
        variants[f"embed, {t} threads"] = with_threads(encoder.embed, t)

    def plain(layout):
        def run(x):
            with torch.inference_mode():
                return encoder(x.to(encoder.device).contiguous(memory_format=layout)).float().cpu().numpy()
        return run

    variants["unfolded, channels-last"] = plain(torch.channels_last)
    nchw = load_encoder(model, resolve_device(device)).to(memory_format=torch.contiguous_format).eval()

    def run_nchw(x):
        with torch.inference_mode():
            return nchw(x.to(nchw.device).contiguous()).float().cpu().numpy()

    variants["unfolded, default layout"] = run_nchw
    if jit and encoder.device.type == "cpu":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = inputs[0].contiguous(memory_format=torch.channels_last)
            frozen = torch.jit.freeze(torch.jit.trace(encoder, example, check_trace=False).eval())

        def run_frozen(x):
            with torch.inference_mode():
                return frozen(x.contiguous(memory_format=torch.channels_last)).numpy()

        variants["jit.trace + freeze"] = run_frozen
    diffs: dict[str, float] = {}
    for name, fn in variants.items():
        out = fn(inputs[0])
        fn(inputs[0])  # a second call: some configurations plan on the first
        diffs[name] = float(np.abs(out - reference).max())
    best: dict[str, float] = {name: 0.0 for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            best[name] = max(best[name], batch_size * len(inputs) / (time.perf_counter() - t0))
    return {"batch_size": batch_size, "input_size": list(size), "images_per_s": {k: round(v, 2) for k, v in best.items()},
            "max_abs_diff": diffs, "fastest": max(best, key=best.get)}
