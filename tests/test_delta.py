"""Delta checkpoints: fingerprint, bit-exact save/load, base checks, merge, and the Trainer helpers."""

from __future__ import annotations

import json

import pytest
import torch

from conditune.errors import CondituneError
from conditune.selection import apply_selection, load_delta, merge_delta, model_fingerprint, save_delta
from fixtures import batch, load_tiny_llama, save_tiny_llama

CHOSEN = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base") / "llama", tie=False, seed=0)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("other") / "llama", tie=False, seed=1)


def fine_tune(model, names):
    """Stand-in for training: change exactly the selected tensors."""
    apply_selection(model, names)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model


def assert_same_weights(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for name in sd_a:
        assert torch.equal(sd_a[name], sd_b[name]), name


def test_fingerprint(base_dir, other_dir):
    a, b = load_tiny_llama(base_dir), load_tiny_llama(base_dir)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(load_tiny_llama(other_dir))
    fine_tune(b, CHOSEN)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a, exclude=CHOSEN) == model_fingerprint(b, exclude=CHOSEN)  # trained tensors left out


def test_round_trip_is_bit_exact(base_dir, tmp_path):
    tuned = fine_tune(load_tiny_llama(base_dir), CHOSEN)
    save_delta(tuned, tmp_path / "delta")
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == ["delta.json", "delta.safetensors"]
    meta = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert sorted(meta["names"]) == sorted(CHOSEN) and meta["dtype"] == "float32"
    assert meta["base_model"] == str(base_dir) and meta["base_fingerprint"] == model_fingerprint(tuned, exclude=CHOSEN)

    fresh = load_tiny_llama(base_dir)
    assert sorted(load_delta(fresh, tmp_path / "delta")) == sorted(CHOSEN)
    assert_same_weights(fresh, tuned)


def test_mismatched_base_is_refused_unless_forced(base_dir, other_dir, tmp_path):
    tuned = fine_tune(load_tiny_llama(base_dir), CHOSEN)
    save_delta(tuned, tmp_path / "delta")
    other = load_tiny_llama(other_dir)
    with pytest.raises(CondituneError, match="delta was made for base .*force") as info:
        load_delta(other, tmp_path / "delta")
    assert "\n" not in str(info.value)
    load_delta(other, tmp_path / "delta", force=True)
    for name in CHOSEN:
        assert torch.equal(other.get_parameter(name), tuned.get_parameter(name))


def test_tied_weights_saved_once(tmp_path):
    tied_dir = save_tiny_llama(tmp_path / "tied", tie=True)
    tuned = fine_tune(load_tiny_llama(tied_dir), ["lm_head.weight"])
    save_delta(tuned, tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert meta["names"] == ["model.embed_tokens.weight"]
    assert meta["tied"] == {"model.embed_tokens.weight": ["lm_head.weight"]}
    fresh = load_tiny_llama(tied_dir)
    load_delta(fresh, tmp_path / "delta")
    assert_same_weights(fresh, tuned)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_bad_inputs(base_dir, tmp_path):
    model = load_tiny_llama(base_dir)
    with pytest.raises(CondituneError, match="closest: lm_head.weight"):
        save_delta(model, tmp_path / "d", names=["lm_head.weights"])
    apply_selection(model, [])  # everything frozen
    with pytest.raises(CondituneError, match="no trainable parameters"):
        save_delta(model, tmp_path / "d")
    with pytest.raises(CondituneError, match="not a conditune delta"):
        load_delta(model, tmp_path)


def test_merge_writes_full_checkpoint(base_dir, tmp_path):
    tuned = fine_tune(load_tiny_llama(base_dir), CHOSEN)
    save_delta(tuned, tmp_path / "delta")
    merge_delta(base_dir, tmp_path / "delta", tmp_path / "merged")
    assert_same_weights(load_tiny_llama(tmp_path / "merged"), tuned)
    merge_delta(None, tmp_path / "delta", tmp_path / "merged2")  # the base recorded in delta.json
    assert_same_weights(load_tiny_llama(tmp_path / "merged2"), tuned)
    with pytest.raises(CondituneError, match="not empty"):
        merge_delta(base_dir, tmp_path / "delta", tmp_path / "merged")


class _Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {k: v[0] for k, v in batch(seed=i, size=1).items()}


def _training_args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        **kw,
    )


def test_trainer_callback_and_delta_trainer(base_dir, tmp_path):
    from transformers import Trainer

    from conditune.selection import DeltaTrainer, SelectionCallback

    base = load_tiny_llama(base_dir)
    model = load_tiny_llama(base_dir)
    callback = SelectionCallback(CHOSEN)
    Trainer(model=model, args=_training_args(tmp_path / "run"), train_dataset=_Batches(), callbacks=[callback]).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed == set(CHOSEN) and callback.report.trainable_tensors == 3
    fresh = load_tiny_llama(base_dir)
    load_delta(fresh, tmp_path / "run" / "checkpoint-2" / "conditune_delta")
    assert_same_weights(fresh, model)

    model = load_tiny_llama(base_dir)
    trainer = DeltaTrainer(
        model=model,
        args=_training_args(tmp_path / "delta-run"),
        train_dataset=_Batches(),
        selection=CHOSEN,
        base_reference=str(base_dir),
    )
    trainer.train()
    checkpoint = tmp_path / "delta-run" / "checkpoint-2"
    assert (checkpoint / "delta.json").is_file() and not list(checkpoint.glob("model*.safetensors"))
    fresh = load_tiny_llama(base_dir)
    load_delta(fresh, checkpoint)
    assert_same_weights(fresh, model)
