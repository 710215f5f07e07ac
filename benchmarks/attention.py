"""Attention kernels against torch SDPA: speed (GPU) and accuracy of flash, flash-int8 and flash-lsh.

Usage: python benchmarks/attention.py [--budget-s 540] [--dtype float16]
On a CUDA machine: ms and TFLOP/s of SDPA (the backend that ran is named), flash (forward,
forward+backward), flash-int8 and flash-lsh (forward) at the FlashAttention paper's shapes
(batch*seq = 16k, heads*head_dim = 2048, seq 512..8k, head_dim 64 and 128, causal and not) and
the Lite model's (batch 32, seq 128 and 512, padded); then the error of each kernel against
exact fp32 attention. Without CUDA: the correctness part only, at small shapes, in Triton's CPU
interpreter. Prints Markdown tables plus the machine, versions and date, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before the kernel modules are imported: triton fixes a kernel's mode when it is defined
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from model.attention import attend, reference_attention  # noqa: E402
from model.config import Config  # noqa: E402
from model.kernels.lsh import default_buckets, lsh_attention  # noqa: E402

# SDPA backends in the order tried: FlashAttention-2 is the one the targets compare against;
# shapes it refuses (an attention mask) fall through to the next.
SDPA_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)


@dataclass(frozen=True)
class Shape:
    label: str
    batch: int
    heads: int
    tq: int
    tk: int
    head_dim: int
    causal: bool
    padded: bool  # a key mask with per-row lengths, as a padded GLUE batch has

    def flops(self, backward: bool = False) -> float:
        """Dense attention FLOPs: two matmuls of 2*Tq*Tk*D each, half under causality; backward counts 2.5x."""
        f = 4.0 * self.batch * self.heads * self.tq * self.tk * self.head_dim * (0.5 if self.causal else 1.0)
        return f * 3.5 if backward else f


def gpu_shapes() -> list[Shape]:
    shapes = []
    for d in (64, 128):
        for t in (512, 1024, 2048, 4096, 8192):
            for causal in (False, True):
                shapes.append(Shape("FA paper", 16384 // t, 2048 // d, t, t, d, causal, False))
    layer = Config.preset("full").encoder[0]  # the Lite model's own attention width
    for t in (128, 512):
        shapes.append(Shape("Lite", 32, layer.n_heads, t, t, layer.head_dim, False, True))
    return shapes


def cpu_shapes() -> list[Shape]:
    return [
        Shape("self", 1, 2, 48, 48, 32, False, True),
        Shape("self", 1, 2, 48, 48, 64, True, False),
        Shape("cross", 1, 2, 33, 70, 32, False, True),
        Shape("cross", 1, 2, 70, 33, 64, True, True),
    ]


def make_inputs(shape: Shape, dtype: torch.dtype, device: str):
    """Unit-scale random q, k, v and (when padded) a key mask with random lengths (the first row full)."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.tq, shape.head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(shape.batch, shape.heads, shape.tk, shape.head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(shape.batch, shape.heads, shape.tk, shape.head_dim, generator=g, device=device, dtype=dtype)
    key_mask = None
    if shape.padded:
        lengths = torch.randint(shape.tk // 2, shape.tk + 1, (shape.batch,), generator=g, device=device)
        lengths[0] = shape.tk
        key_mask = torch.arange(shape.tk, device=device)[None, :] < lengths[:, None]
    return q, k, v, key_mask


def time_ms(fn, grad_to_none=None) -> float:
    """Median ms of fn on the GPU (triton's do_bench: warm-up, L2 flush, CUDA events)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def sdpa_backend(run) -> SDPBackend:
    """The first SDPA backend in SDPA_ORDER that accepts the call `run`."""
    for backend in SDPA_ORDER:
        try:
            with sdpa_kernel(backend):
                run()
            return backend
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend accepted these inputs")


def errors(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, max abs error) of got against exact."""
    got, exact = got.double().flatten(), exact.double().flatten()
    return F.cosine_similarity(got, exact, dim=0).item(), (got - exact).abs().max().item()


def speed_row(shape: Shape, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Timings of one shape: SDPA (named backend), flash fwd and fwd+bwd, int8 and lsh fwd."""
    q, k, v, key_mask = make_inputs(shape, dtype, device)
    opts = dict(key_mask=key_mask, causal=shape.causal)
    row = {}

    def forward(backend):
        return lambda: attend(q, k, v, backend=backend, **opts)

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    d_out = torch.randn_like(q)

    def forward_backward(backend):
        return lambda: attend(qg, kg, vg, backend=backend, **opts).backward(d_out)

    with torch.no_grad():
        backend = sdpa_backend(forward("sdpa"))
    row["sdpa"] = backend.name.lower()
    with sdpa_kernel(backend), torch.no_grad():
        row["sdpa fwd"] = time_ms(forward("sdpa"))
    with torch.no_grad():
        for name in ("flash", "flash-int8", "flash-lsh"):
            row[f"{name} fwd"] = time_ms(forward(name))
    with sdpa_kernel(sdpa_backend(forward_backward("sdpa"))):
        row["sdpa fwd+bwd"] = time_ms(forward_backward("sdpa"), grad_to_none=[qg, kg, vg])
    row["flash fwd+bwd"] = time_ms(forward_backward("flash"), grad_to_none=[qg, kg, vg])
    return row


def accuracy_row(shape: Shape, dtype: torch.dtype, device: str) -> dict:
    """Errors against exact attention: float64 reference on CPU, fp32 SDPA on the GPU (float64 would not fit at 8k)."""
    q, k, v, key_mask = make_inputs(shape, dtype, device)
    opts = dict(key_mask=key_mask, causal=shape.causal)
    d_out = torch.randn_like(q)

    def exact_fn(a, b, c):
        if device == "cpu":
            return reference_attention(a.double(), b.double(), c.double(), **opts)[0]
        return attend(a.float(), b.float(), c.float(), backend="sdpa", **opts)

    def with_grads(fn):
        a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(a, b, c)
        return out.detach(), torch.autograd.grad(out, (a, b, c), d_out.to(out.dtype))

    exact, exact_grads = with_grads(exact_fn)
    flash, flash_grads = with_grads(lambda a, b, c: attend(a, b, c, backend="flash", **opts))
    row = {
        "flash max err": errors(flash, exact)[1],
        "flash grad max err": max(errors(g, e)[1] for g, e in zip(flash_grads, exact_grads)),
    }
    with torch.no_grad():
        row["int8 cos"], row["int8 max err"] = errors(attend(q, k, v, backend="flash-int8", **opts), exact)
        # The small CPU shapes would get 1 bucket by default, which is exact: hash them into 4.
        row["lsh buckets"] = default_buckets(shape.tk) if device == "cuda" else 4
        lsh = lsh_attention(q, k, v, n_buckets=row["lsh buckets"], **opts)
        row["lsh cos"], row["lsh max err"] = errors(lsh, exact)
        row["lsh 1-bucket max err"] = errors(lsh_attention(q, k, v, n_buckets=1, **opts), exact)[1]
    return row


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def shape_cells(s: Shape) -> list[str]:
    t = f"{s.tq}" if s.tq == s.tk else f"{s.tq}x{s.tk}"
    return [
        s.label,
        f"{s.batch}x{t}",
        f"{s.heads}x{s.head_dim}",
        "causal" if s.causal else "full",
        "padded" if s.padded else "-",
    ]


SHAPE_HEADER = ["shapes", "batch x seq", "heads x dim", "attention", "key mask"]


def fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def tflops(shape: Shape, ms, backward: bool = False):
    return shape.flops(backward) / (ms * 1e-3) / 1e12 if isinstance(ms, float) else ms


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else "-"


def run_all(shapes: list[Shape], fn, budget_s: float, began: float) -> tuple[list[dict], list[str]]:
    """fn(shape) for each shape until the time budget runs out; a failure is reported, not fatal."""
    results, failures = [], []
    for shape in shapes:
        if time.perf_counter() - began > budget_s:
            results.append({})
            failures.append(f"{shape}: skipped, over the time budget")
            continue
        try:
            results.append(fn(shape))
        except Exception as e:  # one broken shape must not hide the others' figures
            results.append({})
            failures.append(f"{shape}: {type(e).__name__}: {e}")
    return results, failures


def speed_tables(shapes: list[Shape], rows: list[dict]) -> str:
    forward, training = [], []
    for s, r in zip(shapes, rows):
        get = lambda key: r.get(key, "n/a")  # noqa: E731
        forward.append(
            shape_cells(s)
            + [
                get("sdpa"),
                fmt(get("sdpa fwd"), ".3f"),
                fmt(tflops(s, get("sdpa fwd")), ".1f"),
                fmt(get("flash fwd"), ".3f"),
                fmt(tflops(s, get("flash fwd")), ".1f"),
                fmt(ratio(get("sdpa fwd"), get("flash fwd")), ".2f"),
                fmt(get("flash-int8 fwd"), ".3f"),
                fmt(ratio(get("flash fwd"), get("flash-int8 fwd")), ".2f"),
                fmt(get("flash-lsh fwd"), ".3f"),
                fmt(ratio(get("flash fwd"), get("flash-lsh fwd")), ".2f"),
            ]
        )
        training.append(
            shape_cells(s)
            + [
                fmt(get("sdpa fwd+bwd"), ".3f"),
                fmt(tflops(s, get("sdpa fwd+bwd"), True), ".1f"),
                fmt(get("flash fwd+bwd"), ".3f"),
                fmt(tflops(s, get("flash fwd+bwd"), True), ".1f"),
                fmt(ratio(get("sdpa fwd+bwd"), get("flash fwd+bwd")), ".2f"),
            ]
        )
    return "\n\n".join(
        [
            "Forward (ms; TFLOP/s count dense attention FLOPs; 'x' columns: speed-up over SDPA / over flash)",
            table(
                SHAPE_HEADER
                + [
                    "SDPA backend",
                    "SDPA ms",
                    "SDPA TFLOP/s",
                    "flash ms",
                    "flash TFLOP/s",
                    "flash x SDPA",
                    "int8 ms",
                    "int8 x flash",
                    "lsh ms",
                    "lsh x flash",
                ],
                forward,
            ),
            "Forward + backward (ms, TFLOP/s with backward = 2.5x forward FLOPs)",
            table(SHAPE_HEADER + ["SDPA ms", "SDPA TFLOP/s", "flash ms", "flash TFLOP/s", "flash x SDPA"], training),
        ]
    )


def accuracy_table(shapes: list[Shape], rows: list[dict], exact: str) -> str:
    body = []
    for s, r in zip(shapes, rows):
        get = lambda key: r.get(key, "n/a")  # noqa: E731
        body.append(
            shape_cells(s)
            + [
                fmt(get("flash max err"), ".1e"),
                fmt(get("flash grad max err"), ".1e"),
                fmt(get("int8 cos"), ".5f"),
                fmt(get("int8 max err"), ".1e"),
                str(get("lsh buckets")),
                fmt(get("lsh cos"), ".4f"),
                fmt(get("lsh max err"), ".1e"),
                fmt(get("lsh 1-bucket max err"), ".1e"),
            ]
        )
    return f"Accuracy against {exact} (unit Gaussian inputs)\n\n" + table(
        SHAPE_HEADER
        + [
            "flash max err",
            "flash grad max err",
            "int8 cos",
            "int8 max err",
            "lsh buckets",
            "lsh cos",
            "lsh max err",
            "lsh 1 bucket max err",
        ],
        body,
    )


def targets(shapes: list[Shape], rows: list[dict]) -> list[str]:
    """The issue's speed targets, judged on the rows that were measured."""

    def check(name, goal, pairs):
        pairs = [(s, x) for s, x in pairs if isinstance(x, float)]
        if not pairs:
            return f"- {name}: not measured"
        s, worst = min(pairs, key=lambda p: p[1])
        return (
            f"- {name}: {'met' if worst >= goal else 'missed'} (worst {worst:.2f}x, at {s.batch}x{s.tq}, "
            f"{s.heads}x{s.head_dim}, {'causal' if s.causal else 'full'})"
        )

    paper = [(s, r) for s, r in zip(shapes, rows) if s.label == "FA paper"]
    return [
        check(
            "flash forward >= 1.0x SDPA on its FlashAttention-2 path at seq >= 1k",
            1.0,
            [
                (s, ratio(r.get("sdpa fwd"), r.get("flash fwd")))
                for s, r in paper
                if s.tq >= 1024 and r.get("sdpa") == "flash_attention"
            ],
        ),
        check(
            "flash-int8 forward >= 1.5x flash forward",
            1.5,
            [(s, ratio(r.get("flash fwd"), r.get("flash-int8 fwd"))) for s, r in paper],
        ),
        check(
            "flash-lsh forward faster than flash at seq >= 8k",
            1.0,
            [(s, ratio(r.get("flash fwd"), r.get("flash-lsh fwd"))) for s, r in paper if s.tq >= 8192],
        ),
    ]


def machine() -> list[str]:
    lines = [
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- command: python {' '.join(sys.argv)}",
        f"- torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
    ]
    if ON_GPU:
        lines.append(
            f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        lines.append(
            f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; no CUDA device, "
            "so correctness only, in Triton's CPU interpreter (TRITON_INTERPRET=1); no timings"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting new shapes after this long")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="GPU input dtype")
    args = parser.parse_args()
    began = time.perf_counter()
    torch.manual_seed(0)
    sections, failures = [], []
    if ON_GPU:
        dtype = getattr(torch, args.dtype)
        shapes = gpu_shapes()
        speed, failed = run_all(shapes, lambda s: speed_row(s, dtype), args.budget_s * 0.8, began)
        failures += failed
        sections.append(speed_tables(shapes, speed))
        accuracy, failed = run_all(shapes, lambda s: accuracy_row(s, dtype, "cuda"), args.budget_s, began)
        failures += failed
        sections.append(accuracy_table(shapes, accuracy, f"fp32 SDPA, inputs in {args.dtype}"))
        sections.append("Targets\n\n" + "\n".join(targets(shapes, speed)))
    else:
        shapes = cpu_shapes()
        accuracy, failed = run_all(shapes, lambda s: accuracy_row(s, torch.float32, "cpu"), args.budget_s, began)
        failures += failed
        sections.append(accuracy_table(shapes, accuracy, "the float64 reference, fp32 inputs"))
    print("\n\n".join(sections + ["\n".join(machine())]))
    print(f"\n{time.perf_counter() - began:.0f} s in all")
    if failures:
        print("\nFailures:\n" + "\n".join(f"- {f}" for f in failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
