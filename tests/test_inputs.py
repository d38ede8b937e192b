"""Example inputs built from a Hugging Face-style config, for models stefx is given bare."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from stefx.capture import example_inputs_for


class _ConfigModel(nn.Module):
    """Stands in for a PreTrainedModel: a ``config`` and a forward signature."""

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.proj = nn.Linear(4, 4)


class TextOrImage(_ConfigModel):
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None):
        return input_ids


class ImageOnly(_ConfigModel):
    def forward(self, pixel_values=None):
        return pixel_values


def test_a_model_that_reads_text_gets_token_ids_even_if_it_also_takes_images():
    model = TextOrImage(vocab_size=100, image_size=32, max_position_embeddings=64)
    inputs = example_inputs_for(model)
    assert list(inputs) == ["input_ids"] and inputs["input_ids"].shape == (1, 8)


def test_an_image_only_model_gets_pixels():
    inputs = example_inputs_for(ImageOnly(image_size=16, num_channels=1))
    assert list(inputs) == ["pixel_values"] and inputs["pixel_values"].shape == (1, 1, 16, 16)


def test_vocab_from_text_config_and_no_position_limit():
    # composite configs keep vocab_size under text_config; XLNet reports a limit of -1
    text = SimpleNamespace(vocab_size=50)
    model = TextOrImage(text_config=text, max_position_embeddings=-1)
    ids = example_inputs_for(model)["input_ids"]
    assert ids.shape == (1, 8) and int(ids.max()) < 50 and ids.dtype == torch.long
    short = TextOrImage(vocab_size=50, max_position_embeddings=4)
    assert example_inputs_for(short)["input_ids"].shape == (1, 4)
