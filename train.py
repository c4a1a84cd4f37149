"""Train a STARFlow (text-to-image) or STARFlow-V (text-to-video) model.

    python train.py --model_config_path configs/X.yaml [flags]                          # one process, CPU or GPU
    torchrun --nproc_per_node N train.py --model_config_path configs/X.yaml [--fsdp 1]  # several processes

Data comes from --dataset shapes | folder | webdataset (dataset.py).  Outputs in --logdir: checkpoints/step-<N>
(a run continues from the newest one there, or from --resume_path), model.safetensors (EMA weights and the model
configuration, for sample.py), samples/, and metrics.jsonl with one line per optimizer step.
"""
import dataclasses
import json
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import build_loader
from transformer_flow import bits_per_dim
from utils.config import (
    RUN_KEYS,
    ConfigError,
    add_data_args,
    add_device_args,
    add_model_args,
    add_optimization_args,
    add_sampling_args,
    add_training_args,
    build_parser,
    check_image_size,
    parse_config,
    run_cli,
)
from utils.hub import local_path
from utils.media import save_image, save_video
from utils.model_setup import load_weights, setup_transformer
from utils.pipeline import STARFlowPipeline
from utils.text import TextEncoder
from utils.training import (
    EMA,
    TrainState,
    check_replicate,
    export_weights,
    init_processes,
    latest_checkpoint,
    learning_rate,
    load_checkpoint,
    parallelize,
    save_checkpoint,
    shard_frozen,
    unwrap,
)
from utils.vae import setup_vae

GROUPS = (add_model_args, add_data_args, add_optimization_args, add_training_args, add_sampling_args, add_device_args)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --precision, --export_dtype


class Step:
    """One optimizer step of the official training objective over `acc` micro-batches."""

    def __init__(self, args, net, model, vae, text, optimizers, ema, procs, precision):
        self.args, self.net, self.model, self.vae, self.text = args, net, model, vae, text
        self.opt, self.opt_denoiser = optimizers
        self.ema, self.procs = ema, procs
        self.autocast = dict(device_type=procs.device.type, dtype=DTYPES[precision],
                             enabled=precision != "fp32")
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16" and args.loss_scaling)
        self.generator = torch.Generator(procs.device).manual_seed((args.train_seed or 0) * 1000 + procs.rank)
        self.flow_params = [p for n, p in model.named_parameters() if not n.startswith("learnable_self_denoiser")]

    @torch.no_grad()
    def inputs(self, x, captions, meta):
        """Pixels -> noisy latents (the flow's x) and text embeddings, as in the official training step."""
        args, device = self.args, self.procs.device
        x = x.to(device)
        latents = self.vae.encode(x) if self.vae is not None else x
        rand = lambda *shape: torch.rand(*shape, generator=self.generator, device=device)
        if args.noise_type == "gaussian":
            latents = latents + args.noise_std * torch.randn(latents.shape, generator=self.generator, device=device)
        else:  # dequantisation noise of 8-bit pixels
            latents = ((latents + 1) * 127.5 + rand(*latents.shape)) / 256 * 2 - 1
        if latents.dim() == 5 and args.drop_image > 0 and rand(1).item() < args.drop_image:
            latents, captions = latents[:, 1:], [f"(extend) {c}" for c in captions]  # learn to extend a clip
        captions = ["" if r < args.drop_label else c for c, r in zip(captions, rand(len(captions)).tolist())]
        y = None if self.text is None else \
            self.text(captions, device, aspect_ratio=meta["aspect_ratio"], fps=meta["fps"], noise_std=args.noise_std)
        return latents.requires_grad_(self.opt_denoiser is not None), y

    def micro_step(self, batch, last: bool) -> dict:
        args, acc = self.args, self.args.acc
        latents, y = self.inputs(*batch)
        context = batch[2].get("context")
        if context is not None and context.any():  # less the frames drop_image took off the front
            context = (context - (batch[0].size(1) - latents.size(1))).clamp(min=0).to(latents.device)
        else:
            context = None
        sync = nullcontext() if last or self.procs.world_size == 1 else _no_sync(self.net)
        with sync:
            with torch.autocast(**self.autocast):
                z, _, outputs, logdets = self.net(latents, y)
                out = self.model.get_loss(z, logdets, args.noise_std / 0.3 if args.cond_noise_level else None,
                                          context=context)
                loss = out["loss"]
                if args.latent_norm_regularization > 0:  # keep intermediate latents small (outputs[0] is the input)
                    loss = loss + args.latent_norm_regularization * sum(o.float().pow(2).mean() for o in outputs[:-1])
            out = {"loss": loss.detach(), "loss_z": out["loss_z"], "loss_logdet": out["loss_logdet"]}
            if self.procs.all_min(float(torch.isfinite(loss))) == 0:  # agreed before backward: no rank waits
                return {**out, "finite": 0.0}
            self.scaler.scale(loss / acc).backward()
            if self.opt_denoiser is not None:
                # The denoiser regresses the score of the noisy latents, scaled to about unit variance:
                # noise_std * d(NLL)/dx per sample (the loss is a mean over batch and dimensions).
                score = latents.grad * latents.numel() * acc * args.noise_std / self.scaler.get_scale()
                with torch.autocast(**self.autocast):
                    pred = self.net(latents.detach(), y, denoise=True) if _is_ddp(self.net) else \
                        self.model.denoise(latents.detach(), y)
                    loss_denoiser = F.mse_loss(pred.float(), score)
                self.scaler.scale(loss_denoiser / acc).backward()
                out["loss_denoiser"] = loss_denoiser.detach()
        return {**out, "finite": 1.0}

    def __call__(self, batches, step: int, warmup: int, total: int) -> dict:
        args = self.args
        lr = learning_rate(step, args.lr, args.min_lr, warmup, total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.opt_denoiser is not None:
            for group in self.opt_denoiser.param_groups:
                group["lr"] = learning_rate(step, args.denoiser_lr, 1e-6, warmup, total)
        parts = [self.micro_step(b, i == len(batches) - 1) for i, b in enumerate(batches)]
        shared = [k for k in parts[0] if all(k in p for p in parts)]  # a non-finite part stops before the denoiser
        # The global batch's mean (each rank holds an equal share), whatever the number of processes.
        metrics = self.procs.all_mean({k: sum(float(p[k]) for p in parts) / len(parts) for k in shared})
        finite = metrics.pop("finite") == 1.0  # a non-finite loss on any rank skips the step on all
        optimizers = [o for o in (self.opt, self.opt_denoiser) if o is not None]
        if finite and self.scaler.is_enabled():
            for opt in optimizers:
                self.scaler.unscale_(opt)
        norm = _grad_norm(self.flow_params, args.grad_clip) if finite else float("nan")
        spike = args.grad_skip and args.grad_clip > 0 and step > 100 and norm > args.grad_clip
        skipped = not finite or spike or not torch.isfinite(torch.tensor(norm))
        if not skipped:  # a skipped step changes no weight and no optimizer state
            for opt in optimizers:
                self.scaler.step(opt)
            if self.ema is not None:
                self.ema.update(self.model)
            self.scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return {**metrics, "bits_per_dim": bits_per_dim(metrics["loss"]), "lr": lr, "grad_norm": norm,
                "skipped": int(skipped)}


def _is_ddp(net):
    return isinstance(net, torch.nn.parallel.DistributedDataParallel)


@contextmanager
def _no_sync(net):
    """Gradient accumulation without communication until the last micro-batch (DDP or FSDP2)."""
    if _is_ddp(net):
        with net.no_sync():
            yield
        return
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def _grad_norm(params, clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@torch.no_grad()
def sample_grid(args, model, vae, text, batch, procs, step: int):
    """Samples of the pipeline (self-denoised, as sample.py makes them) for the first captions (up to 8) of a
    training batch, with the batch's aspect ratio and fps, --seed and sample indices 0..n-1, saved as a grid to
    <logdir>/samples with the captions and seed beside it.  Every rank takes part (FSDP); rank 0 writes."""
    _, captions, meta = batch
    n = min(len(captions), 8)
    pipe = STARFlowPipeline(model, text, vae, args, procs.device)
    pipe.set_progress_bar_config(disable=True)
    model.eval()
    try:
        out = pipe(captions[:n], aspect_ratio=meta["aspect_ratio"] if args.mix_aspect else None,
                   fps=int(meta["fps"][0]) or None, seed=args.seed)
    finally:
        model.train()
    if procs.main:
        stem = Path(args.logdir) / "samples" / f"step-{step:08d}"
        path = save_video(out.as_uint8(), stem.with_suffix(".mp4"), out.fps) if out.frames is not None \
            else save_image(out.as_uint8(), stem.with_suffix(".png"))
        (stem.parent / f"{stem.name}.txt").write_text(f"seed {args.seed}\n" + "\n".join(captions[:n]) + "\n")
        print(f"samples: {path}")


def build(args, procs):
    """(text encoder, VAE, model, data loader) of a run configuration; the model's input channels must be the VAE's."""
    text = TextEncoder.from_args(args, procs.device)
    if text is not None and args.fsdp and args.fsdp_text_encoder and procs.world_size > 1:
        text.encoder = shard_frozen(text.encoder, procs, args.fsdp_replicate)
    vae = setup_vae(args.vae, args.finetuned_vae, procs.device) if args.vae else None
    channels = vae.latent_channels if vae is not None else 3
    if args.channel_size != channels:
        raise ConfigError(f"--channel_size {args.channel_size} does not match the "
                          f"{'VAE' if vae else 'pixels (no --vae)'}: {channels} channels")
    factor = vae.downsample_factor if vae is not None else 1
    check_image_size(args, factor)
    model = setup_transformer(args, text.width if text else 0, factor).to(procs.device)
    if args.shapes_continuation and (not model.config.temporal_causal or args.learnable_self_denoiser
                                     or (vae is not None and vae.temporal_downsample_factor != 1)):
        raise ConfigError(f"--shapes_continuation {args.shapes_continuation} scores a clip's last frame given the "
                          "others: it needs --temporal_causal, a frame-by-frame VAE and no --learnable_self_denoiser "
                          "(whose target is the whole clip's score)")
    if args.shapes_from_to is not None and (args.dataset != "shapes" or not args.vid_size
                                            or args.shapes_phrasing != "train"):
        raise ConfigError(f"--shapes_from_to {args.shapes_from_to}: a share of the wordings of a direction, for "
                          "shapes videos (--vid_size) with --shapes_phrasing train")
    loader = build_loader(args, procs.rank, procs.world_size, factor * args.patch_size, args.num_workers)
    return text, vae, model, loader


def optimizers_of(args, model) -> tuple:
    """AdamW for the flow (and one for the learnable self-denoiser, else None), as in the official training."""
    flow = [p for n, p in model.named_parameters() if not n.startswith("learnable_self_denoiser")]
    opt = torch.optim.AdamW(flow, lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    opt_denoiser = torch.optim.AdamW(model.learnable_self_denoiser.parameters(), lr=args.denoiser_lr,
                                     weight_decay=1e-4) if args.learnable_self_denoiser else None
    return opt, opt_denoiser


def resume_source(args, model, procs) -> Path | None:
    """The checkpoint folder the run continues from: the newest in <logdir>/checkpoints, else --resume_path.  A
    weights file given as --resume_path (e.g. an official .pth) initialises a new run instead, unless one is under
    way in the logdir."""
    logdir = Path(args.logdir)
    latest = latest_checkpoint(logdir / "checkpoints")
    resume = local_path(args.resume_path) if args.resume_path else latest
    if resume is None or not resume.is_file():
        return resume
    if latest is not None:
        if procs.main:
            print(f"--resume_path {resume} only initialises a new run; {logdir} holds one under way")
        return latest
    load_weights(model, resume)
    if procs.main:
        print(f"initialised the weights from {resume}; a new run starts at step 0")
    return None


def save(args, state: TrainState, net, procs):
    """A checkpoint to continue from, and the consolidated weights for sampling."""
    logdir = Path(args.logdir)
    path = save_checkpoint(logdir / "checkpoints", state, procs, args.keep_checkpoints)
    export_weights(net, logdir / args.export_name, procs, state.ema, state.run, DTYPES[args.export_dtype])
    if procs.main:
        print(f"checkpoint: {path}; weights for sampling: {logdir / args.export_name}")


class Log:
    """Where a run's metrics go: metrics.jsonl (rank 0; appended, so a continued run continues the file), Weights &
    Biases (--wandb), one printed line every --log_every steps, and the progress bar."""

    def __init__(self, args, procs, total: int, step: int):
        self.args, self.main = args, procs.main
        logdir = Path(args.logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=1 if args.dry_run else total, initial=step, disable=not procs.main, desc="training",
                        dynamic_ncols=True)
        self.file = (logdir / "metrics.jsonl").open("a") if procs.main and not args.dry_run else None
        self.wandb = None
        if args.wandb and procs.main:
            import wandb
            self.wandb = wandb.init(project="starflow", name=args.wandb_name, config=vars(args), dir=str(logdir))

    def __call__(self, step: int, epoch: int, metrics: dict):
        self.bar.update(1)
        if self.file:
            self.file.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.main and (step % self.args.log_every == 0 or step == 1):
            self.bar.write(f"step {step} epoch {epoch} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def close(self):
        self.bar.close()  # ends the bar's line, also before an error is printed
        if self.wandb:
            self.wandb.finish()


class Stop:
    """Stopping early without losing anything: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they kill
    a job) or the --time_limit (wall-clock seconds since the start) ask the run to stop after its current step.
    Every step the ranks agree (one all-reduce), so that they all write the same checkpoint and stop together.
    `close` gives the signals back to the handlers they had (train.main called from Python, e.g. by the tests)."""

    def __init__(self, time_limit: float, procs):
        self.procs, self.limit, self.reason = procs, time_limit, None
        self.deadline = time.monotonic() + time_limit if time_limit else None
        self.previous = {sig: signal.signal(sig, self._receive) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _receive(self, signum, frame):
        self.reason = signal.Signals(signum).name

    def __call__(self) -> str | None:
        """Why the run stops now (on every rank, if any rank was asked), or None."""
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = f"--time_limit {self.limit:g} s"
        asked = self.procs.all_min(0.0 if self.reason else 1.0) == 0.0
        return (self.reason or "another rank") if asked else None


def train(args, state: TrainState, step_fn: Step, procs, total: int, warmup: int) -> str | None:
    """The training loop from state.step to `total` steps: metrics to `Log`, a sample grid every --sample_freq
    epochs, checkpoints every --save_every epochs and --save_every_steps steps and at the end.  Returns why it
    stopped early (a signal or the time limit, see `Stop`; a checkpoint was written), or None."""
    net, loader = step_fn.net, state.loader
    log, stop = Log(args, procs, total, state.step), Stop(args.time_limit, procs)
    done, start_time = state.step >= total, time.perf_counter()
    try:
        while not done and state.epoch < args.epochs:
            micro, batch = [], None
            for batch in loader:
                micro.append(batch)
                if len(micro) < args.acc:
                    continue
                metrics = step_fn(micro, state.step, warmup, total)
                micro, state.step = [], state.step + 1
                metrics["samples_per_s"] = args.batch_size / max(time.perf_counter() - start_time, 1e-9)
                start_time = time.perf_counter()
                log(state.step, state.epoch, metrics)
                done = state.step >= total or args.dry_run
                reason = None if args.dry_run else stop()
                if reason or (args.save_every_steps and state.step % args.save_every_steps == 0 and not done):
                    save(args, state, net, procs)
                if reason:
                    return reason
                if done:
                    break
            if not done:
                state.epoch += 1
                loader.set_epoch(state.epoch)
            preview = args.dry_run or (args.sample_freq and (done or state.epoch % args.sample_freq == 0))
            if preview and batch is not None:  # a continued run may start at the end of an epoch
                sample_grid(args, unwrap(net), step_fn.vae, step_fn.text, batch, procs, state.step)
            if not args.dry_run and (done or state.epoch % args.save_every == 0):
                save(args, state, net, procs)
    finally:
        log.close()
        stop.close()
    return None


def main(argv=None):
    args = parse_config(build_parser(*GROUPS, description=__doc__), argv)
    procs = init_processes(args.device)
    check_replicate(procs, args.fsdp, args.fsdp_replicate)
    precision = args.precision if args.precision != "auto" else ("bf16" if procs.device.type == "cuda" else "fp32")
    torch.manual_seed(args.train_seed or 0)  # the same initial weights on every rank
    text, vae, model, loader = build(args, procs)
    resume = resume_source(args, model, procs)
    net = parallelize(model, procs, bool(args.fsdp), precision == "bf16", args.fsdp_replicate)
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    opt, opt_denoiser = optimizers_of(args, model)
    step_fn = Step(args, net, model, vae, text, (opt, opt_denoiser), ema, procs, precision)
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
             if k not in ("model_config_path", "resume_path")}
    state = TrainState(net, [o for o in (opt, opt_denoiser) if o is not None], ema, loader, step_fn.generator,
                       procs.device, dataclasses.asdict(model.config), {k: getattr(args, k) for k in RUN_KEYS}, flags)

    steps_per_epoch = len(loader) // args.acc
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch holds {len(loader)} batches per process, fewer than --acc {args.acc}")
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else steps_per_epoch
    if resume is not None:
        load_checkpoint(resume, state, procs)
        if procs.main:
            print(f"resuming from {resume} at step {state.step} (epoch {state.epoch})")
            if state.changed:
                print("note: going on with changed settings: " +
                      ", ".join(f"{k} {then} -> {now}" for k, (then, now) in sorted(state.changed.items())))
    else:
        loader.set_epoch(0)
        if procs.main:
            print(f"starting a new run in {args.logdir} ({sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"{procs.world_size} process(es), {procs.device}, {precision})")
    stopped = train(args, state, step_fn, procs, total, warmup)
    if procs.main and stopped:
        print(f"stopped by {stopped} at step {state.step}: checkpoint in {Path(args.logdir) / 'checkpoints'}; "
              f"the same command continues the run")
    elif procs.main:
        print(f"done at step {state.step}: outputs in {args.logdir}")


if __name__ == "__main__":
    run_cli(main)
