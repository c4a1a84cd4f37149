"""Text conditioning: the official prompt wording, exact token counts, zeroed padding, and the real loading code on
a tiny T5 (saved and loaded by path) and on the all-MiniLM-L6-v2 package."""
import time
import warnings

import pytest
import torch

from utils import text
from utils.hub import PretrainedNotFound
from utils.text import encode_text, minilm_path, preprocess_text, setup_encoder


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
    tokenizer, encoder = setup_encoder(str(tiny_t5))
    assert type(encoder).__name__ == "T5EncoderModel" and encoder.config.hidden_size == 32
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    captions = ["a small red circle", "", "x" * 100]
    with pytest.warns(UserWarning, match=r"cut to txt_size=48 tokens: 'A video with 16 fps:\\nxxx.* has 1\d\d "):
        y = encode_text(encoder, tokenizer, captions, 48, fps=16)
    assert y.shape == (3, 48, 32)
    tokens = tokenizer(preprocess_text(captions, fps=16), padding="max_length", truncation=True, max_length=48,
                       return_tensors="pt")
    mask = tokens["attention_mask"].bool()
    assert mask[2].all() and not mask[0].all()  # truncated to exactly txt_size, and padded
    assert (y[~mask] == 0).all() and (y[mask].abs().sum(-1) > 0).all()
    reference = encoder(**tokens).last_hidden_state
    torch.testing.assert_close(y[mask], reference[mask])


def test_whole_captions_do_not_warn(tiny_t5, monkeypatch):
    monkeypatch.setattr(text, "_cut_warned", False)
    tokenizer, encoder = setup_encoder(str(tiny_t5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_text(encoder, tokenizer, ["a small red circle", ""], 48, fps=16)


def test_minilm_package_encodes_offline():
    tokenizer, encoder = setup_encoder("sentence-transformers/all-MiniLM-L6-v2")  # the Hub name, served offline
    assert encoder.config.hidden_size == 384
    y = encode_text(encoder, tokenizer, ["a large blue square", "a small red circle", "a large blue square"], 16)
    assert y.shape == (3, 16, 384)
    torch.testing.assert_close(y[0], y[2])
    assert (y[0] - y[1]).abs().max() > 0.1


def test_unavailable_encoder_fails_fast():
    start = time.perf_counter()
    with pytest.raises(PretrainedNotFound, match="'google/flan-t5-xl' is not available offline.*HF_HOME"):
        setup_encoder("google/flan-t5-xl")
    assert time.perf_counter() - start < 10
