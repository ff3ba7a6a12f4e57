"""One module per lesson (``l01.py``, ``l03b.py``, ...) holding that lesson's exercise checks."""
