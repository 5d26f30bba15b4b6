"""`--mode prepare`: tokenize the text task's training corpus once into the token store it trains on
(`transformer.data.store`): config.data.store, or the cache's store when that is ''. Resumes an interrupted
prepare; logs a line per shard and prints a summary. No JAX."""

from transformer.config import ConfigError


def run_prepare(config) -> dict:
  """Builds (or finishes) the store; returns the summary it prints."""
  if config.get('task') != 'text':
    raise ConfigError(
      f"--mode prepare builds the token store of config.task='text'; this config's task is {config.get('task')!r}: "
      'give a text config, e.g. --config experiments/text.py:tiny.'
    )
  from transformer.tasks import common, text

  common.check_ignored(config)
  summary = text.prepare_store(config, log=lambda line: print(line, flush=True))
  print(
    f'Token store {summary["path"]}: {summary["documents"]:,} documents, {summary["tokens"]:,} tokens in '
    f'{summary["shards"]} shards ({summary["shards_prepared"]} prepared now: {summary["mb_read"]:.1f} MB read in '
    f'{summary["seconds"]:.1f} s, {summary["mb_per_s"]:.1f} MB/s; tokenizer {summary["tokenizer_s"]:.1f} s); '
    f'fingerprint {summary["fingerprint"]}',
    flush=True,
  )
  return summary
