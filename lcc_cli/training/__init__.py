"""`lcc train-compiler`: learn once, for one base model, how to compile any document.

What is learned is the pretrained compiler (pretrained.py): a buffer-only LoRA and a bias
added to every slot's starting embedding. Each training document is compiled exactly as
`lcc compile --steps 0` compiles it: split into segments of `segment_tokens` (the compile
default), each segment's context turn frozen, its slots after it with the LoRA on, and the
segments' buffers laid out one after another as a cartridge lays them out. The reader (LoRA
off) reads [sink + slots] of every segment, and its losses train the LoRA:

- KL to a teacher on the data's own questions, teacher-forced on the gold answer (or, for a
  question without one, on the teacher's own greedy answer). The teacher is the frozen model
  with the question's own *segment* in its context: for a long document that is a stronger
  target than the whole document (the 135M model answers worse from 3k tokens than from the
  right 1k), and it is what a composed cartridge should reproduce;
- reconstruction of a one-segment document (cross-entropy, teacher-forced);
- KL on context-free instructions to the model without any document (the manifold
  regulariser: the buffer must not change how the reader answers unrelated requests).

The teacher's targets are computed inside the step from the context KV the compile has just
prefilled (one extra forward of short rows, no generation), so no teacher pass over the whole
dataset precedes training and every one of the data's questions can be used. Only the
instruction responses are generated, once per model, and cached.

Checkpoints hold everything needed to resume exactly; the step's randomness is derived from
(seed, step). Whole articles (`title`) are held out; the compiler saved is the checkpoint that
did best on them.

The package, by job: data.py (training rows, their tokens, the held-out split), losses.py
(compiling a document with the compiler being trained, and its loss terms), batched.py (the
same losses for a whole step in padded passes), loop.py (the optimiser loop, checkpoints,
the compiler file).
"""
