"""STARFlowPipeline: load a checkpoint once, then captions -> images or videos in one call, following the diffusers
pipeline conventions where they fit a flow.

    from utils.pipeline import STARFlowPipeline

    pipe = STARFlowPipeline.from_pretrained("ckpts/starflow_shapes_t2i_32x32.safetensors")
    pipe("a large red circle center", seed=0).images[0].save("circle.png")

This is the one generation path of the project: sample.py, train.py's previews and scripts/benchmark.py all call
it, so that a checkpoint, caption, seed and settings give the same pixels through any of them.  Each sample depends
on its own caption, seed and index only (`prepare_latents`), never on the rest of the batch.
"""
import contextlib
import dataclasses
import math
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset import aspect_ratio_to_image_size, parse_vid_size
from transformer_flow import KVCache, Model, ModelConfig
from utils.config import ASPECT_RATIOS, SAMPLING_GROUPS, SELF_DENOISE, ConfigError, build_parser, parse_config
from utils.decoding import load_plans
from utils.files import displayed, read_image
from utils.inference import denoise
from utils.media import to_uint8
from utils.model_setup import load_weights, setup_transformer, stored_metadata, vae_downsample_factors
from utils.text import TextEncoder
from utils.vae import setup_vae

NOISE_STREAM = 1_000_003  # the noise of sample i of seed s comes from the generator seeded s * NOISE_STREAM + i


@dataclasses.dataclass
class STARFlowOutput:
    """What a pipeline call returns.

    images: an image model's samples: output_type "pil", a list of PIL images; "np", (B, H, W, 3) float in [0, 1];
        "pt", (B, 3, H, W) float in [0, 1]; "latent", the latents the VAE would decode (B, C, h, w).  None for video.
    frames: a video model's samples: "pil", a list of videos, each a list of PIL frames; "np", (B, T, H, W, 3);
        "pt", (B, T, 3, H, W); "latent", (B, T', C, h, w).  None for images.
    latents: what the flow generated (B, [T'], C, h, w), before self-denoising and decoding.
    fps: the frame rate of the videos (prompt wording and files); seed: the seed of the noise (drawn at random
        when the call gave neither seed, generator nor latents), None otherwise.
    kv_cache_bytes: what the deep flow block's KV cache holds at the end of sampling (bounded by the sliding
        window for long videos).
    """
    images: Any = None
    frames: Any = None
    latents: torch.Tensor | None = None
    fps: int | None = None
    seed: int | None = None
    kv_cache_bytes: int | None = None

    def as_uint8(self) -> np.ndarray:
        """The samples of a "pil" output as one array: (B, H, W, 3), or (B, T, H, W, 3) for videos, uint8."""
        if self.frames is not None:
            return np.stack([np.stack([np.asarray(frame) for frame in video]) for video in self.frames])
        return np.stack([np.asarray(image) for image in self.images])


def load_first_frame(image, size: tuple[int, int]) -> torch.Tensor:
    """A picture (path, PIL image or (H, W, 3) uint8 array) -> (3, h, w) in [-1, 1]: as a viewer shows it
    (utils.files.read_image, as the training data), scaled to cover (h, w), then center-cropped."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"--input_image {image}: no such file")
        image = Image.fromarray(read_image(image, f"--input_image {image}"))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = displayed(image)
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    pixels = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def load_mask(mask, size: tuple[int, int]) -> torch.Tensor:
    """An inpainting mask -> (h, w) bool, True = regenerate: a (h, w) array at the model's size (nonzero = True),
    or a picture (path, PIL image or (H, W, 3) uint8 array) whose bright pixels are regenerated, center-cropped and
    resized like the picture it masks (load_first_frame).  Raises FileNotFoundError for a missing file,
    ConfigError for a 2-D array of another size."""
    if isinstance(mask, (str, Path)) and not Path(mask).is_file():
        raise FileNotFoundError(f"--mask {mask}: no such file")
    if isinstance(mask, (np.ndarray, torch.Tensor)) and mask.ndim == 2:
        if tuple(mask.shape) != tuple(size):
            raise ConfigError(f"a mask of {tuple(mask.shape)} pixels for pictures of {tuple(size)}")
        return torch.as_tensor(np.asarray(mask)).bool()
    return load_first_frame(mask, size).mean(0) > 0


def flags_to_argv(options: dict) -> list[str]:
    """{"text": "x", "mix_aspect": True, "vid_size": "5:8"} -> sample.py flags (None values left out)."""
    argv = []
    for key, value in options.items():
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key}", *(str(int(v)) if isinstance(v, bool) else str(v) for v in values)]
    return argv


class STARFlowPipeline:
    """A STARFlow / STARFlow-V checkpoint with its text encoder and VAE, loaded once.

    `args` holds the sample.py settings the components were loaded with (the checkpoint's stored input flags, then
    the YAML, then the options given): they are the defaults of every call.
    """

    def __init__(self, model: Model, text_encoder: TextEncoder | None, vae, args, device=None):
        self.model, self.text_encoder, self.vae, self.args = model, text_encoder, vae, args
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if vae is not None:
            self.factor, self.temporal = vae.downsample_factor, vae.temporal_downsample_factor
        else:
            self.factor, self.temporal = vae_downsample_factors(args.vae) if args.vae else (1, 1)
        self.trained_frames, self.trained_fps = parse_vid_size(args.vid_size)
        self.progress_bar_config: dict = {}
        self.offload = self.vae_slicing = False
        self.dtype: torch.dtype | None = None  # compute dtype of the flow (autocast); None: fp32

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, config=None, device=None, dtype: torch.dtype | None = None,
                        **options) -> "STARFlowPipeline":
        """Load an exported `.safetensors`, a training checkpoint folder, or an official `.pth` with its YAML
        (`config=`).  `options` are sample.py flags by name (`text=`, `vae=`, `finetuned_vae=`, `cfg=`, ...),
        overriding what the checkpoint stores; `device` defaults to CUDA when available; `dtype` (torch.bfloat16 or
        torch.float16) loads the text encoder and VAE in that precision and runs the flow under autocast in it (its
        weights and the decoded latents stay fp32).  Raises FileNotFoundError or ConfigError (one line)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
        parser = build_parser(*SAMPLING_GROUPS)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)} (the names of sample.py's flags)")
        argv = flags_to_argv({"checkpoint_path": path, "model_config_path": config, **options})
        args = parse_config(parser, argv, stored_metadata(path), str(path))
        return cls.from_args(args, device, dtype)

    @classmethod
    def from_args(cls, args, device=None, dtype: torch.dtype | None = None,
                  with_vae: bool = True) -> "STARFlowPipeline":
        """Load from parsed sample.py settings (utils.config.SAMPLING_GROUPS): the model with its weights and
        decoding plans for this device type, the text encoder and (with `with_vae`) the VAE."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = Path(args.checkpoint_path)
        stored = stored_metadata(path)
        encoder_dtype = dtype or torch.float32
        text = TextEncoder.from_args(args, device, encoder_dtype)
        vae = setup_vae(args.vae, args.finetuned_vae, device, encoder_dtype) if args.vae and with_vae else None
        if "config" in stored:  # built on the meta device: the checkpoint's tensors become the weights
            with torch.device("meta"):
                model = Model(ModelConfig(**stored["config"]))
        elif args.model_config_path is not None:
            factor = vae.downsample_factor if vae else None if args.vae else 1
            with torch.device("meta"):
                model = setup_transformer(args, text.width if text else 0, factor)
        else:
            raise ConfigError(f"--checkpoint_path {path} stores no model configuration (an official checkpoint?): "
                              f"pass its --model_config_path")
        width = text.width if text else 0
        if model.config.txt_dim != width:
            raise ConfigError(f"the model reads text of width {model.config.txt_dim}, the encoder "
                              f"{args.text or '(none)'} gives {width}")
        load_weights(model, path)
        model.decoding = load_plans(path, device.type, len(model.blocks))
        pipe = cls(model.to(device).eval(), text, vae, args, device)
        pipe.dtype = dtype
        return pipe

    # ---- options ----------------------------------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs):
        """tqdm options of the progress bar of each call (e.g. disable=True, desc=...), as in diffusers."""
        self.progress_bar_config = kwargs

    def enable_model_cpu_offload(self):
        """Keep the text encoder and the VAE on the CPU, moving each to the device only while it runs (the flow
        stays on the device): less device memory, some time per call."""
        self.offload = True
        for module in self._offloadable():
            module.to("cpu")

    def enable_vae_slicing(self):
        """Decode one sample at a time (less memory for large batches and long videos)."""
        self.vae_slicing = True

    def _offloadable(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder.encoder if self.text_encoder else None, self.vae) if m is not None]

    @contextlib.contextmanager
    def _on_device(self, module):
        if self.offload and module is not None:
            module.to(self.device)
        try:
            yield
        finally:
            if self.offload and module is not None:
                module.to("cpu")

    def _autocast(self):
        """The flow's compute precision: autocast in `self.dtype`, or fp32."""
        return torch.autocast(self.device.type, self.dtype) if self.dtype else contextlib.nullcontext()

    # ---- pieces of a call -------------------------------------------------------------------------------------
    def image_size(self, height=None, width=None, aspect_ratio=None) -> tuple[tuple[int, int], str | None]:
        """((h, w) in pixels, aspect ratio for the prompt wording or None) from an aspect ratio or a size; a
        model trained on square images (without mix_aspect) makes squares only.  Raises ConfigError."""
        args, multiple = self.args, self.factor * self.model.config.patch_size
        ratios = ASPECT_RATIOS if args.mix_aspect else ["1:1"]
        if height is not None or width is not None:
            sizes = {aspect_ratio_to_image_size(args.img_size, r, multiple): r for r in ratios}
            found = sizes.get((height, width))
            if found is None:
                listed = ", ".join(f"{h}x{w}" for h, w in sizes)
                raise ConfigError(f"height {height} x width {width}: this model makes {listed} (height x width)")
            aspect_ratio = found
        ratio = aspect_ratio or (args.aspect_ratio if args.mix_aspect else None)
        if ratio not in (None, *ratios):
            raise ConfigError(f"aspect ratio {ratio}: this model makes {', '.join(ratios)}" +
                              ("" if args.mix_aspect else " (trained on square images only, without --mix_aspect)"))
        return aspect_ratio_to_image_size(args.img_size, ratio, multiple), ratio if args.mix_aspect else None

    def video_length(self, num_frames=None, context_length=None) -> tuple[int, int | None]:
        """(frames, context in latent frames or None): more frames than trained decode with a sliding window of
        the trained length that keeps `context_length` latent frames (default: all but one).  Raises ConfigError."""
        frames, temporal = self.trained_frames, self.temporal
        local = self.model.config.local_attn_window
        if num_frames is None:
            window = local
        else:
            if frames == 1:
                raise ConfigError("--target_length needs a video model (--vid_size)")
            if (num_frames - 1) % temporal:
                nearest = (num_frames - 1) // temporal * temporal + 1
                raise ConfigError(f"--target_length {num_frames}: the VAE makes 1 + {temporal}k frames (its "
                                  f"{temporal}x temporal downsampling); the nearest are {nearest} and "
                                  f"{nearest + temporal}")
            window = (frames - 1) // temporal + 1
        if window and context_length is not None and context_length >= window:
            raise ConfigError(f"--context_length must be below the trained length of {window} latent frames, "
                              f"got {context_length}")
        context = (context_length or window - 1) if window else None
        return (num_frames or frames), context

    def resolve(self, guidance_scale: float | None = None, fps: int | None = None,
                noise_std: float | None = None) -> tuple[float, int, float]:
        """(guidance scale, fps, noise level) of a call: the given values, else the loaded settings (--cfg, 0 without
        a text encoder; --out_fps, else the trained fps, else 8; --target_noise_std, else the trained --noise_std)."""
        args = self.args
        guidance = (args.cfg if guidance_scale is None else guidance_scale) if self.text_encoder else 0.0
        fps = fps or args.out_fps or self.trained_fps or 8
        noise_std = noise_std if noise_std is not None else \
            args.target_noise_std if args.target_noise_std is not None else args.noise_std
        return guidance, fps, noise_std

    def prepare_latents(self, batch_size: int, height: int, width: int, num_frames: int = 1, seed: int | None = None,
                        indices: list[int] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The flow's Gaussian z (B, [T'], C, h, w) on the device: sample j from the generator seeded
        seed * 1_000_003 + indices[j] (indices default to 0..B-1), so a sample does not depend on its batch; or all
        from `generator` (diffusers style: then it does)."""
        c, f = self.model.config.in_channels, self.factor
        latent_frames = (num_frames - 1) // self.temporal + 1 if num_frames > 1 else 1
        shape = (c, height // f, width // f) if num_frames == 1 else (latent_frames, c, height // f, width // f)
        if generator is not None:
            return torch.randn((batch_size, *shape), generator=generator, device=generator.device).to(self.device)
        indices = list(range(batch_size)) if indices is None else list(indices)
        if len(indices) != batch_size:
            raise ValueError(f"{len(indices)} indices for {batch_size} samples")
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * NOISE_STREAM + i))
                            for i in indices]).to(self.device)

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None, guidance_scale: float,
                      aspect_ratio: str | None, fps: int, noise_std: float) -> torch.Tensor | None:
        """(B or 2B, txt_size, width) text embeddings worded as the checkpoint was trained: the prompts' rows, then,
        with guidance, the negative prompts' rows (empty captions by default)."""
        if self.text_encoder is None:
            return None
        unconditional = (negative_prompts or True) if guidance_scale > 0 else False
        with self._on_device(self.text_encoder.encoder):
            return self.text_encoder(prompts, self.device, aspect_ratio=aspect_ratio, fps=fps, noise_std=noise_std,
                                     unconditional=unconditional)

    @torch.no_grad()
    def invert(self, images, prompt: "str | list[str]", height: int | None = None, width: int | None = None,
               aspect_ratio: str | None = None) -> torch.Tensor:
        """The flow's Gaussian z of real images: each picture (path, PIL image or uint8 array; one or a list),
        center-cropped to the model's size, through the VAE (its posterior mean: no noise, so the inverse is exact)
        and the flow's forward pass under its `prompt` (one for all, or one per image; unguided).

        Image models: (B, C, h, w).  Video models: the picture as a video's first frame, (B, 1, C, h, w); its z
        depends on that frame alone (the deep block is causal in time and the shallow blocks see one frame), so it
        is the first latent frame of any video that starts with the picture.  `pipe(prompt, latents=z,
        guidance_scale=0, self_denoise=False)` gives the images back up to the VAE; another prompt edits them,
        keeping what it does not change (training-free editing, as the STARFlow paper shows; see `edit`).
        Raises ConfigError (one line) for a prompt count that does not match, FileNotFoundError for a missing
        file."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ConfigError(f"{len(prompts)} prompts for {len(images)} images")
        (h, w), ratio = self.image_size(height, width, aspect_ratio)
        latents = self.encode(torch.stack([load_first_frame(image, (h, w)) for image in images]))
        if self.trained_frames > 1:
            latents = latents[:, None]
        _, fps, noise_std = self.resolve(0.0)
        y = self.encode_prompt(prompts, None, 0.0, ratio, fps, noise_std)
        with self._autocast():
            z, _, _, _ = self.model(latents, y)
        return z.float()

    @torch.no_grad()
    def edit(self, image, source_prompt: "str | list[str]", prompt: "str | list[str]", strength: float = 0.0,
             guidance_scale: float = 0.0, mask=None, seed: int = 0, indices: list[int] | None = None,
             num_frames: int | None = None, paste: bool = True, output_type: str = "pil") -> STARFlowOutput:
        """Training-free editing and inpainting of real pictures (the STARFlow paper's editing; the paper shows it,
        the official release has no code for it): each picture is inverted under its `source_prompt` (`invert`),
        fresh noise is mixed into z, sqrt(1 - strength^2) z + strength eps, and z is decoded under its `prompt`
        (each one for all pictures or one per picture) with `guidance_scale` (0: none).  strength 0 keeps the most
        of the picture, 1 is a new sample of the prompt.

        `mask` (inpainting; a path, PIL image, (H, W) array, or one per picture): its bright pixels, center-cropped
        like the picture, are regenerated: the noise is mixed in only at the latent tokens whose pixels a mask
        touches, and with `paste` the pixels outside the mask are the input's.  Video models edit the picture as
        the first frame and continue it for `num_frames` (default: the trained length): the first latent frame is
        the picture's z (mixed as above), the later ones fresh noise, so the video follows the edited frame.
        Decoding: with strength 0 an image model's output is decoded by the VAE's own decoder (the latents are as
        clean as the inverted ones; LatentVAE.base_decoder), else by the run's (e.g. --finetuned_vae); edits skip
        the Tweedie step.
        eps is drawn as `prepare_latents` draws (seed, indices[j]): a picture's edit does not depend on its batch.
        Returns a STARFlowOutput as `__call__` does; raises ConfigError for a strength outside [0, 1] or counts
        that do not match."""
        if not 0 <= strength <= 1:
            raise ConfigError(f"strength {strength}: must be in [0, 1]")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ConfigError(f"{len(prompts)} prompts for {len(images)} pictures")
        (h, w), _ = self.image_size()
        z = self.invert(images, source_prompt)
        frames = self.video_length(num_frames)[0] if self.trained_frames > 1 else 1
        eps = self.prepare_latents(len(z), h, w, frames, seed, indices)
        first = eps[:, :1] if frames > 1 else eps
        mixed = math.sqrt(1 - strength ** 2) * z + strength * first
        if mask is not None:  # a latent token is regenerated when its patch of pixels holds any masked pixel
            masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(images)
            if len(masks) != len(images):
                raise ConfigError(f"{len(masks)} masks for {len(images)} pictures")
            inside = torch.stack([load_mask(m, (h, w)) for m in masks])  # (B, H, W)
            tokens = torch.nn.functional.max_pool2d(inside[:, None].float(), self.factor).to(z.device) > 0
            mixed = torch.where(tokens[:, None] if frames > 1 else tokens, mixed, z)
        z = torch.cat([mixed, eps[:, 1:]], dim=1) if frames > 1 else mixed
        # without fresh noise an image's latents come out as clean as the inverted posterior mean: the VAE's own
        # decoder gives them back (45 dB on shapes, against 36.5 through the decoder fine-tuned on noisy latents).
        # A video's later frames are drawn from noise, so videos keep the run's decoder.
        clean = strength == 0 and frames == 1 and self.vae is not None
        with self.vae.base_decoder() if clean else contextlib.nullcontext():
            out = self(prompts, latents=z, guidance_scale=guidance_scale,
                       num_frames=num_frames if frames > 1 else None, self_denoise=False,
                       output_type="latent" if output_type == "latent" else "pt")
        if output_type == "latent":
            return out
        key = "frames" if frames > 1 else "images"
        pixels = getattr(out, key) * 2 - 1  # back to [-1, 1]
        if mask is not None and paste:
            kept = torch.stack([load_first_frame(im, (h, w)) for im in images])
            first = pixels[:, 0] if frames > 1 else pixels
            first.copy_(torch.where(inside[:, None], first, kept))
        return dataclasses.replace(out, **{key: self._convert(pixels, output_type)})

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, [T], 3, H, W) -> the VAE's posterior mean latents on the device (the flow's x
        before the training noise); the pixels themselves without a VAE (a pixel-space model)."""
        pixels = pixels.to(self.device)
        if self.vae is None:
            return pixels
        with self._on_device(self.vae):
            return self.vae.encode(pixels, sample=False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] (B, [T], 3, H, W) through the VAE (one sample at a time with vae slicing);
        latents themselves without a VAE (a pixel-space model)."""
        if self.vae is None:
            return latents
        with self._on_device(self.vae):
            if self.vae_slicing:
                return torch.cat([self.vae.decode(z[None]) for z in latents])
            return self.vae.decode(latents)

    # ---- the call ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: "str | list[str]", negative_prompt: "str | list[str] | None" = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, aspect_ratio: str | None = None, num_frames: int | None = None,
                 target_length: int | None = None, fps: int | None = None, image=None,
                 context_length: int | None = None, rolling_kv_cache: bool | None = None, seed: int | None = None,
                 indices: list[int] | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", noise_std: float | None = None,
                 self_denoise: "bool | str | None" = None, learnable_denoiser: bool | None = None,
                 denoising_batch_size: int | None = None, jacobi: bool | None = None,
                 jacobi_block_size: int | None = None, jacobi_th: float | None = None,
                 jacobi_max_iter: int | None = None, guide_top: bool | None = None, attn_temp: float | None = None,
                 return_sequence: bool = False, callback=None, verbose: bool = False) -> STARFlowOutput:
        """Generate from one prompt or a list (each `num_images_per_prompt` times).

        Settings left None take the loaded defaults (`self.args`: the checkpoint's flags, then the options given to
        `from_pretrained`); they are sample.py's flags: guidance_scale = --cfg (0: no guidance), aspect_ratio or
        height/width (one of the model's sizes), num_frames or target_length = --target_length (more than trained:
        a sliding window keeping `context_length` latent frames, re-encoded at each slide as the official sampler
        does, or kept in a rolling KV cache when `rolling_kv_cache` = --rolling_kv_cache), fps = --out_fps,
        image = --input_image (path, PIL image or uint8 array: the first frame of the videos), noise_std =
        --target_noise_std, learnable_denoiser = not --disable_learnable_denoiser, jacobi / jacobi_block_size /
        jacobi_th / jacobi_max_iter, guide_top, attn_temp.  Noise: `latents` (the flow's z), else `generator`, else `seed` (random when None) with sample j
        drawing from (seed, indices[j]).  `self_denoise` = --self_denoise: True/"on" runs the Tweedie step before
        decoding, False/"off" skips it, "auto" runs it unless a fine-tuned decoder takes the noisy latents.  `return_sequence` gives every flow block's output
        side by side (not denoised).  `callback(info)` is called whenever a block's committed tokens advance (see
        Model.reverse).  Raises ConfigError (one line) for settings the model cannot make."""
        args, model, device = self.args, self.model, self.device
        if target_length is not None:  # sample.py's name for num_frames
            if num_frames not in (None, target_length):
                raise ConfigError(f"num_frames {num_frames} and target_length {target_length}: give one")
            num_frames = target_length
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("no prompt")
        negatives = None
        if negative_prompt is not None:  # one for all prompts, or one per prompt
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) not in (1, len(prompts)):
                raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            negatives = [n for n in negatives * (len(prompts) // len(negatives)) for _ in range(num_images_per_prompt)]
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ConfigError(f"output_type {output_type!r}: one of pil, np, pt, latent")
        denoising = self.denoises(self_denoise)
        if image is not None and self.trained_frames == 1:
            raise ConfigError("--input_image needs a video model (--vid_size)")
        (h, w), ratio = self.image_size(height, width, aspect_ratio)
        frames, context = self.video_length(num_frames, context_length if context_length is not None
                                            else args.context_length)
        guidance, fps, noise_std = self.resolve(guidance_scale, fps, noise_std)
        drawn = None
        if latents is None:
            drawn = secrets.randbelow(2**31) if seed is None and generator is None else seed
            latents = self.prepare_latents(len(prompts), h, w, frames, drawn, indices, generator)
        elif len(latents) != len(prompts):
            raise ConfigError(f"latents for {len(latents)} samples, {len(prompts)} prompts")
        z = latents.to(device)
        y = self.encode_prompt(prompts, negatives, guidance, ratio, fps, noise_std)
        y_cond = None if y is None else y[:len(prompts)]

        caches = [KVCache() for _ in model.blocks]
        given = None
        if image is not None:
            # the posterior mean: the noise below is the only randomness
            first = given = self.encode(load_first_frame(image, (h, w))[None])
            if generator is not None:
                jitter = torch.randn((len(z), *first.shape[1:]), generator=generator, device=generator.device)
            elif drawn is not None:  # the next draw of each sample's own stream
                jitter = torch.stack([torch.randn(first.shape[1:], generator=self._stream(drawn, i, z[0]))
                                      for i in (indices if indices is not None else range(len(z)))])
            else:
                jitter = torch.randn((len(z), *first.shape[1:]))
            first = first + noise_std * jitter.to(device)
            caches = model.prefill(first.unsqueeze(1), y)

        window = model.blocks[-1].local_attn_window
        if num_frames is not None:  # a sliding window of the trained length, for this call
            model.blocks[-1].local_attn_window = (self.trained_frames - 1) // self.temporal + 1
        bar = tqdm(total=100, **{"desc": "sampling", "leave": False, "unit": "%", **self.progress_bar_config})

        def progress(info):  # the share of all blocks' tokens committed
            bar.update(int(100 * (info["blocks_done"] + info["tokens"] / info["total"]) / info["blocks"]) - bar.n)
            if callback is not None:
                callback(info)

        try:
            with self._autocast():
                out = model.reverse(z, y, guidance=guidance, guide_top=1 if (args.guide_top if guide_top is None
                                                                             else guide_top) else None,
                                    return_sequence=return_sequence, kv_caches=caches, context_length=context,
                                    rolling_kv_cache=bool(args.rolling_kv_cache if rolling_kv_cache is None
                                                          else rolling_kv_cache),
                                    attn_temp=args.attn_temp if attn_temp is None else attn_temp, verbose=verbose,
                                    callback=progress, **self._decoding(jacobi, jacobi_block_size, jacobi_th,
                                                                        jacobi_max_iter))
            final = (out[-1] if return_sequence else out).float()
            if return_sequence:  # every block's output side by side
                pixels = torch.cat([self.decode(s.float()) for s in out], dim=-1)
            else:
                denoised = final
                if denoising:
                    learnable = model.config.learnable_self_denoiser and \
                        (not args.disable_learnable_denoiser if learnable_denoiser is None else learnable_denoiser)
                    denoised = denoise(model, final, y_cond, noise_std, learnable,
                                       denoising_batch_size or args.denoising_batch_size,
                                       model.blocks[-1].local_attn_window, model.config.denoiser_window)
                    if given is not None:  # the given first frame is known clean: the caption must not move it
                        denoised[:, 0] = given.to(denoised)
                pixels = denoised if output_type == "latent" else self.decode(denoised)
        finally:
            model.blocks[-1].local_attn_window = window
            bar.close()
        key = "frames" if frames > 1 else "images"
        held = sum(t.untyped_storage().nbytes() for t in caches[0].keys + caches[0].values)  # the deep block's
        return STARFlowOutput(**{key: self._convert(pixels, output_type)}, latents=final,
                              fps=fps if frames > 1 else None, seed=drawn, kv_cache_bytes=held)

    def denoises(self, self_denoise: "bool | str | None" = None) -> bool:
        """Whether samples are self-denoised before decoding: `self_denoise` (True/False, or "auto", "on", "off";
        None: the loaded --self_denoise), where "auto" is the official rule (on unless --finetuned_vae is set)."""
        mode = self.args.self_denoise if self_denoise is None else \
            {True: "on", False: "off"}.get(self_denoise, self_denoise)
        if mode not in SELF_DENOISE:
            raise ConfigError(f"self_denoise {self_denoise!r}: True, False or one of {', '.join(SELF_DENOISE)}")
        return mode == "on" or (mode == "auto" and self.args.finetuned_vae in (None, "none"))

    @staticmethod
    def _stream(seed: int, index: int, like: torch.Tensor) -> torch.Generator:
        """Sample `index`'s generator after its noise was drawn (prepare_latents): its next draws are its own."""
        generator = torch.Generator().manual_seed(seed * NOISE_STREAM + index)
        torch.randn(like.shape, generator=generator)
        return generator

    def _decoding(self, jacobi, block_size, threshold, max_iter) -> dict:
        args = self.args
        jacobi = args.jacobi if jacobi is None else jacobi
        return dict(jacobi=None if jacobi else False,
                    jacobi_block_size=args.jacobi_block_size if block_size is None else block_size,
                    jacobi_th=args.jacobi_th if threshold is None else threshold,
                    jacobi_max_iter=args.jacobi_max_iter if max_iter is None else max_iter)

    @staticmethod
    def _convert(pixels: torch.Tensor, output_type: str):
        """Pixels in [-1, 1] (B, [T], 3, H, W) -> the output type (see STARFlowOutput)."""
        if output_type == "latent":
            return pixels
        if output_type == "pt":
            return ((pixels.float().clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "np":
            return ((pixels.float().clamp(-1, 1) + 1) / 2).movedim(-3, -1).cpu().numpy()
        uint8 = to_uint8(pixels)
        if uint8.ndim == 5:
            return [[Image.fromarray(frame) for frame in video] for video in uint8]
        return [Image.fromarray(im) for im in uint8]
