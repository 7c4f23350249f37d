"""Stage-1 train-step memory benchmark (not a test): XLA's compiled memory analysis and the
buffers live at its peak.

For each variant, dtype and remat setting, the jitted, donated stage-1 step of
``titok_jax/train/loop.py`` (task ``titok_stage1``: frozen VQGAN proxy codes, TiTok forward,
cross-entropy + quantizer loss, backward, clip, AdamW, EMA) is lowered for the abstract state and
compiled for ONE device; nothing runs. Printed: ``compiled.memory_analysis()`` (argument, output,
alias, temp and generated-code bytes), the peak estimate args + outputs - aliases + temps next to
the bytes live at the peak of XLA's heap simulation, the state (params + EMA + optimizer state)
and gradient sizes from the abstract state, and the compile time and compile-time peak RSS.

Where the peak goes: the compile dumps its buffer assignment (``xla_dump_to``); the buffers live
at the peak instruction (``*-live-range.txt``) are named by their HLO op, shape and JAX source
(``*-buffer-assignment-values.txt``) and summed by kind: state arguments, teacher (VQGAN)
activations, attention logits/probabilities, proxy logits ``[B, g, g, K]``, other block
activations kept for the backward pass, gradients and optimizer temporaries.

``--run`` also executes one step (random state) and records the step's peak resident memory
(``VmHWM`` after resetting it past the compile); ``--official-src`` (a checkout of
bytedance/1d-tokenizer) measures the official PyTorch step the same way in a child process (the
official step and proxy-code encode of ``benchmarks/train.py``). Each configuration runs in
its own process, so no figure carries another's heap.

    python -m benchmarks.memory --variants S-128,B-64 --dtypes float32,bfloat16 --remat both
    python -m benchmarks.memory --variants S-128 --run --official-src /tmp/1d-tokenizer
    python -m benchmarks.memory --variants L-32 --dtypes float32 --remat on --scan both \
        --remat-policy nothing_saveable,save_attention
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import json
import multiprocessing
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import load_official_titok, stage1_config
from titok_jax.infra import sharding
from titok_jax.models.variants import VQGAN_SIZES
from titok_jax.train import loop

GIB = 1024 ** 3
# What an HLO buffer live at the peak holds, from its opcode, shape and JAX op name (Flax module
# paths; ``jvp(TiTok)``: the forward under differentiation, ``transpose(jvp(TiTok))``: the
# backward; the teacher's ``MaskGITVQGAN.encode`` is outside both). First match wins.
KINDS = (
    ("arguments (state/batch/teacher)", lambda b: b["opcode"] == "parameter"),
    ("copies", lambda b: b["opcode"] == "copy"),
    ("teacher (VQGAN) activations", lambda b: "MaskGITVQGAN." in b["op_name"]),
    ("proxy logits [B,g,g,K] (+grad)", lambda b: b["logits"]),
    ("attention logits/probs", lambda b: b["attention"]),
    ("remat recomputation", lambda b: "rematted_computation" in b["op_name"]),
    ("backward (grads, cotangents)", lambda b: "transpose(" in b["op_name"]),
    ("forward activations", lambda b: "jvp(" in b["op_name"]),
    # Ops XLA inserted itself (no JAX op name): on CPU mostly the float32 copies of bfloat16
    # dot operands and outputs (its GEMMs run in float32).
    ("XLA-inserted (no op name)", lambda b: not b["op_name"]),
    ("optimizer/EMA/other", lambda b: True),
)


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(tree))


def peak_rss_bytes() -> int:
    """This process's peak resident set since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- the compiled step's buffers -----------------------------------------------------------------

_VALUE = re.compile(r"^<\d+ (\S+) @\S+>")
_INSTRUCTION = re.compile(r"from instruction: %\S+ = (.*?) ([a-z][\w-]*)\(")
_ASSIGNED = re.compile(r"value: <\d+ (\S+) @\S+> \(size=(\d+),offset=\d+\): (\S+)")
_PEAK_ENTRY = re.compile(r"^\s+(\S+?)\{[^}]*\}: (\d+) bytes")


def _metadata(text: str, key: str) -> str:
    match = re.search(key + r'="([^"]*)"', text)
    return match.group(1) if match else ""


def instructions(values_txt: str) -> dict[str, dict[str, str]]:
    """HLO instruction name -> opcode and JAX op name, from the buffer-assignment values dump."""
    out, name = {}, None
    with open(values_txt) as f:
        for line in f:
            value = _VALUE.match(line)
            if value:
                name = value.group(1)
            elif name and line.startswith(" from instruction:"):
                inst = _INSTRUCTION.search(line)
                out[name] = {"opcode": inst.group(2) if inst else "?",
                             "op_name": _metadata(line, "op_name")}
    return out


def value_shapes(assignment_txt: str) -> dict[tuple[str, int], str]:
    """(instruction name, bytes) -> the shape of that buffer, from the buffer assignment."""
    shapes = {}
    with open(assignment_txt) as f:
        for line in f:
            match = _ASSIGNED.search(line)
            if match:
                shapes[(match.group(1), int(match.group(2)))] = match.group(3).split("{")[0]
    return shapes


def peak_buffers(live_range_txt: str) -> tuple[str, int, int, list[tuple[str, int]]]:
    """The heap simulation's peak: (instruction scheduled there, its position, the schedule's
    length, (instruction name, bytes) of every buffer live at it)."""
    sequence, buffers, at, inside = [], [], -1, False
    with open(live_range_txt) as f:
        for line in f:
            step = re.match(r"^\s+(\d+):(\S+)$", line)
            peak = re.match(r"^\s+Live ranges at (\d+) \(peak\):", line)
            if step and not inside:
                sequence.append(step.group(2))
            elif peak:
                at, inside = int(peak.group(1)), True
            elif inside:
                match = _PEAK_ENTRY.match(line)
                if not match:
                    break
                buffers.append((match.group(1), int(match.group(2))))
    return (sequence[at] if 0 <= at < len(sequence) else "?"), at, len(sequence), buffers


def classify(buffers: list[dict], batch: int, proxy_cells: int, codebook: int) -> None:
    """Sets ``kind`` of each buffer (see ``KINDS``)."""
    side = int(proxy_cells ** 0.5)
    logits = re.compile(rf"\[{batch},(?:{proxy_cells}|{side},{side}),{codebook}\]")
    for b in buffers:
        b["logits"] = bool(logits.search(b["shape"]))
        # [B, heads, T, T] scores (unit dims dropped): two equal sequence dims past the cells.
        dims = [int(d) for d in re.findall(r"\d+", b["shape"].split("[", 1)[-1]) if d != "1"]
        b["attention"] = (len(dims) == 4 and dims[0] == batch and dims[2] == dims[3]
                          and dims[3] > proxy_cells)
        b["kind"] = next(kind for kind, test in KINDS if test(b))


def buffer_report(dump_dir: str, batch: int, cells: int, codebook: int) -> dict[str, Any]:
    """The buffers live at the peak of the compiled step dumped in ``dump_dir``: totals by kind
    and the largest ones."""
    live = max(glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt")),
               key=os.path.getsize)
    stem = live[:-len("-live-range.txt")]
    insts = instructions(stem + "-buffer-assignment-values.txt")
    shapes = value_shapes(stem + "-buffer-assignment.txt")
    at_name, at, length, live_buffers = peak_buffers(live)
    buffers = []
    for name, size in live_buffers:
        info = insts.get(name, {"opcode": "?", "op_name": ""})
        buffers.append({"name": name, "bytes": size, "shape": shapes.get((name, size), "?"),
                        **info})
    classify(buffers, batch, cells, codebook)
    by_kind = collections.Counter()
    for b in buffers:
        by_kind[b["kind"]] += b["bytes"]
    temps = sorted((b for b in buffers if b["opcode"] != "parameter"), key=lambda b: -b["bytes"])
    # Same-shaped buffers of one kind (24 blocks' attention probabilities...) read as one line.
    groups = collections.defaultdict(lambda: [0, 0, ""])
    for b in temps:
        g = groups[(b["kind"], b["shape"], b["opcode"])]
        g[0] += 1
        g[1] += b["bytes"]
        g[2] = g[2] or short_op_name(b["op_name"])
    top = sorted(([kind, shape, opcode, n, total, op] for (kind, shape, opcode), (n, total, op)
                  in groups.items()), key=lambda row: -row[4])
    at_op = short_op_name(insts.get(at_name, {}).get("op_name", ""))
    return {"peak_live_bytes": sum(b["bytes"] for b in buffers), "by_kind": dict(by_kind),
            "peak_at": f"{at}/{length} {at_name} ({at_op})",
            "top_groups": top[:15],
            "top_buffers": [{k: b[k] for k in ("bytes", "shape", "opcode", "kind", "op_name")}
                            for b in temps[:10]]}


def short_op_name(op_name: str, keep: int = 70) -> str:
    """The informative tail of a JAX op name (drops ``jit(train_step)/`` and module prefixes)."""
    op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return op_name if len(op_name) <= keep else "..." + op_name[-keep:]


# -- one configuration, in a child process -------------------------------------------------------

def measure(variant: str, dtype: str, batch: int, remat: bool, run: bool,
            keep_dump: str | None, scan: bool = False,
            policy: str = "nothing_saveable", ema: bool = True) -> dict[str, Any]:
    """Compiles (and with ``run`` executes once) the stage-1 step of one configuration."""
    config = stage1_config(variant, dtype, batch, remat, scan, policy, ema)
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    images = jax.ShapeDtypeStruct((batch, t.task.image_size, t.task.image_size, 3), jnp.float32,
                                  sharding=t.batch_sharding)
    key = jax.random.PRNGKey(0)
    dump_dir = keep_dump or tempfile.mkdtemp(prefix="bench_memory_")
    start = time.perf_counter()
    lowered = t.steps["train"].lower(t.abstract_state, {"image": images}, t.frozen, key)
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump_dir,
                                                 "xla_dump_hlo_as_text": True})
    compile_s = time.perf_counter() - start
    compile_rss = peak_rss_bytes()
    m = compiled.memory_analysis()
    s = t.abstract_state
    row = {"variant": variant, "dtype": dtype, "remat": remat, "scan": scan,
           "policy": policy if remat else "-", "batch": batch,
           "compile_s": compile_s, "compile_peak_rss": compile_rss,
           "args": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes,
           "params": tree_bytes(s.params), "ema": tree_bytes(s.ema_params),
           "opt_state": tree_bytes(s.opt_state), "frozen": tree_bytes(t.frozen),
           "grads": tree_bytes(s.params)}
    row["state"] = row["params"] + row["ema"] + row["opt_state"] + tree_bytes(s.step)
    row["peak_estimate"] = row["args"] + row["outputs"] - row["alias"] + row["temp"]
    cells = (config.model.image_size // config.model.patch_size) ** 2
    row["buffers"] = buffer_report(dump_dir, batch, cells,
                                   VQGAN_SIZES[config.model.vqgan].codebook_size)
    if not keep_dump:
        shutil.rmtree(dump_dir, ignore_errors=True)
    if run:
        row.update(run_once(t, compiled, config, batch))
    return row


def run_once(t, compiled, config, batch: int) -> dict[str, Any]:
    """Executes the compiled step once on a random state; the step's peak RSS."""
    state = t.init_state(jax.random.PRNGKey(0))
    images = jax.device_put(
        np.random.default_rng(0).random((batch, t.task.image_size, t.task.image_size, 3),
                                        np.float32), t.batch_sharding)
    jax.block_until_ready(state)
    # XLA frees the init's temporaries on its own thread shortly after the result is ready
    # (2.7 GiB for L-32 within 0.5 s): let that finish before the step's peak counter starts.
    time.sleep(2.0)
    before = current_rss_bytes()
    reset = reset_peak_rss()
    sampled = RssSampler() if not reset else None
    start = time.perf_counter()
    state, metrics = compiled(state, {"image": images}, t.frozen, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)
    step_s = time.perf_counter() - start
    peak = sampled.stop() if sampled else peak_rss_bytes()
    return {"run_s": step_s, "rss_before_step": before, "step_peak_rss": peak,
            "loss": float(metrics["loss"])}


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Polls VmRSS every 5 ms where the peak counter cannot be reset."""

    def __init__(self):
        self.peak, self._stop = current_rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def official_peak(src: str, variant: str, batch: int, ema: bool = True
                  ) -> dict[str, Any] | None:
    """Peak RSS of this (fresh) process around one official step + proxy encode (after one
    warm-up; with the official ``EMAModel`` update when ``ema``), or None if the official code
    cannot be imported."""
    from benchmarks import train as bench_train  # its official step
    titok_cls = load_official_titok(src)
    if titok_cls is None or not bench_train.official_arch(variant):
        return None
    seconds = bench_train.official_step(titok_cls, variant, batch, warmup=1, iters=1, ema=ema)
    return {"official_peak_rss": peak_rss_bytes(), **seconds}


def in_child(fn, *args):
    """``fn(*args)`` in a fresh spawned process: its own heap and peak-RSS counter."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(fn, *args).result()


# -- report --------------------------------------------------------------------------------------

def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def remat_label(r: dict) -> str:
    """``off`` or the remat policy, shortened (``nothing``, ``dots``, ``attn``, ...)."""
    if not r["remat"]:
        return "off"
    short = {"nothing_saveable": "nothing", "dots_saveable": "dots",
             "dots_with_no_batch_dims_saveable": "dots_nb", "everything_saveable": "all",
             "save_attention": "attn"}
    return short.get(r.get("policy", "nothing_saveable"), r.get("policy"))


def print_table(rows: list[dict]) -> None:
    print(f"\nGiB; peak est. = args + outputs - aliases + temps; live pk = bytes live at the "
          f"heap simulation's peak; state = params + EMA + optimizer state\n"
          f"{'variant':<8}{'dtype':<10}{'remat':<9}{'scan':<5}{'args':>7}{'outs':>7}"
          f"{'alias':>7}{'temp':>7}{'code':>6}{'peak est':>9}{'live pk':>8}{'state':>7}"
          f"{'grads':>7}{'compile s':>10}{'cmp RSS':>8}{'step RSS':>9}{'official':>9}")
    for r in rows:
        step = gib(r["step_peak_rss"]) if "step_peak_rss" in r else "-"
        off = gib(r["official_peak_rss"]) if r.get("official_peak_rss") else "-"
        print(f"{r['variant']:<8}{r['dtype']:<10}{remat_label(r):<9}"
              f"{'on' if r.get('scan') else 'off':<5}"
              f"{gib(r['args']):>7}{gib(r['outputs']):>7}{gib(r['alias']):>7}"
              f"{gib(r['temp']):>7}{gib(r['code']):>6}{gib(r['peak_estimate']):>9}"
              f"{gib(r['buffers']['peak_live_bytes']):>8}{gib(r['state']):>7}{gib(r['grads']):>7}"
              f"{r['compile_s']:>10.1f}{gib(r['compile_peak_rss']):>8}{step:>9}{off:>9}")


def print_buffers(r: dict) -> None:
    b = r["buffers"]
    print(f"\n{r['variant']} {r['dtype']} remat {remat_label(r)} scan "
          f"{'on' if r.get('scan') else 'off'}: live at the "
          f"peak {gib(b['peak_live_bytes'])} GiB at {b['peak_at']}\n  by kind (GiB): "
          + ", ".join(f"{k} {gib(v)}" for k, v in sorted(b["by_kind"].items(),
                                                         key=lambda kv: -kv[1])))
    print(f"  {'kind':<32}{'shape':<26}{'op':<12}{'n':>4}{'GiB':>7}  JAX op (first)")
    for kind, shape, opcode, n, total, op in b["top_groups"]:
        print(f"  {kind:<32}{shape[:25]:<26}{opcode[:11]:<12}{n:>4}{gib(total):>7}  {op}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="S-128,B-64,L-32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--remat", choices=("off", "on", "both"), default="both")
    p.add_argument("--remat-policy", default="nothing_saveable",
                   help="comma-separated remat policies (titok_jax.models.vit.REMAT_POLICIES)")
    p.add_argument("--scan", choices=("off", "on", "both"), default="off",
                   help="scanned transformer stacks (config.model.scan_layers)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ema", choices=("on", "off"), default="on",
                   help="keep an EMA copy of the parameters, in both steps (the released "
                        "recipes do, official and titok-jax)")
    p.add_argument("--run", action="store_true", help="also execute one step: its peak RSS")
    p.add_argument("--official-src", default=None,
                   help="checkout of bytedance/1d-tokenizer: the official step's peak RSS")
    p.add_argument("--keep-dump", default=None, help="keep the XLA dumps under this folder")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    remats = {"off": (False,), "on": (True,), "both": (False, True)}[args.remat]
    scans = {"off": (False,), "on": (True,), "both": (False, True)}[args.scan]
    policies = args.remat_policy.split(",")
    settings = [(remat, scan, policy) for scan in scans for remat in remats
                for policy in (policies if remat else policies[:1])]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, one device "
          f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, batch {args.batch}, "
          f"EMA copy {args.ema} (both steps)")
    rows = []
    for variant in args.variants.split(","):
        official = None
        if args.official_src:
            official = in_child(official_peak, args.official_src, variant, args.batch,
                                args.ema == "on")
            if official:
                print(f"[official] {variant}: peak RSS {gib(official['official_peak_rss'])} GiB"
                      f" (step {official['step_s']:.2f} s)", flush=True)
        for dtype in args.dtypes.split(","):
            for remat, scan, policy in settings:
                dump = (os.path.join(args.keep_dump, f"{variant}_{dtype}_remat{int(remat)}_"
                                     f"{policy}_scan{int(scan)}") if args.keep_dump else None)
                r = in_child(measure, variant, dtype, args.batch, remat, args.run, dump, scan,
                             policy, args.ema == "on")
                if official:
                    r.update(official)
                rows.append(r)
                print_table([r])
                print_buffers(r)
                sys.stdout.flush()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
