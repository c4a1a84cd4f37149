"""Text conditioning: the official prompt wording, exact token counts, zeroed padding, and the real loading code on
a tiny T5 (saved and loaded by path) and on the all-MiniLM-L6-v2 package."""
import time
import warnings

import pytest
import torch

from utils import text
from utils.hub import PretrainedNotFound
from utils.text import TextEncoder, preprocess_text


def test_official_prompt_wording():
    assert preprocess_text(["a cat"]) == ["a cat"]
    assert preprocess_text(["a cat"], fps=16) == ["A video with 16 fps:\na cat\n"]
    assert preprocess_text(["a cat", "a dog"], fps=torch.tensor([16, 0])) == [
        "A video with 16 fps:\na cat\n", "An image:\na dog\n"]
    assert preprocess_text(["a cat"], noise_std=0.5) == ["Noise Level 500:\na cat"]
    assert preprocess_text(["a cat"], noise_std=0.2995) == ["Noise Level 299:\na cat"]  # truncated, as trained
    assert preprocess_text(["a cat"], aspect_ratio="16:9") == ["a cat\n in a 16:9 aspect ratio.\n"]
    # the official video model's training prompt, and its empty caption for guidance
    assert preprocess_text(["a cat", ""], fps=16, noise_std=0.5, aspect_ratio="16:9") == [
        "Noise Level 500:\nA video with 16 fps:\na cat\n\n in a 16:9 aspect ratio.\n",
        "Noise Level 500:\nA video with 16 fps:\n\n\n in a 16:9 aspect ratio.\n"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4)
    T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def test_t5_encoder_loads_by_path_and_encodes(tiny_t5, monkeypatch):
    monkeypatch.setattr(text, "_cut_warned", False)  # the cut-caption warning is given once per process
    encoder = TextEncoder.from_pretrained(str(tiny_t5), txt_size=48, fps_cond=True)
    tokenizer, encoder = encoder.tokenizer, encoder
    assert type(encoder.encoder).__name__ == "T5EncoderModel" and encoder.width == 32
    assert not any(p.requires_grad for p in encoder.encoder.parameters()) and not encoder.encoder.training
    captions = ["a small red circle", "", "x" * 100]
    with pytest.warns(UserWarning, match=r"cut to txt_size=48 tokens: 'A video with 16 fps:\\nxxx.* has 1\d\d "):
        y = encoder(captions, fps=16)
    assert y.shape == (3, 48, 32)
    tokens = tokenizer(preprocess_text(captions, fps=16), padding="max_length", truncation=True, max_length=48,
                       return_tensors="pt")
    mask = tokens["attention_mask"].bool()
    assert mask[2].all() and not mask[0].all()  # truncated to exactly txt_size, and padded
    assert (y[~mask] == 0).all() and (y[mask].abs().sum(-1) > 0).all()
    reference = encoder.encoder(**tokens).last_hidden_state
    torch.testing.assert_close(y[mask], reference[mask])


def test_whole_captions_do_not_warn(tiny_t5, monkeypatch):
    monkeypatch.setattr(text, "_cut_warned", False)
    encoder = TextEncoder.from_pretrained(str(tiny_t5), txt_size=48, fps_cond=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(["a small red circle", ""], fps=16)


def test_minilm_package_encodes_offline():
    encoder = TextEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", 16)  # the Hub name, offline
    assert encoder.width == 384
    y = encoder(["a large blue square", "a small red circle", "a large blue square"])
    assert y.shape == (3, 16, 384)
    torch.testing.assert_close(y[0], y[2])
    assert (y[0] - y[1]).abs().max() > 0.1


def test_unavailable_encoder_fails_fast():
    start = time.perf_counter()
    with pytest.raises(PretrainedNotFound, match="'google/flan-t5-xl' is not available offline.*HF_HOME"):
        TextEncoder.from_pretrained("google/flan-t5-xl", 8)
    assert time.perf_counter() - start < 10


def test_the_run_flags_decide_the_wording_and_guidance_rows_follow(tiny_t5):
    """One wording rule: fps, noise level and aspect ratio reach the prompt only when the run's flag is on, and the
    unconditional rows of guidance are the empty caption worded alike."""
    seen = []
    plain = TextEncoder.from_pretrained(str(tiny_t5), txt_size=48)
    tokenizer = plain.tokenizer
    plain.tokenizer = lambda texts, **k: seen.append(list(texts)) or tokenizer(texts, **k)
    plain(["a cat"], fps=16, noise_std=0.3, aspect_ratio="16:9")
    assert seen[-1] == ["a cat"]
    worded = TextEncoder(plain.tokenizer, plain.encoder, 96, fps_cond=True, mix_aspect=True, cond_noise_level=True)
    y = worded(["a cat", "a dog"], fps=torch.tensor([16, 8]), noise_std=0.3, aspect_ratio="16:9", unconditional=True)
    assert y.shape == (4, 96, 32)
    assert seen[-1] == preprocess_text(["a cat", "a dog", "", ""], "16:9", [16, 8, 16, 8], 0.3)
    torch.testing.assert_close(y[2:3], worded([""], fps=16, noise_std=0.3, aspect_ratio="16:9"))
