"""Files: safetensors save and load, Hugging Face checkpoints, tensors stored
in blocks, tables spanning processes, word2vec and GloVe, other libraries'
embeddings, compressed and adapted tables, crash-safe replacement. Public
names are re-exported by `named_embed.formats`. Imports every layer below.
"""
