"""Commands that run as several processes: where a rank sits (`ranks`), DeepSpeed's
communication layer and its output (`deepspeed_comm`), and attention over a sequence split
across ranks (`sequence_attention`)."""
