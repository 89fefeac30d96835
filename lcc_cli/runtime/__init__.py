"""The model at run time: loading it (device, dtype, fingerprint), prompts, caches, the one
decoding loop, and the reader that answers from a buffer."""
