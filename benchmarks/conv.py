"""3x3 convolution benchmark (not a test): the MaskGIT-VQGAN decoder's convolutions on XLA:CPU,
three formulations, against PyTorch (oneDNN) in the same run.

Shapes are the decoder's stride-1 3x3 convolutions per resolution of the released f16 model
(channels 512 @16, 256 @32/64, 128 @128/256). For each, at ``--batch``:

* ``lax.conv``: ``jax.lax.conv_general_dilated`` NHWC x HWIO, what ``flax.linen.Conv`` runs;
* ``im2col``: the nine shifted views concatenated on the channel axis, one GEMM
  ``[B*H*W, 9*Cin] x [9*Cin, Cout]``;
* ``shift-sum``: nine GEMMs ``[B*H*W, Cin] x [Cin, Cout]`` on shifted views, summed;
* ``lax.conv+onednn``: ``lax.conv`` again in a child process started with
  ``XLA_FLAGS=--xla_cpu_use_onednn=true`` (XLA:CPU's oneDNN rewrite of dots and convolutions);
* ``torch``: ``torch.nn.functional.conv2d`` in NCHW and in channels-last, with
  ``torch.set_num_threads(os.cpu_count())``.

Printed: ms per call (median of ``--repeats`` after a warm-up) and GFLOP/s (2 * B*H*W*9*Cin*Cout
per call), with the CPU model from /proc/cpuinfo and the measured float32 GEMM peak. The
formulations agree with ``lax.conv`` to float32 rounding (checked on every shape).

    python -m benchmarks.conv --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import ROOT, cpu_model

SHAPES = ((16, 512, 512), (32, 256, 256), (64, 256, 256), (128, 128, 128), (256, 128, 128))




def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted(x):
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def im2col_conv(x, w):
    cols = jnp.concatenate(_shifted(x), axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", cols, w.reshape(-1, w.shape[-1]))


def shift_sum_conv(x, w):
    taps = w.reshape(9, w.shape[2], w.shape[3])
    return sum(jnp.einsum("bhwc,co->bhwo", s, taps[t]) for t, s in enumerate(_shifted(x)))


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def onednn_child(args) -> dict:
    """``lax.conv`` ms per shape under ``--xla_cpu_use_onednn=true``, from a child process (XLA
    reads its flags once per process)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "onednn.json")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                          + " --xla_cpu_use_onednn=true").strip())
        proc = subprocess.run([sys.executable, "-m", "benchmarks.conv", "--only-lax",
                               "--no-torch", "--batch", str(args.batch), "--repeats",
                               str(args.repeats), "--json", out], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"the oneDNN child failed:\n{proc.stderr[-2000:]}", flush=True)
            return {}
        with open(out) as f:
            rows = json.load(f)["rows"]
    return {(r["size"], r["cin"], r["cout"]): r["lax.conv"] for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--only-lax", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from benchmarks.common import peak_gflops
    peaks, source = peak_gflops(jax.devices()[0], None)
    peak = peaks["float32"]
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, jax {jax.__version__}, float32 peak "
          f"{peak:.0f} GFLOP/s ({source}), batch {args.batch}", flush=True)
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            print(f"torch {torch.__version__}, oneDNN "
                  f"{torch.backends.mkldnn.is_available()}", flush=True)
        except ImportError:
            print("torch not installed: no PyTorch baseline", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    impls = {"lax.conv": lax_conv, "im2col": im2col_conv, "shift-sum": shift_sum_conv}
    if args.only_lax:
        impls = {"lax.conv": lax_conv}
    onednn = {} if args.only_lax else onednn_child(args)
    for size, cin, cout in SHAPES:
        x = rng.standard_normal((args.batch, size, size, cin), np.float32)
        w = (rng.standard_normal((3, 3, cin, cout), np.float32)
             / np.float32(np.sqrt(9 * cin)))
        gflop = 2 * args.batch * size * size * 9 * cin * cout / 1e9
        row = {"size": size, "cin": cin, "cout": cout, "gflop": gflop}
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        ref = None
        for name, impl in impls.items():
            f = jax.jit(impl)
            out = f(xj, wj).block_until_ready()
            if ref is None:
                ref = np.asarray(out)
            else:
                err = float(np.max(np.abs(np.asarray(out) - ref)))
                assert err < 1e-3, f"{name} differs from lax.conv by {err}"
            row[name] = median_ms(lambda: f(xj, wj).block_until_ready(), args.repeats)
        if torch is not None:
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
            with torch.inference_mode():
                row["torch"] = median_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
                                         args.repeats)
                xc = xt.contiguous(memory_format=torch.channels_last)
                row["torch-cl"] = median_ms(
                    lambda: torch.nn.functional.conv2d(xc, wt, padding=1), args.repeats)
        if onednn:
            row["lax.conv+onednn"] = onednn[(size, cin, cout)]
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.1f} ms ({row['gflop'] / v * 1e3:.0f} GFLOP/s)"
                               for k, v in row.items() if k not in ("size", "cin", "cout",
                                                                    "gflop")), flush=True)
    names = [n for n in ("lax.conv", "lax.conv+onednn", "im2col", "shift-sum", "torch",
                         "torch-cl") if n in rows[0]]
    print(f"\nGFLOP/s (ms per call), batch {args.batch}\n{'shape':<16}{'GFLOP':>7}"
          + "".join(f"{n:>20}" for n in names))
    for r in rows:
        cells = "".join(f"{r['gflop'] / r[n] * 1e3:>11.0f} ({r[n]:>6.1f})" for n in names)
        print(f"{r['size']:>3}x{r['size']:<3} {r['cin']}->{r['cout']:<5}{r['gflop']:>7.1f}{cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "peak_gflops": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
