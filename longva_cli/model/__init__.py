"""LongVA built from transformers' own Qwen2 and CLIP vision classes plus the 2-layer projector."""
