"""``titok-jax reconstruct | tokenize | export | import | sample-images``: a tokenizer (TiTok or
ALIT) on a folder of images, and its weights in and out."""
from __future__ import annotations

import json
import os

import numpy as np

from titok_jax.cli.args import (
    add_length_args,
    add_model_args,
    image_folder,
    is_alit,
    load_model,
    with_progress,
)


def _titok_tokens(tok, args) -> int | None:
    """The checked ``--tokens`` of a TiTok run (None: all N)."""
    if args.adaptive:
        raise ValueError("--adaptive is ALIT's; a TiTok takes a fixed --tokens k")
    if args.tokens is not None and not 1 <= args.tokens <= tok.num_tokens:
        raise ValueError(f"--tokens must lie in [1, {tok.num_tokens}] for this TiTok "
                         f"({tok.num_tokens} latent tokens), got {args.tokens}")
    return args.tokens


def _alit_encode(tok, batch, args, with_recon: bool = False):
    """(padded ids [B, max_tokens], lengths [B], reconstructions in [0, 1] or None) at a fixed
    or adaptive length. Adaptive selection already decoded the chosen lengths."""
    import jax
    rng = None if args.seed is None else jax.random.PRNGKey(args.seed)
    if args.adaptive:
        ids, lengths, info = tok.encode_adaptive(batch, threshold=args.threshold,
                                                 per_image=not args.per_batch, rng=rng,
                                                 return_info=True)
        return ids, lengths, np.clip(info["recon"], 0.0, 1.0)
    n = args.tokens or tok.max_tokens
    ids = np.full((batch.shape[0], tok.max_tokens), -1, np.int32)
    ids[:, :n] = np.asarray(tok.encode(batch, n, rng=rng))
    lengths = np.full((batch.shape[0],), n, np.int32)
    return ids, lengths, np.asarray(tok.decode(ids, lengths)) if with_recon else None


def cmd_reconstruct(args) -> int:
    from titok_jax.data.images import save_png, side_by_side_grid
    tok = load_model(args)
    alit = is_alit(args)
    num_tokens = None if alit else _titok_tokens(tok, args)
    folder = image_folder(args.images, tok.image_size, args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    grid_pairs, written, counts = [], 0, {}
    for item in with_progress(folder):
        paths, batch = item.paths, item.images
        if alit:
            ids, lengths, recon = _alit_encode(tok, batch, args, with_recon=True)
            counts.update({os.path.basename(p): int(n) for p, n in zip(paths, lengths)})
        else:
            recon = np.asarray(tok.reconstruct(batch, num_tokens))
        for path, original, rec in zip(paths, batch, recon):
            stem = os.path.splitext(os.path.basename(path))[0]
            save_png(rec, os.path.join(args.out, f"{stem}_recon.png"))
            written += 1
            if len(grid_pairs) < args.grid_size:
                grid_pairs.append((original, rec))
    if not written:
        raise SystemExit("error: none of the images could be read")
    grid_path = os.path.join(args.out, "grid.png")
    save_png(side_by_side_grid(grid_pairs), grid_path)
    if counts:
        with open(os.path.join(args.out, "token_counts.json"), "w") as f:
            json.dump(counts, f, indent=1)
        print(f"token counts: mean {np.mean(list(counts.values())):.1f} "
              f"(per image in {os.path.join(args.out, 'token_counts.json')})")
    print(f"wrote {written} reconstructions to {args.out} and the input|reconstruction grid "
          f"{grid_path}")
    return 0


def cmd_tokenize(args) -> int:
    tok = load_model(args)
    alit = is_alit(args)
    num_tokens = None if alit else _titok_tokens(tok, args)
    folder = image_folder(args.images, tok.image_size, args.batch_size)
    names, tokens, lengths = [], [], []
    for item in with_progress(folder):
        paths, batch = item.paths, item.images
        if alit:
            ids, n, _ = _alit_encode(tok, batch, args)
            tokens.append(ids)
            lengths.append(n)
        else:
            tokens.append(np.asarray(tok.encode(batch))[:, :num_tokens])
        names.extend(paths)
    if not names:
        raise SystemExit("error: none of the images could be read")
    tokens = np.concatenate(tokens)
    key = "latents" if not alit and tok.is_vae else "ids"
    extra = {"lengths": np.concatenate(lengths)} if alit else {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **{key: tokens}, **extra, files=np.array(names),
             model=np.array(json.dumps(tok.config.to_dict())))
    print(f"wrote {key} {tokens.shape} {tokens.dtype} for {len(names)} images to {args.out}")
    if alit:
        n = extra["lengths"]
        print(f"token counts per image (ids padded with -1 after each length): mean "
              f"{n.mean():.1f}, min {n.min()}, max {n.max()}; "
              + ", ".join(f"{os.path.basename(f)}={c}" for f, c in list(zip(names, n))[:8])
              + (" ..." if len(n) > 8 else ""))
    return 0


def cmd_export(args) -> int:
    from titok_jax.inference.tokenizer import export_pytorch
    export_pytorch(load_model(args), args.out)
    print(f"wrote official-layout PyTorch weights to {args.out}")
    return 0


def cmd_import(args) -> int:
    tok = load_model(args)
    tok.save(args.out)
    print(f"wrote titok-jax checkpoint folder {args.out}")
    return 0


def cmd_sample_images(args) -> int:
    from titok_jax.data.photos import write_sample_photos
    paths = write_sample_photos(args.out)
    print(f"wrote {len(paths)} sample photos to {args.out}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("reconstruct", help="encode+decode images; write PNGs and a grid")
    add_model_args(p)
    p.add_argument("--images", required=True, help="a directory, a file or a glob")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid-size", type=int, default=8, help="images in grid.png")
    add_length_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("tokenize", help="encode images to token ids (.npz)")
    add_model_args(p)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="output .npz (ids [N_images, N] or, with "
                                                "--tokens k, [N_images, k]; files; ALIT: "
                                                "ids padded with -1 and lengths)")
    p.add_argument("--batch-size", type=int, default=8)
    add_length_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("export", help="write official PyTorch key names as .safetensors")
    add_model_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="official weights -> titok-jax checkpoint folder")
    add_model_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("sample-images", help="write the sample photos bundled with scikit-image")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample_images)
