"""config.json of real models, for the tests that decide by a model's shape (memory estimate,
admission) without its weights: what the registry stores for a model, and all the estimator reads."""

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 8192,
}
# Llama 3.1 8B: the same shape, with the 128k-token context long-document fine-tuning needs.
LLAMA3_8B_128K = {**LLAMA3_8B, "max_position_embeddings": 131072, "rope_theta": 500000.0}
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 8192,
}
# The QLoRA paper's own base models (LLaMA 1), for its recipe: 65B on one 48 GB GPU, 33B on one 24 GB GPU.
LLAMA_65B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 22016,
    "num_hidden_layers": 80, "num_attention_heads": 64, "vocab_size": 32000,
    "tie_word_embeddings": False, "max_position_embeddings": 2048,
}
LLAMA_33B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 6656, "intermediate_size": 17920,
    "num_hidden_layers": 60, "num_attention_heads": 52, "vocab_size": 32000,
    "tie_word_embeddings": False, "max_position_embeddings": 2048,
}
# Families whose layers differ from Llama's where the estimate has to know it: Qwen 3's attention is
# wider than its hidden size (32 heads of 128 on 2048) and normalizes queries and keys; Gemma 3's heads are
# 256 wide, and it has four norms per layer.
QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 40960,
}
GEMMA3_12B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 3840,
    "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 256, "vocab_size": 262208, "tie_word_embeddings": True, "max_position_embeddings": 131072,
}
# A family that fuses its layers (one qkv_proj, one gate_up_proj per block): LoRA targets take its names.
PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
    "tie_word_embeddings": False, "max_position_embeddings": 4096,
}
# Mixtures of experts, which the registry refuses: their experts would not be quantized.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False, "max_position_embeddings": 32768,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
    "tie_word_embeddings": False, "max_position_embeddings": 40960,
}
