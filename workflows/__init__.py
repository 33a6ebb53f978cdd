"""The command-line programs: `python workflows/<name>.py` or the `lits-<name>` entry points."""
