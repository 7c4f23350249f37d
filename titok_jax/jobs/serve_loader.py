"""Runs titok-jax serving artefacts with jax + numpy only (no titok-jax).

    python serve.py EXPORT_DIR INPUTS.npz OUTPUTS.npz [REPEATS]

INPUTS.npz holds "<function>/<case>/<input name>" arrays (e.g. "encode/b3/images"); for every
(function, case) found, OUTPUTS.npz gets "<function>/<case>" and "timings" (JSON: per function the
deserialize time, per case the first call (compile + run) and the median of REPEATS more calls).
"""
import json
import os
import sys
import time

import jax
import numpy as np
from jax import export


def main(export_dir, inputs_path, outputs_path, repeats=3):
    with open(os.path.join(export_dir, "signature.json")) as f:
        sig = json.load(f)
    start = time.perf_counter()
    params = jax.device_put(dict(np.load(os.path.join(export_dir, sig["weights"]["file"]))))
    jax.block_until_ready(params)
    timings = {"weights_load_s": time.perf_counter() - start, "functions": {}}
    inputs = np.load(inputs_path)
    outputs = {}
    for name, spec in sig["functions"].items():
        cases = sorted({k.split("/")[1] for k in inputs.files if k.split("/")[0] == name})
        if not cases:
            continue
        start = time.perf_counter()
        with open(os.path.join(export_dir, spec["file"]), "rb") as f:
            fn = jax.jit(export.deserialize(bytearray(f.read())).call)
        t = timings["functions"][name] = {"deserialize_s": time.perf_counter() - start}
        for case in cases:
            args = [inputs[f"{name}/{case}/{x['name']}"] for x in spec["inputs"]]
            start = time.perf_counter()
            out = np.asarray(fn(params, *args))
            first = time.perf_counter() - start
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(params, *args))
                runs.append(time.perf_counter() - start)
            t[case] = {"first_call_s": first, "call_s": float(np.median(runs))}
            outputs[f"{name}/{case}"] = out
    np.savez(outputs_path, timings=np.array(json.dumps(timings)), **outputs)


if __name__ == "__main__":
    main(*sys.argv[1:4], *[int(r) for r in sys.argv[4:5]])
