"""Quality measures: exact per-mode Fréchet distance on mixtures (mixture.py) and the digits
classifier metric (digits.py)."""
