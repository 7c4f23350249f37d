"""Serving export (``titok-jax serve-export``): a model's functions as serialised ``jax.export``
artefacts that run with ``jax`` and ``numpy`` alone, without titok-jax installed.

    titok-jax serve-export --model titok_l32 --weights tokenizer_titok_l32.bin --out served_l32
    titok-jax serve-export --generator titok_l32 --generator-weights generator_titok_l32.bin \\
        --out served_gen_l32 --platforms cpu,cuda,tpu

The output folder (refused if it exists and is not empty; ``signature.json`` is written last, so
a folder without it is an interrupted export):

* ``<function>.jaxexport``: ``jax.export.Exported.serialize()`` of each function, lowered for
  every platform asked for (``cpu`` by default; ``cuda``, ``rocm``, ``tpu`` lower without the
  devices). The batch axis is the symbolic dimension ``b`` (any ``b >= 1``); every other axis is
  fixed, and a call with another image size fails in ``Exported.call`` with jax's
  ``ValueError: Shape mismatch for args[1].shape[1] (expected same constant)``.
* ``params.npz``: the weights, an uncompressed ``.npz`` keyed by the '/'-joined Flax parameter
  paths under ``params/`` (a stage-1 TiTok adds its MaskGIT-VQGAN's under ``vqgan/``). They are
  an input of every function, not constants baked into it: a TiTok-L-32 holds ~2.6 GB of
  float32, beyond the 2 GB flatbuffer limit of a serialised ``Exported``, and one copy serves
  all functions.
* ``signature.json``: per function its file, inputs and output (shapes with ``"b"``, dtypes,
  value ranges), and the model (kind, name, config, image size, token count, codebook size),
  platforms, jax version, calling convention, the weights file and its keys, and how to call.
* ``serve.py``: a copy of :mod:`titok_jax.jobs.serve_loader`, a runnable standalone consumer (jax
  + numpy only).
* with ``--saved-model``: ``saved_model/``, a TF SavedModel of the same functions through
  ``jax2tf`` (the same StableHLO in ``XlaCallModule`` ops, batch ``None``), weights as its
  variables (a second copy on disk); ``tf.saved_model.load(...).encode(images)``.

Functions (every one is ``f(params, *inputs)``; ``params`` is the dict read from ``params.npz``):

* TiTok: ``encode`` images float32 ``[b, S, S, 3]`` in [0, 1] -> VQ ids int32 ``[b, N]`` (VAE:
  the posterior mean, float32 ``[b, N, C]``: deterministic, as ``Tokenizer.encode`` without
  ``rng``); ``decode_tokens`` ids (VAE: latents) -> images float32 ``[b, S, S, 3]`` clipped to
  [0, 1], exactly what ``Tokenizer.decode_tokens`` returns (a stage-1 model decodes its proxy
  codes through the VQGAN, which needs ``vqgan_path``); ``decode_first_tokens`` the same from
  ``[b, N]`` tokens and ``num_tokens`` int32 ``[b]``: row ``i`` decodes its first
  ``num_tokens[i]`` tokens, the tail masked out in the decoder (variable-length decoding, what
  ``Tokenizer.decode_tokens`` does for ``[B, k]`` ids, here with a ``k`` per row).
* Generator: ``sample`` labels int32 ``[b]`` and a key uint32 ``[2]`` (``jax.random.PRNGKey(seed)``,
  threefry) -> ids int32 ``[b, N]``, with the generator's sampling settings baked in and recorded
  in the signature. As in :meth:`Generator.sample`, the re-masking count follows batch element 0,
  so a sample depends on its batch, not only on its label and key.
* ALIT: ``encode_<n>`` for each token count ``n`` (a multiple of ``tokens_per_iter``; all of
  them by default) and one masked ``decode_tokens`` (ids int32 ``[b, max_tokens]`` padded, and
  lengths int32 ``[b]``). Encoding is one artefact per count because the recurrence appends an
  iteration's tokens to the encoder stream: every count has its own shapes, and the model has no
  masked encoder, so a fixed-shape path would always pay all iterations and not be the Python
  API's computation; the artefacts are small (the weights are shared: for ``alit_small`` the
  eight encoders are 4.9 MB of StableHLO beside 1.05 GB of weights) and a server compiles only
  the counts it loads. Decoding is one masked program: the decoder attends to the first
  ``lengths[i]`` latents of row ``i`` (equal to decoding it alone at that length), so one compile
  serves a batch of mixed lengths, as adaptive encoding produces. Halting is the deterministic
  threshold rule (the Python default without ``rng``/``masks``).

Against the Python API on CPU (``tests/test_serving.py``, batch 1 and 3): token ids identical;
TiTok, generator and ALIT floats bitwise (the artefact, its batch refined to the call's,
compiles to the API's program; ALIT decode is one program on both sides,
:func:`titok_jax.inference.alit.decode_images`). The SavedModel runs under TensorFlow's own XLA: ids
identical, images within 3e-4.

Nothing in an artefact checks its input values: the ranges in ``signature.json`` are the
caller's contract (the Python API raises on them). A standalone consumer::

    import json, numpy as np, jax
    from jax import export
    sig = json.load(open("served/signature.json"))
    params = jax.device_put(dict(np.load("served/" + sig["weights"]["file"])))
    encode = export.deserialize(open("served/encode.jaxexport", "rb").read())
    ids = jax.jit(encode.call)(params, images)    # float32 [b, S, S, 3] in [0, 1] -> int32 [b, N]

``python -m titok_jax.cli.serve_export ...`` runs the command alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

FORMAT = "titok-jax-serving"
FORMAT_VERSION = 1
SIGNATURE_FILE = "signature.json"
WEIGHTS_FILE = "params.npz"
LOADER_FILE = "serve.py"
SUFFIX = ".jaxexport"
SAVED_MODEL_DIR = "saved_model"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """An input or output of an exported function; ``"b"`` in ``shape`` is the batch."""

    name: str
    shape: tuple
    dtype: str
    range: tuple | None = None
    note: str = ""

    def abstract(self, batch) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(batch if d == "b" else d for d in self.shape),
                                    jnp.dtype(self.dtype))

    def spec(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.range is not None:
            out["range"] = list(self.range)
        if self.note:
            out["note"] = self.note
        return out


@dataclasses.dataclass(frozen=True)
class Function:
    """``fn(params, *inputs) -> output``, traceable with a symbolic batch."""

    name: str
    fn: Callable
    inputs: tuple[Tensor, ...]
    output: Tensor
    doc: str


def _images(size: int, note: str = "") -> Tensor:
    return Tensor("images", ("b", size, size, 3), "float32", (0.0, 1.0), note)


def _ids(name: str, n: int, codebook: int, note: str = "") -> Tensor:
    return Tensor(name, ("b", n), "int32", (0, codebook - 1), note)


# ---------------------------------------------------------------------------------------------
# The functions of each model kind


def tokenizer_functions(tok) -> tuple[list[Function], dict, dict]:
    """(functions, params, model description) of a
    :class:`titok_jax.inference.tokenizer.Tokenizer`."""
    cfg, m = tok.config, tok.module
    s, n = tok.image_size, tok.num_tokens
    stage1 = m.outputs_proxy_codes
    if stage1 and tok.vqgan is None:
        raise ValueError("this is a stage-1 TiTok (it predicts MaskGIT-VQGAN codes): its "
                         "decode_tokens needs the VQGAN; pass --vqgan (vqgan_path= to "
                         "load_tokenizer)")
    params = {"params": tok.params}
    if stage1:
        params["vqgan"] = tok.vqgan.params

    def encode(p, images):
        out = m.apply({"params": p["params"]}, images, method=m.encode)
        return out.mean if tok.is_vae else out.ids

    def decode_tokens(p, tokens, num_tokens=None):
        out = m.apply({"params": p["params"]}, tokens, num_tokens, method=m.decode_tokens)
        if stage1:
            v = tok.vqgan.module
            codes = jnp.argmax(out, axis=-1).reshape(out.shape[0], -1)
            return v.apply({"params": p["vqgan"]}, codes, method=v.decode)
        return jnp.clip(out, 0.0, 1.0)

    if tok.is_vae:
        tokens = Tensor("latents", ("b", n, cfg.token_size), "float32", None,
                        "VAE latents; encode returns the posterior mean")
    else:
        tokens = _ids("ids", n, cfg.codebook_size)
    clipped = "clipped to [0, 1]" + (" by the MaskGIT-VQGAN decoder (stage 1)" if stage1 else "")
    functions = [
        Function("encode", encode, (_images(s),), tokens,
                 "images -> " + ("posterior-mean latents" if tok.is_vae else "token ids")),
        Function("decode_tokens", decode_tokens, (tokens,), _images(s, clipped),
                 ("latents" if tok.is_vae else "token ids") + " -> images"),
        Function("decode_first_tokens", decode_tokens,
                 (dataclasses.replace(tokens, note="row i is read up to num_tokens[i]"),
                  Tensor("num_tokens", ("b",), "int32", (1, n))), _images(s, clipped),
                 "the first num_tokens[i] tokens of row i -> images (the rest masked out, as "
                 "Tokenizer.decode_tokens does for [B, k] ids)"),
    ]
    model = dict(kind="titok", name=cfg.get("variant"), image_size=s, num_tokens=n,
                 codebook_size=None if tok.is_vae else cfg.codebook_size,
                 quantize_mode=cfg.quantize_mode, stage=1 if stage1 else None,
                 config=cfg.to_dict(),
                 vqgan_config=tok.vqgan.config.to_dict() if stage1 else None)
    return functions, params, model


def generator_functions(gen, settings=None) -> tuple[list[Function], dict, dict]:
    """(functions, params, model description) of a :class:`titok_jax.inference.generator.Generator`;
    ``settings`` (a ``SamplingConfig``) default to its ``sampling_defaults``."""
    cfg = (settings or gen.sampling_defaults).validate()
    sample_ids = gen.sample_fn(cfg)

    def sample(p, labels, key):
        return sample_ids(p["params"], labels, key)

    inputs = (Tensor("labels", ("b",), "int32", (0, gen.num_classes - 1)),
              Tensor("key", (2,), "uint32", None,
                     f"raw PRNG key data ({jax.config.jax_default_prng_impl}), e.g. "
                     "jax.random.PRNGKey(seed)"))
    functions = [Function("sample", sample, inputs,
                          _ids("ids", gen.num_tokens, gen.codebook_size),
                          "class labels + key -> sampled token ids (MaskGIT, settings in "
                          "model.sampling)")]
    model = dict(kind="maskgit", name=gen.config.get("variant"), num_tokens=gen.num_tokens,
                 codebook_size=gen.codebook_size, num_classes=gen.num_classes,
                 sampling=dataclasses.asdict(cfg), config=gen.config.to_dict())
    return functions, {"params": gen.params}, model


def alit_functions(alit, token_counts: Sequence[int] | None = None
                   ) -> tuple[list[Function], dict, dict]:
    """(functions, params, model description) of an :class:`titok_jax.inference.alit.ALITTokenizer`:
    ``encode_<n>`` for each of ``token_counts`` (default: every count) and ``decode_tokens``."""
    # The per-iteration pieces ALITTokenizer jits one by one, fused here into one program.
    from titok_jax.inference.alit import decode_images, start_stream, stream_codes, stream_iteration
    m, cfg = alit.module, alit.config
    step, top, s = alit.tokens_per_iter, alit.max_tokens, alit.image_size
    counts = list(range(step, top + 1, step)) if token_counts is None else list(token_counts)
    bad = [c for c in counts if c % step or not 0 < c <= top]
    if bad or not counts or len(set(counts)) != len(counts):
        raise ValueError(f"ALIT token counts must be distinct multiples of {step} in "
                         f"[{step}, {top}], got {counts}")

    def encoder(iters: int):
        def encode(p, images):
            v = {"params": p["params"]}
            x, gt_ids = m.apply(v, images, method=start_stream)
            for k in range(iters - 1):
                x, _ = m.apply(v, x, gt_ids, None, method=stream_iteration, k=k,
                               halting="threshold", last=False)
            return m.apply(v, x, method=stream_codes)
        return encode

    def decode_tokens(p, ids, lengths):
        ids = jnp.where(jnp.arange(ids.shape[1])[None] < lengths[:, None], ids, 0)
        return m.apply({"params": p["params"]}, ids, lengths, method=decode_images)

    functions = [Function(f"encode_{c}", encoder(c // step), (_images(s),),
                          _ids("ids", c, cfg.codebook_size),
                          f"images -> the first {c} token ids (threshold halting)")
                 for c in sorted(counts)]
    functions.append(Function(
        "decode_tokens", decode_tokens,
        (_ids("ids", top, cfg.codebook_size, "row i is read up to lengths[i]; the rest is "
                                              "ignored (pad with any value, e.g. -1)"),
         Tensor("lengths", ("b",), "int32", (step, top), f"multiples of {step}")),
        _images(s, "clipped to [0, 1]"), "padded token ids + per-image lengths -> images"))
    model = dict(kind="alit", name=cfg.get("variant"), image_size=s, num_tokens=top,
                 token_counts=sorted(counts), tokens_per_iter=step, codebook_size=cfg.codebook_size,
                 halting="threshold", config=cfg.to_dict())
    return functions, {"params": alit.params}, model


# ---------------------------------------------------------------------------------------------
# Writing an export


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    platforms = tuple(p.strip().lower() for p in platforms if p.strip())
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"unknown platform(s) {unknown or list(platforms)}; choose from "
                         f"{list(PLATFORMS)}")
    return tuple(dict.fromkeys(platforms))


def check_out_dir(out_dir: epath.Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty folder; not overwriting it "
                         f"(choose a new --out)")


def _write_weights(path: epath.Path, params: dict) -> dict:
    flat = {k: np.ascontiguousarray(np.asarray(v))
            for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
    with path.open("wb") as f:
        np.savez(f, **flat)
    return dict(file=path.name, format="npz, uncompressed (numpy.load); one array per "
                                       "'/'-joined parameter path",
                num_arrays=len(flat), num_values=int(sum(a.size for a in flat.values())),
                bytes=path.stat().length, keys=sorted(flat))


def _abstract_params(params: dict) -> dict:
    """The exported functions take the params flattened to ``{"a/b/c": array}`` (the layout of
    ``params.npz``), so a consumer passes ``dict(np.load(...))`` as it is."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _flat(fn: Callable) -> Callable:
    """``fn`` taking the params as ``params.npz`` holds them: ``{"a/b/c": array}``."""
    def flat_fn(flat, *inputs):
        return fn(traverse_util.unflatten_dict(flat, sep="/"), *inputs)
    return flat_fn


def _bind_params(fn: Callable, params) -> Callable:
    def call(*inputs):
        return fn(params, *inputs)
    return call


def write_saved_model(directory: str, functions: Sequence[Function], params: dict,
                      platforms: Sequence[str]) -> dict:
    """A TF SavedModel through ``jax2tf`` (native serialisation: each signature runs the same
    StableHLO in an ``XlaCallModule`` op; the batch stays symbolic). The weights become its
    variables, a second copy on disk next to ``params.npz``. Returns its signature entry."""
    import tensorflow as tf
    from jax.experimental import jax2tf
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    module = tf.Module()
    module.params = {k: tf.Variable(np.asarray(v), trainable=False, name=k.replace("/", "."))
                     for k, v in flat.items()}
    signatures = {}
    for f in functions:
        converted = jax2tf.convert(
            _flat(f.fn), with_gradient=False, native_serialization_platforms=tuple(platforms),
            polymorphic_shapes=[None, *(", ".join(map(str, t.shape)) for t in f.inputs)])
        tf_fn = tf.function(_bind_params(converted, module.params), autograph=False,
                            input_signature=[tf.TensorSpec([None if d == "b" else d
                                                            for d in t.shape], t.dtype, t.name)
                                             for t in f.inputs])
        setattr(module, f.name, tf_fn)
        signatures[f.name] = tf_fn.get_concrete_function()
    tf.saved_model.save(module, directory, signatures=signatures)
    return dict(dir=os.path.basename(directory), signatures=sorted(signatures),
                tensorflow_version=tf.__version__,
                calling="m = tf.saved_model.load(dir); m.<function>(*inputs) or "
                        "m.signatures[<function>](**inputs)")


def write_export(out_dir: str | os.PathLike, functions: Sequence[Function], params: dict,
                 model: dict, platforms: Sequence[str] = ("cpu",),
                 saved_model: bool = False) -> dict:
    """Exports ``functions`` with a symbolic batch into ``out_dir`` (see the module docstring),
    with ``saved_model`` also as a TF SavedModel in ``out_dir/saved_model``; returns the
    signature written to ``signature.json``."""
    platforms = check_platforms(platforms)
    out = epath.Path(out_dir)
    check_out_dir(out)
    abstract = _abstract_params(params)
    (batch,) = jax.export.symbolic_shape("b")
    exported = {}
    for f in functions:  # everything is lowered before anything is written
        exp = jax.export.export(jax.jit(_flat(f.fn)), platforms=platforms)(
            abstract, *(t.abstract(batch) for t in f.inputs))
        exported[f.name] = (exp, exp.serialize())
    out.mkdir(parents=True, exist_ok=True)
    signature = dict(
        format=FORMAT, format_version=FORMAT_VERSION, model=model, platforms=list(platforms),
        jax_version=jax.__version__,
        calling_convention_version=next(iter(exported.values()))[0].calling_convention_version,
        batch="'b' is a symbolic batch dimension: any b >= 1",
        calling="f = jax.export.deserialize(open(file, 'rb').read()); "
                "jax.jit(f.call)(params, *inputs) with params = dict(numpy.load(weights.file))",
        weights=_write_weights(out / WEIGHTS_FILE, params), functions={})
    for f in functions:
        path = out / f"{f.name}{SUFFIX}"
        path.write_bytes(exported[f.name][1])
        signature["functions"][f.name] = dict(
            file=path.name, bytes=len(exported[f.name][1]), doc=f.doc,
            inputs=[t.spec() for t in f.inputs], output=f.output.spec())
    if saved_model:
        signature["saved_model"] = write_saved_model(os.fspath(out / SAVED_MODEL_DIR),
                                                     functions, params, platforms)
    (out / LOADER_FILE).write_text(loader_script())
    (out / SIGNATURE_FILE).write_text(json.dumps(signature, indent=1))
    return signature


def export_tokenizer(tok, out_dir: str | os.PathLike, platforms: Sequence[str] = ("cpu",),
                     saved_model: bool = False) -> dict:
    """Writes ``encode`` and ``decode_tokens`` of a TiTok :class:`Tokenizer`; returns the
    signature."""
    return write_export(out_dir, *tokenizer_functions(tok), platforms, saved_model)


def export_generator(gen, out_dir: str | os.PathLike, platforms: Sequence[str] = ("cpu",),
                     saved_model: bool = False, settings=None) -> dict:
    """Writes ``sample`` of a MaskGIT :class:`Generator` (``settings``: a ``SamplingConfig``,
    default its ``sampling_defaults``); returns the signature."""
    return write_export(out_dir, *generator_functions(gen, settings), platforms, saved_model)


def export_alit(alit, out_dir: str | os.PathLike, platforms: Sequence[str] = ("cpu",),
                saved_model: bool = False, token_counts: Sequence[int] | None = None) -> dict:
    """Writes ``encode_<n>`` per token count and the masked ``decode_tokens`` of an
    :class:`ALITTokenizer`; returns the signature."""
    return write_export(out_dir, *alit_functions(alit, token_counts), platforms, saved_model)


def loader_script() -> str:
    """The source of :mod:`titok_jax.jobs.serve_loader`, written as ``serve.py`` next to the
    artefacts: it imports jax and numpy only, never titok-jax."""
    return (resources.files("titok_jax.jobs") / "serve_loader.py").read_text()
