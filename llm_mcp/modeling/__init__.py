"""Models as every process loads them: base models (dtype, 4-bit, vision-language classes), tokenizers and
chat rendering with loss masks, token previews, sparse-delta layers, and adapter layouts (attach, save,
load, merge, switch). Shared by training, sampling, merges and validation's token counts.

Imports torch / transformers inside the modules that need them; the server imports this package only on
first use (the sampler, a token count).
"""
