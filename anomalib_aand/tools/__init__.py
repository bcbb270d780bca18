"""User tools with `python -m` entry points: demo data (`tools.demo`) and edge inference (`tools.infer`)."""
