"""Named GPT-2 sizes. `debug` and `tiny` are ours; the others follow the cited public shapes.

Only `debug` is meant for unit tests; `tiny` is the CPU quickstart model. Param counts (see the
model tests) are at the vocab sizes given here; the GPT-2 vocab of 50257 is padded to 50304, a
multiple of 64, so the embedding and output matmuls tile evenly on tensor cores.
"""

from __future__ import annotations

from lmforge.models.gpt2.model import GPT2Config

FLAVORS: dict[str, GPT2Config] = {
    # ~0.1M params: a forward+backward on CPU in milliseconds, for tests.
    "debug": GPT2Config(vocab_size=512, max_seq_len=64, dim=64, n_layers=2, n_heads=4),
    # ~6.9M params at vocab 8192 (2.2M of them embeddings): trains on a 2-core CPU.
    "tiny": GPT2Config(vocab_size=8192, max_seq_len=256, dim=256, n_layers=6, n_heads=8),
    # GPT-2 small (Radford et al. 2019, table 2, listed there as 117M; 124M counted exactly).
    "124m": GPT2Config(vocab_size=50304, max_seq_len=1024, dim=768, n_layers=12, n_heads=12),
    # GPT-2 medium (Radford et al. 2019, table 2, listed as 345M).
    "350m": GPT2Config(vocab_size=50304, max_seq_len=1024, dim=1024, n_layers=24, n_heads=16),
    # GPT-3 XL, 1.3B (Brown et al. 2020, table 2.1). The table lists 24 heads with d_head 128, which
    # does not multiply out to 2048; we use 16 heads of 128.
    "1b": GPT2Config(vocab_size=50304, max_seq_len=2048, dim=2048, n_layers=24, n_heads=16),
    # GPT-3 6.7B (Brown et al. 2020, table 2.1): 32 heads of 128.
    "7b": GPT2Config(vocab_size=50304, max_seq_len=2048, dim=4096, n_layers=32, n_heads=32),
    # No GPT of this size was published: Llama-70B's trunk (8192 wide, 80 layers, 64 heads of 128)
    # with GPT-2 blocks, 64.8B params (a 4x GELU MLP is smaller than Llama-70B's 3.5x SwiGLU).
    "70b": GPT2Config(vocab_size=50304, max_seq_len=2048, dim=8192, n_layers=80, n_heads=64),
    # GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, 12288 wide, 96 heads of 128.
    "175b": GPT2Config(vocab_size=50304, max_seq_len=2048, dim=12288, n_layers=96, n_heads=96),
}
