"""Named Llama sizes. `debug` and `tiny` are ours; the others follow the cited public shapes.

Only `debug` is meant for unit tests; `tiny` is the CPU quickstart model. Param counts (see the
model tests) are at the vocab sizes given here.
"""

from __future__ import annotations

from lmforge.models.llama.model import LlamaConfig

FLAVORS: dict[str, LlamaConfig] = {
    # ~0.2M params: a forward+backward on CPU in milliseconds, for tests.
    "debug": LlamaConfig(vocab_size=512, max_seq_len=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    # ~8.9M params at vocab 8192 (4.2M of them embeddings + output): trains on a 2-core CPU.
    "tiny": LlamaConfig(vocab_size=8192, max_seq_len=256, dim=256, n_layers=6, n_heads=8, n_kv_heads=4),
    # GPT-2 small's trunk (Radford et al. 2019: 12 layers, 768 wide, 12 heads, 1024 context) with
    # Llama blocks. The derived ffn_hidden 2048 = 8/3 * 768 gives the SwiGLU MLP exactly the
    # parameters of GPT-2's 4x GELU MLP. Vocab 50304 = GPT-2's 50257 padded to a multiple of 64.
    # The untied output head adds 38.6M over the GPT-2 count.
    "124m": LlamaConfig(vocab_size=50304, max_seq_len=1024, dim=768, n_layers=12, n_heads=12, n_kv_heads=12),
    # GPT-2 medium's trunk (Radford et al. 2019: 24 layers, 1024 wide, 16 heads), ffn derived (2816).
    "350m": LlamaConfig(vocab_size=50304, max_seq_len=1024, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16),
    # Llama-3.2-1B (Meta's model card and config.json): tied embeddings, 1.24B params. Llama 3.2
    # reaches 128k context with "llama3" RoPE frequency scaling, which is not implemented here, so
    # max_seq_len is Llama 3's pretraining context of 8192.
    "1b": LlamaConfig(
        vocab_size=128256,
        max_seq_len=8192,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    # Llama-2-7B (Touvron et al. 2023, "Llama 2", table 1, and Meta's params.json): 6.74B params.
    # ffn_hidden is derived: 2/3 * 4 * 4096 = 10922, rounded up to a multiple of 256 = 11008.
    "7b": LlamaConfig(vocab_size=32000, max_seq_len=4096, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32),
    # Llama-3-70B / Llama-3.1-70B (Meta's model cards and params.json): 70.6B params.
    "70b": LlamaConfig(
        vocab_size=128256,
        max_seq_len=8192,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden=28672,
        rope_theta=500000.0,
    ),
    # No Llama of this size was published. GPT-3 175B's trunk (Brown et al. 2020, table 2.1: 96
    # layers, 12288 wide, 96 heads of 128) with Llama 3 choices: 8 kv heads, vocab 128256,
    # rope_theta 500000, and ffn_hidden = 3.25 * dim = 39936, the ratio of Llama-3.1-405B
    # (53248 / 16384). 175.9B params.
    "175b": LlamaConfig(
        vocab_size=128256,
        max_seq_len=8192,
        dim=12288,
        n_layers=96,
        n_heads=96,
        n_kv_heads=8,
        ffn_hidden=39936,
        rope_theta=500000.0,
    ),
}
