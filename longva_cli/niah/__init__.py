"""`longva niah`: needle-in-a-haystack tests of long-context recall, for video and for text.

    longva niah video --haystack movie.mp4          # V-NIAH: one needle frame among N frames
    longva niah text --haystack essays/             # a 7-digit number hidden in a long book
    longva niah plot runs/niah-video                # redraw the heatmap

`settings` holds the grids and their checks, `scoring` the KV-cache-reusing forward passes,
`grid` the resumable loop over cells, `video` and `text` build the sequences, `results` and
`heatmap` write the original's output files.
"""
