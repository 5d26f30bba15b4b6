"""The README and docs/ stay true to the repository: their links resolve, the experiment files, variants,
source paths and imports they name exist, and the README's test command is the one CI runs.

No JAX computation: experiment files are imported by path and only their `get_config(variant)` is called."""

import importlib
import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

from transformer.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]

_FENCE = re.compile(r'^\s*(```|~~~)')
_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
_INLINE_CODE = re.compile(r'`[^`]*`')
_EXPERIMENT = re.compile(r'(?<![\w/.])(experiments/[\w/]+\.py)(?::(\w+))?')
_SOURCE = re.compile(r'(?<![\w/.])((?:transformer|tests|benchmarks|scripts)/[\w/]+\.(?:py|sh))\b')
_FROM_IMPORT = re.compile(r'\bfrom (transformer(?:\.\w+)*) import ([\w, ]+)')
_RUN_MODULE = re.compile(r'python3? -m (transformer(?:\.\w+)*)')
_DOTTED = re.compile(r'(?<![\w.])(\w+(?:\.\w+)+)')
# `train.num_steps`, `config.model`, `metrics.jsonl`: config paths and file names, not a module's attributes.
_NOT_MODULES = {'config', 'train', 'data', 'model', 'bench'}
_FILE_SUFFIXES = {'py', 'sh', 'md', 'json', 'jsonl', 'csv', 'png', 'txt', 'mid'}


def prose_lines(text: str):
  """(line number, line) outside fenced code blocks."""
  in_fence = False
  for number, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      in_fence = not in_fence
    elif not in_fence:
      yield number, line


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`), spaces to `-`."""
  text = _INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
  kept = ''.join(c for c in text if c in ' -_' or unicodedata.category(c)[0] in 'LN')
  return kept.replace(' ', '-')


def anchors(path: Path) -> set[str]:
  """The anchors of a Markdown file's headings, with GitHub's -1, -2 suffixes for repeated ones."""
  seen, result = {}, set()
  for _, line in prose_lines(path.read_text()):
    match = re.match(r'#{1,6} (.+)', line)
    if match:
      base = slug(match.group(1))
      count = seen.get(base, 0)
      seen[base] = count + 1
      result.add(base if count == 0 else f'{base}-{count}')
  return result


def broken_links(path: Path, root: Path = REPO) -> list[str]:
  """Relative links in `path` whose file, or whose anchor in that file, does not exist (named from `root`)."""
  problems = []
  for number, line in prose_lines(path.read_text()):
    for target in _LINK.findall(_INLINE_CODE.sub('', line)):
      if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, mailto:, ...: not a file of this repository
        continue
      file_part, _, anchor = target.partition('#')
      linked = (path.parent / file_part).resolve() if file_part else path
      where = f'{path.relative_to(root)}:{number}: {target}'
      if not linked.exists():
        problems.append(f'{where}: no such file')
      elif anchor and (linked.suffix != '.md' or anchor not in anchors(linked)):
        problems.append(f'{where}: no heading with anchor #{anchor}')
  return problems


def named(pattern: re.Pattern, paths=DOCS) -> dict[tuple, str]:
  """Each match of `pattern` in the files (code blocks included), with the first place it occurs."""
  found = {}
  for path in paths:
    for number, line in enumerate(path.read_text().splitlines(), 1):
      for match in pattern.finditer(line):
        found.setdefault(match.groups(), f'{path.relative_to(REPO)}:{number}')
  return found


def defines(file: Path, name: str) -> bool:
  """Whether a module's source defines `name` at its top level or in a class (def, class or assignment)."""
  return re.search(rf'^\s*(?:def|class) {name}\b|^{name}\s*[:=]', file.read_text(), re.M) is not None


def module_file(dotted: str, root: Path = REPO) -> Path | None:
  """transformer/a/b.py or transformer/a/b/__init__.py for `transformer.a.b`; None when neither exists."""
  base = root.joinpath(*dotted.split('.'))
  for file in (base.with_suffix('.py'), base / '__init__.py'):
    if file.is_file():
      return file
  return None


def undefined_names(text: str, root: Path = REPO) -> list[str]:
  """Dotted names in `text` that the code does not define: `transformer.a.b[.name]` (a module, then at most
  one name defined in it) and `module.name` for a module of transformer/ (`decoding.generate`)."""
  modules = {}
  for file in sorted((root / 'transformer').rglob('*.py')):
    modules.setdefault(file.parent.name if file.stem == '__init__' else file.stem, []).append(file)
  problems = []
  for dotted in dict.fromkeys(_DOTTED.findall(text)):
    parts = dotted.split('.')
    if parts[-1] in _FILE_SUFFIXES:
      continue
    if parts[0] == 'transformer':
      found = next((n for n in range(len(parts), 0, -1) if module_file('.'.join(parts[:n]), root)), 0)
      rest = parts[found:]
      if len(rest) > 1 or (rest and not defines(module_file('.'.join(parts[:found]), root), rest[0])):
        problems.append(dotted)
    elif parts[0] in modules and parts[0] not in _NOT_MODULES:
      if not any(defines(file, parts[1]) for file in modules[parts[0]]):
        problems.append(dotted)
  return problems


def load_config(file: Path, variant: str | None):
  """`get_config(variant)` of an experiment file, imported by path (no process, no flags)."""
  spec = importlib.util.spec_from_file_location(f'docs_check_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_links_in_readme_and_docs_resolve():
  assert [problem for path in DOCS for problem in broken_links(path)] == []


def test_link_check_reports_a_missing_file_and_a_missing_anchor(tmp_path):
  (tmp_path / 'other.md').write_text('# Fault tolerance\n\n## `config.train` keys\n\n## Results\n\n## Results\n')
  page = tmp_path / 'page.md'
  page.write_text(
    '# Page\n'
    '[ok](other.md#fault-tolerance) [ok](other.md#configtrain-keys) [ok](other.md#results-1) [ok](#page)\n'
    '[gone](missing.md) [bad anchor](other.md#results-2) [web](https://example.org/x.md) `[code](nowhere.md)`\n'
    '```\n[in a code block](nowhere.md)\n```\n'
  )
  assert broken_links(page, root=tmp_path) == [
    'page.md:3: missing.md: no such file',
    'page.md:3: other.md#results-2: no heading with anchor #results-2',
  ]


def test_experiment_files_and_variants_named_in_the_docs_exist(monkeypatch):
  monkeypatch.chdir(REPO)  # sweep files name their base experiment relative to the working directory
  experiments = named(_EXPERIMENT)
  assert ('experiments/translation.py', 'tiny') in experiments  # the quickstart's experiment is checked
  problems = []
  for (file, variant), where in sorted(experiments.items(), key=lambda item: (item[0][0], item[0][1] or '')):
    if not (REPO / file).is_file():
      problems.append(f'{where}: {file} does not exist')
      continue
    try:
      load_config(REPO / file, variant)
    except ConfigError as error:
      problems.append(f'{where}: {file}:{variant}: {error}')
  assert problems == []


def test_an_unknown_variant_is_refused():
  with pytest.raises(
    ConfigError, match="Unknown variant 'huge' of experiments/text.py: choose one of tiny, short, small"
  ):
    load_config(REPO / 'experiments/text.py', 'huge')


def test_source_paths_named_in_the_docs_exist():
  paths = named(_SOURCE)
  assert ('transformer/decoding.py',) in paths
  assert [f'{where}: {path}' for (path,), where in sorted(paths.items()) if not (REPO / path).is_file()] == []


def test_imports_and_modules_named_in_the_docs_exist():
  problems = []
  for (module_name, names), where in sorted(named(_FROM_IMPORT).items()):
    module = importlib.import_module(module_name)
    for name in (n.strip() for n in names.split(',') if n.strip()):
      if not hasattr(module, name) and importlib.util.find_spec(f'{module_name}.{name}') is None:
        problems.append(f'{where}: from {module_name} import {name}')
  for (module_name,), where in sorted(named(_RUN_MODULE).items()):
    if importlib.util.find_spec(f'{module_name}.__main__') is None:
      problems.append(f'{where}: python -m {module_name} has no __main__')
  assert problems == []


def test_functions_and_modules_named_in_the_docs_exist():
  assert {path.name: undefined_names(path.read_text()) for path in DOCS} == {path.name: [] for path in DOCS}


def test_name_check_reports_what_the_code_does_not_define():
  text = (
    '`decoding.generate` `decoding.no_such_loop` `transformer.experiment.cli.main` `transformer.experiment.nothing`'
    ' `transformer.config.ModelConfig.extra` `metrics.jsonl` `train.num_steps` `jax.nn.dot_product_attention`'
  )
  assert undefined_names(text) == [
    'decoding.no_such_loop',
    'transformer.experiment.nothing',
    'transformer.config.ModelConfig.extra',
  ]


def test_readme_test_command_is_what_ci_runs():
  ci_commands = [line for line in (REPO / '.ci/run').read_text().splitlines() if line.strip()]
  readme = (REPO / 'README.md').read_text().splitlines()
  readme_commands = [line for line in readme if line.startswith('python3 -m venv') and 'pytest' in line]
  assert readme_commands == [ci_commands[-1]]


# The README is the front door and docs/performance.md the reference of today's figures: what outgrows them moves
# into the docs (dated history to docs/performance-history.md, long explanations to the doc of their topic).
SIZE_LIMITS = {
  'README.md': (12 * 1024, 'docs/*.md (findings to docs/findings.md, history to docs/performance-history.md)'),
  'docs/performance.md': (20 * 1024, 'docs/performance-history.md (dated results, per-change narratives, profiles)'),
}


def oversized(sizes: dict[str, int], limits=SIZE_LIMITS) -> list[str]:
  """A message for each file whose size in bytes exceeds its limit, naming the file, both sizes and where the
  excess belongs."""
  return [
    f'{name} is {sizes[name]:,} bytes, {sizes[name] - limit:,} over its limit of {limit:,}: move the excess into '
    f'{destination}'
    for name, (limit, destination) in limits.items()
    if sizes[name] > limit
  ]


def test_readme_and_performance_doc_stay_within_their_size_limits():
  assert oversized({name: (REPO / name).stat().st_size for name in SIZE_LIMITS}) == []


def test_size_check_names_the_file_its_size_the_limit_and_where_the_excess_goes():
  assert oversized({'README.md': 12 * 1024, 'docs/performance.md': 20 * 1024 + 1}) == [
    'docs/performance.md is 20,481 bytes, 1 over its limit of 20,480: move the excess into '
    'docs/performance-history.md (dated results, per-change narratives, profiles)'
  ]
