"""Training commands (`longva extend-text`, `longva align`) and the pieces they share.

The command modules (`extend_text`, `align`) hold their recipe schema, their part of the loop
(a `loop.Task`: batches, loss, counters) and a Typer `command`; they import nothing heavy at
module level so `longva --help` stays fast. The shared pieces do the rest:

- `settings`: the recipe sections both commands share (optimizer, train, parallel, logging),
  one spelling each, and their value checks;
- `loop`: the training loop itself (accumulation, metrics, progress, checkpoints, resume) and
  the start and end of a distributed run;
- `data`: token rows from pre-tokenized datasets or packed local text, cached as .npy memmaps;
- `multimodal_data`: LLaVA conversations and preference pairs as labelled token sequences;
- `loss`: cross-entropy over final hidden states in chunks, so seq x vocab logits never exist;
- `engine`: DeepSpeed ZeRO configuration, optimizer and learning-rate schedule, op cache;
- `checkpoint`: HF-format checkpoints with the engine state, written atomically, and resume;
- `metrics`: JSONL metrics log, plus TensorBoard / W&B when installed and asked for.

Process groups, sequence sharding and the sequence-parallel attention live in
`longva_cli.parallel`, shared with niah.
"""
