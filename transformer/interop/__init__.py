"""Checkpoints of other libraries in and out: Hugging Face directories (`hf.py`, one mapping module per family:
`gpt2.py`, `llama.py`, `marian.py`), `config.train.init_from` (`init.py`) and `--mode export` (`export.py`).

Nothing here imports PyTorch or `transformers`: the files are read and written with `safetensors`' NumPy API."""
