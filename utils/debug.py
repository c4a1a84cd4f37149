"""Debug-size random models for tests and benchmarks.

A freshly built TransformerFlow is the identity map (every proj_out weight starts at zero), which hides most bugs
and makes decoding trivially fast.  `randomize_weights` gives each block a non-trivial, well-conditioned map.
"""
import torch


def randomize_weights(model: torch.nn.Module, seed: int = 0, scale: float = 0.25) -> torch.nn.Module:
    """Draw proj_out weights from N(0, scale^2 / fan_in) and jitter the norm weights by N(0, 0.1^2), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.size(1) ** 0.5)
            elif "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model
