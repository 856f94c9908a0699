"""The optimisers in the transformers Trainer: ``optimizers=(opt, sched)`` with a tiny Llama."""

from __future__ import annotations

import torch

from weightsmith.optim import GaLoreAdamW, galore_param_groups

torch.set_num_threads(1)


def test_galore_in_hf_trainer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config = LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = [(n, p) for n, p in model.named_parameters() if "layers" in n]
    rest = [(n, p) for n, p in model.named_parameters() if "layers" not in n]
    groups = galore_param_groups(named, rank=4, update_proj_gap=2, scale=0.25, projector="dct")
    groups.append({"params": [p for _, p in rest], "param_names": [n for n, _ in rest]})
    opt = GaLoreAdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data = [
        {"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(8)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    q = "model.layers.0.self_attn.q_proj.weight"
    w = dict(model.named_parameters())[q]
    assert not torch.equal(w.detach(), before[q])
    st = opt.state[w]
    assert st["count"] == 3 and st["refreshes"] == 2 and "idx" in st["proj"]["right"]
    assert opt.param_groups[0]["lr"] < 1e-3  # the scheduler drove the step
