"""mod_ext.hf under transformers.Trainer: gradient accumulation weighs the MoD aux loss
like the LM loss (Trainer passes num_items_in_batch), so accumulating micro-batches gives
the step of one big batch."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import mod_ext.hf  # noqa: E402
from transformers import LlamaConfig, AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 97, (12,), generator=g)
        return {"input_ids": x, "labels": x}


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    mod_ext.hf.convert(model, capacity_factor=0.25, aux_loss_weight=1.0)
    with torch.no_grad():  # routers that separate tokens (a zero router ties every logit)
        for p in mod_ext.hf.router_parameters(model):
            p.normal_(0, 0.5)
    return model


def _train(model, tmp_path, batch, accumulation):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        dataloader_drop_last=True, seed=0, data_seed=0, lr_scheduler_type="constant", warmup_steps=0,
    )
    Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    return dict(model.named_parameters())


def test_gradient_accumulation_matches_one_batch(tmp_path):
    base = _model()
    big = _train(copy.deepcopy(base), tmp_path / "big", batch=4, accumulation=1)
    acc = _train(copy.deepcopy(base), tmp_path / "acc", batch=2, accumulation=2)
    start = dict(base.named_parameters())
    moved = [n for n in start if not torch.equal(start[n], big[n])]
    assert any(".mod.predictor." in n for n in moved), "the aux loss did not train the predictor"
    for n in start:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-5, msg=n)
