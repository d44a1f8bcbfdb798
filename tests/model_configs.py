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
