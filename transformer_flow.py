"""STARFlow and STARFlow-V: the deep-shallow Transformer Autoregressive Flow (arXiv 2506.06276, 2511.20462).

The model maps latents x (B, C, H, W) or videos (B, T, C, H, W) to Gaussian noise z through a stack of
autoregressive affine blocks.  Each block flattens its input into a sequence of patches (flipped on every other
block), and maps token j to z_j = (x_j - mu_j) / sigma_j, with (mu_j, sigma_j) predicted by a causal transformer
from the text prefix and x_<j.  The shallow blocks are small and unconditional (`cond_top_only`); the last, deep
block carries the text and most of the weights.  Sampling inverts the blocks in reverse order, token by token or by
block-wise Jacobi iteration, with classifier-free guidance in the deep block.  An optional non-causal "learnable
self-denoiser" head predicts the score of the noise-augmented latents.

Parameter names follow the official release, so its checkpoints load with `load_official_state_dict`.
"""
import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from misc.pe import RotaryEmbedding, apply_rope, get_positions, rope_rotation

INV_SOFTPLUS_1 = 0.541324854612918  # softplus(INV_SOFTPLUS_1) == 1: a zero output means scale 1
OFFICIAL_DEAD_BUFFERS = ("var", "attn_mask", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
# Official keyword arguments that we accept only with their inert value (the features are broken or unused there).
INERT_OPTIONS = {"use_pretrained_lm": None, "use_mm_attn": False, "noise_embed_denoiser": False}


@dataclasses.dataclass
class ModelConfig:
    """Architecture of a TransformerFlow, with the official keyword names (0/1 flags are accepted as booleans)."""
    in_channels: int
    img_size: int  # latent side (pixels / VAE factor); sets pt_seq_len by default
    patch_size: int = 1
    channels: int = 512
    num_blocks: int = 6
    layers_per_block: tuple[int, ...] = (8,)
    head_dim: int = 64
    num_heads: int | None = None
    num_kv_heads: int | None = None
    rope: bool = True
    pt_seq_len: int | None = None
    sos: bool = False
    txt_size: int = 0
    txt_dim: int = 0
    cond_top_only: bool = False
    use_softplus: bool = False
    use_swiglu: bool = False
    use_bias: bool = True
    use_qk_norm: bool = False
    use_post_norm: bool = False
    use_final_norm: bool = False
    hf_style_rope: bool = False
    norm_type: str = "layer_norm"
    use_checkpoint: int = 0  # checkpoint the attention of every k-th layer while training (0: never)
    use_checkpoint_mlp: int | None = None  # the same for MLPs; None follows use_checkpoint
    soft_clip: float = 0.0
    seq_order: str = "R2L"
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    temporal_causal: int = 0
    top_block_channels: int | None = None
    shallow_block_local: bool = False
    denoiser_window: int | None = None
    local_attn_window: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is bool:
                setattr(self, f.name, bool(value))
        layers = [self.layers_per_block] if isinstance(self.layers_per_block, int) else list(self.layers_per_block)
        if len(layers) == 1:
            layers = layers * self.num_blocks
        if len(layers) != self.num_blocks:
            raise ValueError(f"layers_per_block has {len(layers)} entries but num_blocks is {self.num_blocks}")
        self.layers_per_block = tuple(int(n) for n in layers)
        self.pt_seq_len = self.pt_seq_len or self.img_size // self.patch_size
        self.top_block_channels = self.top_block_channels or self.channels
        checks = [
            (self.rope, "rope=0 (learned position tables) is not supported: the official code cannot run it either"),
            (self.seq_order in ("R2L", "L2R"), f"seq_order must be 'R2L' or 'L2R', got {self.seq_order!r}"),
            (self.norm_type in ("layer_norm", "rms_norm", "none"), f"unknown norm_type {self.norm_type!r}"),
            (not self.local_attn_window or self.shallow_block_local, "local_attn_window requires shallow_block_local"),
            (not self.local_attn_window or self.sos, "local_attn_window requires sos"),
            (not self.shallow_block_local or self.cond_top_only, "shallow_block_local requires cond_top_only"),
            (not self.cond_top_only or self.txt_size > 0, "cond_top_only requires txt_size > 0"),
            (not self.temporal_causal or self.seq_order == "L2R", "temporal_causal requires seq_order L2R"),
            (self.layers_per_block[-1] > 0, "the deep (last) block needs at least one layer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for key, inert in INERT_OPTIONS.items():
            value = kwargs.pop(key, inert)
            if (value or None) != (inert or None):
                raise ValueError(f"model option {key}={value!r} is not supported (only {inert!r})")
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class BlockDecoding:
    """How one flow block is inverted at sampling time.

    window 1 is exact sequential decoding: one network call per token.  A larger window runs block-wise Jacobi
    iteration (the official sampler's `jacobi`): each call solves `window` tokens at once on the current guesses
    (`frame_window` after the first video frame: 4 x window unless set, as in the official sampler), and a token
    is final once its predecessor's squared change, relative to the window's mean square, fell below `threshold`,
    or after `max_iter` iterations.  Raises ValueError naming the option (and its official keyword) out of range.
    """
    window: int = 1
    threshold: float = 1e-3
    max_iter: int = 32
    frame_window: int | None = None

    def __post_init__(self):
        checks = [
            (self.window, "window (jacobi_block_size)", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            (self.threshold, "threshold (jacobi_th)", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            (self.max_iter, "max_iter (jacobi_max_iter)", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            (self.frame_window, "frame_window", lambda v: v is None or isinstance(v, int) and v >= 1,
             "an integer >= 1"),
        ]
        for value, name, ok, allowed in checks:
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"decoding option {name} must be {allowed}, got {value!r}")

    @property
    def later_window(self) -> int:
        return self.frame_window or (4 * self.window if self.window > 1 else 1)


SEQUENTIAL = BlockDecoding()
OFFICIAL_JACOBI = BlockDecoding(window=64, threshold=5e-3, max_iter=32)  # the official sample.py defaults


def default_plan(model: "Model", device_type: str | None = None) -> list[BlockDecoding]:
    """The decoding of a model that has no calibrated plan for its device type (default: where its weights are).

    CPU: 64-token Jacobi windows in the shallow blocks (on trained models they converge in a few sweeps) and 16-token
    windows in the deep block, whose tokens depend most on each other.  CUDA: one Jacobi iteration over 64 tokens
    costs about what one sequential token does (kernel launches dominate at these sizes), so 64-token windows in
    every block, the deep block at threshold 1e-4 (on an H200, batch 4, eager sweeps, the bundled models' deep blocks
    so decode 1.2x (image) and 2.2x (video) faster than at window 16 and threshold 1e-3, at a third and a ninth of the
    error; random weights, with CUDA graphs: 0.16x the official Jacobi time).
    Calibrate (`utils.decoding`) for the best plan of a model and device."""
    device_type = device_type or next(model.parameters()).device.type
    if device_type == "cuda":
        deep = BlockDecoding(window=64, threshold=1e-4)
    else:
        deep = BlockDecoding(window=16, threshold=1e-3)
    return [BlockDecoding(window=64, threshold=1e-3)] * (len(model.blocks) - 1) + [deep]


# ----------------------------------------------------------------------------------------------------------------
# Transformer layers
# ----------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma-style RMSNorm: computed in fp32, scaled by (1 + weight) with weight initialised to zero."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1 + self.weight.float())).type_as(x)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    return {"layer_norm": nn.LayerNorm, "rms_norm": RMSNorm}.get(norm_type, lambda _: nn.Identity())(dim)


class Slots(NamedTuple):
    """Cache slots of a ragged call, where every row writes its tokens at its own positions (Jacobi decoding of
    samples whose frontiers differ): index (B, L) on the model's device, end = index.max() + 1."""
    index: torch.Tensor
    end: int


class KVCache:
    """Rotated keys and values of every attention layer of one flow block, for decoding and image conditioning.

    `length` is the number of filled slots: `Transformer.run` writes its n tokens at [length, length + n) in every
    layer and moves `length` past them, or, in a ragged call, writes each row at its own `Slots` and moves `length`
    to the last slot written.  Jacobi decoding rewinds with `truncate`.
    `prefix` holds the block's (permuted) input tokens when the cache was filled by a forward pass over a context
    such as a first video frame.
    """

    def __init__(self):
        self.keys, self.values, self.length, self.prefix = [], [], 0, None
        self.capacity, self.dtype = 0, None  # slots and dtype to allocate at the first write

    def reserve(self, capacity: int, dtype: torch.dtype | None = None):
        self.capacity, self.dtype = max(self.capacity, capacity), dtype

    def __len__(self):
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: Slots | None = None):
        """Write k, v (B, heads, L, d) at the next L slots (or at `slots`); return all keys and values up to the
        last slot written."""
        end = self.length + k.size(2) if slots is None else slots.end
        if layer == len(self.keys):
            self.keys.append(k.new_empty(*k.shape[:2], 0, k.size(3), dtype=self.dtype or k.dtype))
            self.values.append(self.keys[-1].clone())
        if end > self.keys[layer].size(2):  # grow geometrically; zeros, since masked slots still meet the values
            for store in (self.keys, self.values):
                old = store[layer]
                store[layer] = old.new_zeros(*k.shape[:2], max(end, 2 * old.size(2), self.capacity), k.size(3))
                store[layer][:, :, :old.size(2)] = old
        keys, values = self.keys[layer], self.values[layer]
        if slots is None:
            keys[:, :, self.length:end] = k
            values[:, :, self.length:end] = v
        else:
            index = slots.index[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))
            keys.scatter_(2, index, k.to(keys.dtype))
            values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, :end], values[:, :, :end]

    def truncate(self, length: int):
        self.length = min(self.length, length)

    def keep_first_half(self):
        """Drop the unconditional half of a guided batch."""
        half = lambda t: t[: t.size(0) // 2]
        self.keys, self.values = [half(k) for k in self.keys], [half(v) for v in self.values]
        self.prefix = None if self.prefix is None else half(self.prefix)


class Attention(nn.Module):
    """Pre-norm multi-head attention with grouped KV heads, optional qk-norm, RoPE and a KV cache."""

    def __init__(self, channels, head_dim, num_heads, num_kv_heads, norm_type, use_qk_norm, use_post_norm, use_bias):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.norm = make_norm(norm_type, channels)
        self.qkv = nn.Linear(channels, (num_heads + 2 * num_kv_heads) * head_dim, bias=use_bias)
        self.proj = nn.Linear(num_heads * head_dim, channels, bias=use_bias)
        if use_qk_norm:
            self.query_norm, self.key_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.use_qk_norm = use_qk_norm
        self.post_norm = RMSNorm(channels) if use_post_norm else None

    def project(self, x, rope):
        """x: (B, L, C) -> q (B, heads, L, d) and k, v (B, kv_heads, L, d), normalised and rotated."""
        B, L, _ = x.shape
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(self.norm(x)).split([(H + G) * d, G * d], -1)
        qk, v = qk.view(B, L, H + G, d), v.view(B, L, G, d)
        if self.use_qk_norm:
            qk = torch.cat([self.query_norm(qk[:, :, :H]), self.key_norm(qk[:, :, H:])], dim=2)
        if rope is not None:  # q and k rotated together, by their slots
            qk = apply_rope(qk, rope)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, rope, cache=None, layer=0, causal=True, mask=None, temp=1.0, slots=None):
        """x: (B, L, C) tokens at cache slots [len(cache), len(cache) + L), or at `slots`; rope: their
        `rope_rotation`.  A causal call over a non-empty cache needs the prefix-causal `mask` (see
        `Transformer.run`)."""
        B, L, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, slots)
        q, k, v = q.to(x.dtype), k.to(x.dtype), v.to(x.dtype)
        is_causal = causal and mask is None and L > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=(self.head_dim ** -0.25) ** 2 / temp,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = self.proj(out.transpose(1, 2).reshape(B, L, -1))
        return out if self.post_norm is None else self.post_norm(out)


class MLP(nn.Module):
    """Pre-norm MLP: exact-GELU two-layer network, or a tanh-GELU gated unit with `use_swiglu`."""

    def __init__(self, channels, expansion, use_swiglu, norm_type, use_post_norm, use_bias):
        super().__init__()
        hidden = int(channels * expansion)
        self.norm = make_norm(norm_type, channels)
        self.use_swiglu = use_swiglu
        if use_swiglu:
            self.gate_proj = nn.Linear(channels, hidden, bias=use_bias)
            self.up_proj = nn.Linear(channels, hidden, bias=use_bias)
            self.down_proj = nn.Linear(hidden, channels, bias=use_bias)
        else:
            self.main = nn.Sequential(nn.Linear(channels, hidden, bias=use_bias), nn.GELU(),
                                      nn.Linear(hidden, channels, bias=use_bias))
        self.post_norm = RMSNorm(channels) if use_post_norm else None

    def forward(self, x):
        h = self.norm(x)
        if self.use_swiglu:
            h = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        else:
            h = self.main(h)
        return h if self.post_norm is None else self.post_norm(h)


class AttentionBlock(nn.Module):
    """One transformer layer: x + attention(x), then + mlp(x); both sublayers normalise their own input."""

    def __init__(self, channels, head_dim, num_heads, num_kv_heads, use_swiglu, norm_type, use_qk_norm,
                 use_post_norm, use_bias, expansion=4):
        super().__init__()
        self.attention = Attention(channels, head_dim, num_heads, num_kv_heads, norm_type, use_qk_norm, use_post_norm,
                                   use_bias)
        self.mlp = MLP(channels, expansion, use_swiglu, norm_type, use_post_norm, use_bias)

    def forward(self, x, rope, cache=None, layer=0, causal=True, mask=None, temp=1.0, ckpt_attn=False,
                ckpt_mlp=False, slots=None):
        attn = lambda h: self.attention(h, rope, cache, layer, causal, mask, temp, slots)
        x = x + (checkpoint(attn, x, use_reentrant=False) if ckpt_attn else attn(x))
        return x + (checkpoint(self.mlp, x, use_reentrant=False) if ckpt_mlp else self.mlp(x))


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean attention mask (..., L, S) -> the same mask as an additive bias (0 where allowed, -inf elsewhere).

    Built once per call for all layers: given a boolean mask, scaled_dot_product_attention converts it to a bias
    (and CUDA's memory-efficient kernel pads its rows to a multiple of 16) in every layer.  The bias is a view of
    rows already padded to a multiple of 16 elements, which the kernel reads in place."""
    S = allowed.size(-1)
    bias = torch.full((*allowed.shape[:-1], -(-S // 16) * 16), -math.inf, dtype=dtype, device=allowed.device)
    return bias[..., :S].masked_fill_(allowed, 0.0)


class Transformer(nn.Module):
    """proj_in -> [text prefix] -> layers -> final norm -> proj_out: the trunk shared by flow blocks and denoiser."""

    def __init__(self, cfg: ModelConfig, in_channels, out_channels, channels, num_layers, txt_dim, num_heads=None):
        super().__init__()
        num_heads = num_heads or cfg.num_heads or channels // cfg.head_dim
        self.proj_in = nn.Linear(in_channels, channels)
        self.proj_out = nn.Linear(channels, out_channels)
        nn.init.zeros_(self.proj_out.weight)
        self.txt_dim = txt_dim
        if txt_dim:
            self.proj_txt = nn.Linear(txt_dim, channels)
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(channels, cfg.head_dim, num_heads, cfg.num_kv_heads or num_heads, cfg.use_swiglu,
                           cfg.norm_type, cfg.use_qk_norm, cfg.use_post_norm, cfg.use_bias)
            for _ in range(num_layers))
        self.hf_style_rope = cfg.hf_style_rope
        self.final_norm = RMSNorm(channels) if cfg.use_final_norm else nn.Identity()
        every_attn, every_mlp = cfg.use_checkpoint, cfg.use_checkpoint_mlp
        every_mlp = every_attn if every_mlp is None else every_mlp
        self.ckpt = [(bool(every_attn) and (i + 1) % every_attn == 0, bool(every_mlp) and (i + 1) % every_mlp == 0)
                     for i in range(num_layers)]

    def run(self, x, y, rope, cache=None, causal=True, mask=None, temp=1.0, slots=None, kv_only=False):
        """x: (B, L, Cin) input tokens, y: (B, Ly, txt_dim) text or None, placed first; rope: (cos, sin) tables of
        every cache slot.  Returns the hidden states (B, L, C) of x and (B, Ly, C) of y, final-normed; with a cache,
        their K/V are appended to it, or, with `slots` (B, L) of cache positions on the CPU and no text, written
        there row by row, each query attending to the slots up to its own (or `Slots` already on the device, whose
        `end` is the number of cache slots read: no host synchronisation, as a CUDA graph needs).  `kv_only` (with
        a cache) only fills it: the last layer stops at its K/V, as nothing reads its outputs (a refilled context),
        and the return is None; the cache holds the same values as after a full call."""
        h = self.proj_in(x.to(self.proj_in.weight.dtype))
        n_txt = 0
        if y is not None:
            n_txt = y.size(1)
            h = torch.cat([self.proj_txt(y.to(self.proj_txt.weight.dtype)), h], dim=1)
        if slots is None:
            start = len(cache) if cache is not None else 0
            if rope is not None:
                rope = rope_rotation(rope[0][start:start + h.size(1)], rope[1][start:start + h.size(1)],
                                     self.hf_style_rope)
            if causal and mask is None and start > 0 and h.size(1) > 1:  # queries follow a cached prefix
                mask = attention_bias(torch.ones(h.size(1), start + h.size(1), dtype=torch.bool,
                                                 device=h.device).tril(diagonal=start), h.dtype)
        else:
            if not isinstance(slots, Slots):
                slots = Slots(slots.to(h.device), int(slots.max()) + 1)
            if rope is not None:  # slots past the end of the tables are padding, whose outputs are never used
                table = slots.index.clamp(max=rope[0].size(0) - 1)
                rope = rope_rotation(rope[0][table], rope[1][table], self.hf_style_rope)
            mask = attention_bias((torch.arange(slots.end, device=h.device) <= slots.index[..., None]).unsqueeze(1),
                                  h.dtype)  # (B, 1, L, end)
        if kv_only and cache is None:
            raise ValueError("kv_only fills a KV cache: pass one")
        for i, layer in enumerate(self.attn_blocks):
            if kv_only and i == len(self.attn_blocks) - 1:
                cache.update(i, *layer.attention.project(h, rope)[1:], slots)
                break
            ckpt_attn, ckpt_mlp = self.ckpt[i] if self.training else (False, False)
            h = layer(h, rope, cache, i, causal, mask, temp, ckpt_attn, ckpt_mlp, slots)
        if cache is not None:
            cache.length = max(cache.length, slots.end) if slots is not None else cache.length + h.size(1)
        if kv_only:
            return None
        h = self.final_norm(h)
        return h[:, n_txt:], h[:, :n_txt]


# ----------------------------------------------------------------------------------------------------------------
# Flow maths
# ----------------------------------------------------------------------------------------------------------------
def affine_params(out: torch.Tensor, soft_clip: float, use_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw network output (..., 2C) -> shift mu and scale sigma (..., C) in fp32."""
    if soft_clip > 0:
        out = soft_clip * torch.tanh(out / soft_clip)
    a, mu = out.float().chunk(2, dim=-1)
    sigma = F.softplus(a + INV_SOFTPLUS_1) if use_softplus else a.exp()
    return mu, sigma


def guide(mu: torch.Tensor, sigma: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance of a batch [cond; uncond]: the Gaussian (1+w) log p_cond - w log p_uncond, with the
    unconditional variance clipped so the precision stays positive.  Both halves get the guided (mu, sigma)."""
    (mu_c, mu_u), (sigma_c, sigma_u) = mu.chunk(2), sigma.chunk(2)
    s = (sigma_c / sigma_u).clip(max=1.0).square()
    d = 1 + w - w * s
    mu, sigma = ((1 + w) * mu_c - (w * s) * mu_u) / d, sigma_c / d.sqrt()
    return torch.cat([mu, mu]), torch.cat([sigma, sigma])


STATIC_SWEEP_DEVICES = ("cuda",)  # device types whose Jacobi sweeps run as fixed-shape calls (CUDA graphs)


class StaticSweep:
    """One Jacobi sweep of a fixed width over windows whose positions live on the device (`MetaBlock._decode`).

    Gathers every row's window of guesses, runs the block over it (each row writes its keys and values at its own
    cache slots and attends to all `cache.capacity` slots under its mask), updates the guesses of each sample's own
    window in place and leaves the per-token squared changes and squares that decide which tokens settle.  Nothing
    in it waits for the host, so on CUDA the first sweep of a shape runs eagerly (and sizes the KV cache for good),
    the second is captured as a CUDA graph, and every later one replays it: on an H200 one 64-token sweep of the
    bundled video model's deep block takes 6.3 ms eagerly, kernel launches dominating, and 0.70 ms replayed, with
    the same outputs.  `__call__(pos, slots, valid)` takes CPU tensors (S, W): each sample's token positions, their
    cache slots, and which are in its window; returns (change, square), (S, W) on the CPU.
    """

    def __init__(self, block: "MetaBlock", xs, noise, rope, cache: KVCache, samples: int, groups: int, width: int,
                 guidance: float, temp: float):
        self.block, self.xs, self.noise, self.rope, self.cache = block, xs, noise, rope, cache
        self.groups, self.guidance, self.temp = groups, guidance, temp
        self.pos = torch.zeros(samples, width, dtype=torch.long, device=xs.device)
        self.slots = torch.zeros_like(self.pos)
        self.valid = torch.zeros(samples, width, dtype=torch.bool, device=xs.device)
        self.stats, self.graph, self.calls = None, None, 0

    def _body(self):
        rows = lambda t: t.repeat(self.groups, 1)
        index = rows(self.pos)[..., None].expand(-1, -1, self.xs.size(-1))
        x, old, z = self.xs.gather(1, index), self.xs.gather(1, index + 1), self.noise.gather(1, index)
        slots = Slots(rows(self.slots), self.cache.capacity)
        h, _ = self.block.run(x, None, self.rope, self.cache, temp=self.temp, slots=slots)
        mu, sigma = self.block.params(h, self.guidance)
        new = mu + sigma * z
        self.xs.scatter_(1, index + 1, torch.where(rows(self.valid)[..., None], new, old))
        self.stats = MetaBlock._sweep_stats(new, old, self.groups)

    def __call__(self, pos, slots, valid):
        self.pos.copy_(pos)
        self.slots.copy_(slots)
        self.valid.copy_(valid)
        if self.xs.device.type != "cuda":
            self._body()
        elif self.calls == 0:  # eagerly, on a side stream as graph capture wants its warm-up
            side = torch.cuda.Stream(self.xs.device)
            side.wait_stream(torch.cuda.current_stream(self.xs.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.xs.device).wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._body()
            self.graph.replay()
        self.calls += 1
        change, square = self.stats.cpu()
        return change, square


class MetaBlock(Transformer):
    """One autoregressive affine flow over the (possibly flipped) token sequence.

    `flip` is None (raster order), "all" (reversed sequence) or "frame" (reversed within each video frame).
    """

    def __init__(self, cfg: ModelConfig, flip, num_layers, txt_dim, channels, num_heads=None, local_attn_window=None):
        cin = cfg.in_channels * cfg.patch_size ** 2
        super().__init__(cfg, cin, 2 * cin, channels, num_layers, txt_dim, num_heads)
        if cfg.sos:
            self.sos_embed = nn.Parameter(torch.randn(1, 1, cin))
        self.use_sos, self.use_softplus, self.soft_clip = cfg.sos, cfg.use_softplus, cfg.soft_clip
        self.flip, self.local_attn_window = flip, local_attn_window

    # (B, [T], H, W, C) <-> (B, N, C) in this block's order; every order is its own inverse.
    def to_seq(self, x):
        s = x.flatten(1, -2)
        if self.flip == "all" or (self.flip == "frame" and x.dim() == 4):
            return s.flip(1)
        if self.flip == "frame":
            return s.view(x.size(0), x.size(1), -1, x.size(-1)).flip(2).view_as(s)
        return s

    def from_seq(self, s, shape):
        return self.to_seq(s.view(s.size(0), *shape[1:])).view(s.size(0), *shape[1:])

    def _shift(self, s):
        """Network inputs for each slot: the previous token, or the SOS embedding first."""
        if not self.use_sos:
            return s
        return torch.cat([self.sos_embed.expand(s.size(0), 1, -1).to(s.dtype), s[:, :-1]], dim=1)

    def params(self, h, guidance=0.0):
        mu, sigma = affine_params(self.proj_out(h), self.soft_clip, self.use_softplus)
        return guide(mu, sigma, guidance) if guidance > 0 else (mu, sigma)

    def forward(self, x, y, rope, cache=None, guidance=0.0):
        """x: (B, [T], H, W, C) -> z of the same shape, projected text (or None), logdet (B, N, C) in sequence order."""
        s = self.to_seq(x)
        h, h_txt = self.run(self._shift(s), y if self.txt_dim else None, rope, cache)
        if cache is not None:
            cache.prefix = s
        mu, sigma = self.params(h if self.use_sos else F.pad(h, (0, 0, 1, 0))[:, :-1], guidance)
        if not self.use_sos:  # token 0 has no predecessor: identity
            mu, sigma = mu.clone(), sigma.clone()
            mu[:, 0], sigma[:, 0] = 0, 1
        z = (s.float() - mu) / sigma
        return self.from_seq(z, x.shape).to(h.dtype), (h_txt if self.txt_dim else None), -sigma.log()

    @torch.no_grad()
    def reverse(self, z, y, rope, guidance=0.0, cache=None, decoding: "BlockDecoding | None" = None,
                context_length=None, attn_temp=1.0, verbose=False, progress=None, rolling=False):
        """Invert the block: z (B, [T], H, W, C) -> x, by exact sequential decoding (the default) or by the Jacobi
        iteration that `decoding` describes (see `_decode`).  `progress(tokens, total)` is called whenever every
        sample's committed tokens advance."""
        dtype, shape = z.dtype, z.shape
        noise = self.to_seq(z.float())
        if guidance > 0:
            noise = torch.cat([noise, noise])
        x = self._decode(noise, y if self.txt_dim else None, rope, guidance, cache if cache is not None else KVCache(),
                         frame=noise.size(1) // (shape[1] if z.dim() == 5 else 1), decoding=decoding or SEQUENTIAL,
                         context_length=context_length, temp=attn_temp, verbose=verbose, progress=progress,
                         rolling=rolling)
        if guidance > 0:
            x = x[: x.size(0) // 2]
            if cache is not None:
                cache.keep_first_half()
        return self.from_seq(x, shape).to(dtype)

    def _decode(self, noise, y, rope, guidance, cache, frame, decoding, context_length, temp, verbose, progress=None,
                rolling=False):
        """Solve x from noise (B, N, C) in sequence order.

        xs[j] is the network input of slot j and xs[j + 1] the token slot j predicts (xs[0] is the SOS embedding;
        without SOS, token 0 is its own noise).  Each sample has its own frontier `start`: its slots before it are
        final and cached.  Each iteration runs every sample's window of slots [start, start + window) on the current
        guesses, then keeps that sample's leading tokens that are settled: the first one is exact, and each next one
        is kept if its predecessor moved less than `threshold` (squared change relative to the window's mean square,
        over the sample's own rows) or has been iterated max_iter times.  A sample's result thus depends on its own
        noise and text only, never on the rest of the batch.  While all frontiers agree (always, in sequential
        decoding) the windows are plain slices; otherwise every row is gathered at its own slots.  A fresh video
        token is first guessed from the previous frame.  With a local attention window, the cache is rebuilt every
        (window - context) frames from the last context frames, once every sample has reached that point (the
        official re-encoding: each window is the trained length, its context attending only within it); with
        `rolling`, the cache instead drops the frames that leave the window and keeps the others' keys and values
        as they were computed, each key re-rotated to its new slot (`_roll`): a rolling KV cache, which is
        sliding-window attention in every layer (a kept frame carries what it attended to when it was made) and
        costs no re-encoding pass.
        """
        B, N, C = noise.shape
        groups = 2 if guidance > 0 else 1  # guided rows [cond; uncond] share one state per sample
        S = B // groups
        pad = max(decoding.window, decoding.later_window)  # ragged windows may run past the end
        zeros = noise.new_zeros(B, pad, C)
        if self.use_sos:
            xs = torch.cat([self.sos_embed.float().expand(B, 1, C), noise, zeros], dim=1)
        else:
            xs, noise = torch.cat([noise, zeros], dim=1), noise[:, 1:]
        noise = torch.cat([noise, zeros], dim=1)
        n_slots = N if self.use_sos else N - 1
        n_txt = y.size(1) if y is not None else 0
        first = 0
        if cache.prefix is not None and len(cache) > n_txt:  # continue after a prefilled context
            p = cache.prefix.size(1)
            xs[:, int(self.use_sos):p + int(self.use_sos)] = cache.prefix
            first = p if self.use_sos else p - 1  # without SOS, token p is the output of cached slot p - 1
            cache.truncate(n_txt + first)
        else:
            cache.truncate(0)
            if y is not None:
                self.run(xs[:, :0], y, rope, cache, temp=temp, kv_only=True)
        window = self.local_attn_window * frame if self.local_attn_window else None
        target = min(n_slots, window) if window else n_slots
        cache.reserve(n_txt + target + pad, self.proj_in.weight.dtype)
        origin = 0  # xs index of the first image slot in the cache
        start = torch.full((S,), first)
        seen = start.clone()  # slots up to here have had a guess assigned
        computed = torch.zeros(S, n_slots + pad, dtype=torch.long)  # Jacobi iterations of each slot
        rows = lambda t: t.repeat(groups, *[1] * (t.dim() - 1))  # per-sample values -> per-row values
        bar = tqdm(total=n_slots, initial=first, disable=not verbose, desc="decoding", leave=False)
        static = xs.device.type in STATIC_SWEEP_DEVICES and not torch.is_autocast_enabled(xs.device.type)
        sweeps: dict[int, StaticSweep] = {}  # by width
        while True:
            while bool((start < target).any()):
                size = torch.where(start > frame, decoding.later_window, decoding.window)
                end = torch.clamp(start + size, max=target)
                width = int((end - start).max())
                if width > 1 and frame < n_slots:  # sequential decoding never reads a guess
                    self._guess_from_previous_frame(xs, end, seen, frame, S)
                    seen = torch.maximum(seen, end)
                if width > 1 and static:  # a fixed-shape sweep: the widest window of the batch, unclamped
                    W = int(size.max())
                    pos = start[:, None] + torch.arange(W)
                    valid = pos < end[:, None]
                    if W not in sweeps:
                        sweeps[W] = StaticSweep(self, xs, noise, rope, cache, S, groups, W, guidance, temp)
                    change, square = sweeps[W](pos, n_txt - origin + pos, valid)
                    keep = self._keep(change, square, pos, valid, computed, decoding)
                    cache.length = max(cache.length, n_txt - origin + int(pos.max()) + 1)  # as a ragged call leaves it
                else:
                    uniform = bool((start == start[0]).all())
                    if width > 1 or not uniform:  # Jacobi: each sample's slots in this call, and its own window in them
                        pos = start[:, None] + torch.arange(width)  # (S, width)
                        valid = pos < end[:, None]
                    if uniform:  # one slice for the whole batch
                        s0 = int(start[0])
                        cache.truncate(n_txt + s0 - origin)
                        h, _ = self.run(xs[:, s0:s0 + width], None, rope, cache, temp=temp)
                        old, z = xs[:, s0 + 1:s0 + 1 + width], noise[:, s0:s0 + width]
                        index = None
                    else:  # every sample at its own frontier
                        index = rows(pos).to(xs.device)[..., None].expand(-1, -1, C)
                        h, _ = self.run(xs.gather(1, index), None, rope, cache, temp=temp, slots=rows(n_txt - origin + pos))
                        old, z = xs.gather(1, index + 1), noise.gather(1, index)
                    mu, sigma = self.params(h, guidance)
                    new = mu + sigma * z
                    # sequential decoding: every token is final
                    keep = end - start if width == 1 else self._settled(new, old, pos, valid, computed, decoding, groups)
                    if index is None:
                        xs[:, s0 + 1:s0 + 1 + width] = new
                    else:
                        xs.scatter_(1, index + 1, torch.where(rows(valid).to(xs.device)[..., None], new, old))
                before = int(start.min())
                start += keep
                if int(start.min()) > before:
                    bar.update(int(start.min()) - before)
                    if progress is not None:
                        progress(min(int(start.min()), n_slots), n_slots)
            if target >= n_slots:
                break
            context = context_length * frame
            target = min(target + window - context, n_slots)
            shift, origin = int(start[0]) - context - origin, int(start[0]) - context
            if rolling:
                self._roll(cache, rope, n_txt, shift, context - 1)
                continue
            cache.truncate(n_txt)  # the text's K/V stay: it attends to itself alone, at the same slots
            self.run(torch.cat([xs[:, :1], xs[:, origin + 1:int(start[0])]], dim=1), None, rope, cache, temp=temp,
                     kv_only=True)
        bar.close()
        return xs[:, 1:N + 1] if self.use_sos else xs[:, :N]

    def _roll(self, cache: KVCache, rope, n_txt: int, shift: int, n: int):
        """Slide a rolling KV cache by `shift` slots: the last `n` image slots' keys and values move down to just
        after the SOS slot (text and SOS stay), each key turned from its old slot's RoPE rotation to its new one's,
        so that every query meets every kept key at the same relative position as before; the values are copied."""
        old = torch.arange(n_txt + 1 + shift, n_txt + 1 + shift + n)
        new = old - shift
        cos, sin = rope
        # the rotation by the angle from each old slot to its new one: cos(b - a), sin(b - a), once for all layers
        turn = rope_rotation(cos[new] * cos[old] + sin[new] * sin[old], sin[new] * cos[old] - cos[new] * sin[old],
                             self.hf_style_rope)
        for keys, values in zip(cache.keys, cache.values):
            k = keys[:, :, old].transpose(1, 2)  # (B, n, heads, head_dim), as apply_rope takes it
            keys[:, :, new] = apply_rope(k, turn).transpose(1, 2).to(keys.dtype)
            values[:, :, new] = values[:, :, old]
        cache.length = n_txt + 1 + n

    @staticmethod
    def _guess_from_previous_frame(xs, end, seen, frame, S):
        """Video: the first guess of a token entering a window is the same token of the previous frame."""
        lo = torch.clamp(seen, min=frame)
        for s in torch.nonzero(lo < end).flatten().tolist():
            for a in range(int(lo[s]) + 1, int(end[s]) + 1, frame):  # a frame at a time: windows may span several
                b = min(a + frame, int(end[s]) + 1)
                xs[s::S, a:b] = xs[s::S, a - frame:b - frame]

    @staticmethod
    def _settled(new, old, pos, valid, computed, decoding, groups):
        """How many leading tokens of each sample's window are final (at least 1, none for a finished sample).
        pos, valid: (S, width) slots of each sample in this call, and which of them are in its own window."""
        change, square = MetaBlock._sweep_stats(new, old, groups).cpu()  # one device-to-host copy per iteration
        return MetaBlock._keep(change, square, pos, valid, computed, decoding)

    @staticmethod
    def _sweep_stats(new, old, groups):
        """(2, S, width) fp32 on the device: each token's squared change and its square, averaged over its
        channels and over a sample's guided rows (new, old: (groups x S, width, C))."""
        squares = torch.stack([(new - old).square().mean(2), new.square().mean(2)])
        return squares.view(2, groups, -1, squares.size(-1)).float().mean(1)

    @staticmethod
    def _keep(change, square, pos, valid, computed, decoding):
        """`_settled` from the per-token squared changes and squares of new guesses (S, width), on the CPU."""
        scale = (square * valid).sum(1) / valid.sum(1).clamp(min=1)
        computed.scatter_add_(1, pos, valid.long())
        settled = (change[:, :-1] < decoding.threshold * scale[:, None]) | \
            (computed.gather(1, pos[:, 1:]) >= decoding.max_iter)
        keep = 1 + (settled & valid[:, 1:]).long().cumprod(1).sum(1)
        return torch.minimum(keep, valid.sum(1))


class IdentityBlock(nn.Module):
    """A shallow block with zero layers: no parameters, identity map, zero log-determinant."""
    flip, txt_dim = None, 0

    def forward(self, x, y, rope, cache=None, guidance=0.0):
        return x, None, x.new_zeros(x.size(0))

    def reverse(self, z, *args, **kwargs):
        return z


class NonCausalBlock(Transformer):
    """The learnable self-denoiser: a bidirectional transformer from noisy latents (and text) to their score.

    For video with `block_causal` A > 0, frame f attends to all text and to frames [f + A - 1 - window, f + A - 1].
    """

    def __init__(self, cfg: ModelConfig, txt_dim):
        cin = cfg.in_channels * cfg.patch_size ** 2
        super().__init__(cfg, cin, cin, cfg.channels, 8, txt_dim, cfg.num_heads)
        self.block_causal, self.window = cfg.temporal_causal, cfg.denoiser_window

    def mask(self, shape, n_txt, device):
        frame = shape[2] * shape[3]
        a, g = self.block_causal, self.window or 10000
        q = torch.arange(n_txt + shape[1] * frame, device=device)
        k = q[None, :]
        q = q[:, None]
        frame_k = torch.div(k - n_txt, frame, rounding_mode="floor")
        lo = torch.div(q - n_txt, frame, rounding_mode="floor") + a - 1 - g
        hi = torch.div((q - n_txt).relu(), frame, rounding_mode="floor") + a - 1
        return (k < n_txt) | ((frame_k >= lo) & (frame_k <= hi))

    def forward(self, x, y, rope):
        """x: (B, [T], H, W, C) -> predicted score of the same shape."""
        y = y if self.txt_dim else None
        mask = None
        if self.block_causal and x.dim() == 5:
            mask = self.mask(x.shape, y.size(1) if y is not None else 0, x.device)
        h, _ = self.run(x.flatten(1, -2), y, rope, causal=False, mask=mask)
        return self.proj_out(h).view(*x.shape)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class Model(nn.Module):
    """A deep-shallow TransformerFlow: shallow blocks 0..n-2 then the deep block n-1 (and optionally a denoiser).

    Built from the official keyword arguments (`Model(in_channels=4, img_size=32, ...)`) or a `ModelConfig`.
    """

    def __init__(self, config: ModelConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.config = config if config is not None else ModelConfig.from_kwargs(**kwargs)
        # Alternate orders, deep block included; L2R leaves the deep block in raster order.
        flips = ["frame" if cfg.temporal_causal else "all", None]
        flips = flips[::-1] if cfg.seq_order == "R2L" else flips
        blocks = [MetaBlock(cfg, flips[i % 2], n, 0 if cfg.cond_top_only else cfg.txt_dim, cfg.channels)
                  if n else IdentityBlock() for i, n in enumerate(cfg.layers_per_block[:-1])]
        top_heads = cfg.num_heads or cfg.top_block_channels // cfg.head_dim
        blocks.append(MetaBlock(cfg, flips[(cfg.num_blocks - 1) % 2], cfg.layers_per_block[-1], cfg.txt_dim,
                                cfg.top_block_channels, top_heads, cfg.local_attn_window))
        self.blocks = nn.ModuleList(blocks)
        if cfg.learnable_self_denoiser:
            self.learnable_self_denoiser = NonCausalBlock(cfg, cfg.txt_dim if cfg.conditional_denoiser else 0)
        self.rope = RotaryEmbedding(cfg.head_dim, time_axis=cfg.txt_size > 0)
        # Calibrated decoding plans by the batch size they were calibrated at (see `decoding_plan`, utils.decoding).
        self.decoding: dict[int, list[BlockDecoding]] | None = None

    # ---- shapes -------------------------------------------------------------------------------------------------
    def patchify(self, x):
        """(..., C, H, W) -> (..., H/p, W/p, p*p*C)."""
        p = self.config.patch_size
        if x.size(-1) % p or x.size(-2) % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of patch_size {p}")
        x = x.unflatten(-1, (-1, p)).unflatten(-3, (-1, p))  # (..., C, h, p1, w, p2)
        return x.movedim(-5, -1).movedim(-4, -3).flatten(-3)  # (..., h, w, p1, p2, C)

    def unpatchify(self, x):
        """(..., h, w, p*p*C) -> (..., C, h*p, w*p)."""
        p = self.config.patch_size
        x = x.unflatten(-1, (p, p, -1)).movedim(-1, -5).movedim(-2, -3)  # (..., C, h, p1, w, p2)
        return x.flatten(-2).flatten(-3, -2)

    def rope_tables(self, shape, n_txt, device):
        """cos/sin tables for a block input of patchified shape (B, [T], h, w, C) after n_txt text tokens."""
        frames = shape[1] if len(shape) == 5 else 0
        mode = "3d" if self.config.txt_size > 0 or frames else "2d"
        pos = get_positions(shape[-3], shape[-2], n_txt, self.config.pt_seq_len, frames, mode)
        return self.rope(pos.to(device))

    def _local(self, block, x):
        """Whether a shallow block sees each video frame on its own; if so, x as (B*T, 1, h, w, C)."""
        local = self.config.shallow_block_local and x.dim() == 5 and not isinstance(block, IdentityBlock)
        return local, (x.flatten(0, 1).unsqueeze(1) if local else x)

    def _text_len(self, block, y):
        return y.size(1) if y is not None and block.txt_dim else 0

    def _check_inputs(self, x, y, guidance):
        """One clear error for the usual shape mistakes: latents of the wrong rank, text missing or of the wrong batch
        (with guidance, y holds the conditional rows then the unconditional ones: twice the latent batch)."""
        if x.dim() not in (4, 5):
            raise ValueError(f"latents must be (B, C, H, W) or (B, T, C, H, W), got shape {tuple(x.shape)}")
        if self.config.txt_dim and y is None:
            raise ValueError("this model is text-conditioned (txt_dim > 0): pass the text embeddings y")
        if y is not None and y.size(0) != (2 if guidance > 0 else 1) * x.size(0):
            raise ValueError(f"text batch {y.size(0)} does not match latent batch {x.size(0)}"
                             + (" (with guidance > 0, y is [conditional; unconditional])" if guidance > 0 else ""))

    # ---- likelihood ---------------------------------------------------------------------------------------------
    def forward(self, x, y=None, guidance=0.0, kv_caches=None):
        """x: latents (B, C, H, W) or (B, T, C, H, W); y: text (B, Ly, txt_dim) or None.

        Returns (z, text hidden states of the deep block, per-block patchified outputs [input first], per-block
        log-determinants).  With guidance > 0, x is [x; x] and y is [cond; uncond] (only the deep block is guided
        when cond_top_only).  With kv_caches (one per block, deep block first) the caches are filled.
        """
        self._check_inputs(x[: x.size(0) // 2] if guidance > 0 else x, y, guidance)
        x = self.patchify(x)
        outputs, logdets, tables = [x], [], {}
        y_shallow = y.chunk(2)[0] if self.config.cond_top_only and guidance > 0 and y is not None else y
        for i, block in enumerate(self.blocks):
            deep = i == len(self.blocks) - 1
            local, h = (False, x) if deep else self._local(block, x)
            y_i = y if deep else y_shallow
            key = (h.shape, self._text_len(block, y_i))
            if key not in tables:
                tables[key] = self.rope_tables(h.shape, key[1], x.device)
            cache = kv_caches[len(self.blocks) - 1 - i] if kv_caches and not local else None
            h, y_out, logdet = block(h, y_i, tables[key], cache, guidance if deep else 0.0)
            x = h.view_as(x)
            if local:
                logdet = logdet.view(x.size(0), x.size(1), *logdet.shape[1:])
            outputs.append(x)
            logdets.append(logdet)
        return self.unpatchify(x), y_out, outputs, logdets

    def nll_given_context(self, x, y, context: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """The negative log-likelihood (nats, summed over the batch and dimensions, without the 0.5 log 2 pi
        constant) of video latents x (B, T, C, H, W) after their first `context` frames, given those frames and
        text y (B, Ly, txt_dim).  The context runs without autograd: it only fills each block's KV cache, and every
        network pass of the later frames attends to it.  In a temporally causal model (`temporal_causal`: every
        block keeps time order) no earlier frame's terms depend on a later frame, so the gradient of this with
        respect to x[:, context:] is that of the whole clip's NLL (`forward` + `get_loss`): the self-denoising
        window's new frames get their Tweedie step at the cost of those frames alone (issue "long videos").
        `features` (B, context, h, w, C): `frame_features` of the context frames, which then skip the shallow
        blocks (a sliding window computes each frame's once, not once per window that keeps it)."""
        if not self.config.temporal_causal or x.dim() != 5:
            raise ValueError("nll_given_context needs video latents (B, T, C, H, W) of a temporally causal model")
        if not 0 < context < x.size(1):
            raise ValueError(f"context {context}: between 1 and the {x.size(1) - 1} frames before the last")
        self._check_inputs(x, y, 0.0)
        x = self.patchify(x)
        past, new, total = x[:, :context].detach(), x[:, context:], 0.0
        if features is not None:
            if not self.frame_local_shallow or features.shape != past.shape:
                raise ValueError(f"features {tuple(features.shape)}: frame_features of the {context} context frames "
                                 f"{tuple(past.shape)}, of a model whose shallow blocks see one frame at a time")
            past = features
        for i, block in enumerate(self.blocks):
            deep = i == len(self.blocks) - 1
            local = not deep and self._local(block, x)[0]
            if local or isinstance(block, IdentityBlock):  # frame by frame: the context plays no part
                if features is None:
                    with torch.no_grad():
                        past = self._frames(block, past, y, local)[0]
                new, logdet = self._frames(block, new, y, local)
            else:
                past, new, logdet = self._continue(block, past, new, y, need_past=not deep)
            total = total - logdet.sum()
        return total + 0.5 * new.float().pow(2).sum()

    @property
    def frame_local_shallow(self) -> bool:
        """Whether every shallow block sees each video frame on its own (shallow_block_local, or no layers)."""
        return all(isinstance(b, IdentityBlock) or self.config.shallow_block_local for b in self.blocks[:-1])

    @torch.no_grad()
    def frame_features(self, x, y) -> torch.Tensor:
        """What the deep block reads of video latents x (B, T, C, H, W): x patchified, (B, T, h, w, C), through the
        shallow blocks, which must see one frame at a time (`frame_local_shallow`; else ValueError), so that each
        frame's features are its own.  For `nll_given_context`'s `features`."""
        if not self.frame_local_shallow or x.dim() != 5:
            raise ValueError("frame_features needs video latents of a model whose shallow blocks see one frame at "
                             "a time (shallow_block_local)")
        h = self.patchify(x)
        for block in self.blocks[:-1]:
            h = self._frames(block, h, y, self._local(block, h)[0])[0]
        return h

    def _frames(self, block, x, y, local):
        """Block `block` over frames x (B, T, h, w, C) each on its own (or, for an IdentityBlock, as they are)."""
        h = x.flatten(0, 1).unsqueeze(1) if local else x
        rope = self.rope_tables(h.shape, self._text_len(block, y), x.device)
        out, _, logdet = block(h, y, rope)
        return out.view_as(x), logdet

    def _continue(self, block, past, new, y, need_past=True):
        """A time-ordered block over frames `past` (without autograd, into a KV cache), then `new` after them:
        (past output, or None unless `need_past`, new output, new log-determinant)."""
        whole = (new.size(0), past.size(1) + new.size(1), *new.shape[2:])
        rope = self.rope_tables(whole, self._text_len(block, y), new.device)
        s_past, s_new, cache = block.to_seq(past), block.to_seq(new), KVCache()
        y = y if block.txt_dim else None
        with torch.no_grad():
            kv_only = block.use_sos and not need_past  # only the context's K/V are read
            out = block.run(block._shift(s_past), y, rope, cache, kv_only=kv_only)  # None with kv_only
            h_past, z_past = None if kv_only else out[0], None
            if need_past:
                mu, sigma = block.params(h_past if block.use_sos else F.pad(h_past, (0, 0, 1, 0))[:, :-1])
                if not block.use_sos:
                    mu[:, 0], sigma[:, 0] = 0, 1
                z_past = block.from_seq((s_past.float() - mu) / sigma, past.shape).to(h_past.dtype)
        if block.use_sos:  # each token's input is its predecessor: the first new token's is the last past one
            h = block.run(torch.cat([s_past[:, -1:], s_new[:, :-1]], 1), None, rope, cache)[0]
        else:  # each token's parameters come from its predecessor's output
            h = torch.cat([h_past[:, -1:], block.run(s_new, None, rope, cache)[0][:, :-1]], 1)
        mu, sigma = block.params(h)
        return z_past, block.from_seq((s_new.float() - mu) / sigma, new.shape).to(h.dtype), -sigma.log()

    @staticmethod
    def get_loss(z, logdets, weights=None, context=None) -> dict[str, torch.Tensor]:
        """Per-dimension negative log-likelihood in nats (without the 0.5 log 2 pi constant), averaged over the batch;
        `weights` scales each sample's loss.  `context` (B,) (videos z (B, T, ...)): sample b's first context[b]
        frames are given, not scored: its loss is the mean over its later frames, which in a temporally causal
        model is their NLL given those frames (`nll_given_context`; every term of z and of the log-determinants,
        per token in time order, belongs to one frame)."""
        if context is None:
            loss_z = 0.5 * z.float().pow(2).flatten(1).mean(1)
            loss_logdet = -sum(ld.reshape(ld.size(0), -1).mean(1) for ld in logdets)
        else:
            B, T = z.shape[:2]
            scored = (torch.arange(T, device=z.device) >= context[:, None]).float()  # (B, T)

            def per_frame(t):  # (B, T, ...) in time order -> the mean over each sample's scored frames
                return (t.float().reshape(B, T, -1).mean(2) * scored).sum(1) / scored.sum(1)
            loss_z = 0.5 * per_frame(z.pow(2))
            loss_logdet = -sum(per_frame(ld) for ld in logdets if ld.dim() > 1)  # (B,): an IdentityBlock's zeros
        loss = loss_z + loss_logdet
        if weights is not None:
            loss = loss * weights
        return {"loss": loss.mean(), "loss_z": loss_z.detach().mean(), "loss_logdet": loss_logdet.detach().mean()}

    # ---- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reverse(self, z, y=None, guidance=0.0, guide_top=None, return_sequence=False, verbose=False,
                kv_caches=None, decoding: "BlockDecoding | Sequence[BlockDecoding] | None" = None, jacobi=None,
                jacobi_block_size=None, jacobi_max_iter=None, jacobi_th=None, context_length=None, attn_temp=1.0,
                callback=None, rolling_kv_cache=False):
        """Generate latents from noise z (the shape of x).  y is text (B, Ly, D), or [cond; uncond] rows when
        guidance > 0.  How each block is inverted comes from `decoding_plan` (the calibrated plan by default;
        `jacobi=False` is exact sequential decoding).  A sample depends only on its own noise and text, never on
        its batch companions.  `kv_caches` from `prefill` continue a given first frame.  The shallow blocks are
        unguided when cond_top_only or guide_top is set.  `callback(info)` is called each time the committed tokens
        of a block advance (a Jacobi window or a sequential token settled in every sample), with info = {"block": i,
        "blocks_done": blocks finished before this one, "blocks": n, "tokens": committed, "total": tokens}.
        Videos past the deep block's local_attn_window slide it keeping `context_length` latent frames, re-encoding
        them at each slide as the official sampler does, or with `rolling_kv_cache` keeping their keys and values
        (`MetaBlock._decode`: faster, and not the official numbers)."""
        self._check_inputs(z, y, guidance)
        if self.config.local_attn_window and not context_length:
            raise ValueError("decoding with local_attn_window needs context_length")
        plan = self.decoding_plan(decoding, jacobi, jacobi_block_size, jacobi_th, jacobi_max_iter, batch=z.size(0))
        caches = kv_caches or [KVCache() for _ in self.blocks]
        seq, n = [z], len(self.blocks)
        for i in reversed(range(n)):
            y_i, guidance_i = self.block_guidance(i, y, guidance, guide_top)
            progress = None if callback is None else \
                lambda tokens, total, i=i: callback(dict(block=i, blocks_done=n - 1 - i, blocks=n, tokens=tokens,
                                                         total=total))
            seq.append(self.reverse_block(i, seq[-1], y_i, guidance_i, plan[i], caches[n - 1 - i], context_length,
                                          attn_temp, verbose, progress, rolling_kv_cache))
        return seq if return_sequence else seq[-1]

    def block_guidance(self, i, y, guidance, guide_top=None):
        """(text, guidance) with which block i decodes: the shallow blocks take the conditional rows unguided when
        cond_top_only or guide_top is set."""
        if i < len(self.blocks) - 1 and guidance > 0 and (guide_top is not None or self.config.cond_top_only):
            return y.chunk(2)[0], 0.0
        return y, guidance

    @torch.no_grad()
    def reverse_block(self, i, x, y, guidance, decoding=None, cache=None, context_length=None, attn_temp=1.0,
                      verbose=False, progress=None, rolling_kv_cache=False):
        """Invert block i alone: its output latents x (B, [T], C, H, W) -> its input latents, with the text and
        guidance it decodes with (`block_guidance`) and a BlockDecoding (sequential by default)."""
        block, h = self.blocks[i], self.patchify(x)
        local, h_i = (False, h) if i == len(self.blocks) - 1 else self._local(block, h)
        cache = KVCache() if local or cache is None else cache
        rope = self.rope_tables(h_i.shape, self._text_len(block, y), x.device)
        out = block.reverse(h_i, y, rope, guidance, cache, decoding, context_length, attn_temp, verbose, progress,
                            rolling_kv_cache)
        return self.unpatchify(out.view_as(h))

    def decoding_plan(self, decoding=None, jacobi=None, jacobi_block_size=None, jacobi_th=None,
                      jacobi_max_iter=None, batch: int = 1) -> list["BlockDecoding"]:
        """One BlockDecoding per block, blocks.0 first: `decoding` (one for all blocks, or a list); else sequential
        decoding if `jacobi` is False; else, when any of the official jacobi_* arguments is given, that Jacobi
        iteration in every block (the others at the official sampler's defaults); else the plan in `self.decoding`
        calibrated at the batch size nearest to `batch` (samples, on a log scale), when there is one; else
        `default_plan`."""
        n = len(self.blocks)
        if decoding is not None:
            plan = [decoding] * n if isinstance(decoding, BlockDecoding) else list(decoding)
            if len(plan) != n or not all(isinstance(d, BlockDecoding) for d in plan):
                raise ValueError(f"decoding: expected a BlockDecoding or a list of {n} (one per block)")
            return plan
        if jacobi is not None and not jacobi:
            return [SEQUENTIAL] * n
        given = dict(window=jacobi_block_size, threshold=jacobi_th, max_iter=jacobi_max_iter)
        if any(v is not None for v in given.values()):
            return [dataclasses.replace(OFFICIAL_JACOBI, **{k: v for k, v in given.items() if v is not None})] * n
        if self.decoding:
            nearest = min(self.decoding, key=lambda b: (abs(math.log(b / batch)), b))
            return list(self.decoding[nearest])
        return default_plan(self)

    @torch.no_grad()
    def prefill(self, x, y=None, kv_caches=None) -> list[KVCache]:
        """Fill decoding caches from given leading latents, e.g. a first frame (B, 1, C, H, W); `reverse` then
        continues after it.  With y of twice x's batch ([cond; uncond]), x is doubled for the guided deep block and
        the shallow caches keep the conditional half."""
        caches = kv_caches or [KVCache() for _ in self.blocks]
        guided = y is not None and self.config.cond_top_only and y.size(0) == 2 * x.size(0)
        self.forward(torch.cat([x, x]) if guided else x, y, kv_caches=caches)
        if guided:
            for cache in caches[1:]:
                cache.keep_first_half()
        return caches

    def denoise(self, x, y=None):
        """Run the learnable self-denoiser on noisy latents x (shape of the model input): its score estimate."""
        h = self.patchify(x)
        block = self.learnable_self_denoiser
        y = y if block.txt_dim else None
        rope = self.rope_tables(h.shape, y.size(1) if y is not None else 0, x.device)
        return self.unpatchify(block(h, y, rope))


def bits_per_dim(nll_nats: torch.Tensor | float) -> torch.Tensor | float:
    """Per-dimension NLL from `get_loss` (nats, no Gaussian constant) -> bits per latent dimension."""
    return (nll_nats + 0.5 * math.log(2 * math.pi)) / math.log(2)


def load_official_state_dict(model: Model, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Load an official STARFlow checkpoint (or one of ours) strictly, after dropping the official dead buffers.

    With `assign` the checkpoint's tensors become the model's (cast to the model's dtypes; a no-op for tensors already
    in them): a model built on the meta device is materialised without a second copy of the weights
    (load_state_dict(..., assign=True)).
    Raises ValueError listing every missing, unexpected or mis-shaped tensor; the model is unchanged in that case.
    """
    dead = lambda k: k in OFFICIAL_DEAD_BUFFERS or k.endswith(".attn_mask")
    state_dict = {k: v for k, v in state_dict.items() if not dead(k)}
    own = model.state_dict()
    problems = [f"missing: {k}" for k in own if k not in state_dict]
    problems += [f"unexpected: {k}" for k in state_dict if k not in own]
    problems += [f"shape of {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError("checkpoint does not fit the model:\n  " + "\n  ".join(shown))
    if assign:  # load_state_dict copies into the model's dtypes; assigned tensors are the model's, so cast them
        state_dict = {k: v.to(own[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
