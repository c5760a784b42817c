"""The CLI's commands, grouped by what they work on; cli/main.py wires them into one typer app."""
