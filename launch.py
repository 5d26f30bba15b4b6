"""Run an experiment: flags -> config -> run (the command line is `transformer.experiment.cli`).

python launch.py --config experiments/translation.py:base --dry_run
"""

from transformer.experiment import cli

if __name__ == '__main__':
  cli.main()
