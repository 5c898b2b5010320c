"""Built-in tasks: ``digits`` (tiny, seconds per round) and ``textlm`` (a transformer language
model whose size is an option, from about 1 MB to hundreds of MB)."""
