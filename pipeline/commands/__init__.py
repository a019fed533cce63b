"""The commands: each a thin function from its config to the library; `cli.py` makes their flags.

Each imports the library inside its body, not at the top of its module: importing torch, transformers
and mlflow takes 5-7 s on 2 cores (measured: torch 2.0 s, mlflow 2.1 s, accelerate 1.9 s, transformers
1.4 s), and `--help` or a bad flag value should answer at once. No command module imports another.
"""
