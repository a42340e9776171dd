"""Named BERT-style encoder sizes. `debug` and `tiny` are ours; `base` and `large` are BERT's shapes
(Devlin et al. 2019, section 3: L=12, H=768, A=12, 110M; L=24, H=1024, A=16, 340M), with BERT's
30,522-token WordPiece vocabulary padded to a multiple of 64 (lmforge trains its own tokenizer, so
runs set their vocabulary from it)."""

from __future__ import annotations

from lmforge.models.bert.model import BertConfig

FLAVORS: dict[str, BertConfig] = {
    # ~0.1M params: for tests.
    "debug": BertConfig(vocab_size=512, max_seq_len=64, dim=64, n_layers=2, n_heads=4),
    # ~6.9M params at vocab 8192: masked-LM pretraining on a 2-core CPU in minutes.
    "tiny": BertConfig(vocab_size=8192, max_seq_len=256, dim=256, n_layers=6, n_heads=8),
    "base": BertConfig(vocab_size=30528, max_seq_len=512, dim=768, n_layers=12, n_heads=12),
    "large": BertConfig(vocab_size=30528, max_seq_len=512, dim=1024, n_layers=24, n_heads=16),
}
