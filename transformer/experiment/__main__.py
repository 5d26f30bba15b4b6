"""`python -m transformer.experiment --config <file>[:variant] ...`: the same command line as launch.py."""

from transformer.experiment import cli

if __name__ == '__main__':
  cli.main()
