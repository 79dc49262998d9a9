"""`python -m distsgd ...`, also how torchrun starts it: `torchrun ... -m distsgd train`."""

from distsgd.cli import entry

entry()
