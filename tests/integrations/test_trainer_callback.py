"""The transformers TrainerCallback: a Trainer run on a tiny LLaMA from config compresses the
model, logs what each step kept and the whole-step ratio against plain (measured), and keeps
training exact where eps = 1."""

import pytest
import torch

import actcomp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from actcomp.integrations import ActcompTrainerCallback  # noqa: E402


class TokenData(torch.utils.data.Dataset):
    def __init__(self, count=4, length=16):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (count, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def test_trainer_callback_compresses_and_logs_the_whole_step_ratio(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    callback = ActcompTrainerCallback(eps=0.9)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    seen = []

    class Reporter(transformers.TrainerCallback):  # a reporter after ours, as wandb's or tensorboard's
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback, Reporter()])
    trainer.train()
    assert set(actcomp.compressed_layers(model)) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    history = callback.monitor.history
    assert len(history) == 2
    first = history[0]
    assert 0 < first["saved_bytes"] <= first["plain_saved_bytes"]
    assert first["whole_step_ratio"] == first["saved_bytes"] / first["plain_saved_bytes"]
    assert first["compressed_layers"] == 8 and first["layers_not_run"] == 0
    logged = [entry for entry in seen if "loss" in entry]
    assert len(logged) == 2 and all("actcomp/whole_step_ratio" in entry for entry in logged)


def test_trainer_callback_counts_what_plain_keeps_with_compression_suspended():
    """The plain figure is plain autograd's: the same as count_saved on an uncompressed copy."""
    torch.manual_seed(0)
    model = tiny_llama().train()
    batch = TokenData()[0]
    batch = {k: v[None] for k, v in batch.items()}
    with actcomp.count_saved(model) as plain:
        model(**batch)
    callback = ActcompTrainerCallback(eps=0.9)
    callback.monitor.attach(model)
    assert callback.monitor.measure_plain(model, lambda: model(**batch)) == plain.saved_bytes
