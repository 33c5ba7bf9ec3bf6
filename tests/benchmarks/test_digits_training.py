"""The digits source model trains with the shared recipe and says so in the logs (issue 16,
items 7 and 8)."""

from __future__ import annotations

import logging

import torch

from benchmarks.data import load_digits
from benchmarks.models.digits import DigitsCNN, DigitsTrainConfig, digits_source_model, train_digits_model
from benchmarks.training import random_crop_flip, train_classifier

TINY = DigitsTrainConfig(width=4, epochs=2, batch_size=256)


def test_first_use_logs_a_progress_line_per_epoch(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO):
        digits_source_model(TINY, progress=False)  # no terminal, no bar
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("training the digits source model (first use; 2 epochs)") for m in messages)
    epochs = [m for m in messages if m.startswith("DigitsCNN epoch ")]
    assert [m.split(":")[0] for m in epochs] == ["DigitsCNN epoch 1/2", "DigitsCNN epoch 2/2"]
    assert "train_loss" in epochs[0] and "test_accuracy" in epochs[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        digits_source_model(TINY, progress=False)  # cached now: nothing to train
    assert not any("epoch" in record.getMessage() for record in caplog.records)


def test_digits_model_is_trained_by_the_shared_trainer() -> None:
    model, accuracy = train_digits_model(TINY)
    torch.manual_seed(TINY.seed)
    reference = DigitsCNN(10, TINY.width, TINY.norm)
    result = train_classifier(reference, load_digits("train"), load_digits("test"), TINY.train_config(), progress=False)
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name
    assert accuracy == result.clean_accuracy
    recipe = TINY.train_config()
    assert (recipe.flip, recipe.padding_mode, recipe.crop_padding, recipe.amp) == (False, "zeros", 2, "none")


def test_cache_key_follows_the_recipe(monkeypatch) -> None:
    before = DigitsTrainConfig().key()
    original = DigitsTrainConfig.train_config

    def other_recipe(self):
        config = original(self)
        config.warmup_fraction = 0.2
        return config

    monkeypatch.setattr(DigitsTrainConfig, "train_config", other_recipe)
    assert DigitsTrainConfig().key() != before


def test_digit_augmentation_is_a_zero_padded_shift_without_flips() -> None:
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros inside an image
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0), flip=False, padding_mode="zeros")
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    crops = torch.stack([padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)], 1)
    matches = (crops == out[:, None]).flatten(2).all(2)
    assert matches.any(1).all()
    assert (out == 0).any()  # some shifts bring in the zero border
