"""Exact likelihoods under a STARFlow checkpoint: negative log-likelihood (NLL) in nats, bits per dimension, its split
over the flow blocks, per-token heatmaps, and zero-shot ranking of candidate captions.

    python -m scripts.likelihood --checkpoint ckpts/starflow_shapes_t2i_32x32.safetensors --inputs a.png folder/ \\
        --caption "a small red circle on the left"      # or --captions FILE: one line per input, in order
    python -m scripts.likelihood --checkpoint CKPT --inputs folder/ --candidates labels.txt   # zero-shot ranking
    python -m scripts.likelihood --checkpoint CKPT --inputs folder/ --heatmaps maps/          # where it is surprised
    python -m scripts.likelihood --checkpoint CKPT --inputs shards/shard-000000.tar ...       # WebDataset shards
    python -m scripts.likelihood --checkpoint ckpts/starflow_shapes_t2i_32x32.safetensors --shapes_eval 64
    torchrun --nproc_per_node 2 -m scripts.likelihood ...                                      # inputs split

What is scored is what the model was trained on (train.py, Step.inputs): the pixels, center-cropped and resized to
the model's size (dataset.Transform), through the VAE (its posterior mean), plus Gaussian noise of the trained
noise_std.  A normalizing flow gives the exact density of that noisy latent x: -log p(x | caption) =
D/2 log 2pi + 1/2 |z|^2 - sum of the blocks' log-determinants, z = flow(x), D = the latent dimensions (C x H x W,
x T for video).  The NLL reported is its mean over --draws noise draws, which estimates the NLL of the clean latent
convolved with the noise (an upper bound on nothing: an expectation); bits/dim = NLL / (D ln 2).  It is a density of
continuous latents in the VAE's scaled units, not a discrete likelihood of 8-bit pixels: numbers compare inputs under
one checkpoint, not checkpoints with different VAEs, nor with pixel-space bits/dim of other papers.  The same --seed
gives the same numbers, whatever the batch or the number of processes (each input's noise comes from (seed, its
index; a shard sample's from its shard and key)).  Without a caption the empty caption is used (the model's
unconditional density, trained with drop_label); a shard sample is scored under its own caption (its .txt or .json
member, as training reads it) unless --caption is given.  Shards are read one at a time, whole, into memory.

Outputs: one JSON line per input (--output, default <checkpoint stem>-likelihood.jsonl), a summary table, and with
--heatmaps one PNG per image: the input beside its per-token NLL (nats per latent token, brighter is more
surprising), upsampled onto the image.
"""
import argparse
import dataclasses
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.config import ConfigError, Parser, add_device_args
from utils.files import read_lines

LOG_2PI = math.log(2 * math.pi)
CANDIDATE_ROWS = 128  # rows of one forward pass when ranking candidate captions


def read_inputs(paths: list[Path], video: bool) -> list[Path]:
    """Files, and the image (or video) files under folders, in order; FileNotFoundError naming a missing path."""
    from dataset import VIDEO_EXTS
    from utils.files import IMAGE_EXTS

    exts, files = VIDEO_EXTS if video else IMAGE_EXTS, []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in exts and p.is_file())
            if not found:
                raise FileNotFoundError(f"--inputs {path}: no {'/'.join(exts)} files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--inputs {path}: no such file or folder")
    return files


@dataclasses.dataclass
class ShardSample:
    """One sample of a WebDataset shard: named <shard>:<key>, its media bytes and its own caption."""
    name: str
    media: bytes
    caption: str

    @property
    def stem(self) -> str:
        return self.name.replace("/", "_").replace(":", "-")


def read_shard(path: Path, video: bool) -> list[ShardSample]:
    """The samples of one .tar shard in order (the members training reads: dataset.shard_sample); ValueError (one
    line) naming the shard when it is not a readable tar file, or a sample when a member is missing."""
    import tarfile

    import webdataset as wds

    from dataset import shard_sample
    from utils.config import one_line

    samples = []
    try:
        for sample in wds.tarfile_to_samples()([{"url": str(path)}]):
            media, caption, _ = shard_sample(sample, video)
            samples.append(ShardSample(f"{path}:{sample['__key__']}", media, caption.strip()))
    except (OSError, tarfile.TarError) as err:
        raise ValueError(f"--inputs {path}: not a readable tar shard ({one_line(err)})") from None
    if not samples:
        raise ValueError(f"--inputs {path}: no samples in this shard")
    return samples


def noise_id(item) -> int:
    """Where a shard sample's noise draws come from (a file's come from its index): its shard's name and key."""
    return zlib.crc32(Path(item.name).name.encode()) & 0x7FFFFFFF


class Scorer:
    """Exact NLL of pixels under a pipeline's flow, as it was trained (see the module docstring).

    `latents(pixels, indices)` -> (draws, B, *latent shape) noisy latents; `score(latents, captions)` -> per-sample
    dict of tensors: "nll" (B,) nats, "bits_per_dim" (B,), "prior" (B,) nats (the Gaussian term), "blocks"
    (B, n_blocks) nats (-log-determinant of each flow block, blocks.0 first, the deep block last) and, with
    `tokens=True`, "tokens" (B, [T], H, W) nats per latent token.  Each is the mean over the draws.
    """

    def __init__(self, pipe, draws: int = 4, seed: int = 0):
        if draws < 1:
            raise ConfigError(f"--draws {draws}: must be at least 1")
        self.pipe, self.model, self.draws, self.seed = pipe, pipe.model, draws, seed
        self.noise_std = pipe.args.noise_std

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, indices: list[int]) -> torch.Tensor:
        mean = self.pipe.encode(pixels)
        out = []
        for k in range(self.draws):
            eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + i * 1009 + k)) for i in indices]).to(mean.device)
            out.append(mean + self.noise_std * eps)
        return torch.stack(out)

    @property
    def dims(self) -> int:
        """D, the latent dimensions of one sample (C x H x W, x T for video)."""
        pipe = self.pipe
        return pipe.prepare_latents(1, *pipe.image_size()[0], pipe.trained_frames, seed=0)[0].numel()

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor | None:
        """Text embeddings (B, txt_size, width) worded as the checkpoint was trained (None for a model without)."""
        pipe = self.pipe
        (_, _), ratio = pipe.image_size()
        _, fps, noise_std = pipe.resolve()
        return pipe.encode_prompt(captions, None, 0.0, ratio, fps, noise_std)

    @torch.no_grad()
    def score(self, latents: torch.Tensor, captions: list[str] | None = None, tokens: bool = False,
              y: torch.Tensor | None = None) -> dict:
        model = self.model
        y = self.text(captions) if captions is not None else y
        totals = {}
        for x in latents:
            z, _, _, logdets = model(x, y)
            B, D = z.size(0), z[0].numel()
            prior = 0.5 * (z.float().pow(2).flatten(1).sum(1) + D * LOG_2PI)
            blocks = torch.stack([-ld.float().reshape(B, -1).sum(1) for ld in logdets], dim=1)
            one = {"prior": prior, "blocks": blocks, "nll": prior + blocks.sum(1)}
            one["bits_per_dim"] = one["nll"] / (D * math.log(2))
            if tokens:
                one["tokens"] = self.token_map(z, logdets)
            for k, v in one.items():
                totals[k] = totals.get(k, 0) + v / len(latents)
        return totals

    def token_map(self, z: torch.Tensor, logdets: list[torch.Tensor]) -> torch.Tensor:
        """(B, [T], H, W) nats per latent token: its Gaussian term minus its log-determinants, each block's brought
        back from its own token order (per frame for frame-local blocks) to the picture's; they sum to the NLL."""
        h = self.model.patchify(z)  # (B, [T], H, W, C)
        per_token = 0.5 * (h.float().pow(2) + LOG_2PI).sum(-1)
        for block, ld in zip(self.model.blocks, logdets):
            if ld.dim() == 4:  # a frame-local block of a video model: (B, T, tokens of a frame, C)
                frames = block.from_seq(ld.float().flatten(0, 1), (ld.size(0) * ld.size(1), 1, *h.shape[2:]))
                per_token = per_token - frames.reshape(h.shape).sum(-1)
            elif ld.dim() == 3:  # (B, N, C) in the block's order
                per_token = per_token - block.from_seq(ld.float(), h.shape).sum(-1)
        return per_token


def stack_pictures(paths: list[Path], out: Path, gap: int = 8):
    """PNGs one above the other (left-aligned, `gap` white pixels between them) as one PNG."""
    from scripts.eval_shapes import read_sample
    from utils.media import save_image

    pictures = [read_sample(path) for path in paths]
    width = max(x.shape[1] for x in pictures)
    rows = [np.pad(x, ((0, gap), (0, width - x.shape[1]), (0, 0)), constant_values=255) for x in pictures]
    save_image(np.concatenate(rows)[:-gap], out)


def heatmap_png(pixels: np.ndarray, per_token: np.ndarray, path: Path, lo: float, hi: float):
    """The input beside its per-token NLL map, upsampled (nearest) to the picture, colour-mapped from lo to hi nats;
    a video's frames in a row above their maps."""
    from PIL import Image, ImageOps

    from utils.files import plain_mode

    frames = pixels if pixels.ndim == 4 else pixels[None]
    maps = per_token if per_token.ndim == 3 else per_token[None]
    H, W = frames.shape[1:3]
    heat = []
    for m in maps:
        gray = np.clip((m - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
        heat.append(ImageOps.colorize(Image.fromarray(gray).resize((W, H), Image.Resampling.NEAREST),
                                      black="#000004", mid="#b73779", white="#fcffa4"))
    if pixels.ndim == 3:  # an image: side by side
        canvas = Image.new("RGB", (2 * W + 2, H), "white")
        canvas.paste(Image.fromarray(frames[0]), (0, 0))
        canvas.paste(heat[0], (W + 2, 0))
    else:
        canvas = Image.new("RGB", (len(frames) * (W + 2) - 2, 2 * H + 2), "white")
        for t, (frame, m) in enumerate(zip(frames, heat)):
            canvas.paste(Image.fromarray(frame), (t * (W + 2), 0))
            canvas.paste(m, (t * (W + 2), H + 2))
    scale = max(1, 256 // max(H, 1))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    canvas.save(path)
    plain_mode(path)


def load_pixels(files: list, pipe, rng: np.random.Generator) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(B, [T], 3, H, W) in [-1, 1] as the model was trained (center crop and resize), and the uint8 pixels shown."""
    from dataset import Transform, decode, decode_bytes

    video = pipe.trained_frames > 1
    transform = Transform(pipe.args.img_size)
    tensors = []
    for item in files:
        if isinstance(item, ShardSample):
            pixels, _ = decode_bytes(item.media, pipe.trained_frames, pipe.trained_fps, rng, item.name)
        else:
            pixels, _ = decode(item, video, pipe.trained_frames, pipe.trained_fps, rng, where=item)
        tensors.append(transform(pixels, "1:1", rng))
    shown = [((t.permute(*range(t.dim() - 3), -2, -1, -3) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
             for t in tensors]
    return torch.stack(tensors), shown


def score_files(scorer: Scorer, files: list, indices: list[int], captions: list[str] | None,
                candidates: list[str] | None, batch: int, heatmaps: Path | None, progress: bool) -> list[dict]:
    """One record per file (a Path, or a ShardSample): its NLL and bits/dim under its caption (or the empty one),
    the split over the blocks, and with candidates each candidate's bits/dim (the same noise draws for all), best
    first.  `indices`: where each input's noise draws come from."""
    rng = np.random.default_rng(scorer.seed)
    records, maps = [], []
    bar = tqdm(total=len(files), desc="scoring", disable=not progress)
    for start in range(0, len(files), batch):
        part, idx = files[start:start + batch], indices[start:start + batch]
        pixels, shown = load_pixels(part, scorer.pipe, rng)
        x = scorer.latents(pixels, idx)
        own = captions[start:start + batch] if captions else [""] * len(part)
        result = scorer.score(x, own, tokens=heatmaps is not None)
        ranked = None
        if candidates:
            if start == 0:  # each candidate encoded once, for every batch
                texts = torch.cat([scorer.text(candidates[k:k + batch]) for k in range(0, len(candidates), batch)])
            rows, columns = len(part), []
            per_call = max(1, CANDIDATE_ROWS // rows)  # candidates scored in one forward pass
            for k in range(0, len(candidates), per_call):
                chunk = texts[k:k + per_call]
                y = torch.cat([t[None].expand(rows, *t.shape) for t in chunk])  # candidate-major rows
                repeated = x.repeat(1, len(chunk), *[1] * (x.dim() - 2))
                columns.append(scorer.score(repeated, y=y)["bits_per_dim"].view(len(chunk), rows))
            bpd = torch.cat(columns).T  # (inputs, candidates)
            ranked = [sorted(zip(candidates, row.tolist()), key=lambda cb: cb[1]) for row in bpd.cpu()]
        for j, path in enumerate(part):
            record = {"input": path.name if isinstance(path, ShardSample) else str(path), "caption": own[j], "nll_nats": round(result["nll"][j].item(), 4),
                      "bits_per_dim": round(result["bits_per_dim"][j].item(), 6),
                      "prior_nats": round(result["prior"][j].item(), 4),
                      "blocks_nats": [round(v, 4) for v in result["blocks"][j].tolist()], "draws": scorer.draws}
            if ranked is not None:
                record["candidates"] = [{"caption": c, "bits_per_dim": round(b, 6)} for c, b in ranked[j]]
                record["best"] = ranked[j][0][0]
            records.append(record)
            if heatmaps is not None:
                tokens, pixels = result["tokens"][j].cpu().numpy(), shown[j]
                if tokens.ndim == 3 and len(tokens) != len(pixels):  # latent frame t starts at frame t x temporal
                    pixels = pixels[[min(t * scorer.pipe.temporal, len(pixels) - 1) for t in range(len(tokens))]]
                maps.append((path, pixels, tokens))
        bar.update(len(part))
    bar.close()
    if maps:
        lo = min(m.min() for _, _, m in maps)
        hi = max(m.max() for _, _, m in maps)
        heatmaps.mkdir(parents=True, exist_ok=True)
        for (path, pixels, per_token), record in zip(maps, records):
            out = heatmaps / f"{path.stem}-nll.png"  # a file's stem, or <shard>-<key> of a shard sample
            heatmap_png(pixels, per_token, out, lo, hi)
            record["heatmap"] = str(out)
    return records


def summary(records: list[dict]) -> str:
    bpd = np.array([r["bits_per_dim"] for r in records])
    lines = [f"{len(records)} inputs: bits/dim mean {bpd.mean():.4f}, median {np.median(bpd):.4f}, "
             f"min {bpd.min():.4f} ({records[int(bpd.argmin())]['input']}), "
             f"max {bpd.max():.4f} ({records[int(bpd.argmax())]['input']})"]
    blocks = np.array([r["blocks_nats"] for r in records]).mean(0)
    prior = np.mean([r["prior_nats"] for r in records])
    lines.append("mean NLL split (nats): prior " + f"{prior:.1f}, " +
                 ", ".join(f"blocks.{i} {b:.1f}" for i, b in enumerate(blocks)))
    return "\n".join(lines)


def shapes_eval(scorer: Scorer, n: int, folder: Path, batch: int) -> str:
    """Acceptance figures of the issue on exact likelihoods, for a shapes image checkpoint: n in-distribution images
    (dataset.ShapesDataset at a seed training never used) against n out-of-distribution ones (uniform noise, shapes
    on black, smooth colour gradients; n/3 of each), and zero-shot colour x shape classification by likelihood: each
    of the 18 classes is scored by its marginal likelihood over the captions that name it (every size and position,
    in the strict grammar, equally likely a priori), p(x | colour, shape) = mean over them of p(x | caption)."""
    from PIL import Image

    from dataset import COLORS, POSITIONS, SHAPES, SIZES, ShapesDataset, render_shape, shape_caption

    if scorer.pipe.trained_frames > 1:
        raise ConfigError("--shapes_eval: for shapes image checkpoints")
    size, rng = scorer.pipe.args.img_size, np.random.default_rng(12345)
    data = ShapesDataset(n, img_size=size, seed=987_654)
    folder.mkdir(parents=True, exist_ok=True)
    inside, outside, truth = [], [], []
    for i in range(n):
        attrs = data.attributes(i)
        path = folder / f"in-{i:03d}.png"
        Image.fromarray(render_shape(**attrs, img_size=size)).save(path)
        inside.append(path)
        truth.append(f"a {attrs['color']} {attrs['shape']}")
        kind = ("noise", "black", "gradient")[i % 3]
        if kind == "noise":
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == "black":
            attrs = ShapesDataset(n, img_size=size, seed=13).attributes(i)
            pixels = render_shape(**attrs, img_size=size)
            pixels = np.where(pixels.min(-1, keepdims=True) > 245, 0, pixels).astype(np.uint8)
        else:
            a, b = rng.integers(0, 256, (2, 3))
            t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
            pixels = np.broadcast_to(a + (b - a) * t, (size, size, 3)).round().astype(np.uint8)
        path = folder / f"out-{kind}-{i:03d}.png"
        Image.fromarray(pixels).save(path)
        outside.append(path)
    classes = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    naming = {f"a {c} {s}": [shape_caption(c, s, size_, where) for size_ in SIZES for where in POSITIONS]
              for c in COLORS for s in SHAPES}
    labels = [caption for k in classes for caption in naming[k]]
    ins = score_files(scorer, inside, list(range(n)), None, labels, batch, None, True)
    outs = score_files(scorer, outside, list(range(n, 2 * n)), None, None, batch, None, True)
    nats = scorer.dims * math.log(2)  # bits/dim -> nats
    for r in ins:
        bpd = {c["caption"]: c["bits_per_dim"] for c in r["candidates"]}
        marginal = {k: torch.logsumexp(torch.tensor([-bpd[c] * nats for c in naming[k]], dtype=torch.float64), 0)
                    for k in classes}
        r["best"] = max(classes, key=lambda k: marginal[k].item())
    bpd_in = np.array([r["bits_per_dim"] for r in ins])
    bpd_out = np.array([r["bits_per_dim"] for r in outs])
    median_out = float(np.median(bpd_out))
    right = sum(r["best"] == t for r, t in zip(ins, truth))
    kinds = {k: np.median([r["bits_per_dim"] for r in outs if f"out-{k}-" in r["input"]])
             for k in ("noise", "black", "gradient")}
    return (f"in-distribution: {n} images, bits/dim median {np.median(bpd_in):.4f}, max {bpd_in.max():.4f}\n"
            f"out-of-distribution: {n} images, bits/dim median {median_out:.4f} (noise {kinds['noise']:.4f}, "
            f"shapes on black {kinds['black']:.4f}, gradients {kinds['gradient']:.4f}), min {bpd_out.min():.4f}\n"
            f"in-distribution images below the OOD median: {(bpd_in < median_out).sum()}/{n}\n"
            f"zero-shot colour x shape by likelihood ({len(classes)} classes, each the marginal over its "
            f"{len(labels) // len(classes)} grammar captions): "
            f"{right}/{n} = {right / n:.1%}\n"
            f"images written to {folder}")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint (ours, or an official .pth with --config)")
    p.add_argument("--config", type=Path, help="the YAML of an official .pth checkpoint")
    p.add_argument("--inputs", type=Path, nargs="*", default=[], help="image (or, for video models, .mp4) files, "
                   "folders of them, and WebDataset .tar shards (each sample under its own caption)")
    p.add_argument("--caption", help="one caption for every input (default: the empty caption, unconditional)")
    p.add_argument("--captions", type=Path, help="a file with one caption per input, in the order of --inputs")
    p.add_argument("--candidates", type=Path, help="a file of candidate captions: each input is scored under each, "
                   "and they are ranked (zero-shot classification by likelihood)")
    p.add_argument("--draws", type=int, default=4, help="noise draws averaged per input (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--batch", type=int, default=16, help="inputs per forward pass")
    p.add_argument("--heatmaps", type=Path, help="folder for one per-token NLL heatmap PNG per input (images)")
    p.add_argument("--picture", type=Path, help="with --heatmaps: one PNG of all the heatmaps, top to bottom")
    p.add_argument("--output", type=Path, help="JSON lines file (default: <checkpoint stem>-likelihood.jsonl)")
    p.add_argument("--shapes_eval", type=int, default=0, metavar="N",
                   help="shapes image checkpoints: N in-distribution vs N out-of-distribution images, and zero-shot "
                        "colour x shape classification (the issue's acceptance figures)")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.caption is not None and args.captions is not None:
        raise ConfigError("give --caption or --captions, not both")
    if not args.inputs and not args.shapes_eval:
        raise ConfigError("nothing to score: give --inputs (files or folders) or --shapes_eval N")
    if args.picture is not None and args.heatmaps is None:
        raise ConfigError("--picture stacks the heatmaps: give --heatmaps DIR too")
    for flag, value in (("--batch", args.batch), ("--draws", args.draws)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or folder")
    for path in args.inputs:  # before the slow loading
        if not path.exists():
            raise FileNotFoundError(f"--inputs {path}: no such file or folder")
    for flag, path in (("--captions", args.captions), ("--candidates", args.candidates)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")

    from utils.pipeline import STARFlowPipeline
    from utils.training import init_processes

    procs = init_processes(args.device)
    pipe = STARFlowPipeline.from_pretrained(args.checkpoint, args.config, procs.device)
    if pipe.text_encoder is None and (args.candidates or args.caption or args.captions):
        raise ConfigError(f"{args.checkpoint} has no text encoder: captions cannot be scored")
    scorer = Scorer(pipe, args.draws, args.seed)
    if args.shapes_eval:
        print(shapes_eval(scorer, args.shapes_eval, Path("outputs") / "likelihood_shapes_eval", args.batch))
        return
    video = pipe.trained_frames > 1
    shards = [p for p in args.inputs if p.suffix == ".tar"]
    files = read_inputs([p for p in args.inputs if p.suffix != ".tar"], video)
    captions = [args.caption] * len(files) if args.caption is not None else None
    if args.captions is not None:
        if shards:
            raise ConfigError("--captions FILE numbers files; shard samples have their own captions (or use --caption)")
        captions = read_lines(args.captions, "--captions")
        if len(captions) != len(files):
            raise ConfigError(f"--captions {args.captions}: {len(captions)} captions for {len(files)} inputs")
    candidates = read_lines(args.candidates, "--candidates") if args.candidates is not None else None
    mine = list(range(procs.rank, len(files), procs.world_size))  # files by index, shards whole, round robin
    records = score_files(scorer, [files[i] for i in mine], mine, [captions[i] for i in mine] if captions else None,
                          candidates, args.batch, args.heatmaps, procs.main)
    order = [(0, i, 0) for i in mine]
    for s in range(procs.rank, len(shards), procs.world_size):
        samples = read_shard(shards[s], video)
        own = [args.caption if args.caption is not None else x.caption for x in samples]
        records += score_files(scorer, samples, [noise_id(x) for x in samples], own, candidates, args.batch,
                               args.heatmaps, procs.main)
        order += [(1, s, k) for k in range(len(samples))]
    if procs.world_size > 1:
        gathered = [None] * procs.world_size
        torch.distributed.all_gather_object(gathered, list(zip(order, records)))
        records = [r for _, r in sorted((pair for part in gathered for pair in part), key=lambda ir: ir[0])]
    if not procs.main:
        return
    output = args.output or Path(f"{Path(args.checkpoint).stem}-likelihood.jsonl")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(output)
    print(summary(records))
    if candidates:
        print("best candidate per input:\n" + "\n".join(f"  {r['input']}: {r['best']}" for r in records))
    if args.picture is not None:
        stack_pictures([Path(r["heatmap"]) for r in records], args.picture)
    print(f"wrote {output}" + (f" and {len(records)} heatmaps to {args.heatmaps}" if args.heatmaps else "") +
          (f"; picture {args.picture}" if args.picture is not None else ""))


if __name__ == "__main__":
    from utils.config import run_cli

    run_cli(main)
