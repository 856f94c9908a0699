"""The real matrices checked against WeightWatcher (shared by conftest and the reference tests)."""

# Real matrices checked against WeightWatcher: every kind of minilm layer 0, and four SmolLM2 shapes.
WW_MINILM = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.self.key.weight",
    "encoder.layer.0.attention.self.value.weight",
    "encoder.layer.0.attention.output.dense.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.output.dense.weight",
]
WW_SMOLLM2 = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
]
