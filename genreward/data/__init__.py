"""Dataset converters into the JSONL formats the trainers read (e.g. judge training rows)."""
