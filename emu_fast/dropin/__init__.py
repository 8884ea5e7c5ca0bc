"""The drop-in: emu_fast.accelerate(model) and what it needs to read a user's model.

- accelerate.py: swapping a model's generate_image for the KV-cached path;
- families.py: everything that differs between the Emu model classes;
- prompts.py: prompts to the decoder's inputs;
- walk.py: the model walker (where the LLaMA and its projections are);
- model_checks.py: what emu_fast can run, checked before anything is packed;
- packing.py: the decoder layers' weights stacked in place (float or quantized);
- segments.py: where a split model's layers run.
"""
