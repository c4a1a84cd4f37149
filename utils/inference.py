"""Self-denoising of samples.  STARFlow models the latents plus Gaussian noise of std `noise_std` (the training
augmentation), so its samples carry that noise; one Tweedie step removes it: x + sigma^2 * grad log p(x).

The score comes from the flow's own exact likelihood, or from the learnable self-denoiser (STARFlow-V), which was
trained to regress noise_std * w * grad NLL (w = noise_std / 0.3 with --cond_noise_level): the step is then
x - 0.3 * prediction, as in the official sampler.
"""
import torch

from transformer_flow import Model

DENOISER_SCALE = 0.3  # the reference noise level of the learnable denoiser's training target


def flow_score_step(model: Model, x: torch.Tensor, y: torch.Tensor | None, noise_std: float) -> torch.Tensor:
    """x - noise_std^2 * grad_x NLL(x | y), per sample, with the flow's exact likelihood (no guidance)."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        z, _, _, logdets = model(x, y)
        nll = model.get_loss(z, logdets)["loss"] * x.numel()  # mean over batch and dims -> sum of per-sample NLLs
        (grad,) = torch.autograd.grad(nll, x)
    return (x - noise_std ** 2 * grad).detach()


def context_score_step(model: Model, x: torch.Tensor, y: torch.Tensor | None, noise_std: float,
                       context: int, features: torch.Tensor | None = None) -> torch.Tensor:
    """`flow_score_step` of a video window x (B, T, C, H, W) for its frames after the first `context`, which are
    returned (B, T - context, C, H, W): the same values (to float rounding), for the cost of those frames alone plus
    a forward pass of the context without autograd (`Model.nll_given_context`; temporally causal models), which
    skips the shallow blocks when `features` (`Model.frame_features` of the context frames) are given."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.nll_given_context(x, y, context, features), x)
    return (x - noise_std ** 2 * grad)[:, context:].detach()


@torch.no_grad()
def learnable_step(model: Model, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return x - DENOISER_SCALE * model.denoise(x, y).float()


def denoise(model: Model, x: torch.Tensor, y: torch.Tensor | None, noise_std: float, learnable: bool,
            batch_size: int = 1, window: int | None = None, overlap: int | None = None,
            continued: bool | None = None) -> torch.Tensor:
    """Denoise samples x (B, ...) in mini-batches of `batch_size`.  Videos longer than `window` latent frames are
    denoised in windows that overlap by `overlap` frames, each window rewriting only its frames after the overlap (the
    official `process_denoising`), so each window's context is frames already denoised.  With the flow's score and a
    temporally causal model a window after the first pays only for its new frames (`context_score_step`: the same
    values), so that the time per frame of a long video stays near that of the trained length: the context runs
    without autograd, through the shallow blocks once per frame when they see one frame at a time
    (`Model.frame_features`), and as the autograd graph then holds the new frames alone, those windows take
    window / new-frames times `batch_size` samples at once, in no more memory than one whole window of `batch_size`.
    `continued=False` runs every window whole, as the official code does (scripts/benchmark.py times both)."""
    step = (lambda v, t: learnable_step(model, v, t)) if learnable else \
        (lambda v, t: flow_score_step(model, v, t, noise_std))
    possible = not learnable and bool(model.config.temporal_causal)
    if continued and not possible:
        raise ValueError("continued windows need the flow's score (not the learnable denoiser) and temporal_causal")
    continued = possible if continued is None else continued
    batch_size = max(1, batch_size)
    rows = lambda t, i, n: None if t is None else t[i:i + n]
    if not (x.dim() == 5 and window and window < x.size(1)):
        return torch.cat([step(x[i:i + batch_size], rows(y, i, batch_size)) for i in range(0, x.size(0), batch_size)])
    keep = min(overlap if overlap is not None else window - 1, window - 1)  # each window moves on
    group = batch_size * (window // (window - keep) if continued else 1)
    cached = continued and model.frame_local_shallow
    out = []
    for i in range(0, x.size(0), group):
        xb, yb = x[i:i + group].clone(), rows(y, i, group)
        start, written, features = 0, 0, {}  # features: frame index -> its frame_features, once final
        while written < xb.size(1):
            chunk, skip = xb[:, start:start + window], written - start  # skip: frames already denoised
            if skip and continued:
                given = None
                if cached:
                    features = {f: v for f, v in features.items() if f >= start}
                    fresh = [f for f in range(start, written) if f not in features]
                    computed = model.frame_features(xb[:, fresh[0]:fresh[-1] + 1], yb).unbind(1) if fresh else ()
                    features.update(zip(fresh, computed))
                    given = torch.stack([features[f] for f in range(start, written)], 1)
                xb[:, written:start + window] = context_score_step(model, chunk, yb, noise_std, skip, given)
            else:
                xb[:, written:start + window] = torch.cat([step(chunk[j:j + batch_size], rows(yb, j, batch_size))
                                                           [:, skip:] for j in range(0, xb.size(0), batch_size)])
            written, start = start + window, start + window - keep
        out.append(xb)
    return torch.cat(out)
