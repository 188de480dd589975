"""`python -m probekit` runs the command line."""

from probekit.cli import main

main()
