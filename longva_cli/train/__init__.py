"""Training commands (`longva extend-text`, later `longva align`) and the pieces they share.

The command modules (`extend_text`) hold the recipe schema and a Typer `command`; they import
nothing heavy at module level so `longva --help` stays fast. The helpers do the work:

- `data`: token rows from pre-tokenized datasets or packed local text, cached as .npy memmaps;
- `sequence_parallel`: process groups, sequence sharding with global positions, and the
  Ulysses / zigzag-ring attention plugged into transformers' `AttentionInterface`;
- `loss`: cross-entropy over final hidden states in chunks, so seq x vocab logits never exist;
- `engine`: DeepSpeed ZeRO configuration, optimizer and learning-rate schedule;
- `checkpoint`: HF-format checkpoints with the engine state, written atomically, and resume;
- `metrics`: JSONL metrics log, plus TensorBoard / W&B when installed and asked for.
"""
