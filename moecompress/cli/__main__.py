"""`python -m moecompress.cli ...` runs the command line."""

from moecompress.cli.main import main

main()
