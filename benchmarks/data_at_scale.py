"""Data at scale: prepare and train on a generated corpus of several GB, with each phase in its own process.

    python benchmarks/data_at_scale.py --dir /tmp/big --gb 5      # about 15 min here with the unigram tokenizer

1. Generates `<dir>/corpus/part-*.jsonl` (`{"text": ...}` per line, documents of 1-40 consecutive Bible
   verses in English, French and German, drawn with a fixed seed) and a held-out `<dir>/eval.jsonl`.
2. `launch.py --mode prepare` tokenizes it into `<dir>/store` (the text task's settings, `--tokenizer`):
   the tokenizer's training time, then MB/s of tokenizing, and the peak RSS of any one of its processes.
3. SentencePiece's own batch encoder on the first `--raw_mb` MB of the same text with the store's tokenizer
   and every core's thread: the limit of step 2.
4. The text task's loader reads the store as training does (the `lm` shape: batch 8 x 256 tokens):
   tokens/s of one process, against `launch.py --config experiments/bench.py:lm --mode bench`'s train step.
5. A short training run (`experiments/text.py:tiny` on the store): its peak RSS and `train/data_wait_frac`.

The last line is a JSON object of the figures.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PART_MB = 256


def generate(directory: str, gigabytes: float) -> int:
  """Writes the corpus (unless a complete one is there); returns its size in bytes."""
  from transformer.data import corpora

  corpus = os.path.join(directory, 'corpus')
  done = os.path.join(corpus, 'COMPLETE')
  if os.path.exists(done):
    return int(open(done).read())
  os.makedirs(corpus, exist_ok=True)
  verses = [text for code in ('k', 'l', 'e') for text in corpora.bible_documents(code, 'train', unit='verse')]
  rng = random.Random(0)
  total, part, target = 0, 0, int(gigabytes * 1e9)
  while total < target:
    with open(os.path.join(corpus, f'part-{part:04d}.jsonl'), 'w') as f:
      written = 0
      while written < PART_MB * 1e6 and total + written < target:
        start = rng.randrange(len(verses))
        line = json.dumps({'text': ' '.join(verses[start : start + rng.randint(1, 40)])}) + '\n'
        f.write(line)
        written += len(line.encode())
    total, part = total + written, part + 1
  with open(os.path.join(directory, 'eval.jsonl'), 'w') as f:
    for i in range(200):
      f.write(json.dumps({'text': ' '.join(verses[i * 100 : i * 100 + 10])}) + '\n')
  with open(done, 'w') as f:
    f.write(str(total))
  return total


def watched(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
  """Runs `command`; returns (result, seconds, the peak RSS in GB of any one process of its tree)."""
  start = time.perf_counter()
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
  peak, output = {}, []
  reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
  reader.start()
  root = psutil.Process(process.pid)
  while process.poll() is None:
    try:
      for proc in [root, *root.children(recursive=True)]:
        peak[proc.pid] = max(peak.get(proc.pid, 0), proc.memory_info().rss)
    except psutil.Error:
      pass
    time.sleep(0.1)
  reader.join()
  seconds = time.perf_counter() - start
  result = subprocess.CompletedProcess(command, process.returncode, ''.join(output))
  if result.returncode:
    sys.exit(f'{" ".join(command)} failed:\n{result.stdout[-3000:]}')
  return result, seconds, max(peak.values(), default=0) / 1e9


def text_flags(directory: str, tokenizer: str) -> list[str]:
  return [
    '--config.data.corpus=files',
    f'--config.data.train_files={directory}/corpus/*.jsonl',
    f'--config.data.eval_files={directory}/eval.jsonl',
    f'--config.data.store={directory}/store',
    f'--config.data.tokenizer={tokenizer}',
    '--config.data.vocab_size=8192',
  ]


def raw_encode(directory: str, megabytes: int) -> float:
  """SentencePiece's batch encoder alone, MB/s (the JSON parsing is not timed)."""
  from transformer.data import tokenizer

  tok = tokenizer.load_tokenizer(os.path.join(directory, 'store', 'tokenizer.model'))
  texts, size = [], 0
  with open(os.path.join(directory, 'corpus', 'part-0000.jsonl')) as f:
    for line in f:
      texts.append(json.loads(line)['text'])
      size += len(texts[-1].encode())
      if size > megabytes * 1e6:
        break
  start = time.perf_counter()
  for i in range(0, len(texts), 4096):
    tok.processor.encode(texts[i : i + 4096], out_type=int, num_threads=os.cpu_count())
  return size / 1e6 / (time.perf_counter() - start)


def loader(directory: str, tokenizer: str, batches: int) -> float:
  """Tokens/s of the text task's training iterator over the store (one process, the `lm` batch shape)."""
  from experiments import text
  from transformer.tasks import get_task

  config = text.get_config('tiny')
  for flag in text_flags(directory, tokenizer):
    key, value = flag.removeprefix('--config.data.').split('=', 1)
    config.data[key] = type(config.data[key])(value)
  task = get_task(config)
  iterator = task.train_iter(8)
  next(iterator)
  start, tokens = time.perf_counter(), 0
  for _ in range(batches):
    tokens += int((next(iterator)['targets'] != 0).sum())
  return tokens / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dir', required=True)
  parser.add_argument('--gb', type=float, default=5.0)
  parser.add_argument('--tokenizer', default='unigram', choices=('unigram', 'bpe'))
  parser.add_argument('--raw_mb', type=int, default=200)
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--phase', help=argparse.SUPPRESS)  # a phase run in its own process
  args = parser.parse_args()
  if args.phase == 'raw':
    print(json.dumps({'raw_mb_per_s': raw_encode(args.dir, args.raw_mb)}))
    return
  if args.phase == 'loader':
    print(json.dumps({'loader_tokens_per_s': loader(args.dir, args.tokenizer, 2000)}))
    return

  size = generate(args.dir, args.gb)
  figures = {'corpus_gb': size / 1e9, 'tokenizer': args.tokenizer}
  launch = [sys.executable, 'launch.py', '--config', 'experiments/text.py:tiny', *text_flags(args.dir, args.tokenizer)]
  result, seconds, peak = watched([*launch, '--mode', 'prepare'])
  print(result.stdout[-1500:], flush=True)
  tokenize_s, tokenize_mb_per_s, tokenizer_s = map(
    float, re.search(r'MB read in ([\d.]+) s, ([\d.]+) MB/s; tokenizer ([\d.]+) s', result.stdout).groups()
  )
  figures.update(
    prepare_s=seconds,
    tokenizer_train_s=tokenizer_s,
    tokenize_s=tokenize_s,
    tokenize_mb_per_s=tokenize_mb_per_s,
    prepare_peak_rss_gb=peak,
  )
  me = [sys.executable, os.path.abspath(__file__), '--dir', args.dir, '--tokenizer', args.tokenizer]
  for phase in ('raw', 'loader'):
    result, _, peak = watched([*me, '--phase', phase, '--raw_mb', str(args.raw_mb)])
    figures.update(json.loads(result.stdout.strip().splitlines()[-1]), **{f'{phase}_peak_rss_gb': peak})
  result, _, _ = watched([sys.executable, 'launch.py', '--config', 'experiments/bench.py:lm', '--mode', 'bench'])
  figures['lm_step_tokens_per_s'] = json.loads(result.stdout.strip().splitlines()[-1])['tokens_per_sec']
  figures['loader_over_lm_step'] = figures['loader_tokens_per_s'] / figures['lm_step_tokens_per_s']
  workdir = os.path.join(args.dir, 'run')
  flags = [f'--config.train.num_steps={args.steps}', '--config.train.eval_every=100000', f'--workdir={workdir}']
  _, seconds, peak = watched([*launch, *flags, '--config.train.log_every=20', '--config.train.num_samples=0'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    waits = [row['train/data_wait_frac'] for row in map(json.loads, f) if 'train/data_wait_frac' in row]
  figures.update(train_s=seconds, train_peak_rss_gb=peak, train_data_wait_frac_max=max(waits))
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
